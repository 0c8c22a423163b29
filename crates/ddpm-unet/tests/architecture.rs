//! Parameter counts of the paper's models and forward-pass shapes.

use ddpm_config::Config;
use ddpm_unet::{parameter_count, UNet, UNetConfig};
use tch::{nn, Device, Kind, Tensor};

fn count(config_file: &str) -> i64 {
    let path = format!("{}/../../configs/{config_file}", env!("CARGO_MANIFEST_DIR"));
    let cfg = Config::from_file(&path).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    UNet::new(&vs.root(), &UNetConfig::from_config(&cfg)).unwrap();
    parameter_count(&vs)
}

#[test]
fn cifar10_model_has_the_papers_parameter_count() {
    assert_eq!(count("cifar10.toml"), 35_746_307);
}

#[test]
fn church_256_model_has_the_papers_parameter_count() {
    assert_eq!(count("lsun_church.toml"), 113_673_219);
}

#[test]
fn forward_keeps_spatial_shape_and_doubles_channels_for_learned_variance() {
    let mut cfg = Config::parse(
        "[data]\nresolution = 16\nchannels = 1\n[model]\nch = 32\nch_mult = [1, 2]\nnum_res_blocks = 1\nattn_resolutions = [8]\n[diffusion]\nmodel_var_type = \"learned\"\nloss_type = \"kl\"\n",
        "t",
    )
    .unwrap();
    cfg.model.dropout = 0.0;
    let vs = nn::VarStore::new(Device::Cpu);
    let net = UNet::new(&vs.root(), &UNetConfig::from_config(&cfg)).unwrap();
    let x = Tensor::randn([3, 1, 16, 16], (Kind::Float, Device::Cpu));
    let t = Tensor::from_slice(&[0i64, 10, 999]);
    let y = net.forward_t(&x, &t, false);
    assert_eq!(y.size(), vec![3, 2, 16, 16]);
    assert!(bool::try_from(y.isfinite().all()).unwrap());
}
