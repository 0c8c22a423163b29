//! Trainer behaviour: flat buffers, Adam equal to libtorch's, loss going down, determinism,
//! and weight snapshots.

use ddpm_config::Config;
use ddpm_trainer::{load_model, save_weights_dir, Trainer};
use tch::nn::OptimizerConfig;
use tch::{nn, Device, Kind, Tensor};

fn tiny_config(extra: &str) -> Config {
    let text = format!(
        "[run]\nseed = 5\n[data]\nresolution = 16\nchannels = 1\nrandom_flip = false\n\
         [model]\nch = 32\nch_mult = [1, 2]\nnum_res_blocks = 1\nattn_resolutions = [8]\ndropout = 0.0\n\
         [train]\nbatch_size = 16\nlr = 0.001\nwarmup_steps = 10\ngrad_clip = 1.0\nema_decay = 0.99\nthreads = 1\n{extra}"
    );
    Config::parse(&text, "tiny").unwrap()
}

/// 16 grey 16x16 images with simple structure (bars and blocks), in [-1, 1].
fn images() -> Tensor {
    let mut v = vec![-1f32; 16 * 16 * 16];
    for n in 0..16 {
        for y in 0..16 {
            for x in 0..16 {
                let on = match n % 4 {
                    0 => (x / 4) % 2 == n / 4 % 2,
                    1 => (y / 4) % 2 == 0,
                    2 => x > 3 + n / 4 && x < 12 && y > 3 && y < 12,
                    _ => (x + y) % 8 < 4,
                };
                if on {
                    v[n * 256 + y * 16 + x] = 1.0;
                }
            }
        }
    }
    Tensor::from_slice(&v).view([16, 1, 16, 16])
}

/// libtorch's generator is process-global and the test harness runs tests on threads:
/// every test that trains holds this lock.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

fn bits(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
}

#[test]
fn gradients_accumulate_into_the_flat_buffer() {
    let _rng = rng_lock();
    // No clipping, so the flat gradient after a step is the raw gradient of the loss.
    let mut cfg = tiny_config("");
    cfg.train.grad_clip = 0.0;
    let mut tr = Trainer::new(&cfg, Device::Cpu).unwrap();

    // The same network, not flattened, with the same initial values.
    let vs = nn::VarStore::new(Device::Cpu);
    let net = ddpm_unet::UNet::new(&vs.root(), &ddpm_unet::UNetConfig::from_config(&cfg)).unwrap();
    tch::no_grad(|| {
        let src = tr.model().0.variables();
        for (name, mut v) in vs.variables() {
            v.copy_(&src[&name]);
        }
    });

    let x0 = images();
    tr.step(&x0).unwrap();
    // Replay the step's randomness (t, then noise) on the plain network.
    tch::manual_seed(tr.step_seed(0));
    let t = Tensor::randint(1000, [16], (Kind::Int64, Device::Cpu));
    let noise = Tensor::randn_like(&x0);
    let loss = tr
        .diffusion()
        .training_losses(|x, t| net.forward_t(x, t, true), &x0, &t, &noise)
        .mean(Kind::Float);
    loss.backward();

    let (flat, _) = tr.flat();
    flat.check_views(tr.model().0).unwrap();
    let plain = vs.variables();
    for slot in &flat.slots {
        let ours = flat.grads.narrow(0, slot.offset, slot.numel());
        let want = plain[&slot.name].grad().reshape([-1]);
        let diff = (&ours - &want).abs().max().double_value(&[]);
        assert!(
            diff <= 1e-6,
            "{}: flat gradient differs from autograd's by {diff:e}",
            slot.name
        );
    }
    assert!(flat.grads.abs().sum(Kind::Float).double_value(&[]) > 0.0);
}

