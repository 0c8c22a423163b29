//! Images in, statistics out: pixel batches are prepared for Inception as they come, run in
//! batches of a fixed size, and folded into running statistics, so no image set (50,000
//! samples for the paper's numbers) is ever held in memory.

use crate::preprocess::inception_input;
use crate::stats::{FeatureStats, StatsAccumulator};
use crate::torchscript::FidInception;
use crate::{inception_score, Result, IS_SPLITS};
use tch::{Device, Tensor};

/// A network that gives the 1008 Inception class logits of prepared input (for the IS).
pub trait Classifier {
    /// `[N, classes]` logits of `[N, 3, 299, 299]` input in the TF range.
    fn logits(&self, input: &Tensor) -> Result<Tensor>;
}

/// What a [`FeatureCollector`] gathered.
#[derive(Debug)]
pub struct Collected {
    /// Mean and covariance of the pool3 features.
    pub stats: FeatureStats,
    /// Number of images.
    pub count: i64,
    /// Inception Score `(mean, std)` over 10 splits, when a classifier was given.
    pub inception_score: Option<(f64, f64)>,
}

/// Accumulates FID statistics (and IS logits) of pixel batches.
pub struct FeatureCollector<'m> {
    fid: &'m FidInception,
    classifier: Option<&'m dyn Classifier>,
    batch: i64,
    pending: Vec<Tensor>,
    pending_len: i64,
    stats: StatsAccumulator,
    logits: Vec<Tensor>,
    origin: String,
}

impl<'m> FeatureCollector<'m> {
    /// Collects through `fid` in batches of `batch` images; `origin` names the image set in
    /// errors.
    pub fn new(fid: &'m FidInception, batch: i64, origin: &str) -> Self {
        Self {
            fid,
            classifier: None,
            batch: batch.max(1),
            pending: Vec::new(),
            pending_len: 0,
            stats: StatsAccumulator::new(),
            logits: Vec::new(),
            origin: origin.to_string(),
        }
    }

    /// Also computes the Inception Score with `classifier`.
    pub fn with_classifier(mut self, classifier: &'m dyn Classifier) -> Self {
        self.classifier = Some(classifier);
        self
    }

    /// Images taken so far.
    pub fn count(&self) -> i64 {
        self.stats.count() + self.pending_len
    }

    /// Adds `[N, 3, H, W]` pixels on the 0..=255 scale (images of one size; sizes may differ
    /// between calls).
    pub fn push(&mut self, pixels: &Tensor) -> Result<()> {
        let x = inception_input(&pixels.to_device(self.fid.device()))?;
        self.pending_len += x.size()[0];
        self.pending.push(x);
        while self.pending_len >= self.batch {
            self.run(self.batch)?;
        }
        Ok(())
    }

    /// Runs the first `n` pending images.
    fn run(&mut self, n: i64) -> Result<()> {
        let all = Tensor::cat(&self.pending, 0);
        let x = all.narrow(0, 0, n);
        let rest = all.narrow(0, n, self.pending_len - n);
        self.pending = if rest.size()[0] > 0 {
            vec![rest]
        } else {
            Vec::new()
        };
        self.pending_len -= n;
        let done = self.stats.count();
        let origin = format!("{} (images {}..{})", self.origin, done, done + n);
        self.stats.add(&self.fid.features_of_input(&x)?, &origin)?;
        if let Some(c) = self.classifier {
            self.logits.push(c.logits(&x)?.to_device(Device::Cpu));
        }
        Ok(())
    }

    /// The statistics of every image pushed (and the IS when a classifier was given).
    pub fn finish(mut self) -> Result<Collected> {
        if self.pending_len > 0 {
            self.run(self.pending_len)?;
        }
        let count = self.stats.count();
        let inception_score = match self.logits.is_empty() {
            true => None,
            false => Some(inception_score(&Tensor::cat(&self.logits, 0), IS_SPLITS)?),
        };
        Ok(Collected {
            stats: self.stats.finish(&self.origin)?,
            count,
            inception_score,
        })
    }
}
