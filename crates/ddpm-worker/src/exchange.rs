//! Moving the trainer's flat buffers through a [`Comm`]: the size-weighted gradient
//! average of a data-parallel step, in buckets, and the start-of-training broadcast of the
//! parameters from rank 0.
//!
//! The buffers go through the collective where they are: a CUDA buffer in place on the
//! device when the collective has device operations (NCCL, [`Comm::device`]), otherwise as
//! a host slice (a CPU tensor's own storage, or a host copy of any other).

use crate::comm::{Comm, DeviceCollective};
use crate::error::{ensure, Result};
use ddpm_collective::ReduceOp;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// Runs `f` on the elements of the float32 tensor `t` as a host slice, writing the slice's
/// changes back. A contiguous CPU tensor is used in place; any other goes through a copy.
///
/// # Safety
///
/// While `f` runs, nothing else may read or write `t`'s storage: no other thread, and not
/// `f` itself through another handle of the tensor. The trainer's flat buffers qualify:
/// only the training thread, which is the caller, touches them.
unsafe fn with_host_slice<R>(t: &Tensor, f: impl FnOnce(&mut [f32]) -> Result<R>) -> Result<R> {
    ensure!(
        t.kind() == Kind::Float,
        "expected a float32 buffer, got {:?}",
        t.kind()
    );
    let n = t.numel();
    if n == 0 {
        return f(&mut []);
    }
    if t.device() == Device::Cpu && t.is_contiguous() {
        // SAFETY: `t` is a contiguous float32 CPU tensor of `n` > 0 elements, so its data
        // pointer is valid for `n` floats; the caller guarantees that nothing else accesses
        // the storage while the slice lives.
        let slice = unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, n) };
        return f(slice);
    }
    let mut host = vec![0f32; n];
    t.to_device(Device::Cpu)
        .contiguous()
        .view([-1])
        .copy_data(&mut host, n);
    let r = f(&mut host)?;
    let mut dst = t.shallow_clone();
    tch::no_grad(|| dst.copy_(&Tensor::from_slice(&host).view(t.size().as_slice())));
    Ok(r)
}

/// The device address of the float32 CUDA tensor `t` for `dev`'s device operations, and its
/// length; an error when `t` is not a contiguous float32 buffer on `dev`'s device.
fn device_buffer(dev: &dyn DeviceCollective, t: &Tensor, what: &str) -> Result<(u64, usize)> {
    ensure!(
        t.kind() == Kind::Float && t.is_contiguous(),
        "{what}: expected a contiguous float32 buffer, got {:?} (contiguous: {})",
        t.kind(),
        t.is_contiguous()
    );
    ensure!(
        t.device() == Device::Cuda(dev.device_ordinal()),
        "{what}: the buffer is on {:?}, the collective on CUDA device {}",
        t.device(),
        dev.device_ordinal()
    );
    Ok((t.data_ptr() as u64, t.numel()))
}

/// All-reduces (sums) the CUDA buffer `t` in place on the device, in buckets of `bucket`
/// elements, on the legacy default stream: after the kernels that wrote it, before the ones
/// queued after the call.
///
/// # Safety
///
/// Nothing else may access `t`'s storage during the call (as for `with_host_slice`).
unsafe fn all_reduce_on_device(
    dev: &mut dyn DeviceCollective,
    t: &Tensor,
    bucket: usize,
    step: u64,
) -> Result<()> {
    let (ptr, n) = device_buffer(dev, t, &format!("the gradient all-reduce at step {step}"))?;
    let buckets = n.div_ceil(bucket);
    for i in 0..buckets {
        let start = i * bucket;
        let len = bucket.min(n - start);
        let at = ptr + (start * std::mem::size_of::<f32>()) as u64;
        // SAFETY: `at` and `len` lie within `t`'s contiguous float32 storage on the
        // collective's device (checked by device_buffer); the caller guarantees that
        // nothing else uses it meanwhile.
        unsafe {
            dev.device_all_reduce_sum(
                at,
                len,
                &format!("gradient bucket {}/{buckets} at step {step}", i + 1),
            )?
        };
    }
    Ok(())
}

