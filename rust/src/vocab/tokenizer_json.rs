//! Reading a Hugging Face `tokenizers` JSON (`tokenizer.json`, or
//! `PreTrainedTokenizerFast.backend_tokenizer.to_str()`) into a [`RawVocab`].

use serde_json::Value;

use super::decoder::{Decoder, Step, METASPACE};
use super::{PieceKind, RawVocab, VocabError};

/// The pieces, added tokens and decoder chain of a tokenizer JSON.
pub fn read(text: &str) -> Result<RawVocab, VocabError> {
    let root: Value =
        serde_json::from_str(text).map_err(|e| VocabError::Format(format!("invalid JSON: {e}")))?;
    let model = root.get("model").ok_or_else(|| VocabError::Format("no \"model\" entry".into()))?;
    let mut raw = RawVocab { decoder: decoder_of(&root)?, ..Default::default() };
    read_model_vocab(model, &mut raw)?;
    if let Some(added) = root.get("added_tokens").and_then(Value::as_array) {
        for token in added {
            let id = token.get("id").and_then(Value::as_u64);
            let content = token.get("content").and_then(Value::as_str);
            match (id, content) {
                (Some(id), Some(content)) => {
                    raw.set(id as usize, content.as_bytes().to_vec(), PieceKind::Verbatim)
                }
                _ => return Err(VocabError::Format(format!("added token without id/content: {token}"))),
            }
        }
    }
    Ok(raw)
}

fn model_type(model: &Value) -> &str {
    if let Some(t) = model.get("type").and_then(Value::as_str) {
        return t;
    }
    // Older files leave the type out; the fields tell the models apart.
    match model.get("vocab") {
        Some(Value::Array(_)) => "Unigram",
        _ if model.get("merges").is_some() => "BPE",
        _ if model.get("continuing_subword_prefix").is_some() => "WordPiece",
        _ => "WordLevel",
    }
}

fn read_model_vocab(model: &Value, raw: &mut RawVocab) -> Result<(), VocabError> {
    let kind = model_type(model);
    let vocab = model.get("vocab").ok_or_else(|| VocabError::Format(format!("{kind} model has no vocab")))?;
    match (kind, vocab) {
        ("BPE" | "WordPiece" | "WordLevel", Value::Object(map)) => {
            for (piece, id) in map {
                let id = id.as_u64().ok_or_else(|| {
                    VocabError::Format(format!("{kind} vocab entry {piece:?} has a non-integer id"))
                })?;
                raw.set(id as usize, piece.as_bytes().to_vec(), PieceKind::Decoded);
            }
        }
        ("Unigram", Value::Array(entries)) => {
            for (id, entry) in entries.iter().enumerate() {
                let piece = entry.get(0).and_then(Value::as_str).ok_or_else(|| {
                    VocabError::Format(format!("Unigram vocab entry {id} is not [piece, score]"))
                })?;
                raw.set(id, piece.as_bytes().to_vec(), PieceKind::Decoded);
            }
        }
        _ => return Err(VocabError::Unsupported(format!("model type {kind:?} with this vocab layout"))),
    }
    Ok(())
}

fn decoder_of(root: &Value) -> Result<Decoder, VocabError> {
    match root.get("decoder") {
        Some(d) if !d.is_null() => {
            let mut steps = Vec::new();
            push_steps(d, &mut steps)?;
            Ok(Decoder::new(steps))
        }
        // No decoder: a byte-level pre-tokenizer still means byte-level pieces.
        _ if root.get("pre_tokenizer").map_or(false, mentions_byte_level) => {
            Ok(Decoder::new(vec![Step::ByteLevel]))
        }
        _ => Ok(Decoder::default()),
    }
}

fn mentions_byte_level(v: &Value) -> bool {
    match v {
        Value::Object(map) => {
            map.get("type").and_then(Value::as_str) == Some("ByteLevel")
                || map.values().any(mentions_byte_level)
        }
        Value::Array(items) => items.iter().any(mentions_byte_level),
        _ => false,
    }
}

fn str_field<'a>(d: &'a Value, key: &str, default: &'a str) -> &'a str {
    d.get(key).and_then(Value::as_str).unwrap_or(default)
}

