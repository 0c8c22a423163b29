//! Building blocks: residual block with time projection, self-attention, resampling,
//! and the sinusoidal timestep embedding.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// GroupNorm epsilon of the official implementation (tf.contrib group_norm default).
pub const NORM_EPS: f64 = 1e-6;
/// GroupNorm groups.
pub const NORM_GROUPS: i64 = 32;

/// Variance-scaling (fan_avg, uniform) init of the official code; scale 0 means 1e-10.
pub fn default_init(scale: f64, fan_in: i64, fan_out: i64) -> nn::Init {
    let scale = if scale == 0.0 { 1e-10 } else { scale };
    let limit = (3.0 * scale / ((fan_in + fan_out) as f64 / 2.0)).sqrt();
    nn::Init::Uniform {
        lo: -limit,
        up: limit,
    }
}

pub fn conv(
    p: nn::Path,
    cin: i64,
    cout: i64,
    k: i64,
    stride: i64,
    padding: i64,
    scale: f64,
) -> nn::Conv2D {
    let cfg = nn::ConvConfig {
        stride,
        padding,
        ws_init: default_init(scale, cin * k * k, cout * k * k),
        bs_init: nn::Init::Const(0.0),
        ..Default::default()
    };
    nn::conv2d(p, cin, cout, k, cfg)
}

pub fn linear(p: nn::Path, cin: i64, cout: i64, scale: f64) -> nn::Linear {
    let cfg = nn::LinearConfig {
        ws_init: default_init(scale, cin, cout),
        bs_init: Some(nn::Init::Const(0.0)),
        bias: true,
    };
    nn::linear(p, cin, cout, cfg)
}

pub fn group_norm(p: nn::Path, c: i64) -> nn::GroupNorm {
    let cfg = nn::GroupNormConfig {
        eps: NORM_EPS,
        ..Default::default()
    };
    nn::group_norm(p, NORM_GROUPS, c, cfg)
}

/// Sinusoidal embedding of integer timesteps: [sin(t w_i), cos(t w_i)] with
/// w_i = exp(-ln(10000) i / (half - 1)), as in the official code and diffusers
/// (flip_sin_to_cos = false, freq_shift = 1).
pub fn timestep_embedding(t: &Tensor, dim: i64) -> Tensor {
    let half = dim / 2;
    let denom = (half - 1).max(1) as f64;
    let freqs =
        (Tensor::arange(half, (Kind::Float, t.device())) * (-(10000f64.ln())) / denom).exp();
    let args = t.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0);
    let emb = Tensor::cat(&[args.sin(), args.cos()], 1);
    if dim % 2 == 1 {
        emb.constant_pad_nd([0, 1])
    } else {
        emb
    }
}

/// Wide-ResNet block: GN, swish, conv3x3, + dense(swish(temb)), GN, swish, dropout, conv3x3,
/// plus a 1x1 shortcut when the channel count changes.
#[derive(Debug)]
pub struct ResBlock {
    norm1: nn::GroupNorm,
    conv1: nn::Conv2D,
    temb_proj: nn::Linear,
    norm2: nn::GroupNorm,
    conv2: nn::Conv2D,
    nin_shortcut: Option<nn::Conv2D>,
    dropout: f64,
}

impl ResBlock {
    pub fn new(p: nn::Path, cin: i64, cout: i64, temb_ch: i64, dropout: f64) -> Self {
        Self {
            norm1: group_norm(&p / "norm1", cin),
            conv1: conv(&p / "conv1", cin, cout, 3, 1, 1, 1.0),
            temb_proj: linear(&p / "temb_proj", temb_ch, cout, 1.0),
            norm2: group_norm(&p / "norm2", cout),
            conv2: conv(&p / "conv2", cout, cout, 3, 1, 1, 0.0),
            nin_shortcut: (cin != cout).then(|| conv(&p / "nin_shortcut", cin, cout, 1, 1, 0, 1.0)),
            dropout,
        }
    }

    /// `temb_act` is swish(temb), shared by every block.
    pub fn forward(&self, x: &Tensor, temb_act: &Tensor, train: bool) -> Tensor {
        let h = self.conv1.forward(&self.norm1.forward(x).silu());
        let h = h + self.temb_proj.forward(temb_act).unsqueeze(-1).unsqueeze(-1);
        let h = self.norm2.forward(&h).silu();
        let h = if train && self.dropout > 0.0 {
            h.dropout(self.dropout, true)
        } else {
            h
        };
        let h = self.conv2.forward(&h);
        match &self.nin_shortcut {
            Some(s) => s.forward(x) + h,
            None => x + h,
        }
    }
}

/// Single-head self-attention over all spatial positions, with a residual connection.
#[derive(Debug)]
pub struct AttnBlock {
    norm: nn::GroupNorm,
    q: nn::Linear,
    k: nn::Linear,
    v: nn::Linear,
    proj_out: nn::Linear,
}

impl AttnBlock {
    pub fn new(p: nn::Path, c: i64) -> Self {
        Self {
            norm: group_norm(&p / "norm", c),
            q: linear(&p / "q", c, c, 1.0),
            k: linear(&p / "k", c, c, 1.0),
            v: linear(&p / "v", c, c, 1.0),
            proj_out: linear(&p / "proj_out", c, c, 0.0),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().expect("attention input is NCHW");
        // [B, C, H, W] -> [B, 1, HW, C]: one head of width C (scale 1/sqrt(C)).
        let hs = self.norm.forward(x).view([b, c, h * w]).transpose(1, 2);
        let q = self.q.forward(&hs).unsqueeze(1);
        let k = self.k.forward(&hs).unsqueeze(1);
        let v = self.v.forward(&hs).unsqueeze(1);
        let a = Tensor::scaled_dot_product_attention::<Tensor>(
            &q, &k, &v, None, 0.0, false, None, false,
        );
        let out = self.proj_out.forward(&a.squeeze_dim(1));
        x + out.transpose(1, 2).reshape([b, c, h, w])
    }
}

/// Halves the resolution: a stride-2 3x3 conv with TF "SAME" padding (pad right/bottom by 1),
/// or 2x2 average pooling.
#[derive(Debug)]
pub struct Downsample {
    conv: Option<nn::Conv2D>,
}

impl Downsample {
    pub fn new(p: nn::Path, c: i64, with_conv: bool) -> Self {
        Self {
            conv: with_conv.then(|| conv(&p / "conv", c, c, 3, 2, 0, 1.0)),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        match &self.conv {
            Some(conv) => conv.forward(&x.constant_pad_nd([0, 1, 0, 1])),
            None => x.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None::<i64>),
        }
    }
}

/// Doubles the resolution: nearest neighbour, then an optional 3x3 conv.
#[derive(Debug)]
pub struct Upsample {
    conv: Option<nn::Conv2D>,
}

impl Upsample {
    pub fn new(p: nn::Path, c: i64, with_conv: bool) -> Self {
        Self {
            conv: with_conv.then(|| conv(&p / "conv", c, c, 3, 1, 1, 1.0)),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (_, _, h, w) = x.size4().expect("upsample input is NCHW");
        let up = x.upsample_nearest2d([h * 2, w * 2], None, None);
        match &self.conv {
            Some(conv) => conv.forward(&up),
            None => up,
        }
    }
}
