//! The layers of pytorch-fid's FID Inception: torchvision's `Inception3` with the blocks
//! `FIDInceptionA`, `FIDInceptionC`, `FIDInceptionE_1` and `FIDInceptionE_2`.
//!
//! Every convolution is torchvision's `BasicConv2d`: a bias-free convolution, BatchNorm in
//! eval mode with eps 0.001, then ReLU. The FID variant differs from torchvision's network
//! only in its branch pools: the average pools of the A, C and first E blocks exclude the
//! padding (`count_include_pad=False`), and the last E block (`Mixed_7c`) max-pools.

use super::weights::Params;
use crate::Result;
use tch::Tensor;

/// Batch-norm epsilon of every `BasicConv2d` (torchvision and TF Inception).
pub(crate) const BN_EPS: f64 = 1e-3;

/// `BasicConv2d`: conv (no bias) + BatchNorm (running statistics) + ReLU.
pub(crate) struct Conv {
    weight: Tensor,
    gamma: Tensor,
    beta: Tensor,
    mean: Tensor,
    var: Tensor,
    stride: i64,
    padding: [i64; 2],
}

impl Conv {
    /// Takes `{name}.conv.weight` [cout, cin, k0, k1] and `{name}.bn.*` [cout] from `p`.
    fn new(
        p: &mut Params,
        name: &str,
        cin: i64,
        cout: i64,
        k: [i64; 2],
        stride: i64,
        padding: [i64; 2],
    ) -> Self {
        Conv {
            weight: p.take(&format!("{name}.conv.weight"), &[cout, cin, k[0], k[1]]),
            gamma: p.take(&format!("{name}.bn.weight"), &[cout]),
            beta: p.take(&format!("{name}.bn.bias"), &[cout]),
            mean: p.take(&format!("{name}.bn.running_mean"), &[cout]),
            var: p.take(&format!("{name}.bn.running_var"), &[cout]),
            stride,
            padding,
        }
    }

    /// A 1x1 convolution.
    fn k1(p: &mut Params, name: &str, cin: i64, cout: i64) -> Self {
        Self::new(p, name, cin, cout, [1, 1], 1, [0, 0])
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.f_conv2d(
            &self.weight,
            None::<Tensor>,
            [self.stride; 2],
            self.padding,
            [1, 1],
            1,
        )?;
        let y = y.f_batch_norm(
            Some(&self.gamma),
            Some(&self.beta),
            Some(&self.mean),
            Some(&self.var),
            false,
            0.1,
            BN_EPS,
            true,
        )?;
        Ok(y.f_relu()?)
    }
}

/// 3x3 stride-1 average pool that does not count the zero padding (FID blocks).
fn avg_pool_3x3(x: &Tensor) -> Result<Tensor> {
    Ok(x.f_avg_pool2d([3, 3], [1, 1], [1, 1], false, false, None)?)
}

fn max_pool(x: &Tensor, stride: i64, padding: i64) -> Result<Tensor> {
    Ok(x.f_max_pool2d([3, 3], [stride, stride], [padding, padding], [1, 1], false)?)
}

fn chain(x: &Tensor, convs: &[Conv]) -> Result<Tensor> {
    let mut y = convs[0].forward(x)?;
    for c in &convs[1..] {
        y = c.forward(&y)?;
    }
    Ok(y)
}

/// `FIDInceptionA` (Mixed_5b/5c/5d): 64 + 64 + 96 + `pool_features` channels.
struct BlockA {
    b1x1: Conv,
    b5x5: [Conv; 2],
    b3x3dbl: [Conv; 3],
    pool: Conv,
}