/// Append the per-token steps of the decoder `d` (see the module docs of `decoder`).
pub fn push_steps(d: &Value, steps: &mut Vec<Step>) -> Result<(), VocabError> {
    let kind = d.get("type").and_then(Value::as_str).unwrap_or("");
    match kind {
        "Sequence" => {
            for inner in d.get("decoders").and_then(Value::as_array).into_iter().flatten() {
                push_steps(inner, steps)?;
            }
        }
        "ByteLevel" => steps.push(Step::ByteLevel),
        "ByteFallback" => steps.push(Step::ByteFallback),
        "Replace" => match d.get("pattern") {
            Some(Value::Object(p)) if p.contains_key("String") => steps.push(Step::Replace {
                pattern: p["String"].as_str().unwrap_or("").as_bytes().to_vec(),
                content: str_field(d, "content", "").as_bytes().to_vec(),
            }),
            other => {
                return Err(VocabError::Unsupported(format!(
                    "Replace decoder with pattern {}",
                    other.map_or("null".to_string(), Value::to_string)
                )))
            }
        },
        "Metaspace" => steps.push(Step::Replace {
            pattern: str_field(d, "replacement", METASPACE).as_bytes().to_vec(),
            content: b" ".to_vec(),
        }),
        "WordPiece" => steps.push(Step::WordPiece { prefix: str_field(d, "prefix", "##").as_bytes().to_vec() }),
        "BPEDecoder" => {
            steps.push(Step::EndOfWordSuffix { suffix: str_field(d, "suffix", "</w>").as_bytes().to_vec() })
        }
        // Only the ends of a whole text, or the joining of tokens, change.
        "Fuse" | "Strip" => {}
        other => return Err(VocabError::Unsupported(format!("decoder type {other:?}"))),
    }
    Ok(())
}

/// A decoder chain from its JSON alone (used for slow tokenizers' pieces).
pub fn decoder_from_json(text: &str) -> Result<Decoder, VocabError> {
    let d: Value = serde_json::from_str(text).map_err(|e| VocabError::Format(format!("invalid decoder JSON: {e}")))?;
    let mut steps = Vec::new();
    if !d.is_null() {
        push_steps(&d, &mut steps)?;
    }
    Ok(Decoder::new(steps))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpe_byte_level_with_added_tokens() {
        let json = r#"{"model": {"type": "BPE", "vocab": {"a": 0, "\u0120b": 1}, "merges": []},
            "added_tokens": [{"id": 2, "content": "<|end|>", "special": true}],
            "decoder": {"type": "ByteLevel"}}"#;
        let bytes = read(json).unwrap().decode().unwrap();
        assert_eq!(bytes, vec![b"a".to_vec(), b" b".to_vec(), b"<|end|>".to_vec()]);
    }

    #[test]
    fn byte_level_from_pre_tokenizer_when_no_decoder() {
        let json = r#"{"model": {"vocab": {"\u010a": 0}, "merges": []}, "decoder": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "ByteLevel"}]}}"#;
        assert_eq!(read(json).unwrap().decode().unwrap(), vec![b"\n".to_vec()]);
    }

    #[test]
    fn unigram_metaspace_and_wordpiece() {
        let json = r#"{"model": {"type": "Unigram", "vocab": [["<unk>", 0.0], ["\u2581x", -1.0], ["<0x41>", -2.0]]},
            "decoder": {"type": "Sequence", "decoders": [{"type": "Metaspace", "replacement": "\u2581"}, {"type": "ByteFallback"}]}}"#;
        let bytes = read(json).unwrap().decode().unwrap();
        assert_eq!(bytes, vec![b"<unk>".to_vec(), b" x".to_vec(), b"A".to_vec()]);
        let json = r###"{"model": {"type": "WordPiece", "vocab": {"un": 0, "##able": 1}},
            "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true}}"###;
        assert_eq!(read(json).unwrap().decode().unwrap(), vec![b" un".to_vec(), b"able".to_vec()]);
    }

    #[test]
    fn unsupported_decoders_are_named() {
        let json = r#"{"model": {"type": "BPE", "vocab": {}, "merges": []}, "decoder": {"type": "CTC"}}"#;
        assert!(read(json).unwrap_err().to_string().contains("CTC"));
        let json = r#"{"model": {"type": "BPE", "vocab": {}, "merges": []},
            "decoder": {"type": "Replace", "pattern": {"Regex": "x+"}, "content": ""}}"#;
        assert!(read(json).unwrap_err().to_string().contains("Regex"));
        assert!(read("{").unwrap_err().to_string().contains("invalid JSON"));
    }
}
