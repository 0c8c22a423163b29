//! U-Net forward parity with diffusers' UNet2DModel, and weight import/export, against the
//! golden fixtures made by tests/parity/make_fixtures.py.

use ddpm_unet::weights::{self, WeightsFormat};
use ddpm_unet::{UNet, UNetConfig};
use std::collections::HashMap;
use std::path::PathBuf;
use tch::{nn, Device, Kind, Tensor};

fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(format!(
        "{}/../../tests/parity/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
}

fn load_config(prefix: &str) -> UNetConfig {
    let path = fixture_path(&format!("{prefix}_config.json"));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    weights::config_from_diffusers(&json, &path.display().to_string()).unwrap()
}

fn build(cfg: &UNetConfig) -> (nn::VarStore, UNet) {
    let vs = nn::VarStore::new(Device::Cpu);
    let net = UNet::new(&vs.root(), cfg).unwrap();
    (vs, net)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn check_forward(prefix: &str) {
    let cfg = load_config(prefix);
    let (vs, net) = build(&cfg);
    let format = weights::load(
        &vs,
        cfg.levels(),
        &fixture_path(&format!("{prefix}_weights.safetensors")),
    )
    .unwrap();
    assert_eq!(format, WeightsFormat::Diffusers);
    let io: HashMap<String, Tensor> =
        Tensor::read_safetensors(fixture_path(&format!("{prefix}_io.safetensors")))
            .unwrap()
            .into_iter()
            .collect();
    let out = tch::no_grad(|| net.forward_t(&io["x"], &io["t"], false));
    let err = max_abs_diff(&out, &io["out"]);
    assert!(
        err <= 1e-4,
        "{prefix}: U-Net output differs from diffusers by {err:e}"
    );
}

#[test]
fn two_level_unet_matches_diffusers_forward() {
    check_forward("unet_small");
}

#[test]
fn three_level_unet_with_learned_variance_channels_matches_diffusers_forward() {
    let cfg = load_config("unet_small3");
    assert_eq!(
        (
            cfg.out_channels,
            cfg.num_res_blocks,
            cfg.attn_resolutions.clone()
        ),
        (6, 2, vec![8])
    );
    check_forward("unet_small3");
}

#[test]
fn export_and_reimport_in_both_namings_is_lossless() {
    let cfg = load_config("unet_small3");
    let (vs, net) = build(&cfg);
    weights::load(
        &vs,
        cfg.levels(),
        &fixture_path("unet_small3_weights.safetensors"),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let x = Tensor::randn([2, 3, 16, 16], (Kind::Float, Device::Cpu));
    let t = Tensor::from_slice(&[5i64, 900]);
    let reference = tch::no_grad(|| net.forward_t(&x, &t, false));
    for format in [WeightsFormat::Ours, WeightsFormat::Diffusers] {
        let path = dir.path().join(format!("{format:?}.safetensors"));
        weights::save(&vs, cfg.levels(), &path, format).unwrap();
        let (vs2, net2) = build(&cfg);
        assert_eq!(weights::load(&vs2, cfg.levels(), &path).unwrap(), format);
        let again = tch::no_grad(|| net2.forward_t(&x, &t, false));
        assert_eq!(
            max_abs_diff(&again, &reference),
            0.0,
            "{format:?} round trip"
        );
    }
    // The exported diffusers names are exactly the fixture's names.
    let ours: Vec<String> = weights::named_tensors(&vs, cfg.levels(), WeightsFormat::Diffusers)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let mut theirs: Vec<String> =
        Tensor::read_safetensors(fixture_path("unet_small3_weights.safetensors"))
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
    theirs.sort();
    assert_eq!(ours, theirs);
    // And the exported config reads back as the same architecture.
    let json = weights::diffusers_config(&cfg).unwrap();
    assert_eq!(
        weights::config_from_diffusers(&json, "exported").unwrap(),
        cfg
    );
}

#[test]
fn missing_extra_and_misshaped_tensors_are_named() {
    let cfg = load_config("unet_small");
    let (vs, _net) = build(&cfg);
    let mut tensors =
        Tensor::read_safetensors(fixture_path("unet_small_weights.safetensors")).unwrap();
    tensors.retain(|(n, _)| n != "mid_block.attentions.0.to_q.weight");
    for (n, t) in tensors.iter_mut() {
        if n == "conv_in.weight" {
            *t = Tensor::zeros([32, 1, 3, 3], (Kind::Float, Device::Cpu));
        }
    }
    tensors.push((
        "down_blocks.0.resnets.7.conv1.weight".into(),
        Tensor::zeros([1], (Kind::Float, Device::Cpu)),
    ));
    let err = weights::load_into(&vs, cfg.levels(), tensors, "bad.safetensors")
        .unwrap_err()
        .to_string();
    assert!(err.contains("bad.safetensors"), "{err}");
    assert!(
        err.contains(
            "missing tensor `mid_block.attentions.0.to_q.weight` (expected shape [64, 64])"
        ),
        "{err}"
    );
    assert!(
        err.contains("tensor `conv_in.weight` has shape [32, 1, 3, 3], expected [32, 3, 3, 3]"),
        "{err}"
    );
    assert!(
        err.contains("unexpected tensor `down_blocks.0.resnets.7.conv1.weight`"),
        "{err}"
    );
}

#[test]
fn older_diffusers_attention_names_are_accepted() {
    let cfg = load_config("unet_small");
    let (vs, net) = build(&cfg);
    let renamed: Vec<(String, Tensor)> =
        Tensor::read_safetensors(fixture_path("unet_small_weights.safetensors"))
            .unwrap()
            .into_iter()
            .map(|(n, t)| {
                let n = n
                    .replace(".to_q.", ".query.")
                    .replace(".to_k.", ".key.")
                    .replace(".to_v.", ".value.")
                    .replace(".to_out.0.", ".proj_attn.");
                (n, t)
            })
            .collect();
    weights::load_into(&vs, cfg.levels(), renamed, "old.safetensors").unwrap();
    let io: HashMap<String, Tensor> =
        Tensor::read_safetensors(fixture_path("unet_small_io.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let out = tch::no_grad(|| net.forward_t(&io["x"], &io["t"], false));
    assert!(max_abs_diff(&out, &io["out"]) <= 1e-4);
}

#[test]
fn unsupported_diffusers_configs_are_rejected_by_key() {
    let path = fixture_path("unet_small_config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let reject = |j: &serde_json::Value, key: &str| {
        let err = weights::config_from_diffusers(j, "cfg.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("cfg.json: {key}")), "{err}");
    };
    let mut flipped = json.clone();
    flipped["flip_sin_to_cos"] = serde_json::json!(true);
    reject(&flipped, "flip_sin_to_cos");
    // Without the key, diffusers uses 8-dimensional heads: not the paper's single head.
    json.as_object_mut().unwrap().remove("attention_head_dim");
    reject(&json, "attention_head_dim");
    json["attention_head_dim"] = serde_json::json!(32);
    reject(&json, "attention_head_dim");
    json["attention_head_dim"] = serde_json::Value::Null;
    json["add_attention"] = serde_json::json!(false);
    reject(&json, "add_attention");
    json["add_attention"] = serde_json::json!(true);
    json["block_out_channels"] = serde_json::json!([32, "x"]);
    reject(&json, "block_out_channels");
}