/// What the ranks' step came to.
#[derive(Debug, Clone, Copy)]
pub struct Averaged {
    /// Examples over all ranks (0: every rank's batch was empty; nothing to update).
    pub examples: u64,
    /// The loss averaged over those examples.
    pub loss: f64,
    /// Seconds spent in the collective.
    pub seconds: f64,
}

/// Averages gradients over the ranks, weighting each rank by its examples.
pub struct GradientExchange {
    bucket_elems: usize,
    spent: Duration,
}

impl GradientExchange {
    /// All-reduces in buckets of about `bucket_mb` MiB.
    pub fn new(bucket_mb: usize) -> Self {
        Self {
            bucket_elems: (bucket_mb.max(1) << 20) / std::mem::size_of::<f32>(),
            spent: Duration::ZERO,
        }
    }

    /// Seconds spent in collectives so far.
    pub fn spent(&self) -> Duration {
        self.spent
    }

    /// Turns this rank's mean-loss gradients `grads` over `examples` examples (zeroes and 0
    /// for an empty batch) into the mean over every rank's examples, in place, and returns
    /// the total and the mean loss. Each rank's gradient is scaled by its count before the
    /// sum, so unequal shares of the global batch weigh what they hold.
    ///
    /// The example counts and losses are summed as a host array. The gradient buffer is
    /// summed in place on the device when it is a CUDA tensor and `comm` has device
    /// operations (NCCL), otherwise as a host slice; the scaling before and after is the
    /// same libtorch operations on the buffer either way.
    pub fn average(
        &mut self,
        comm: &mut dyn Comm,
        grads: &Tensor,
        loss: f64,
        examples: usize,
        step: u64,
    ) -> Result<Averaged> {
        let started = Instant::now();
        let mut totals = [(loss * examples as f64) as f32, examples as f32];
        comm.all_reduce(
            &mut totals,
            ReduceOp::Sum,
            &format!("the example count at step {step}"),
        )?;
        let total = totals[1].round() as u64;
        if total > 0 {
            let mut g = grads.shallow_clone();
            tch::no_grad(|| {
                let _ = g.g_mul_scalar_(examples as f64);
            });
            let bucket = self.bucket_elems;
            match (grads.device(), comm.device()) {
                (Device::Cuda(_), Some(dev)) => {
                    // SAFETY: the gradient buffer is the training thread's, and `g` is not
                    // used until the call returns.
                    unsafe { all_reduce_on_device(dev, grads, bucket, step) }?
                }
                // SAFETY: the gradient buffer is the training thread's; `g` is not used in `f`.
                _ => unsafe {
                    with_host_slice(grads, |buf| {
                        let buckets = buf.len().div_ceil(bucket);
                        for (i, chunk) in buf.chunks_mut(bucket).enumerate() {
                            comm.all_reduce(
                                chunk,
                                ReduceOp::Sum,
                                &format!("gradient bucket {}/{buckets} at step {step}", i + 1),
                            )?;
                        }
                        Ok(())
                    })?
                },
            }
            tch::no_grad(|| {
                let _ = g.g_mul_scalar_(1.0 / total as f64);
            });
        }
        let seconds = started.elapsed();
        self.spent += seconds;
        Ok(Averaged {
            examples: total,
            loss: if total > 0 {
                totals[0] as f64 / total as f64
            } else {
                0.0
            },
            seconds: seconds.as_secs_f64(),
        })
    }
}

