//! The subset of Python's pickle machine that `torch.save` uses for a state dict.
//!
//! Values are kept as a small tree ([`Value`]); the calls and persistent ids of a pickle are
//! interpreted by [`super::torch_objects`], which knows the few globals a state dict uses
//! (`torch._utils._rebuild_tensor_v2` and friends, `collections.OrderedDict`). Any other call
//! becomes an opaque [`Value::Object`] that names the global, so an unexpected file fails
//! with a message saying what it holds.

use super::torch_objects::{call, persistent_load, StorageRef, TensorRef};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// A value on the pickle machine's stack. Lists and dicts are shared (mutations after
/// memoization are visible through the memo, as in Python).
#[derive(Clone, Debug)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too large for i64 (little-endian two's complement bytes).
    BigInt(Rc<[u8]>),
    Float,
    Str(Rc<str>),
    Bytes,
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Global(String),
    Storage(StorageRef),
    Tensor(Rc<TensorRef>),
    /// The result of calling a global this reader does not interpret.
    Object(String),
}

impl Value {
    /// A short description for error messages.
    pub fn describe(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "a bool".into(),
            Value::Int(i) => format!("the integer {i}"),
            Value::BigInt(_) => "a large integer".into(),
            Value::Float => "a float".into(),
            Value::Str(s) => format!("the string {s:?}"),
            Value::Bytes => "bytes".into(),
            Value::Tuple(_) => "a tuple".into(),
            Value::List(_) => "a list".into(),
            Value::Dict(_) => "a dict".into(),
            Value::Global(g) => format!("the global {g}"),
            Value::Storage(_) => "a storage".into(),
            Value::Tensor(_) => "a tensor".into(),
            Value::Object(g) => format!("an object built by {g}"),
        }
    }
}

/// The most tuples, lists and dicts one pickle may build.
pub(crate) const MAX_CONTAINERS: usize = 200_000;