#[test]
fn adam_steps_match_libtorchs_adam() {
    let _rng = rng_lock();
    // No warmup, no clipping: fed the same gradients, our flat Adam must take the same
    // steps as libtorch's torch::optim::Adam on separate tensors.
    let mut cfg = tiny_config("");
    cfg.train.warmup_steps = 0;
    cfg.train.grad_clip = 0.0;
    let mut tr = Trainer::new(&cfg, Device::Cpu).unwrap();

    let vs = nn::VarStore::new(Device::Cpu);
    ddpm_unet::UNet::new(&vs.root(), &ddpm_unet::UNetConfig::from_config(&cfg)).unwrap();
    let mut reference: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    reference.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        let src = tr.model().0.variables();
        for (name, v) in reference.iter_mut() {
            v.copy_(&src[name]);
        }
    });
    let zero = reference
        .iter()
        .map(|(_, v)| v.sum(Kind::Float) * 0.0)
        .fold(Tensor::from(0f32), |a, b| a + b);
    zero.backward();
    let mut opt = nn::Adam::default().build(&vs, cfg.train.lr).unwrap();
    let x0 = images();
    for _ in 0..3 {
        tr.step(&x0).unwrap();
        let ours = tr.model().0.variables();
        tch::no_grad(|| {
            for (name, v) in &reference {
                v.grad().copy_(&ours[name].grad());
            }
        });
        opt.step();
    }
    let ours = tr.model().0.variables();
    let mut worst = 0f64;
    for (name, v) in &reference {
        let scale = v.abs().max().double_value(&[]).max(1e-3);
        worst = worst.max((&ours[name] - v).abs().max().double_value(&[]) / scale);
    }
    assert!(
        worst < 1e-5,
        "parameters differ from libtorch Adam by {worst:e} (relative)"
    );
}

#[test]
fn two_hundred_steps_on_sixteen_images_cut_the_loss() {
    let _rng = rng_lock();
    let cfg = tiny_config("");
    let mut tr = Trainer::new(&cfg, Device::Cpu).unwrap();
    let x0 = images();
    let mut losses = Vec::new();
    for _ in 0..200 {
        losses.push(tr.step(&x0).unwrap().loss.double_value(&[]));
    }
    let first: f64 = losses[..20].iter().sum::<f64>() / 20.0;
    let last: f64 = losses[180..].iter().sum::<f64>() / 20.0;
    assert!(
        last < 0.5 * first,
        "mean loss of the first 20 steps {first:.4}, of the last 20 {last:.4}"
    );
    assert_eq!(tr.global_step(), 200);
}

#[test]
fn two_runs_with_one_seed_are_bitwise_identical() {
    let _rng = rng_lock();
    let mut cfg = tiny_config("");
    cfg.model.dropout = 0.1;
    let run = || {
        let mut tr = Trainer::new(&cfg, Device::Cpu).unwrap();
        for _ in 0..15 {
            tr.step(&images()).unwrap();
        }
        let (flat, ema) = tr.flat();
        (bits(&flat.params), bits(ema))
    };
    let a = run();
    let b = run();
    assert!(
        a.0 == b.0,
        "parameters differ between two runs with one seed"
    );
    assert!(a.1 == b.1, "EMA differs between two runs with one seed");
    let mut other = cfg.clone();
    other.run.seed += 1;
    let mut tr = Trainer::new(&other, Device::Cpu).unwrap();
    for _ in 0..15 {
        tr.step(&images()).unwrap();
    }
    assert!(
        bits(&tr.flat().0.params) != a.0,
        "a different seed must give different parameters"
    );
}

#[test]
fn snapshots_reload_into_an_identical_sampling_model() {
    let _rng = rng_lock();
    let cfg = tiny_config("");
    let mut tr = Trainer::new(&cfg, Device::Cpu).unwrap();
    for _ in 0..3 {
        tr.step(&images()).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let (mvs, _) = tr.model();
    let (evs, enet) = tr.ema_model();
    save_weights_dir(dir.path(), &cfg, mvs, evs).unwrap();
    let saved = Config::from_file(dir.path().join("config.toml")).unwrap();
    assert_eq!(saved, cfg);
    let (_vs, net, _) =
        load_model(&saved, &dir.path().join("ema.safetensors"), Device::Cpu).unwrap();
    let x = Tensor::randn([2, 1, 16, 16], (Kind::Float, Device::Cpu));
    let t = Tensor::from_slice(&[3i64, 700]);
    let a = tch::no_grad(|| enet.forward_t(&x, &t, false));
    let b = tch::no_grad(|| net.forward_t(&x, &t, false));
    assert!(a.equal(&b));
}

#[test]
fn a_batch_of_the_wrong_shape_is_rejected_with_the_expected_shape() {
    let _rng = rng_lock();
    let mut tr = Trainer::new(&tiny_config(""), Device::Cpu).unwrap();
    let err = tr
        .step(&Tensor::zeros([2, 3, 16, 16], (Kind::Float, Device::Cpu)))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("expected [B, 1, 16, 16], got [2, 3, 16, 16]"),
        "{err}"
    );
}

