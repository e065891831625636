//! A reader of GGUF metadata (the key/value section at the head of the file).
//!
//! Only the metadata is read, through a buffered reader from the start of the
//! file, so a multi-gigabyte model file costs no more than its header.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(Vec<u8>),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    fn as_int(&self) -> Option<i64> {
        Some(match *self {
            GgufValue::U8(v) => v.into(),
            GgufValue::I8(v) => v.into(),
            GgufValue::U16(v) => v.into(),
            GgufValue::I16(v) => v.into(),
            GgufValue::U32(v) => v.into(),
            GgufValue::I32(v) => v.into(),
            GgufValue::U64(v) => i64::try_from(v).ok()?,
            GgufValue::I64(v) => v,
            _ => return None,
        })
    }
}

/// Why a GGUF file could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GgufError {
    Io(String),
    Format(String),
}

impl std::fmt::Display for GgufError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GgufError::Io(m) | GgufError::Format(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for GgufError {}

/// The metadata of a GGUF file, in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufMetadata {
    pub version: u32,
    pub kv: Vec<(String, GgufValue)>,
}

/// Entries claimed beyond this many are taken as corruption, not allocated.
const MAX_ITEMS: u64 = 1 << 28;

struct Reader<R> {
    inner: R,
    offset: u64,
}

