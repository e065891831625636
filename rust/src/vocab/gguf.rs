//! A reader of the vocabulary in a GGUF file's metadata (the key/value section
//! at the head of the file).
//!
//! Only the three `tokenizer.ggml.*` keys that decide token bytes are kept;
//! every other value is skipped without being materialised. The reader is built
//! for hostile files: it never recurses (nested arrays are walked with an
//! explicit stack, at most [`MAX_DEPTH`] deep), and every length or count the
//! file claims is checked against the bytes left in the file before anything is
//! allocated or read for it, so memory stays proportional to the file's size.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// Why a GGUF file could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GgufError {
    /// Opening, seeking or reading failed (a missing or unreadable file, a
    /// failing disk): `errno` is the OS error code where there is one.
    Io { errno: Option<i32>, message: String },
    /// The bytes read are not a well-formed GGUF file.
    Format(String),
}

impl GgufError {
    /// The I/O error `e`, met while doing `doing` ("reading byte 24").
    fn io(e: &std::io::Error, doing: String) -> GgufError {
        // `e`'s text without the " (os error N)" that Display appends: the code is kept apart.
        let text = e.to_string();
        let text = text.rfind(" (os error ").map_or(&text[..], |at| &text[..at]);
        GgufError::Io { errno: e.raw_os_error(), message: format!("{text} ({doing})") }
    }
}

impl std::fmt::Display for GgufError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GgufError::Io { message, .. } | GgufError::Format(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for GgufError {}

/// The tokenizer part of a GGUF file's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTokenizer {
    /// `tokenizer.ggml.model`, e.g. "gpt2", "llama", "bert", "t5".
    pub model: String,
    /// `tokenizer.ggml.tokens`: the stored piece of every id.
    pub tokens: Vec<Vec<u8>>,
    /// `tokenizer.ggml.token_type` (llama.cpp's token types), when present.
    pub token_types: Option<Vec<i32>>,
}

/// Arrays nested deeper than this are taken as corruption (llama.cpp writes none).
pub const MAX_DEPTH: usize = 64;

/// Up to this many items are reserved ahead; longer arrays grow as items are read.
const RESERVE_CAP: u64 = 1 << 16;

/// The longest key the GGUF format allows.
pub const MAX_KEY_BYTES: u64 = (1 << 16) - 1;

/// The longest string kept (the model name, a token's piece); longer ones are
/// corruption. Bounding what is kept bounds memory even for a multi-gigabyte file.
pub const MAX_KEPT_STRING_BYTES: u64 = 1 << 20;

/// The most tokens a vocabulary may have: 16 times the largest in use (262,144).
/// Each token costs about 100 bytes on its way to Python, so this bounds that
/// overhead to ~400 MB whatever the file claims.
pub const MAX_TOKENS: u64 = 1 << 22;

const TYPE_STRING: u32 = 8;
const TYPE_ARRAY: u32 = 9;

/// The encoded size of a fixed-size value type.
fn fixed_size(ty: u32) -> Option<u64> {
    match ty {
        0 | 1 | 7 => Some(1), // u8, i8, bool
        2 | 3 => Some(2),     // u16, i16
        4..=6 => Some(4),     // u32, i32, f32
        10..=12 => Some(8),   // u64, i64, f64
        _ => None,
    }
}

/// The fewest bytes a value of type `ty` takes in the file.
fn min_size(ty: u32) -> Option<u64> {
    match ty {
        TYPE_STRING => Some(8),    // its length
        TYPE_ARRAY => Some(4 + 8), // its item type and count
        _ => fixed_size(ty),
    }
}

struct Reader<R> {
    inner: R,
    offset: u64,
    len: u64,
}