#[test]
fn resume_from_exported_state_is_bitwise_exact() {
    let _rng = rng_lock();
    let mut cfg = tiny_config("");
    cfg.model.dropout = 0.1;
    let x0 = images();
    let state = |tr: &Trainer| {
        let (flat, ema) = tr.flat();
        let (m, v) = tr.adam_moments();
        (bits(&flat.params), bits(ema), bits(m), bits(v))
    };

    let mut straight = Trainer::new(&cfg, Device::Cpu).unwrap();
    for _ in 0..20 {
        straight.step(&x0).unwrap();
    }

    let mut first = Trainer::new(&cfg, Device::Cpu).unwrap();
    for _ in 0..10 {
        first.step(&x0).unwrap();
    }
    let blobs: Vec<(String, Vec<u8>)> = first
        .export_state()
        .unwrap()
        .into_iter()
        .map(|(n, b)| (n.to_string(), b))
        .collect();
    drop(first);
    // The restore must overwrite every parameter: start from garbage.
    let mut resumed = Trainer::new(&cfg, Device::Cpu).unwrap();
    tch::no_grad(|| {
        let _ = resumed.flat().0.params.shallow_clone().fill_(0.5);
    });
    resumed.import_state(&blobs, 10).unwrap();
    assert_eq!(resumed.global_step(), 10);
    for _ in 0..10 {
        resumed.step(&x0).unwrap();
    }
    assert!(
        state(&straight) == state(&resumed),
        "20 steps straight != 10 + restore + 10"
    );
}

