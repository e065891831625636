//! How a vocabulary piece (the string a tokenizer stores for a token id) becomes
//! the exact bytes that token stands for in text.
//!
//! This mirrors the decoders of Hugging Face `tokenizers`, applied to one token at
//! a time. Steps that only act on the ends of a whole decoded text (`Strip`, the
//! first-token special case of `Metaspace` and `WordPiece`, `Fuse`) do not change a
//! token's bytes and are skipped: a token keeps the space its piece encodes.

use super::byte_level;
use super::VocabError;

/// One step of a decoder chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Each character is a byte through the byte-level map (characters outside
    /// the map stand for their own UTF-8, as in `tokenizers`). Final.
    ByteLevel,
    /// A piece of the exact form `<0xHH>` is the single byte `HH`. Final when it matches.
    ByteFallback,
    /// Replace every occurrence of `pattern` with `content`.
    Replace { pattern: Vec<u8>, content: Vec<u8> },
    /// WordPiece: a piece starting with `prefix` continues a word (the prefix is
    /// dropped); any other piece starts a new word, after a space.
    WordPiece { prefix: Vec<u8> },
    /// Subword-NMT style BPE: a trailing `suffix` marks the end of a word (a space).
    EndOfWordSuffix { suffix: Vec<u8> },
}

/// An ordered chain of steps; the empty chain keeps pieces as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decoder {
    pub steps: Vec<Step>,
}

impl Decoder {
    pub fn new(steps: Vec<Step>) -> Self {
        Decoder { steps }
    }

    /// The bytes that `piece` stands for.
    ///
    /// A chain from a file can grow a piece without bound (each `Replace` of
    /// one byte by two doubles it), so a piece may decode to at most
    /// [`max_token_bytes`] bytes; a longer result is an error, found before it
    /// is built.
    pub fn decode(&self, piece: &[u8]) -> Result<Vec<u8>, VocabError> {
        if let Some(Step::ByteLevel) = self.steps.first() {
            return byte_level_bytes(piece);
        }
        let limit = max_token_bytes(piece.len());
        let too_long = || {
            VocabError::Undecodable(format!(
                "the decoder grows piece {:?} beyond {limit} bytes",
                String::from_utf8_lossy(&piece[..piece.len().min(64)])
            ))
        };
        let mut text = piece.to_vec();
        for step in &self.steps {
            if text.len() > limit {
                return Err(too_long());
            }
            match step {
                Step::ByteLevel => return byte_level_bytes(&text),
                Step::ByteFallback => {
                    if let Some(b) = byte_fallback(&text) {
                        return Ok(vec![b]);
                    }
                }
                Step::Replace { pattern, content } => {
                    text = replace(&text, pattern, content, limit).ok_or_else(too_long)?
                }
                Step::WordPiece { prefix } => {
                    text = match text.strip_prefix(prefix.as_slice()) {
                        Some(rest) => rest.to_vec(),
                        None => [b" ".as_slice(), &text].concat(),
                    }
                }
                Step::EndOfWordSuffix { suffix } => {
                    if let Some(stem) = text.strip_suffix(suffix.as_slice()) {
                        text = [stem, b" "].concat();
                    }
                }
            }
        }
        if text.len() > limit {
            return Err(too_long());
        }
        Ok(text)
    }
}

/// The most bytes a piece of `piece_len` bytes may decode to: real decoder
/// chains shrink pieces or add one space; this leaves room for any plausible
/// `Replace` while keeping a vocabulary's bytes proportional to its file.
pub const fn max_token_bytes(piece_len: usize) -> usize {
    piece_len.saturating_mul(4).saturating_add(64)
}