impl<R: Read> Reader<R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut buf = [0u8; N];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| GgufError::Format(format!("truncated at byte {}: {e}", self.offset)))?;
        self.offset += N as u64;
        Ok(buf)
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    fn count(&mut self, what: &str) -> Result<u64, GgufError> {
        let at = self.offset;
        let n = self.u64()?;
        if n > MAX_ITEMS {
            return Err(GgufError::Format(format!("implausible {what} length {n} at byte {at}")));
        }
        Ok(n)
    }

    fn string(&mut self) -> Result<Vec<u8>, GgufError> {
        let n = self.count("string")? as usize;
        let mut buf = Vec::new();
        let got = (&mut self.inner)
            .take(n as u64)
            .read_to_end(&mut buf)
            .map_err(|e| GgufError::Io(e.to_string()))?;
        if got != n {
            return Err(GgufError::Format(format!("string truncated at byte {}", self.offset)));
        }
        self.offset += n as u64;
        Ok(buf)
    }

    fn value(&mut self, ty: u32) -> Result<GgufValue, GgufError> {
        Ok(match ty {
            0 => GgufValue::U8(u8::from_le_bytes(self.bytes()?)),
            1 => GgufValue::I8(i8::from_le_bytes(self.bytes()?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.bytes()?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.bytes()?)),
            4 => GgufValue::U32(self.u32()?),
            5 => GgufValue::I32(i32::from_le_bytes(self.bytes()?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.bytes()?)),
            7 => GgufValue::Bool(self.bytes::<1>()?[0] != 0),
            8 => GgufValue::Str(self.string()?),
            9 => {
                let item_ty = self.u32()?;
                let n = self.count("array")?;
                let mut items = Vec::with_capacity(n.min(1 << 20) as usize);
                for _ in 0..n {
                    items.push(self.value(item_ty)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(i64::from_le_bytes(self.bytes()?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.bytes()?)),
            other => {
                return Err(GgufError::Format(format!(
                    "unknown value type {other} at byte {}",
                    self.offset - 4
                )))
            }
        })
    }
}

impl GgufMetadata {
    /// Read the metadata of the GGUF file at `path`.
    pub fn read(path: &Path) -> Result<GgufMetadata, GgufError> {
        let file = File::open(path).map_err(|e| GgufError::Io(format!("cannot open {}: {e}", path.display())))?;
        Self::from_reader(BufReader::with_capacity(1 << 20, file))
            .map_err(|e| GgufError::Format(format!("{}: {e}", path.display())))
    }

    /// Read GGUF metadata from the start of a stream.
    pub fn from_reader<R: Read>(inner: R) -> Result<GgufMetadata, GgufError> {
        let mut r = Reader { inner, offset: 0 };
        if &r.bytes::<4>()? != b"GGUF" {
            return Err(GgufError::Format("not a GGUF file (bad magic)".into()));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Format(format!("unsupported GGUF version {version}")));
        }
        let _tensor_count = r.u64()?;
        let n = r.count("metadata")?;
        let mut kv = Vec::with_capacity(n.min(1 << 16) as usize);
        for _ in 0..n {
            let key = String::from_utf8_lossy(&r.string()?).into_owned();
            let ty = r.u32()?;
            let value = r.value(ty).map_err(|e| GgufError::Format(format!("key {key:?}: {e}")))?;
            kv.push((key, value));
        }
        Ok(GgufMetadata { version, kv })
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.kv.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

/// The tokenizer part of a GGUF file's metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTokenizer {
    /// `tokenizer.ggml.model`, e.g. "gpt2", "llama", "bert", "t5".
    pub model: String,
    /// `tokenizer.ggml.tokens`: the stored piece of every id.
    pub tokens: Vec<Vec<u8>>,
    /// `tokenizer.ggml.token_type` (llama.cpp's token types), when present.
    pub token_types: Option<Vec<i32>>,
}

/// Read the tokenizer metadata of the GGUF file at `path`.
pub fn read_tokenizer(path: &Path) -> Result<GgufTokenizer, GgufError> {
    let meta = GgufMetadata::read(path)?;
    tokenizer_of(&meta).map_err(|m| GgufError::Format(format!("{}: {m}", path.display())))
}

fn tokenizer_of(meta: &GgufMetadata) -> Result<GgufTokenizer, String> {
    let model = match meta.get("tokenizer.ggml.model") {
        Some(GgufValue::Str(s)) => String::from_utf8_lossy(s).into_owned(),
        _ => return Err("no string \"tokenizer.ggml.model\"".into()),
    };
    let tokens = match meta.get("tokenizer.ggml.tokens") {
        Some(GgufValue::Array(items)) => items
            .iter()
            .map(|v| match v {
                GgufValue::Str(s) => Ok(s.clone()),
                _ => Err("\"tokenizer.ggml.tokens\" holds a non-string".to_string()),
            })
            .collect::<Result<Vec<_>, _>>()?,
        _ => return Err("no array \"tokenizer.ggml.tokens\"".into()),
    };
    let token_types = match meta.get("tokenizer.ggml.token_type") {
        Some(GgufValue::Array(items)) => Some(
            items
                .iter()
                .map(|v| v.as_int().and_then(|i| i32::try_from(i).ok()))
                .collect::<Option<Vec<_>>>()
                .ok_or("\"tokenizer.ggml.token_type\" holds a non-integer")?,
        ),
        Some(_) => return Err("\"tokenizer.ggml.token_type\" is not an array".into()),
        None => None,
    };
    Ok(GgufTokenizer { model, tokens, token_types })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gguf_string(s: &[u8]) -> Vec<u8> {
        [&(s.len() as u64).to_le_bytes()[..], s].concat()
    }

    fn file(kvs: &[(&str, u32, Vec<u8>)]) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(0u64.to_le_bytes());
        out.extend((kvs.len() as u64).to_le_bytes());
        for (k, ty, v) in kvs {
            out.extend(gguf_string(k.as_bytes()));
            out.extend(ty.to_le_bytes());
            out.extend(v);
        }
        out
    }

    fn str_array(items: &[&[u8]]) -> Vec<u8> {
        let mut v = 8u32.to_le_bytes().to_vec();
        v.extend((items.len() as u64).to_le_bytes());
        for s in items {
            v.extend(gguf_string(s));
        }
        v
    }

    #[test]
    fn reads_every_value_type_and_the_tokenizer() {
        let mut types = 5u32.to_le_bytes().to_vec();
        types.extend(2u64.to_le_bytes());
        types.extend(1i32.to_le_bytes());
        types.extend(6i32.to_le_bytes());
        let mut nested = 9u32.to_le_bytes().to_vec();
        nested.extend(1u64.to_le_bytes());
        nested.extend(0u32.to_le_bytes());
        nested.extend(1u64.to_le_bytes());
        nested.push(7);
        let bytes = file(&[
            ("a.u8", 0, vec![200]),
            ("a.i8", 1, vec![0xff]),
            ("a.u16", 2, 7u16.to_le_bytes().to_vec()),
            ("a.i16", 3, (-7i16).to_le_bytes().to_vec()),
            ("a.f32", 6, 1.5f32.to_le_bytes().to_vec()),
            ("a.bool", 7, vec![1]),
            ("a.u64", 10, 9u64.to_le_bytes().to_vec()),
            ("a.i64", 11, (-9i64).to_le_bytes().to_vec()),
            ("a.f64", 12, 2.5f64.to_le_bytes().to_vec()),
            ("a.nested", 9, nested),
            ("tokenizer.ggml.model", 8, gguf_string(b"llama")),
            ("tokenizer.ggml.tokens", 9, str_array(&[b"\xe2\x96\x81a", b"<0x0A>"])),
            ("tokenizer.ggml.token_type", 9, types),
        ]);
        let meta = GgufMetadata::from_reader(&bytes[..]).unwrap();
        assert_eq!(meta.version, 3);
        assert_eq!(meta.get("a.u8"), Some(&GgufValue::U8(200)));
        assert_eq!(meta.get("a.i8"), Some(&GgufValue::I8(-1)));
        assert_eq!(meta.get("a.i16"), Some(&GgufValue::I16(-7)));
        assert_eq!(meta.get("a.f64"), Some(&GgufValue::F64(2.5)));
        assert_eq!(meta.get("a.nested"), Some(&GgufValue::Array(vec![GgufValue::Array(vec![GgufValue::U8(7)])])));
        let tok = tokenizer_of(&meta).unwrap();
        assert_eq!(tok.model, "llama");
        assert_eq!(tok.tokens, vec![b"\xe2\x96\x81a".to_vec(), b"<0x0A>".to_vec()]);
        assert_eq!(tok.token_types, Some(vec![1, 6]));
    }

    #[test]
    fn rejects_corrupt_files() {
        let err = |b: &[u8]| GgufMetadata::from_reader(b).unwrap_err().to_string();
        assert!(err(b"GGML\x03\0\0\0").contains("magic"));
        let mut v1 = b"GGUF".to_vec();
        v1.extend(1u32.to_le_bytes());
        assert!(err(&v1).contains("version 1"));
        let good = file(&[("k", 8, gguf_string(b"value"))]);
        assert!(err(&good[..good.len() - 2]).contains("truncated"));
        let huge = file(&[("k", 8, u64::MAX.to_le_bytes().to_vec())]);
        assert!(err(&huge).contains("implausible"));
        let unknown = file(&[("k", 99, vec![])]);
        assert!(err(&unknown).contains("unknown value type 99"));
        let meta = GgufMetadata::from_reader(&file(&[])[..]).unwrap();
        assert!(tokenizer_of(&meta).unwrap_err().contains("tokenizer.ggml.model"));
    }
}
