//! GPU checks, compiled only with `--features cuda` and run on a CUDA host:
//! U-Net parity with diffusers on the GPU, and one mixed-precision (autocast) training step.
#![cfg(feature = "cuda")]

use ddpm_config::Config;
use ddpm_trainer::Trainer;
use ddpm_unet::{weights, UNet};
use std::collections::HashMap;
use tch::{nn, Kind, Tensor};

fn fixture(name: &str) -> std::path::PathBuf {
    format!(
        "{}/../../tests/parity/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
    .into()
}

#[test]
fn unet_matches_diffusers_on_cuda() {
    let dev = ddpm_unet::device::resolve("cuda").expect("a CUDA device");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("unet_small3_config.json")).unwrap())
            .unwrap();
    let cfg = weights::config_from_diffusers(&json, "unet_small3_config.json").unwrap();
    let vs = nn::VarStore::new(dev);
    let net = UNet::new(&vs.root(), &cfg).unwrap();
    weights::load(
        &vs,
        cfg.levels(),
        &fixture("unet_small3_weights.safetensors"),
    )
    .unwrap();
    let io: HashMap<String, Tensor> =
        Tensor::read_safetensors(fixture("unet_small3_io.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let out =
        tch::no_grad(|| net.forward_t(&io["x"].to_device(dev), &io["t"].to_device(dev), false));
    let err = (out.to_device(tch::Device::Cpu) - &io["out"])
        .abs()
        .max()
        .double_value(&[]);
    // TF32 convolutions/matmuls on the GPU round inputs to 10-bit mantissas.
    assert!(err <= 5e-3, "CUDA U-Net differs from diffusers by {err:e}");
    eprintln!("cuda unet max abs diff: {err:e}");
}

/// tch's `autocast` enables libtorch's CUDA autocast with its default dtype (float16);
/// choosing bfloat16 needs `at::autocast::set_autocast_dtype`, which tch 0.24 does not expose.
#[test]
fn one_autocast_training_step_is_finite() {
    let dev = ddpm_unet::device::resolve("cuda").expect("a CUDA device");
    let cfg = Config::parse(
        "[data]\nchannels = 3\nresolution = 32\n[model]\nch = 64\nch_mult = [1, 2]\nnum_res_blocks = 1\nattn_resolutions = [16]\n[train]\nbatch_size = 8\n",
        "cuda-test",
    )
    .unwrap();
    let mut tr = Trainer::new(&cfg, dev).unwrap();
    let x = Tensor::rand([8, 3, 32, 32], (Kind::Float, dev)) * 2.0 - 1.0;
    let stats = tch::autocast(true, || tr.step(&x)).unwrap();
    let loss = stats.loss.double_value(&[]);
    assert!(loss.is_finite() && loss > 0.0, "autocast loss {loss}");
    let (flat, _) = tr.flat();
    assert_eq!(
        flat.params.kind(),
        Kind::Float,
        "master weights stay float32"
    );
    assert!(bool::try_from(flat.params.isfinite().all()).unwrap());
}