impl BlockA {
    fn new(p: &mut Params, name: &str, cin: i64, pool_features: i64) -> Self {
        let n = |b: &str| format!("{name}.{b}");
        BlockA {
            b1x1: Conv::k1(p, &n("branch1x1"), cin, 64),
            b5x5: [
                Conv::k1(p, &n("branch5x5_1"), cin, 48),
                Conv::new(p, &n("branch5x5_2"), 48, 64, [5, 5], 1, [2, 2]),
            ],
            b3x3dbl: [
                Conv::k1(p, &n("branch3x3dbl_1"), cin, 64),
                Conv::new(p, &n("branch3x3dbl_2"), 64, 96, [3, 3], 1, [1, 1]),
                Conv::new(p, &n("branch3x3dbl_3"), 96, 96, [3, 3], 1, [1, 1]),
            ],
            pool: Conv::k1(p, &n("branch_pool"), cin, pool_features),
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let branches = [
            self.b1x1.forward(x)?,
            chain(x, &self.b5x5)?,
            chain(x, &self.b3x3dbl)?,
            self.pool.forward(&avg_pool_3x3(x)?)?,
        ];
        Ok(Tensor::f_cat(&branches, 1)?)
    }
}

/// `InceptionB` (Mixed_6a): grid reduction 35 -> 17, 384 + 96 + cin channels.
struct BlockB {
    b3x3: Conv,
    b3x3dbl: [Conv; 3],
}

impl BlockB {
    fn new(p: &mut Params, name: &str, cin: i64) -> Self {
        let n = |b: &str| format!("{name}.{b}");
        BlockB {
            b3x3: Conv::new(p, &n("branch3x3"), cin, 384, [3, 3], 2, [0, 0]),
            b3x3dbl: [
                Conv::k1(p, &n("branch3x3dbl_1"), cin, 64),
                Conv::new(p, &n("branch3x3dbl_2"), 64, 96, [3, 3], 1, [1, 1]),
                Conv::new(p, &n("branch3x3dbl_3"), 96, 96, [3, 3], 2, [0, 0]),
            ],
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let branches = [
            self.b3x3.forward(x)?,
            chain(x, &self.b3x3dbl)?,
            max_pool(x, 2, 0)?,
        ];
        Ok(Tensor::f_cat(&branches, 1)?)
    }
}

/// `FIDInceptionC` (Mixed_6b..6e): factorized 7x7 convolutions, 4 x 192 channels.
struct BlockC {
    b1x1: Conv,
    b7x7: [Conv; 3],
    b7x7dbl: [Conv; 5],
    pool: Conv,
}

impl BlockC {
    fn new(p: &mut Params, name: &str, cin: i64, c7: i64) -> Self {
        let n = |b: &str| format!("{name}.{b}");
        let (row, col) = (([1, 7], [0, 3]), ([7, 1], [3, 0]));
        let conv = |p: &mut Params, b: &str, ci, co, (k, pad): ([i64; 2], [i64; 2])| {
            Conv::new(p, &n(b), ci, co, k, 1, pad)
        };
        BlockC {
            b1x1: Conv::k1(p, &n("branch1x1"), cin, 192),
            b7x7: [
                Conv::k1(p, &n("branch7x7_1"), cin, c7),
                conv(p, "branch7x7_2", c7, c7, row),
                conv(p, "branch7x7_3", c7, 192, col),
            ],
            b7x7dbl: [
                Conv::k1(p, &n("branch7x7dbl_1"), cin, c7),
                conv(p, "branch7x7dbl_2", c7, c7, col),
                conv(p, "branch7x7dbl_3", c7, c7, row),
                conv(p, "branch7x7dbl_4", c7, c7, col),
                conv(p, "branch7x7dbl_5", c7, 192, row),
            ],
            pool: Conv::k1(p, &n("branch_pool"), cin, 192),
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let branches = [
            self.b1x1.forward(x)?,
            chain(x, &self.b7x7)?,
            chain(x, &self.b7x7dbl)?,
            self.pool.forward(&avg_pool_3x3(x)?)?,
        ];
        Ok(Tensor::f_cat(&branches, 1)?)
    }
}

/// `InceptionD` (Mixed_7a): grid reduction 17 -> 8, 320 + 192 + cin channels.
struct BlockD {
    b3x3: [Conv; 2],
    b7x7x3: [Conv; 4],
}

impl BlockD {
    fn new(p: &mut Params, name: &str, cin: i64) -> Self {
        let n = |b: &str| format!("{name}.{b}");
        BlockD {
            b3x3: [
                Conv::k1(p, &n("branch3x3_1"), cin, 192),
                Conv::new(p, &n("branch3x3_2"), 192, 320, [3, 3], 2, [0, 0]),
            ],
            b7x7x3: [
                Conv::k1(p, &n("branch7x7x3_1"), cin, 192),
                Conv::new(p, &n("branch7x7x3_2"), 192, 192, [1, 7], 1, [0, 3]),
                Conv::new(p, &n("branch7x7x3_3"), 192, 192, [7, 1], 1, [3, 0]),
                Conv::new(p, &n("branch7x7x3_4"), 192, 192, [3, 3], 2, [0, 0]),
            ],
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let branches = [
            chain(x, &self.b3x3)?,
            chain(x, &self.b7x7x3)?,
            max_pool(x, 2, 0)?,
        ];
        Ok(Tensor::f_cat(&branches, 1)?)
    }
}

/// `FIDInceptionE_1` (Mixed_7b, average pool) and `FIDInceptionE_2` (Mixed_7c, max pool):
/// 320 + 2 x 384 + 2 x 384 + 192 = 2048 channels.
struct BlockE {
    b1x1: Conv,
    b3x3_1: Conv,
    b3x3_2: [Conv; 2],
    b3x3dbl_12: [Conv; 2],
    b3x3dbl_3: [Conv; 2],
    pool: Conv,
    max_pool: bool,
}

impl BlockE {
    fn new(p: &mut Params, name: &str, cin: i64, max_pool: bool) -> Self {
        let n = |b: &str| format!("{name}.{b}");
        let pair = |p: &mut Params, b: &str| {
            [
                Conv::new(p, &n(&format!("{b}a")), 384, 384, [1, 3], 1, [0, 1]),
                Conv::new(p, &n(&format!("{b}b")), 384, 384, [3, 1], 1, [1, 0]),
            ]
        };
        BlockE {
            b1x1: Conv::k1(p, &n("branch1x1"), cin, 320),
            b3x3_1: Conv::k1(p, &n("branch3x3_1"), cin, 384),
            b3x3_2: pair(p, "branch3x3_2"),
            b3x3dbl_12: [
                Conv::k1(p, &n("branch3x3dbl_1"), cin, 448),
                Conv::new(p, &n("branch3x3dbl_2"), 448, 384, [3, 3], 1, [1, 1]),
            ],
            b3x3dbl_3: pair(p, "branch3x3dbl_3"),
            pool: Conv::k1(p, &n("branch_pool"), cin, 192),
            max_pool,
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.b3x3_1.forward(x)?;
        let b = chain(x, &self.b3x3dbl_12)?;
        let pooled = if self.max_pool {
            max_pool(x, 1, 1)?
        } else {
            avg_pool_3x3(x)?
        };
        let branches = [
            self.b1x1.forward(x)?,
            self.b3x3_2[0].forward(&a)?,
            self.b3x3_2[1].forward(&a)?,
            self.b3x3dbl_3[0].forward(&b)?,
            self.b3x3dbl_3[1].forward(&b)?,
            self.pool.forward(&pooled)?,
        ];
        Ok(Tensor::f_cat(&branches, 1)?)
    }
}

/// The whole network up to pool3, and the optional 1008-class head.
pub(crate) struct Network {
    stem: [Conv; 5],
    mixed_5: [BlockA; 3],
    mixed_6a: BlockB,
    mixed_6: [BlockC; 4],
    mixed_7a: BlockD,
    mixed_7: [BlockE; 2],
    /// `fc.weight` [1008, 2048] and `fc.bias` [1008].
    fc: Option<(Tensor, Tensor)>,
}

/// Classes of the TF Inception head (1000 ImageNet classes plus 8 unused).
pub const NUM_CLASSES: i64 = 1008;
/// Width of the pool3 features.
pub const POOL3_DIM: i64 = 2048;

impl Network {
    /// Takes every parameter of the network (and the head if `head`) from `p`, by
    /// torchvision / pytorch-fid name.
    pub(crate) fn new(p: &mut Params, head: bool) -> Self {
        let stem = [
            Conv::new(p, "Conv2d_1a_3x3", 3, 32, [3, 3], 2, [0, 0]),
            Conv::new(p, "Conv2d_2a_3x3", 32, 32, [3, 3], 1, [0, 0]),
            Conv::new(p, "Conv2d_2b_3x3", 32, 64, [3, 3], 1, [1, 1]),
            Conv::k1(p, "Conv2d_3b_1x1", 64, 80),
            Conv::new(p, "Conv2d_4a_3x3", 80, 192, [3, 3], 1, [0, 0]),
        ];
        Network {
            stem,
            mixed_5: [
                BlockA::new(p, "Mixed_5b", 192, 32),
                BlockA::new(p, "Mixed_5c", 256, 64),
                BlockA::new(p, "Mixed_5d", 288, 64),
            ],
            mixed_6a: BlockB::new(p, "Mixed_6a", 288),
            mixed_6: [
                BlockC::new(p, "Mixed_6b", 768, 128),
                BlockC::new(p, "Mixed_6c", 768, 160),
                BlockC::new(p, "Mixed_6d", 768, 160),
                BlockC::new(p, "Mixed_6e", 768, 192),
            ],
            mixed_7a: BlockD::new(p, "Mixed_7a", 768),
            mixed_7: [
                BlockE::new(p, "Mixed_7b", 1280, false),
                BlockE::new(p, "Mixed_7c", 2048, true),
            ],
            fc: head.then(|| {
                (
                    p.take("fc.weight", &[NUM_CLASSES, POOL3_DIM]),
                    p.take("fc.bias", &[NUM_CLASSES]),
                )
            }),
        }
    }