/// Copies rank 0's `t` to every rank (the parameters at the start of training, so every
/// rank starts from the same point whatever it loaded): in place on the device when `t` is
/// a CUDA tensor and `comm` has device operations (NCCL), otherwise as a host slice.
///
/// # Safety
///
/// Nothing else may access `t`'s storage during the call (see `with_host_slice`).
pub unsafe fn broadcast_from_rank0(comm: &mut dyn Comm, t: &Tensor, what: &str) -> Result<()> {
    if let (Device::Cuda(_), Some(dev)) = (t.device(), comm.device()) {
        let (ptr, n) = device_buffer(dev, t, what)?;
        // SAFETY: `ptr` is `t`'s contiguous float32 storage of `n` values on the
        // collective's device (checked by device_buffer); nothing else uses it meanwhile
        // (the caller's guarantee).
        unsafe { dev.device_broadcast(ptr, n, 0, what) }?;
        return Ok(());
    }
    // SAFETY: forwarded to the caller.
    unsafe { with_host_slice(t, |buf| Ok(comm.broadcast(buf, 0, what)?)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ddpm_collective::tcp::{RingOptions, TcpRing};
    use std::net::TcpListener;

    fn ring(world: usize) -> Vec<TcpRing> {
        let listeners: Vec<TcpListener> = (0..world)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let peers: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let peers = peers.clone();
                std::thread::spawn(move || {
                    TcpRing::connect(r, l, &peers, RingOptions::default()).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn unequal_and_empty_shares_average_by_example_count() {
        // Three ranks holding 3, 1 and 0 examples; the mean over all 4 examples is what one
        // process with the whole batch computes. Small buckets: several per buffer.
        let rings = ring(3);
        let n = 1003usize;
        let per_example = |r: usize, i: usize| (r * 1000 + i) as f32 * 0.001;
        let counts = [3usize, 1, 0];
        let handles: Vec<_> = rings
            .into_iter()
            .enumerate()
            .map(|(r, mut comm)| {
                std::thread::spawn(move || {
                    let local: Vec<f32> = (0..n).map(|i| per_example(r, i)).collect();
                    let grads = Tensor::from_slice(&local);
                    let mut ex = GradientExchange {
                        bucket_elems: 100,
                        spent: Duration::ZERO,
                    };
                    let a = ex
                        .average(&mut comm, &grads, r as f64 + 1.0, counts[r], 7)
                        .unwrap();
                    (a, Vec::<f32>::try_from(&grads).unwrap())
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for (a, g) in &results {
            assert_eq!(a.examples, 4);
            assert!(
                (a.loss - (3.0 * 1.0 + 2.0) / 4.0).abs() < 1e-6,
                "{}",
                a.loss
            );
            for (i, v) in g.iter().enumerate() {
                let want = (3.0 * per_example(0, i) + per_example(1, i)) / 4.0;
                assert!(
                    (v - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "{i}: {v} vs {want}"
                );
            }
        }
        assert_eq!(
            results[0].1, results[2].1,
            "every rank ends with the same gradient"
        );
    }

    #[test]
    fn when_no_rank_has_examples_nothing_is_averaged() {
        let mut rings = ring(2);
        let b = rings.pop().unwrap();
        let h = std::thread::spawn(move || {
            let mut b = b;
            let g = Tensor::zeros([10], (Kind::Float, Device::Cpu));
            GradientExchange::new(1)
                .average(&mut b, &g, 0.0, 0, 1)
                .unwrap()
        });
        let mut a = rings.pop().unwrap();
        let g = Tensor::zeros([10], (Kind::Float, Device::Cpu));
        let got = GradientExchange::new(1)
            .average(&mut a, &g, 0.0, 0, 1)
            .unwrap();
        assert_eq!((got.examples, h.join().unwrap().examples), (0, 0));
    }

    #[test]
    fn broadcast_gives_every_rank_rank_zeros_values() {
        let rings = ring(2);
        let handles: Vec<_> = rings
            .into_iter()
            .enumerate()
            .map(|(r, mut comm)| {
                std::thread::spawn(move || {
                    let t = Tensor::full([5], r as f64 + 2.0, (Kind::Float, Device::Cpu));
                    // SAFETY: `t` is this thread's own tensor.
                    unsafe { broadcast_from_rank0(&mut comm, &t, "test") }.unwrap();
                    Vec::<f32>::try_from(&t).unwrap()
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), vec![2.0; 5]);
        }
    }
}