#[test]
fn a_state_that_does_not_match_the_model_is_named() {
    let _rng = rng_lock();
    let tr = Trainer::new(&tiny_config(""), Device::Cpu).unwrap();
    let mut blobs: Vec<(String, Vec<u8>)> = tr
        .export_state()
        .unwrap()
        .into_iter()
        .map(|(n, b)| (n.to_string(), b))
        .collect();
    let mut bigger = tiny_config("");
    bigger.model.ch = 64;
    let mut other = Trainer::new(&bigger, Device::Cpu).unwrap();
    let err = other.import_state(&blobs, 1).unwrap_err().to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("expected Float"),
        "{err}"
    );
    blobs.retain(|(n, _)| n != "optimizer.safetensors");
    let mut same = Trainer::new(&tiny_config(""), Device::Cpu).unwrap();
    let err = same.import_state(&blobs, 1).unwrap_err().to_string();
    assert!(
        err.contains("optimizer.safetensors") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn a_snapshot_is_isolated_from_later_steps() {
    let _rng = rng_lock();
    let cfg = tiny_config("");
    let x0 = images();
    let mut tr = Trainer::new(&cfg, Device::Cpu).unwrap();
    tr.step(&x0).unwrap();
    let now = tr.export_state().unwrap();
    let pool = ddpm_trainer::SnapshotPool::default();
    let snap = tr.snapshot(&pool);
    assert_eq!(snap.step(), 1);
    // Training goes on while the snapshot waits for the uploader thread.
    tr.step(&x0).unwrap();
    let later = std::thread::spawn(move || snap.into_blobs().unwrap())
        .join()
        .unwrap();
    assert_eq!(now, later);
    assert_ne!(tr.export_state().unwrap(), now);
}

#[test]
fn snapshot_segments_are_safetensors_and_their_buffers_are_reused() {
    let _rng = rng_lock();
    let cfg = tiny_config("");
    let mut tr = Trainer::new(&cfg, Device::Cpu).unwrap();
    tr.step(&images()).unwrap();
    let pool = ddpm_trainer::SnapshotPool::default();
    let segments = tr.snapshot(&pool).into_segments().unwrap();
    let first_ptr = segments[0].1[1].as_ptr();
    for (name, parts) in &segments {
        let whole = parts.concat();
        let st = safetensors::SafeTensors::deserialize(&whole)
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let header_len = u64::from_le_bytes(whole[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + header_len) % 8, 0, "{name}: data is 8-byte aligned");
        let expected = if *name == "optimizer.safetensors" {
            2
        } else {
            1
        };
        assert_eq!(st.len(), expected * tr.flat().0.slots.len(), "{name}");
    }
    // The blobs round-trip through import_state.
    let blobs: Vec<(String, Vec<u8>)> = segments
        .iter()
        .map(|(n, p)| (n.to_string(), p.concat()))
        .collect();
    let mut other = Trainer::new(&cfg, Device::Cpu).unwrap();
    other.import_state(&blobs, 1).unwrap();
    assert_eq!(other.export_state().unwrap(), tr.export_state().unwrap());
    // The model blob holds the same tensors as the safetensors crate's own serializer writes.
    let (vs, _) = tr.model();
    let named: Vec<(String, tch::Tensor)> = tr
        .flat()
        .0
        .slots
        .iter()
        .map(|s| (s.name.clone(), vs.variables()[&s.name].shallow_clone()))
        .collect();
    let reference = ddpm_trainer::state::safetensors_bytes(&named).unwrap();
    let reference = safetensors::SafeTensors::deserialize(&reference).unwrap();
    let ours_bytes = segments[0].1.concat();
    let ours = safetensors::SafeTensors::deserialize(&ours_bytes).unwrap();
    assert_eq!(ours.len(), reference.len());
    for (name, t) in reference.tensors() {
        let o = ours.tensor(&name).unwrap();
        assert_eq!(
            (o.dtype(), o.shape(), o.data()),
            (t.dtype(), t.shape(), t.data()),
            "{name}"
        );
    }
    // While the segments are alive their buffers are not handed out again.
    let live: Vec<*const u8> = segments
        .iter()
        .flat_map(|(_, p)| p[1..].iter().map(|b| b.as_ptr()))
        .collect();
    let other = tr.snapshot(&pool).into_segments().unwrap();
    for (_, p) in &other {
        for b in &p[1..] {
            assert!(
                !live.contains(&b.as_ptr()),
                "a live buffer was handed out twice"
            );
        }
    }
    // Once the uploader drops the segments, the next snapshot reuses the host buffers (the
    // pool keeps one snapshot's worth: the first four returned).
    drop(segments);
    drop(other);
    let again = tr.snapshot(&pool).into_segments().unwrap();
    let ptrs: Vec<*const u8> = again
        .iter()
        .flat_map(|(_, p)| p[1..].iter().map(|b| b.as_ptr()))
        .collect();
    assert!(ptrs.contains(&first_ptr), "a pooled buffer was reused");
}

#[test]
fn two_ranks_with_averaged_gradients_take_the_steps_of_one_with_both_batches() {
    let _rng = rng_lock();
    // Invariant 2 with world sizes 2 and 4: per-rank batches of 8 and 4 against one batch
    // of 16, gradients averaged as an all-reduce would (no dropout: its masks are not
    // shared between world sizes).
    // The paper's learning rate. Adam normalises each update, so a rounding difference in a
    // near-zero gradient component can move a parameter by up to ~lr: measured 5.6e-8 at
    // lr 2e-4, but 2e-6 at the tiny config's 1e-3.
    let mut cfg = tiny_config("");
    cfg.model.dropout = 0.0;
    cfg.train.lr = 2e-4;
    let x0 = images();
    let mut single = Trainer::new(&cfg, Device::Cpu).unwrap();
    for _ in 0..5 {
        single.step(&x0).unwrap();
    }
    for world in [2i64, 4] {
        let per = 16 / world;
        let mut ranks: Vec<Trainer> = (0..world)
            .map(|_| Trainer::new(&cfg, Device::Cpu).unwrap())
            .collect();
        for _ in 0..5 {
            let mut sum: Option<Tensor> = None;
            let mut losses = Vec::new();
            for (r, tr) in ranks.iter_mut().enumerate() {
                let part = x0.narrow(0, r as i64 * per, per);
                losses.push(
                    tr.compute_gradients(&part, r as u64 * per as u64, 16)
                        .unwrap(),
                );
                let g = tr.gradients().copy();
                sum = Some(match sum {
                    None => g,
                    Some(s) => s + g,
                });
            }
            let mean = sum.unwrap() / world as f64;
            for (tr, loss) in ranks.iter_mut().zip(losses) {
                tr.gradients().copy_(&mean);
                tr.apply_update(loss);
            }
        }
        let want = &single.flat().0.params;
        for (r, tr) in ranks.iter().enumerate() {
            let diff = (&tr.flat().0.params - want).abs().max().double_value(&[]);
            assert!(
                diff <= 1e-6,
                "world {world} rank {r}: parameters differ by {diff:e}"
            );
        }
    }
}