    pub(crate) fn has_head(&self) -> bool {
        self.fc.is_some()
    }

    /// pool3 features [N, 2048] of a float input [N, 3, 299, 299] on the network's device.
    pub(crate) fn pool3(&self, x: &Tensor) -> Result<Tensor> {
        let s = &self.stem;
        let mut y = chain(x, &s[..3])?;
        y = max_pool(&y, 2, 0)?;
        y = chain(&y, &s[3..])?;
        y = max_pool(&y, 2, 0)?;
        for b in &self.mixed_5 {
            y = b.forward(&y)?;
        }
        y = self.mixed_6a.forward(&y)?;
        for b in &self.mixed_6 {
            y = b.forward(&y)?;
        }
        y = self.mixed_7a.forward(&y)?;
        for b in &self.mixed_7 {
            y = b.forward(&y)?;
        }
        Ok(y.f_adaptive_avg_pool2d([1, 1])?.f_flatten(1, -1)?)
    }

    /// Logits [N, 1008] of pool3 features (dropout is the identity in eval mode).
    pub(crate) fn logits(&self, pool3: &Tensor) -> Option<Result<Tensor>> {
        let (w, b) = self.fc.as_ref()?;
        Some(pool3.f_linear(w, Some(b)).map_err(Into::into))
    }

    /// Logits without the head's bias, `pool3 @ W^T`: what the original Inception Score
    /// code (improved-gan's `inception_score.py`, `matmul(pool3, w)`) takes the softmax of.
    pub(crate) fn logits_unbiased(&self, pool3: &Tensor) -> Option<Result<Tensor>> {
        let (w, _) = self.fc.as_ref()?;
        Some(pool3.f_matmul(&w.tr()).map_err(Into::into))
    }
}
