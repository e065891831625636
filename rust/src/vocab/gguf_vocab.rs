//! A GGUF file's vocabulary (`tokenizer.ggml.*`) as a [`RawVocab`].
//!
//! llama.cpp stores pieces per vocabulary family: byte-level characters for
//! `gpt2` (BPE), `▁`-spaced pieces with `<0xHH>` byte tokens for `llama` and `t5`
//! (SentencePiece), and, for `bert` (WordPiece), pieces rewritten by its
//! converter so that a word-initial piece starts with `▁` and a continuation has
//! no `##`. The token type says which ids are text as written.

use std::io::{Read, Seek};
use std::path::Path;

use super::decoder::{self, Decoder, Step};
use super::gguf::{read_tokenizer, tokenizer_from_reader, GgufError, GgufTokenizer};
use super::{PieceKind, RawVocab, VocabError};

/// GGUF token types (llama.cpp's `llama_token_type`).
const NORMAL: i32 = 1;
const USER_DEFINED: i32 = 4;
const BYTE: i32 = 6;

/// Read the vocabulary of the GGUF file at `path`.
pub fn read(path: &Path) -> Result<RawVocab, VocabError> {
    let source = path.display().to_string();
    let tok = read_tokenizer(path).map_err(|e| vocab_error(e, &source, false))?;
    vocab_of(tok, &source)
}

/// Read the vocabulary of a GGUF stream; `source` names it in errors.
pub fn read_from<R: Read + Seek>(stream: R, source: &str) -> Result<RawVocab, VocabError> {
    let tok = tokenizer_from_reader(stream).map_err(|e| vocab_error(e, source, true))?;
    vocab_of(tok, source)
}

/// `e` as a vocabulary error about `source`; `name_source` puts its name into
/// a format error's message.
fn vocab_error(e: GgufError, source: &str, name_source: bool) -> VocabError {
    match e {
        GgufError::Io { errno, message } => VocabError::Io { path: source.to_owned(), errno, message },
        GgufError::Format(m) if name_source => VocabError::Format(format!("{source}: {m}")),
        GgufError::Format(m) => VocabError::Format(m),
    }
}

fn vocab_of(tok: GgufTokenizer, source: &str) -> Result<RawVocab, VocabError> {
    let (decoder, user_defined) = match tok.model.as_str() {
        "gpt2" => (Decoder::new(vec![Step::ByteLevel]), PieceKind::Verbatim),
        "llama" | "t5" | "bert" | "gemma4" => (decoder::sentencepiece(), PieceKind::Decoded),
        other => return Err(VocabError::Unsupported(format!("GGUF tokenizer model {other:?} in {source}"))),
    };
    let types = tok.token_types.unwrap_or_default();
    let mut raw = RawVocab { decoder, ..Default::default() };
    raw.pieces.reserve(tok.tokens.len());
    for (id, piece) in tok.tokens.into_iter().enumerate() {
        let kind = match types.get(id).copied().unwrap_or(NORMAL) {
            NORMAL | BYTE => PieceKind::Decoded,
            USER_DEFINED => user_defined,
            _ => PieceKind::Verbatim,
        };
        raw.pieces.push(Some((piece, kind)));
    }
    Ok(raw)
}
