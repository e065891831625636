//! The exact bytes of every token of a vocabulary.
//!
//! Every source (a `tokenizers` JSON, a GGUF file, the pieces of a slow
//! tokenizer) is first read into a [`RawVocab`]: the piece stored for each id, and
//! the decoder chain that turns a piece into bytes. [`RawVocab::decode`] then does
//! the per-token work for all sources alike.

pub mod byte_level;
pub mod decoder;
pub mod gguf;
pub mod gguf_vocab;
pub mod tokenizer_json;

use rayon::prelude::*;

pub use decoder::{Decoder, Step};

/// Why a vocabulary could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VocabError {
    /// The file at `path` could not be read: `errno` is the OS error code where
    /// there is one, `message` what failed.
    Io { path: String, errno: Option<i32>, message: String },
    /// The input is not a well-formed tokenizer description.
    Format(String),
    /// A tokenizer kind or decoder step whose token bytes cannot be derived.
    Unsupported(String),
    /// A piece that the decoder chain cannot turn into bytes.
    Undecodable(String),
}

impl std::fmt::Display for VocabError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VocabError::Io { path, message, .. } => write!(f, "cannot read {path}: {message}"),
            VocabError::Format(m) => write!(f, "malformed tokenizer: {m}"),
            VocabError::Unsupported(m) => write!(f, "unsupported tokenizer: {m}"),
            VocabError::Undecodable(m) => write!(f, "cannot decode token: {m}"),
        }
    }
}

impl std::error::Error for VocabError {}

/// How one id's piece becomes bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceKind {
    /// Through the vocabulary's decoder chain.
    Decoded,
    /// The piece's own text (added, special and control tokens).
    Verbatim,
}

/// A vocabulary as stored: per id, the piece (or `None` for an unused id).
#[derive(Debug, Clone, Default)]
pub struct RawVocab {
    pub pieces: Vec<Option<(Vec<u8>, PieceKind)>>,
    pub decoder: Decoder,
}

/// How many unused ids a vocabulary may leave beyond one per entry (see [`RawVocab::from_ids`]).
pub const SPARE_IDS: u64 = 1024;

/// What to show for a token whose bytes are not valid UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrFallback {
    /// The piece as the tokenizer stores it (e.g. `"Ġ\u{fffd}"` or `"<0xE9>"`).
    Tokenizer,
    /// Each byte as the Latin-1 character of the same value.
    Latin1,
    /// Invalid sequences replaced with U+FFFD.
    Replace,
}

impl StrFallback {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "tokenizer" => Some(StrFallback::Tokenizer),
            "latin1" => Some(StrFallback::Latin1),
            "replace" => Some(StrFallback::Replace),
            _ => None,
        }
    }
}

impl RawVocab {
    /// The vocabulary of `(id, piece, kind)` entries; a later entry for an id
    /// replaces an earlier one, and ids no entry names are unused.
    ///
    /// Ids come from files, so they are bounded by the entries actually present
    /// before any table is sized from them: a vocabulary may leave unused ids
    /// (some tokenizers number their added tokens past gaps), but no more of them
    /// than it has entries, plus [`SPARE_IDS`]. A larger id is an error naming it.
    pub fn from_ids(entries: Vec<(u64, Vec<u8>, PieceKind)>, decoder: Decoder) -> Result<RawVocab, VocabError> {
        let limit = (entries.len() as u64).saturating_mul(2).saturating_add(SPARE_IDS);
        let size = match entries.iter().map(|e| e.0).max() {
            Some(id) if id >= limit => {
                return Err(VocabError::Format(format!(
                    "token id {id} is out of range: {} tokens allow ids below {limit}",
                    entries.len()
                )))
            }
            Some(id) => id as usize + 1,
            None => 0,
        };
        let mut pieces = vec![None; size];
        for (id, piece, kind) in entries {
            pieces[id as usize] = Some((piece, kind));
        }
        Ok(RawVocab { pieces, decoder })
    }

    /// The bytes of every id; an unused id has no bytes.
    pub fn decode(&self) -> Result<Vec<Vec<u8>>, VocabError> {
        self.pieces
            .par_iter()
            .enumerate()
            .map(|(id, entry)| match entry {
                None => Ok(Vec::new()),
                Some((piece, PieceKind::Verbatim)) => Ok(piece.clone()),
                Some((piece, PieceKind::Decoded)) => self.decoder.decode(piece).map_err(|e| match e {
                    VocabError::Undecodable(m) => VocabError::Undecodable(format!("token {id}: {m}")),
                    other => other,
                }),
            })
            .collect()
    }

    /// A string form of every token: its text where its bytes are UTF-8, else per `fallback`.
    pub fn strings(&self, bytes: &[Vec<u8>], fallback: StrFallback) -> Vec<String> {
        bytes
            .par_iter()
            .zip(self.pieces.par_iter())
            .map(|(b, entry)| match std::str::from_utf8(b) {
                Ok(s) => s.to_owned(),
                Err(_) => match fallback {
                    StrFallback::Tokenizer => {
                        let piece = entry.as_ref().map_or(&b[..], |(p, _)| &p[..]);
                        String::from_utf8_lossy(piece).into_owned()
                    }
                    StrFallback::Latin1 => b.iter().map(|&c| c as char).collect(),
                    StrFallback::Replace => String::from_utf8_lossy(b).into_owned(),
                },
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_verbatim_and_strings() {
        let entries = vec![
            (3, b"<0xE9>".to_vec(), PieceKind::Decoded),
            (0, b"<s>".to_vec(), PieceKind::Verbatim),
            (2, "▁hi".as_bytes().to_vec(), PieceKind::Decoded),
        ];
        let raw = RawVocab::from_ids(entries, decoder::sentencepiece()).unwrap();
        let bytes = raw.decode().unwrap();
        assert_eq!(bytes, vec![b"<s>".to_vec(), vec![], b" hi".to_vec(), vec![0xE9]]);
        let s = raw.strings(&bytes, StrFallback::Tokenizer);
        assert_eq!(s, vec!["<s>", "", " hi", "<0xE9>"]);
        assert_eq!(raw.strings(&bytes, StrFallback::Latin1)[3], "é");
        assert_eq!(raw.strings(&bytes, StrFallback::Replace)[3], "\u{fffd}");
    }

    #[test]
    fn undecodable_names_the_token() {
        let entries = vec![(0, b"a".to_vec(), PieceKind::Decoded), (1, vec![0xff], PieceKind::Decoded)];
        let raw = RawVocab::from_ids(entries, Decoder::new(vec![Step::ByteLevel])).unwrap();
        let err = raw.decode().unwrap_err();
        assert!(err.to_string().contains("token 1"), "{err}");
    }

    #[test]
    fn ids_are_bounded_by_the_entries_present() {
        let one = |id: u64| RawVocab::from_ids(vec![(id, b"a".to_vec(), PieceKind::Verbatim)], Decoder::default());
        // A sparse id within the allowance keeps working, its gap unused.
        assert_eq!(one(2 + SPARE_IDS - 1).unwrap().pieces.len(), (2 + SPARE_IDS) as usize);
        for id in [2 + SPARE_IDS, 100_000_000_000, 1 << 62, u64::MAX] {
            let err = one(id).unwrap_err().to_string();
            assert!(err.contains(&format!("token id {id} is out of range")), "{err}");
        }
        assert!(RawVocab::from_ids(vec![], Decoder::default()).unwrap().pieces.is_empty());
    }
}
