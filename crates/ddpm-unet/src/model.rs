//! The U-Net itself.

use crate::blocks::{
    conv, group_norm, linear, timestep_embedding, AttnBlock, Downsample, ResBlock, Upsample,
};
use crate::{Result, UNetError};
use ddpm_config::{Config, ModelConfig};
use tch::nn::{self, Module};
use tch::Tensor;

/// Architecture hyper-parameters of one U-Net.
#[derive(Debug, Clone, PartialEq)]
pub struct UNetConfig {
    /// Image channels in.
    pub in_channels: i64,
    /// Channels out (2x in for a learned variance).
    pub out_channels: i64,
    /// Base channels.
    pub ch: i64,
    /// Channel multiplier per level.
    pub ch_mult: Vec<i64>,
    /// Residual blocks per level on the way down (one more on the way up).
    pub num_res_blocks: i64,
    /// Side lengths that get self-attention.
    pub attn_resolutions: Vec<i64>,
    /// Dropout in residual blocks.
    pub dropout: f64,
    /// Convolutions in the resamplers.
    pub resamp_with_conv: bool,
    /// Input side length.
    pub resolution: i64,
}

impl UNetConfig {
    /// The U-Net of a full configuration (channels from `[data]`, output channels doubled for
    /// a learned variance).
    pub fn from_config(c: &Config) -> Self {
        Self::from_model(
            &c.model,
            c.data.channels,
            c.data.resolution,
            c.diffusion.model_var_type,
        )
    }

    /// The U-Net of a `[model]` section for images of `channels` x `resolution`^2.
    pub fn from_model(
        m: &ModelConfig,
        channels: i64,
        resolution: i64,
        var: ddpm_config::VarType,
    ) -> Self {
        Self {
            in_channels: channels,
            out_channels: ModelConfig::out_channels(channels, var),
            ch: m.ch,
            ch_mult: m.ch_mult.clone(),
            num_res_blocks: m.num_res_blocks,
            attn_resolutions: m.attn_resolutions.clone(),
            dropout: m.dropout,
            resamp_with_conv: m.resamp_with_conv,
            resolution,
        }
    }

    /// Number of resolution levels.
    pub fn levels(&self) -> usize {
        self.ch_mult.len()
    }

    /// Checks the shape constraints (GroupNorm(32) channels, resolution divisibility).
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, reason: String| {
            Err(UNetError::Config {
                key: key.into(),
                reason,
            })
        };
        if self.ch_mult.is_empty() {
            return bad("ch_mult", "expected at least one level".into());
        }
        for (i, m) in self.ch_mult.iter().enumerate() {
            if m * self.ch <= 0 || (m * self.ch) % 32 != 0 {
                return bad(
                    "ch_mult",
                    format!(
                        "level {i} has {} channels; GroupNorm(32) needs a positive multiple of 32",
                        m * self.ch
                    ),
                );
            }
        }
        if self.ch % 32 != 0 {
            return bad("ch", format!("expected a multiple of 32, got {}", self.ch));
        }
        let factor = 1 << (self.levels() - 1);
        if self.resolution % factor != 0 || self.resolution < factor {
            return bad(
                "resolution",
                format!(
                    "{} is not divisible by 2^(levels-1) = {factor}",
                    self.resolution
                ),
            );
        }
        if self.in_channels < 1 || self.out_channels < 1 || self.num_res_blocks < 1 {
            return bad(
                "in_channels/out_channels/num_res_blocks",
                "expected positive values".into(),
            );
        }
        Ok(())
    }
}

#[derive(Debug)]
struct DownLevel {
    blocks: Vec<ResBlock>,
    attns: Vec<AttnBlock>,
    downsample: Option<Downsample>,
}

#[derive(Debug)]
struct UpLevel {
    blocks: Vec<ResBlock>,
    attns: Vec<AttnBlock>,
    upsample: Option<Upsample>,
}