fn byte_level_bytes(piece: &[u8]) -> Result<Vec<u8>, VocabError> {
    let text = std::str::from_utf8(piece).map_err(|_| {
        VocabError::Undecodable(format!("byte-level piece {:?} is not valid UTF-8", String::from_utf8_lossy(piece)))
    })?;
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match byte_level::byte_of_char(c) {
            Some(b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    Ok(out)
}

/// `<0xHH>` (upper- or lower-case hex) -> the byte `0xHH`.
pub fn byte_fallback(piece: &[u8]) -> Option<u8> {
    match piece {
        [b'<', b'0', b'x', hi, lo, b'>'] => {
            let hex = |c: u8| (c as char).to_digit(16);
            Some((hex(*hi)? * 16 + hex(*lo)?) as u8)
        }
        _ => None,
    }
}

/// `text` with every `pattern` replaced by `content`, or `None` once the result
/// would pass `limit` bytes.
fn replace(text: &[u8], pattern: &[u8], content: &[u8], limit: usize) -> Option<Vec<u8>> {
    if pattern.is_empty() || text.len() < pattern.len() {
        return Some(text.to_vec());
    }
    let mut out = Vec::with_capacity(text.len().min(limit));
    let mut i = 0;
    while i < text.len() {
        if out.len() > limit {
            return None;
        }
        if text[i..].starts_with(pattern) {
            if out.len() + content.len() > limit {
                return None;
            }
            out.extend_from_slice(content);
            i += pattern.len();
        } else {
            out.push(text[i]);
            i += 1;
        }
    }
    (out.len() <= limit).then_some(out)
}

/// The metaspace character that SentencePiece uses for a space.
pub const METASPACE: &str = "\u{2581}";

/// The usual chain of SentencePiece vocabularies: `▁` is a space, `<0xHH>` a byte.
pub fn sentencepiece() -> Decoder {
    Decoder::new(vec![
        Step::Replace { pattern: METASPACE.as_bytes().to_vec(), content: b" ".to_vec() },
        Step::ByteFallback,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_maps_shifted_characters() {
        let d = Decoder::new(vec![Step::ByteLevel]);
        assert_eq!(d.decode("Ġhello".as_bytes()).unwrap(), b" hello");
        assert_eq!(d.decode("Ċ".as_bytes()).unwrap(), b"\n");
        assert_eq!(d.decode("Ã©".as_bytes()).unwrap(), "é".as_bytes());
        // Outside the map: the character's own UTF-8, as tokenizers does.
        assert_eq!(d.decode("\u{2581}".as_bytes()).unwrap(), "\u{2581}".as_bytes());
        assert!(d.decode(&[0xff]).is_err());
    }

    #[test]
    fn sentencepiece_spaces_and_bytes() {
        let d = sentencepiece();
        assert_eq!(d.decode("▁the".as_bytes()).unwrap(), b" the");
        assert_eq!(d.decode(b"<0x0A>").unwrap(), b"\n");
        assert_eq!(d.decode(b"<0xe9>").unwrap(), vec![0xe9]);
        assert_eq!(d.decode(b"<0xZZ>").unwrap(), b"<0xZZ>");
        assert_eq!(d.decode(b"<0x0A").unwrap(), b"<0x0A");
    }

    #[test]
    fn wordpiece_and_suffix() {
        let d = Decoder::new(vec![Step::WordPiece { prefix: b"##".to_vec() }]);
        assert_eq!(d.decode(b"##ing").unwrap(), b"ing");
        assert_eq!(d.decode(b"play").unwrap(), b" play");
        let d = Decoder::new(vec![Step::EndOfWordSuffix { suffix: b"</w>".to_vec() }]);
        assert_eq!(d.decode(b"the</w>").unwrap(), b"the ");
        assert_eq!(d.decode(b"th").unwrap(), b"th");
    }

    #[test]
    fn replace_all_occurrences() {
        assert_eq!(replace(b"a--b--", b"--", b"+", 100).unwrap(), b"a+b+");
        assert_eq!(replace(b"ab", b"", b"+", 100).unwrap(), b"ab");
        assert_eq!(replace(b"aaa", b"a", b"xy", 6).unwrap(), b"xyxyxy");
        assert_eq!(replace(b"aaa", b"a", b"xy", 5), None);
    }

    #[test]
    fn a_growing_chain_is_an_error_before_it_is_built() {
        // 40 doublings of one byte: a 2.7 KB tokenizer.json that aborted on a 1 GiB allocation.
        let d = Decoder::new(vec![Step::Replace { pattern: b"a".to_vec(), content: b"aa".to_vec() }; 40]);
        let err = d.decode(b"a").unwrap_err().to_string();
        assert!(err.contains("grows piece \"a\" beyond 68 bytes"), "{err}");
        let huge = Decoder::new(vec![Step::Replace { pattern: b"a".to_vec(), content: vec![b'b'; 1 << 20] }]);
        assert!(huge.decode(&[b'a'; 1000]).is_err());
        // Six doublings stay within the bound and decode.
        let d = Decoder::new(vec![Step::Replace { pattern: b"a".to_vec(), content: b"aa".to_vec() }; 6]);
        assert_eq!(d.decode(b"a").unwrap(), vec![b'a'; 64]);
        let d = Decoder::new(vec![Step::WordPiece { prefix: b"##".to_vec() }; 100]);
        assert!(d.decode(b"x").is_err());
    }
}
