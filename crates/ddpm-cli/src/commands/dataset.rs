//! Reading a whole `data.source` into memory (for `ddpm nll`); training opens its source
//! through `ddpm_worker::dataset`.

use anyhow::Result;
use ddpm_config::DataConfig;
use ddpm_data::samples::SampleSource;

/// Every sample of `data.source` in memory, in dataset order (for `ddpm nll`): prepared
/// datasets are read shard by shard, each shard verified.
pub fn load_all(data: &DataConfig) -> Result<ddpm_data::ImageSet> {
    let Some(url) = data.source.strip_prefix("shards:") else {
        return Ok(ddpm_data::open_source(data)?);
    };
    let src = ddpm_worker::dataset::open_prepared(url, data)?;
    let [c, h, w] = src.shape();
    let per = c * h * w;
    let mut pixels = vec![0u8; src.len() * per];
    let pb = super::progress(src.len() as u64, "load shards");
    for (i, out) in pixels.chunks_exact_mut(per).enumerate() {
        src.read(i, out)?;
        pb.inc(1);
    }
    pb.finish_and_clear();
    let images =
        tch::Tensor::from_slice(&pixels).view([src.len() as i64, c as i64, h as i64, w as i64]);
    Ok(ddpm_data::ImageSet::from_uint8(images, url)?)
}