/// The DDPM U-Net. Variables live in the `nn::Path` it was built on; names follow the
/// official implementation (`temb.dense.0`, `down.{i}.block.{j}.conv1`, `mid.attn_1`, ...).
#[derive(Debug)]
pub struct UNet {
    config: UNetConfig,
    temb_dense: [nn::Linear; 2],
    conv_in: nn::Conv2D,
    down: Vec<DownLevel>,
    mid_block_1: ResBlock,
    mid_attn_1: AttnBlock,
    mid_block_2: ResBlock,
    up: Vec<UpLevel>,
    norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl UNet {
    /// Creates the network's variables under `p` with the official initialisation.
    pub fn new(p: &nn::Path, config: &UNetConfig) -> Result<Self> {
        config.validate()?;
        let c = config;
        let ch = c.ch;
        let temb_ch = 4 * ch;
        let temb = p / "temb" / "dense";
        let temb_dense = [
            linear(&temb / 0, ch, temb_ch, 1.0),
            linear(&temb / 1, temb_ch, temb_ch, 1.0),
        ];
        let conv_in = conv(p / "conv_in", c.in_channels, ch, 3, 1, 1, 1.0);

        let levels = c.levels();
        let mut skip_ch = vec![ch];
        let mut cur = ch;
        let mut res = c.resolution;
        let mut down = Vec::with_capacity(levels);
        for (i, mult) in c.ch_mult.iter().enumerate() {
            let lp = p / "down" / i;
            let out = ch * mult;
            let mut blocks = Vec::new();
            let mut attns = Vec::new();
            for j in 0..c.num_res_blocks {
                blocks.push(ResBlock::new(
                    &lp / "block" / j,
                    cur,
                    out,
                    temb_ch,
                    c.dropout,
                ));
                cur = out;
                if c.attn_resolutions.contains(&res) {
                    attns.push(AttnBlock::new(&lp / "attn" / j, cur));
                }
                skip_ch.push(cur);
            }
            let downsample = (i + 1 != levels).then(|| {
                skip_ch.push(cur);
                res /= 2;
                Downsample::new(&lp / "downsample", cur, c.resamp_with_conv)
            });
            down.push(DownLevel {
                blocks,
                attns,
                downsample,
            });
        }

        let mp = p / "mid";
        let mid_block_1 = ResBlock::new(&mp / "block_1", cur, cur, temb_ch, c.dropout);
        let mid_attn_1 = AttnBlock::new(&mp / "attn_1", cur);
        let mid_block_2 = ResBlock::new(&mp / "block_2", cur, cur, temb_ch, c.dropout);

        let mut up: Vec<Option<UpLevel>> = (0..levels).map(|_| None).collect();
        for i in (0..levels).rev() {
            let lp = p / "up" / i;
            let out = ch * c.ch_mult[i];
            let mut blocks = Vec::new();
            let mut attns = Vec::new();
            for j in 0..=c.num_res_blocks {
                let skip = skip_ch.pop().expect("one skip connection per up block");
                blocks.push(ResBlock::new(
                    &lp / "block" / j,
                    cur + skip,
                    out,
                    temb_ch,
                    c.dropout,
                ));
                cur = out;
                if c.attn_resolutions.contains(&res) {
                    attns.push(AttnBlock::new(&lp / "attn" / j, cur));
                }
            }
            let upsample = (i != 0).then(|| {
                res *= 2;
                Upsample::new(&lp / "upsample", cur, c.resamp_with_conv)
            });
            up[i] = Some(UpLevel {
                blocks,
                attns,
                upsample,
            });
        }
        let up = up
            .into_iter()
            .map(|l| l.expect("every level built"))
            .collect();
        Ok(Self {
            config: c.clone(),
            temb_dense,
            conv_in,
            down,
            mid_block_1,
            mid_attn_1,
            mid_block_2,
            up,
            norm_out: group_norm(p / "norm_out", cur),
            conv_out: conv(p / "conv_out", cur, c.out_channels, 3, 1, 1, 0.0),
        })
    }

    /// The architecture.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Runs the network on `x` `[B, C, H, W]` at integer timesteps `t` `[B]`.
    /// `train` enables dropout.
    pub fn forward_t(&self, x: &Tensor, t: &Tensor, train: bool) -> Tensor {
        let temb = timestep_embedding(t, self.config.ch).to_kind(x.kind());
        let temb = self.temb_dense[1].forward(&self.temb_dense[0].forward(&temb).silu());
        let temb_act = temb.silu();

        let mut hs = vec![self.conv_in.forward(x)];
        for level in &self.down {
            for (j, block) in level.blocks.iter().enumerate() {
                let mut h = block.forward(hs.last().expect("non-empty"), &temb_act, train);
                if let Some(attn) = level.attns.get(j) {
                    h = attn.forward(&h);
                }
                hs.push(h);
            }
            if let Some(ds) = &level.downsample {
                let h = ds.forward(hs.last().expect("non-empty"));
                hs.push(h);
            }
        }

        let mut h = hs.last().expect("non-empty").shallow_clone();
        h = self.mid_block_1.forward(&h, &temb_act, train);
        h = self.mid_attn_1.forward(&h);
        h = self.mid_block_2.forward(&h, &temb_act, train);

        for level in self.up.iter().rev() {
            for (j, block) in level.blocks.iter().enumerate() {
                let skip = hs.pop().expect("one skip per up block");
                h = block.forward(&Tensor::cat(&[h, skip], 1), &temb_act, train);
                if let Some(attn) = level.attns.get(j) {
                    h = attn.forward(&h);
                }
            }
            if let Some(us) = &level.upsample {
                h = us.forward(&h);
            }
        }
        self.conv_out.forward(&self.norm_out.forward(&h).silu())
    }
}

/// Total number of parameters in a var store.
pub fn parameter_count(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum()
}
