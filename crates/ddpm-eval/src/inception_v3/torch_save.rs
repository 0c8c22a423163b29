//! Reads a state dict written by Python's `torch.save`, in either of its formats:
//!
//! * the zip format (torch >= 1.6): `<name>/data.pkl` plus one record `<name>/data/<key>`
//!   per storage;
//! * the legacy format (torch < 1.6, e.g. pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`):
//!   consecutive pickles (magic number, protocol version, system info, the object, the list of
//!   storage keys), then each storage as an 8-byte element count and its raw bytes.
//!
//! libtorch's own readers cannot load these files: `torch::pickle_load` and tch's
//! `Tensor::loadz_multi` turn a pickled `collections.OrderedDict` (what `state_dict()`
//! returns) into `None`, and neither reads the legacy format.

use super::pickle::{unpickle, Value};
use super::torch_objects::{StorageRef, TensorRef};
use std::collections::HashMap;
use std::io::{Cursor, Read};
use tch::{Kind, Tensor};

/// The zip local-file-header magic that starts every zip-format torch.save file.
pub(crate) const ZIP_MAGIC: &[u8] = b"PK\x03\x04";
/// The first pickle of a legacy torch.save file: this integer.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// Reads the named tensors of a torch.save file (contiguous, CPU, in the stored dtype).
/// The error is the reason only; the caller names the file.
pub(crate) fn read_state_dict(bytes: &[u8]) -> Result<Vec<(String, Tensor)>, String> {
    // On a thread with a large stack: dropping a value nested as deep as the pickle machine
    // allows (`pickle::MAX_CONTAINERS`) recurses that deep.
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("torch-save-reader".into())
            .stack_size(512 << 20)
            .spawn_scoped(scope, || read_state_dict_here(bytes))
            .map_err(|e| format!("starting the reader thread: {e}"))?
            .join()
            .map_err(|_| "the torch.save reader panicked".to_string())?
    })
}

fn read_state_dict_here(bytes: &[u8]) -> Result<Vec<(String, Tensor)>, String> {
    if bytes.starts_with(ZIP_MAGIC) {
        read_zip(bytes)
    } else if bytes.starts_with(&[0x80, 0x02, 0x8a, 0x0a]) {
        read_legacy(bytes)
    } else {
        Err("neither a zip-format nor a legacy torch.save file (unknown leading bytes)".into())
    }
}

/// The largest record read from a zip file (Inception-v3's weights are ~100 MB).
const MAX_RECORD_BYTES: u64 = 1 << 30;

/// The most elements one tensor of a weights file may have (the largest of Inception-v3 has
/// about 2 million).
const MAX_TENSOR_ELEMENTS: i64 = 1 << 26;

fn read_zip(bytes: &[u8]) -> Result<Vec<(String, Tensor)>, String> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| format!("bad zip: {e}"))?;
    let pkl = zip
        .file_names()
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .map(str::to_string)
        .ok_or("zip file without <name>/data.pkl: not written by torch.save")?;
    let prefix = &pkl[..pkl.len() - "data.pkl".len()];
    let mut record = |name: &str| -> Result<Option<Vec<u8>>, String> {
        let mut file = match zip.by_name(&format!("{prefix}{name}")) {
            Ok(f) => f,
            Err(zip::result::ZipError::FileNotFound) => return Ok(None),
            Err(e) => return Err(format!("record {prefix}{name}: {e}")),
        };
        // The entry's claimed size is not trusted for the allocation; reading stops at a
        // bound far above any Inception-v3 file.
        let mut out = Vec::new();
        (&mut file)
            .take(MAX_RECORD_BYTES)
            .read_to_end(&mut out)
            .map_err(|e| format!("record {prefix}{name}: {e}"))?;
        if out.len() as u64 == MAX_RECORD_BYTES {
            return Err(format!(
                "record {prefix}{name} is larger than {MAX_RECORD_BYTES} bytes"
            ));
        }
        Ok(Some(out))
    };
    if let Some(order) = record("byteorder")? {
        if order != b"little" {
            return Err(format!(
                "byte order {:?} is not supported",
                String::from_utf8_lossy(&order)
            ));
        }
    }
    let data = record("data.pkl")?.ok_or("data.pkl unreadable")?;
    let (root, _) = unpickle(&data, 0)?;
    let mut storages = HashMap::new();
    for t in tensors_of(&root)?.iter().map(|(_, t)| t) {
        if !storages.contains_key(&t.storage.key) {
            let name = format!("data/{}", t.storage.key);
            let raw =
                record(&name)?.ok_or_else(|| format!("storage record {prefix}{name} missing"))?;
            storages.insert(t.storage.key.clone(), flat(&raw, t.storage.kind)?);
        }
    }
    materialize(&root, &storages)
}

