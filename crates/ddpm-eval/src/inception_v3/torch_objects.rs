//! What the pickle of a torch.save state dict builds: storages (persistent ids), tensors
//! (`_rebuild_tensor_v2`), parameters and ordered dicts.

use super::pickle::Value;
use std::rc::Rc;
use tch::Kind;

/// A storage referenced by a persistent id: `('storage', type, key, location, numel[, view])`.
#[derive(Clone, Debug)]
pub(crate) struct StorageRef {
    /// The key under which the bytes are stored (zip record `data/<key>`, or legacy order).
    pub key: String,
    /// The element type, from the storage class (`torch.FloatStorage`, ...).
    pub kind: Kind,
    /// Offset in elements of a legacy storage view into its root storage (0 otherwise).
    pub view_offset: i64,
}

/// A tensor as `_rebuild_tensor_v2` describes it: a strided view of a storage.
#[derive(Clone, Debug)]
pub(crate) struct TensorRef {
    pub storage: StorageRef,
    pub offset: i64,
    pub size: Vec<i64>,
    pub stride: Vec<i64>,
}

/// The element type of a `torch.*Storage` class.
pub(crate) fn storage_kind(class: &str) -> Option<Kind> {
    Some(match class.strip_prefix("torch.")? {
        "FloatStorage" => Kind::Float,
        "DoubleStorage" => Kind::Double,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" | "UntypedStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

fn int(v: &Value, what: &str) -> Result<i64, String> {
    match v {
        Value::Int(i) => Ok(*i),
        other => Err(format!(
            "{what}: expected an integer, found {}",
            other.describe()
        )),
    }
}

fn ints(v: &Value, what: &str) -> Result<Vec<i64>, String> {
    match v {
        Value::Tuple(items) => items.iter().map(|x| int(x, what)).collect(),
        Value::List(items) => items.borrow().iter().map(|x| int(x, what)).collect(),
        other => Err(format!(
            "{what}: expected a tuple of integers, found {}",
            other.describe()
        )),
    }
}

fn tuple(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Tuple(items) => Some(items),
        _ => None,
    }
}

/// `persistent_load` of torch.save: only storages are supported.
pub(crate) fn persistent_load(pid: &Value) -> Result<Value, String> {
    let items = tuple(pid).ok_or_else(|| format!("persistent id is {}", pid.describe()))?;
    match items.first() {
        Some(Value::Str(s)) if &**s == "storage" => {}
        Some(Value::Str(s)) => {
            return Err(format!(
            "the file holds a pickled `{s}` (e.g. a whole nn.Module), not a state dict of tensors"
        ))
        }
        _ => return Err(format!("persistent id is {}", pid.describe())),
    }
    if items.len() < 5 {
        return Err("storage persistent id with fewer than 5 fields".into());
    }
    let class = match &items[1] {
        Value::Global(g) => g.clone(),
        other => return Err(format!("storage type is {}", other.describe())),
    };
    let kind = storage_kind(&class).ok_or_else(|| format!("unsupported storage type {class}"))?;
    let key = match &items[2] {
        Value::Str(s) => s.to_string(),
        Value::Int(i) => i.to_string(),
        other => return Err(format!("storage key is {}", other.describe())),
    };
    // Legacy files may describe a view into a root storage: (view_key, offset, size).
    let view_offset = match items.get(5).and_then(tuple) {
        Some(view) if view.len() == 3 => int(&view[1], "storage view offset")?,
        _ => 0,
    };
    Ok(Value::Storage(StorageRef {
        key,
        kind,
        view_offset,
    }))
}

/// Calls a global with `args`, for the globals a state dict uses.
pub(crate) fn call(callable: &Value, args: &Value) -> Result<Value, String> {
    let name = match callable {
        Value::Global(g) => g.as_str(),
        Value::Object(g) => return Ok(Value::Object(g.clone())),
        other => return Err(format!("pickle calls {}", other.describe())),
    };
    let empty = Vec::new();
    let a = match args {
        Value::Tuple(items) => items.as_slice(),
        _ => empty.as_slice(),
    };
    match name {
        "torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_tensor" => {
            if a.len() < 4 {
                return Err(format!("{name} with {} arguments", a.len()));
            }
            let storage = match &a[0] {
                Value::Storage(s) => s.clone(),
                other => return Err(format!("{name} of {}", other.describe())),
            };
            Ok(Value::Tensor(Rc::new(TensorRef {
                offset: int(&a[1], "tensor storage offset")?
                    .checked_add(storage.view_offset)
                    .ok_or("tensor storage offset overflows")?,
                size: ints(&a[2], "tensor size")?,
                stride: ints(&a[3], "tensor stride")?,
                storage,
            })))
        }
        "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state" => a
            .first()
            .cloned()
            .ok_or_else(|| format!("{name} without arguments")),
        "torch._tensor._rebuild_from_type_v2" if a.len() >= 3 => call(&a[0], &a[2]),
        "collections.OrderedDict" | "builtins.dict" | "__builtin__.dict" => {
            let dict = Value::Dict(Rc::default());
            if let (Some(Value::List(pairs)), Value::Dict(d)) = (a.first(), &dict) {
                for p in pairs.borrow().iter() {
                    match tuple(p) {
                        Some([k, v]) => d.borrow_mut().push((k.clone(), v.clone())),
                        _ => return Err(format!("{name} of {}", p.describe())),
                    }
                }
            }
            Ok(dict)
        }
        "torch.Size" => Ok(a.first().cloned().unwrap_or(Value::Tuple(Rc::default()))),
        _ => Ok(Value::Object(name.to_string())),
    }
}