impl<R: Read> Reader<R> {
    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.offset)
    }

    fn truncated(&self, what: &str, need: u64) -> GgufError {
        GgufError::Format(format!(
            "{what} at byte {} needs {need} bytes but the file has {} left",
            self.offset,
            self.remaining()
        ))
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut buf = [0u8; N];
        self.fill(&mut buf)?;
        Ok(buf)
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<(), GgufError> {
        let need = buf.len() as u64;
        if need > self.remaining() {
            return Err(self.truncated("value", need));
        }
        self.inner.read_exact(buf).map_err(|e| GgufError::io(&e, format!("reading byte {}", self.offset)))?;
        self.offset += need;
        Ok(())
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    /// A count of at most `max` items of at least `item_size` bytes each, backed by the bytes left.
    fn count(&mut self, what: &str, item_size: u64, max: u64) -> Result<u64, GgufError> {
        let at = self.offset;
        let n = self.u64()?;
        if n > max {
            return Err(GgufError::Format(format!(
                "{what} at byte {at} claims {n} items, more than the {max} allowed"
            )));
        }
        match n.checked_mul(item_size) {
            Some(need) if need <= self.remaining() => Ok(n),
            _ => Err(GgufError::Format(format!(
                "{what} at byte {at} claims {n} items of at least {item_size} bytes, but the file has {} bytes left",
                self.remaining()
            ))),
        }
    }

    /// Pass over `n` bytes without keeping them.
    fn skip(&mut self, n: u64) -> Result<(), GgufError> {
        if n > self.remaining() {
            return Err(self.truncated("value", n));
        }
        let mut buf = [0u8; 8192];
        let mut left = n;
        while left > 0 {
            let chunk = left.min(buf.len() as u64) as usize;
            self.fill(&mut buf[..chunk])?;
            left -= chunk as u64;
        }
        Ok(())
    }

    /// A string of at most `max` bytes.
    fn string(&mut self, max: u64) -> Result<Vec<u8>, GgufError> {
        let n = self.count("string", 1, max)?;
        // `count` checked that the file holds these n bytes.
        let mut buf = vec![0u8; n as usize];
        self.fill(&mut buf)?;
        Ok(buf)
    }

    fn unknown_type(&self, ty: u32) -> GgufError {
        GgufError::Format(format!("unknown value type {ty} before byte {}", self.offset))
    }

    /// An array header: its item type (of a known size) and its count.
    fn array_header(&mut self) -> Result<(u32, u64), GgufError> {
        let item = self.u32()?;
        let size = min_size(item).ok_or_else(|| self.unknown_type(item))?;
        Ok((item, self.count("array", size, u64::MAX)?))
    }

    /// Pass over one value of type `ty`, walking nested arrays with an explicit stack.
    fn skip_value(&mut self, ty: u32) -> Result<(), GgufError> {
        // (item type, items left) of each array being walked, outermost first.
        let mut open: Vec<(u32, u64)> = Vec::new();
        let mut ty = ty;
        loop {
            match ty {
                TYPE_STRING => {
                    let n = self.count("string", 1, u64::MAX)?;
                    self.skip(n)?;
                }
                TYPE_ARRAY => {
                    if open.len() >= MAX_DEPTH {
                        return Err(GgufError::Format(format!(
                            "arrays nested more than {MAX_DEPTH} deep at byte {}",
                            self.offset
                        )));
                    }
                    let (item, n) = self.array_header()?;
                    match fixed_size(item) {
                        // `array_header` checked that n * size bytes are left.
                        Some(size) => self.skip(n * size)?,
                        None => open.push((item, n)),
                    }
                }
                other => self.skip(fixed_size(other).ok_or_else(|| self.unknown_type(other))?)?,
            }
            loop {
                match open.last_mut() {
                    None => return Ok(()),
                    Some((_, 0)) => {
                        open.pop();
                    }
                    Some((item, left)) => {
                        *left -= 1;
                        ty = *item;
                        break;
                    }
                }
            }
        }
    }

    /// A value of integer type `ty`; `None` past `i64::MAX` (or for a type the caller let through that is not an integer).
    fn integer(&mut self, ty: u32) -> Result<Option<i64>, GgufError> {
        Ok(match ty {
            0 => Some(u8::from_le_bytes(self.bytes()?).into()),
            1 => Some(i8::from_le_bytes(self.bytes()?).into()),
            2 => Some(u16::from_le_bytes(self.bytes()?).into()),
            3 => Some(i16::from_le_bytes(self.bytes()?).into()),
            4 => Some(u32::from_le_bytes(self.bytes()?).into()),
            5 => Some(i32::from_le_bytes(self.bytes()?).into()),
            10 => i64::try_from(u64::from_le_bytes(self.bytes()?)).ok(),
            11 => Some(i64::from_le_bytes(self.bytes()?)),
            _ => None,
        })
    }

    /// The header of a per-token array of `wanted` items: its item type and count.
    fn token_array(
        &mut self,
        key: &str,
        ty: u32,
        wanted: &str,
        ok: impl Fn(u32) -> bool,
    ) -> Result<(u32, u64), GgufError> {
        if ty != TYPE_ARRAY {
            return Err(GgufError::Format(format!("{key:?} is not an array (type {ty})")));
        }
        let item = self.u32()?;
        if !ok(item) {
            return Err(GgufError::Format(format!("{key:?} holds type {item}, not {wanted}")));
        }
        let size = min_size(item).ok_or_else(|| self.unknown_type(item))?;
        Ok((item, self.count("array", size, MAX_TOKENS)?))
    }

    fn string_array(&mut self, key: &str, ty: u32) -> Result<Vec<Vec<u8>>, GgufError> {
        let (_, n) = self.token_array(key, ty, "strings", |t| t == TYPE_STRING)?;
        let mut out = Vec::with_capacity(n.min(RESERVE_CAP) as usize);
        for _ in 0..n {
            out.push(self.string(MAX_KEPT_STRING_BYTES)?);
        }
        Ok(out)
    }

    fn int_array(&mut self, key: &str, ty: u32) -> Result<Vec<i32>, GgufError> {
        let (item, n) = self.token_array(key, ty, "integers", |t| matches!(t, 0..=5 | 10 | 11))?;
        let mut out = Vec::with_capacity(n.min(RESERVE_CAP) as usize);
        for i in 0..n {
            let value = self.integer(item)?.and_then(|v| i32::try_from(v).ok());
            out.push(value.ok_or_else(|| GgufError::Format(format!("{key:?} item {i} is not a 32-bit integer")))?);
        }
        Ok(out)
    }
}

/// Read the tokenizer metadata of the GGUF file at `path`. A format error's
/// message starts with the path; an I/O error's does not (the caller has it).
pub fn read_tokenizer(path: &Path) -> Result<GgufTokenizer, GgufError> {
    let file = File::open(path).map_err(|e| GgufError::io(&e, "opening it".into()))?;
    tokenizer_from_reader(BufReader::with_capacity(1 << 20, file)).map_err(|e| match e {
        GgufError::Format(m) => GgufError::Format(format!("{}: {m}", path.display())),
        io => io,
    })
}

/// Read the tokenizer metadata from a GGUF stream (positioned anywhere; it is read from its start).
pub fn tokenizer_from_reader<R: Read + Seek>(mut inner: R) -> Result<GgufTokenizer, GgufError> {
    let io = |e: std::io::Error| GgufError::io(&e, "seeking".into());
    let len = inner.seek(SeekFrom::End(0)).map_err(io)?;
    inner.seek(SeekFrom::Start(0)).map_err(io)?;
    let mut r = Reader { inner, offset: 0, len };
    if &r.bytes::<4>()? != b"GGUF" {
        return Err(GgufError::Format("not a GGUF file (bad magic)".into()));
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::Format(format!("unsupported GGUF version {version}")));
    }
    let _tensor_count = r.u64()?;
    // A key/value pair is at least a key length, a type and a one-byte value.
    let n = r.count("metadata", 8 + 4 + 1, u64::MAX)?;
    let (mut model, mut tokens, mut token_types) = (None, None, None);
    for _ in 0..n {
        let key = String::from_utf8_lossy(&r.string(MAX_KEY_BYTES)?).into_owned();
        let ty = r.u32()?;
        let duplicate = |key: &str| GgufError::Format(format!("duplicate key {key:?}"));
        let mut read = |r: &mut Reader<R>| -> Result<(), GgufError> {
            match key.as_str() {
                "tokenizer.ggml.model" if model.is_some() => Err(duplicate(&key)),
                "tokenizer.ggml.model" => {
                    if ty != TYPE_STRING {
                        return Err(GgufError::Format(format!("{key:?} is not a string (type {ty})")));
                    }
                    model = Some(String::from_utf8_lossy(&r.string(MAX_KEPT_STRING_BYTES)?).into_owned());
                    Ok(())
                }
                "tokenizer.ggml.tokens" if tokens.is_some() => Err(duplicate(&key)),
                "tokenizer.ggml.tokens" => {
                    tokens = Some(r.string_array(&key, ty)?);
                    Ok(())
                }
                "tokenizer.ggml.token_type" if token_types.is_some() => Err(duplicate(&key)),
                "tokenizer.ggml.token_type" => {
                    token_types = Some(r.int_array(&key, ty)?);
                    Ok(())
                }
                _ => r.skip_value(ty),
            }
        };
        read(&mut r).map_err(|e| GgufError::Format(format!("key {key:?}: {e}")))?;
    }
    Ok(GgufTokenizer {
        model: model.ok_or_else(|| GgufError::Format("no string \"tokenizer.ggml.model\"".into()))?,
        tokens: tokens.ok_or_else(|| GgufError::Format("no array \"tokenizer.ggml.tokens\"".into()))?,
        token_types,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

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

    fn tokenizer_kvs() -> Vec<(&'static str, u32, Vec<u8>)> {
        let mut types = 5u32.to_le_bytes().to_vec();
        types.extend(2u64.to_le_bytes());
        types.extend(1i32.to_le_bytes());
        types.extend(6i32.to_le_bytes());
        vec![
            ("tokenizer.ggml.model", 8, gguf_string(b"llama")),
            ("tokenizer.ggml.tokens", 9, str_array(&[b"\xe2\x96\x81a", b"<0x0A>"])),
            ("tokenizer.ggml.token_type", 9, types),
        ]
    }

    fn read(bytes: &[u8]) -> Result<GgufTokenizer, GgufError> {
        tokenizer_from_reader(Cursor::new(bytes))
    }

    fn err(bytes: &[u8]) -> String {
        read(bytes).unwrap_err().to_string()
    }

    /// `depth` arrays, each holding the next as its single item, around one u8.
    fn nested(depth: usize, count: u64) -> Vec<u8> {
        let mut v = Vec::new();
        for _ in 0..depth {
            v.extend(9u32.to_le_bytes());
            v.extend(count.to_le_bytes());
        }
        v.extend(0u32.to_le_bytes());
        v.extend(1u64.to_le_bytes());
        v.push(7);
        v
    }

    #[test]
    fn skips_every_value_type_and_reads_the_tokenizer() {
        let mut kvs = vec![
            ("a.u8", 0, vec![200]),
            ("a.i8", 1, vec![0xff]),
            ("a.u16", 2, 7u16.to_le_bytes().to_vec()),
            ("a.i16", 3, (-7i16).to_le_bytes().to_vec()),
            ("a.u32", 4, 7u32.to_le_bytes().to_vec()),
            ("a.i32", 5, 7i32.to_le_bytes().to_vec()),
            ("a.f32", 6, 1.5f32.to_le_bytes().to_vec()),
            ("a.bool", 7, vec![1]),
            ("a.str", 8, gguf_string(b"text")),
            ("a.u64", 10, 9u64.to_le_bytes().to_vec()),
            ("a.i64", 11, (-9i64).to_le_bytes().to_vec()),
            ("a.f64", 12, 2.5f64.to_le_bytes().to_vec()),
            ("a.nested", 9, nested(3, 1)),
            ("a.strs", 9, str_array(&[b"x", b"yz"])),
            ("a.empty", 9, nested(1, 0)[..12].to_vec()),
        ];
        kvs.extend(tokenizer_kvs());
        let tok = read(&file(&kvs)).unwrap();
        assert_eq!(tok.model, "llama");
        assert_eq!(tok.tokens, vec![b"\xe2\x96\x81a".to_vec(), b"<0x0A>".to_vec()]);
        assert_eq!(tok.token_types, Some(vec![1, 6]));
        // Whatever the skipped values were, the tokenizer after them reads the same.
        assert_eq!(read(&file(&tokenizer_kvs())).unwrap(), tok);
    }

    #[test]
    fn rejects_corrupt_files() {
        assert!(err(b"GGML\x03\0\0\0").contains("magic"));
        let mut v1 = b"GGUF".to_vec();
        v1.extend(1u32.to_le_bytes());
        assert!(err(&v1).contains("version 1"));
        let good = file(&[("k", 8, gguf_string(b"value"))]);
        assert!(
            err(&good[..good.len() - 2]).contains("claims 5 items of at least 1 bytes, but the file has 3 bytes left")
        );
        let int = file(&[("k", 10, 9u64.to_le_bytes().to_vec())]);
        assert!(err(&int[..int.len() - 1]).contains("needs 8 bytes but the file has 7 left"));
        let huge = file(&[("k", 8, u64::MAX.to_le_bytes().to_vec())]);
        assert!(err(&huge).contains("claims 18446744073709551615 items"), "{}", err(&huge));
        let unknown = file(&[("k", 99, vec![])]);
        assert!(err(&unknown).contains("unknown value type 99"));
        assert!(err(&file(&[])).contains("tokenizer.ggml.model"));
        let mut twice = tokenizer_kvs();
        twice.push(tokenizer_kvs().remove(1));
        assert!(err(&file(&twice)).contains("duplicate key \"tokenizer.ggml.tokens\""));
        let mut wrong = tokenizer_kvs();
        wrong[2] = ("tokenizer.ggml.token_type", 9, str_array(&[b"1"]));
        assert!(err(&file(&wrong)).contains("not integers"));
    }

    #[test]
    fn io_errors_are_told_apart_from_malformed_files() {
        let missing = read_tokenizer(Path::new("/nonexistent/dir/missing.gguf")).unwrap_err();
        assert!(
            matches!(&missing, GgufError::Io { errno: Some(2), message } if message == "No such file or directory (opening it)"),
            "{missing:?}"
        );
        // A directory opens on Linux and fails on the first read.
        let dir = read_tokenizer(Path::new("/")).unwrap_err();
        assert!(
            matches!(&dir, GgufError::Io { errno: Some(_), message } if message.ends_with("(reading byte 0)")),
            "{dir:?}"
        );
        let bad = std::env::temp_dir().join(format!("genlm-anyio-bad-{}.gguf", std::process::id()));
        std::fs::write(&bad, b"GGML\x03\0\0\0").unwrap();
        let malformed = read_tokenizer(&bad).unwrap_err();
        std::fs::remove_file(&bad).unwrap();
        assert_eq!(malformed, GgufError::Format(format!("{}: not a GGUF file (bad magic)", bad.display())));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        // 50,000 levels overflowed the stack of the recursive reader (SIGSEGV).
        let deep = file(&[("k", 9, nested(50_000, 1))]);
        assert!(err(&deep).contains(&format!("nested more than {MAX_DEPTH} deep")), "{}", err(&deep));
        assert!(err(&file(&[("k", 9, nested(MAX_DEPTH, 1))])).contains("nested more than"));
        // MAX_DEPTH arrays in all (the innermost holds a u8) are read.
        let mut kvs = vec![("k", 9, nested(MAX_DEPTH - 1, 1))];
        kvs.extend(tokenizer_kvs());
        assert_eq!(read(&file(&kvs)).unwrap().tokens.len(), 2);
    }

    #[test]
    fn counts_beyond_the_file_are_refused_before_allocating() {
        // 130 levels claiming 2^20 items each reserved ~32 MB a level (OOM under a 4 GB limit).
        let wide = file(&[("k", 9, nested(130, 1 << 20))]);
        assert!(err(&wide).contains("claims 1048576 items of at least 12 bytes"), "{}", err(&wide));
        let mut tokens = 8u32.to_le_bytes().to_vec();
        tokens.extend(MAX_TOKENS.to_le_bytes());
        let claim = file(&[("tokenizer.ggml.tokens", 9, tokens)]);
        assert!(err(&claim).contains("claims 4194304 items of at least 8 bytes"), "{}", err(&claim));
        let mut many = 8u32.to_le_bytes().to_vec();
        many.extend((MAX_TOKENS + 1).to_le_bytes());
        let many = file(&[("tokenizer.ggml.tokens", 9, many)]);
        assert!(err(&many).contains("claims 4194305 items, more than the 4194304 allowed"), "{}", err(&many));
        let long_piece = vec![b'x'; MAX_KEPT_STRING_BYTES as usize + 1];
        let long = file(&[("tokenizer.ggml.tokens", 9, str_array(&[&long_piece]))]);
        assert!(err(&long).contains("claims 1048577 items, more than the 1048576 allowed"), "{}", err(&long));
        let long_key = "k".repeat(MAX_KEY_BYTES as usize + 1);
        assert!(err(&file(&[(&long_key, 7, vec![1])])).contains("more than the 65535 allowed"));
        let mut metadata = file(&[]);
        metadata[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(err(&metadata).contains("metadata at byte 16 claims"), "{}", err(&metadata));
    }

    #[test]
    fn a_large_skipped_array_is_walked_not_kept() {
        // 8 MB of u8 items: read through in fixed chunks (it used to be kept at 32 bytes an item).
        let n = 8u64 << 20;
        let mut big = 0u32.to_le_bytes().to_vec();
        big.extend(n.to_le_bytes());
        big.resize(big.len() + n as usize, 1);
        let mut kvs = vec![("big", 9, big)];
        kvs.extend(tokenizer_kvs());
        assert_eq!(read(&file(&kvs)).unwrap().tokens.len(), 2);
    }
}