fn read_legacy(bytes: &[u8]) -> Result<Vec<(String, Tensor)>, String> {
    let (magic, pos) = unpickle(bytes, 0)?;
    match magic {
        Value::BigInt(b) if *b == LEGACY_MAGIC => {}
        _ => return Err("not a legacy torch.save file (wrong magic number)".into()),
    }
    let (_protocol, pos) = unpickle(bytes, pos)?;
    let (sys_info, pos) = unpickle(bytes, pos)?;
    if let Value::Dict(d) = &sys_info {
        for (k, v) in d.borrow().iter() {
            if matches!((k, v), (Value::Str(k), Value::Bool(false)) if &**k == "little_endian") {
                return Err("big-endian legacy files are not supported".into());
            }
        }
    }
    let (root, pos) = unpickle(bytes, pos)?;
    let (keys, mut pos) = unpickle(bytes, pos)?;
    let keys: Vec<String> = match keys {
        Value::List(l) => l
            .borrow()
            .iter()
            .map(|k| match k {
                Value::Str(s) => Ok(s.to_string()),
                other => Err(format!("storage key is {}", other.describe())),
            })
            .collect::<Result<_, _>>()?,
        other => return Err(format!("storage key list is {}", other.describe())),
    };
    let kinds: HashMap<String, Kind> = tensors_of(&root)?
        .iter()
        .map(|(_, t)| (t.storage.key.clone(), t.storage.kind))
        .collect();
    let mut storages = HashMap::new();
    for key in keys {
        let count: [u8; 8] = bytes
            .get(pos..pos + 8)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| format!("file ends before storage {key}"))?;
        let count = i64::from_le_bytes(count);
        // A storage no tensor uses is skipped as raw bytes (its element size is unknown then,
        // but such a storage does not occur in a state dict).
        let kind = kinds.get(&key).copied().unwrap_or(Kind::Uint8);
        let len = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(kind.elt_size_in_bytes()));
        let end = len
            .and_then(|l| (pos + 8).checked_add(l))
            .filter(|&e| e <= bytes.len());
        let end = end.ok_or_else(|| {
            format!("storage {key} ({count} elements) runs past the end of the file")
        })?;
        storages.insert(key, flat(&bytes[pos + 8..end], kind)?);
        pos = end;
    }
    materialize(&root, &storages)
}

/// The (name, tensor description) pairs of a state dict, in file order.
fn tensors_of(root: &Value) -> Result<Vec<(String, TensorRef)>, String> {
    let dict = match root {
        Value::Dict(d) => d,
        other => {
            return Err(format!(
                "holds {}, not a state dict (a dict of tensors)",
                other.describe()
            ))
        }
    };
    let mut out = Vec::new();
    for (k, v) in dict.borrow().iter() {
        let name = match k {
            Value::Str(s) => s.clone(),
            other => return Err(format!("state dict key is {}", other.describe())),
        };
        match v {
            Value::Tensor(t) => out.push((name.to_string(), (**t).clone())),
            other => {
                return Err(format!(
                    "state dict entry `{name}` is {}, not a tensor",
                    other.describe()
                ))
            }
        }
    }
    Ok(out)
}

/// A 1-D tensor over raw little-endian storage bytes.
fn flat(raw: &[u8], kind: Kind) -> Result<Tensor, String> {
    let elt = kind.elt_size_in_bytes();
    let n = raw.len() / elt;
    Tensor::f_from_data_size(&raw[..n * elt], &[n as i64], kind).map_err(|e| e.to_string())
}

fn materialize(
    root: &Value,
    storages: &HashMap<String, Tensor>,
) -> Result<Vec<(String, Tensor)>, String> {
    tensors_of(root)?
        .into_iter()
        .map(|(name, t)| {
            let storage = storages.get(&t.storage.key).ok_or_else(|| {
                format!(
                    "tensor `{name}`: storage {} is not in the file",
                    t.storage.key
                )
            })?;
            let tensor = view(storage, &t).map_err(|e| format!("tensor `{name}`: {e}"))?;
            Ok((name, tensor))
        })
        .collect()
}

/// The strided view `t` of `storage`, copied to a contiguous tensor, after a bounds check.
pub(crate) fn view(storage: &Tensor, t: &TensorRef) -> Result<Tensor, String> {
    let StorageRef { key, .. } = &t.storage;
    if t.size.len() != t.stride.len()
        || t.size.iter().chain(&t.stride).any(|&v| v < 0)
        || t.offset < 0
    {
        return Err(format!(
            "invalid size {:?} / stride {:?} / offset {}",
            t.size, t.stride, t.offset
        ));
    }
    if t.size.contains(&0) {
        return Ok(Tensor::zeros(
            t.size.as_slice(),
            (storage.kind(), storage.device()),
        ));
    }
    let overflow = || {
        format!(
            "size {:?} / stride {:?} / offset {} overflow",
            t.size, t.stride, t.offset
        )
    };
    let mut last = t.offset;
    let mut elements: i64 = 1;
    for (n, s) in t.size.iter().zip(&t.stride) {
        last = (n - 1)
            .checked_mul(*s)
            .and_then(|d| last.checked_add(d))
            .ok_or_else(overflow)?;
        elements = elements.checked_mul(*n).ok_or_else(overflow)?;
    }
    let numel = storage.size()[0];
    // A view may repeat elements (stride 0, or overlapping strides as in the test
    // fixtures), so its size is bounded on its own: no Inception-v3 tensor comes near.
    if elements > MAX_TENSOR_ELEMENTS {
        return Err(format!(
            "size {:?} has {elements} elements, more than the {MAX_TENSOR_ELEMENTS} any weight of this model has room for",
            t.size
        ));
    }
    if last >= numel {
        return Err(format!(
            "size {:?}, stride {:?}, offset {} reach element {last} of storage {key}, which has {numel}",
            t.size, t.stride, t.offset
        ));
    }
    let v = storage.f_as_strided(t.size.as_slice(), t.stride.as_slice(), t.offset);
    v.and_then(|v| v.f_contiguous()).map_err(|e| e.to_string())
}