/// Runs one pickle starting at `pos`; returns the value and the position after its STOP.
pub(crate) fn unpickle(data: &[u8], pos: usize) -> Result<(Value, usize), String> {
    let mut m = Machine {
        data,
        pos,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        containers: 0,
    };
    let value = m.run()?;
    Ok((value, m.pos))
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    /// Tuples, lists and dicts built so far.
    containers: usize,
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or_else(|| format!("pickle data ends early at byte {}", self.pos))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn uint(&mut self, n: usize) -> Result<u64, String> {
        let b = self.take(n)?;
        Ok(b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64))
    }

    fn line(&mut self) -> Result<String, String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("pickle line without newline")?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }

    fn len_prefixed(&mut self, n: usize) -> Result<Vec<u8>, String> {
        let len = self.uint(n)? as usize;
        Ok(self.take(len)?.to_vec())
    }

    fn pop(&mut self) -> Result<Value, String> {
        self.stack
            .pop()
            .ok_or_else(|| "pickle stack underflow".to_string())
    }

    fn top(&mut self) -> Result<&mut Value, String> {
        self.stack
            .last_mut()
            .ok_or_else(|| "pickle stack underflow".to_string())
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let mark = self.marks.pop().ok_or("pickle MARK missing")?;
        if mark > self.stack.len() {
            return Err("pickle MARK beyond the stack".into());
        }
        Ok(self.stack.split_off(mark))
    }

    fn memo_get(&self, key: u64) -> Result<Value, String> {
        self.memo
            .get(&key)
            .cloned()
            .ok_or_else(|| format!("pickle memo key {key} not set"))
    }

    fn memo_put(&mut self, key: u64) -> Result<(), String> {
        let v = self.stack.last().cloned().ok_or("pickle stack underflow")?;
        self.memo.insert(key, v);
        Ok(())
    }

    fn extend_dict(&mut self, items: Vec<Value>) -> Result<(), String> {
        if !items.len().is_multiple_of(2) {
            return Err("pickle SETITEMS with an odd number of items".into());
        }
        let mut it = items.into_iter();
        let pairs: Vec<(Value, Value)> =
            std::iter::from_fn(|| Some((it.next()?, it.next()?))).collect();
        match self.top()? {
            Value::Dict(d) => d.borrow_mut().extend(pairs),
            Value::Object(_) => {}
            other => return Err(format!("pickle SETITEM on {}", other.describe())),
        }
        Ok(())
    }

    fn extend_list(&mut self, items: Vec<Value>) -> Result<(), String> {
        match self.top()? {
            Value::List(l) => l.borrow_mut().extend(items),
            Value::Object(_) => {}
            other => return Err(format!("pickle APPEND on {}", other.describe())),
        }
        Ok(())
    }

    fn run(&mut self) -> Result<Value, String> {
        loop {
            let at = self.pos;
            let op = self.take(1)?[0];
            if matches!(
                op,
                b')' | b't' | 0x85 | 0x86 | 0x87 | b']' | b'l' | b'}' | b'd'
            ) {
                // Bounds the nesting too, and with it the recursion that drops a value
                // (the caller runs on a large stack); a state dict builds a few thousand.
                self.containers += 1;
                if self.containers > MAX_CONTAINERS {
                    return Err(format!(
                        "pickle builds more than {MAX_CONTAINERS} tuples, lists and dicts: not a state dict"
                    ));
                }
            }
            match op {
                0x80 => {
                    self.take(1)?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME
                }
                b'.' => return self.pop(), // STOP
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = self.uint(4)? as u32 as i32;
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.uint(1)?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = self.uint(2)?;
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a | 0x8b => {
                    let bytes = self.len_prefixed(if op == 0x8a { 1 } else { 4 })?;
                    self.stack.push(long_value(bytes));
                }
                b'I' | b'L' => {
                    let s = self.line()?;
                    let s = s.trim_end_matches('L');
                    let v = match s {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        _ => Value::Int(s.parse().map_err(|_| format!("bad pickle INT {s:?}"))?),
                    };
                    self.stack.push(v);
                }
                b'G' => {
                    self.take(8)?; // BINFLOAT: the value is not needed
                    self.stack.push(Value::Float);
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        0x8c => 1,
                        b'X' => 4,
                        _ => 8,
                    };
                    let b = self.len_prefixed(n)?;
                    let s = String::from_utf8(b).map_err(|_| "pickle string is not UTF-8")?;
                    self.stack.push(Value::Str(s.into()));
                }
                b'U' | b'T' => {
                    let b = self.len_prefixed(if op == b'U' { 1 } else { 4 })?;
                    self.stack.push(Value::Str(
                        b.iter().map(|&c| c as char).collect::<String>().into(),
                    ));
                }
                b'C' | b'B' | 0x8e | 0x96 => {
                    let n = match op {
                        b'C' => 1,
                        b'B' => 4,
                        _ => 8,
                    };
                    self.len_prefixed(n)?;
                    self.stack.push(Value::Bytes);
                }
                b')' => self.stack.push(Value::Tuple(Rc::new(Vec::new()))),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err("pickle stack underflow".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                b']' => self.stack.push(Value::List(Rc::default())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Rc::new(RefCell::new(items))));
                }
                b'a' => {
                    let v = self.pop()?;
                    self.extend_list(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.extend_list(items)?;
                }
                b'}' => self.stack.push(Value::Dict(Rc::default())),
                b'd' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Dict(Rc::default()));
                    self.extend_dict(items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.extend_dict(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.extend_dict(items)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global(format!("{module}.{name}")));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => {
                            self.stack.push(Value::Global(format!("{m}.{n}")))
                        }
                        _ => return Err("pickle STACK_GLOBAL without strings".into()),
                    }
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = call(&callable, &args)?;
                    self.stack.push(v);
                }
                0x92 => {
                    self.pop()?; // NEWOBJ_EX kwargs
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = call(&callable, &args)?;
                    self.stack.push(v);
                }
                b'b' => {
                    // BUILD: the object's state (an OrderedDict's `_metadata`, ...) is not needed.
                    self.pop()?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.stack.push(persistent_load(&pid)?);
                }
                b'P' => return Err("pickle text persistent ids are not supported".into()),
                b'q' => {
                    let k = self.uint(1)?;
                    self.memo_put(k)?;
                }
                b'r' => {
                    let k = self.uint(4)?;
                    self.memo_put(k)?;
                }
                b'p' => {
                    let k = self.line()?.parse().map_err(|_| "bad pickle PUT")?;
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = self.memo.len() as u64;
                    self.memo_put(k)?;
                }
                b'h' => {
                    let k = self.uint(1)?;
                    self.stack.push(self.memo_get(k)?);
                }
                b'j' => {
                    let k = self.uint(4)?;
                    self.stack.push(self.memo_get(k)?);
                }
                b'g' => {
                    let k = self.line()?.parse().map_err(|_| "bad pickle GET")?;
                    self.stack.push(self.memo_get(k)?);
                }
                _ => return Err(format!("unsupported pickle opcode 0x{op:02x} at byte {at}")),
            }
        }
    }
}

fn long_value(bytes: Vec<u8>) -> Value {
    if bytes.is_empty() {
        return Value::Int(0);
    }
    if bytes.len() > 8 {
        return Value::BigInt(bytes.into());
    }
    let negative = bytes[bytes.len() - 1] & 0x80 != 0;
    let mut buf = [if negative { 0xff } else { 0 }; 8];
    buf[..bytes.len()].copy_from_slice(&bytes);
    Value::Int(i64::from_le_bytes(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long1_decodes_signed_little_endian() {
        assert!(matches!(long_value(vec![0xff]), Value::Int(-1)));
        assert!(matches!(long_value(vec![0x00, 0x01]), Value::Int(256)));
        assert!(matches!(long_value(vec![0; 10]), Value::BigInt(_)));
    }

    #[test]
    fn truncated_pickle_is_an_error_not_a_panic() {
        let err = unpickle(&[0x80, 0x02, b'X', 10, 0, 0, 0, b'a'], 0).unwrap_err();
        assert!(err.contains("ends early"), "{err}");
        let err = unpickle(&[0x80, 0x02, 0xfe], 0).unwrap_err();
        assert!(err.contains("opcode 0xfe"), "{err}");
    }
}
