//! Reading a Hugging Face `tokenizers` JSON (`tokenizer.json`, or
//! `PreTrainedTokenizerFast.backend_tokenizer.to_str()`) into a [`RawVocab`].

use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use super::decoder::{Decoder, Step, METASPACE};
use super::{PieceKind, RawVocab, VocabError};

/// The parts of a tokenizer JSON that decide token bytes. Everything else, the
/// merges above all (as large as the vocabulary), is skipped unparsed.
#[derive(Deserialize)]
struct TokenizerFile {
    model: Model,
    #[serde(default)]
    added_tokens: Vec<AddedToken>,
    #[serde(default)]
    decoder: Value,
    #[serde(default)]
    pre_tokenizer: Value,
}

#[derive(Deserialize)]
struct Model {
    #[serde(rename = "type")]
    kind: Option<String>,
    vocab: Option<Pieces>,
    merges: Option<IgnoredAny>,
    continuing_subword_prefix: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct AddedToken {
    id: u64,
    content: String,
}

/// The pieces, added tokens and decoder chain of a tokenizer JSON.
pub fn read(text: &str) -> Result<RawVocab, VocabError> {
    let file: TokenizerFile =
        serde_json::from_str(text).map_err(|e| VocabError::Format(format!("invalid JSON: {e}")))?;
    let decoder = decoder_of(&file.decoder, &file.pre_tokenizer)?;
    let mut entries = model_entries(file.model)?;
    entries.extend(file.added_tokens.into_iter().map(|t| (t.id, t.content.into_bytes(), PieceKind::Verbatim)));
    RawVocab::from_ids(entries, decoder)
}

/// A model's vocabulary as `(id, piece)` pairs in file order: a `{piece: id}`
/// map (BPE, WordPiece, WordLevel) or a `[[piece, score], ...]` list (Unigram).
/// No table is sized from an id here: see [`RawVocab::from_ids`].
struct Pieces {
    entries: Vec<(u64, Vec<u8>)>,
    is_list: bool,
}

impl<'de> Deserialize<'de> for Pieces {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> Visitor<'de> for Visit {
            type Value = Pieces;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a {piece: id} map or a [[piece, score], ...] list")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Pieces, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some((piece, id)) = map.next_entry::<String, u64>()? {
                    entries.push((id, piece.into_bytes()));
                }
                Ok(Pieces { entries, is_list: false })
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Pieces, A::Error> {
                let mut entries = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some((piece, _score)) = seq.next_element::<(String, IgnoredAny)>()? {
                    entries.push((entries.len() as u64, piece.into_bytes()));
                }
                Ok(Pieces { entries, is_list: true })
            }
        }
        d.deserialize_any(Visit)
    }
}

fn model_type(model: &Model) -> &str {
    if let Some(t) = &model.kind {
        return t;
    }
    // Older files leave the type out; the fields tell the models apart.
    match &model.vocab {
        Some(p) if p.is_list => "Unigram",
        _ if model.merges.is_some() => "BPE",
        _ if model.continuing_subword_prefix.is_some() => "WordPiece",
        _ => "WordLevel",
    }
}

fn model_entries(model: Model) -> Result<Vec<(u64, Vec<u8>, PieceKind)>, VocabError> {
    let kind = model_type(&model).to_owned();
    let pieces = model.vocab.ok_or_else(|| VocabError::Format(format!("{kind} model has no vocab")))?;
    match (kind.as_str(), pieces.is_list) {
        ("BPE" | "WordPiece" | "WordLevel", false) | ("Unigram", true) => {
            Ok(pieces.entries.into_iter().map(|(id, p)| (id, p, PieceKind::Decoded)).collect())
        }
        _ => Err(VocabError::Unsupported(format!("model type {kind:?} with this vocab layout"))),
    }
}

fn decoder_of(decoder: &Value, pre_tokenizer: &Value) -> Result<Decoder, VocabError> {
    if decoder.is_null() {
        // No decoder: a byte-level pre-tokenizer still means byte-level pieces.
        let steps = if mentions_byte_level(pre_tokenizer) { vec![Step::ByteLevel] } else { vec![] };
        return Ok(Decoder::new(steps));
    }
    let mut steps = Vec::new();
    push_steps(decoder, &mut steps)?;
    Ok(Decoder::new(steps))
}

fn mentions_byte_level(v: &Value) -> bool {
    match v {
        Value::Object(map) => {
            map.get("type").and_then(Value::as_str) == Some("ByteLevel") || map.values().any(mentions_byte_level)
        }
        Value::Array(items) => items.iter().any(mentions_byte_level),
        _ => false,
    }
}

fn str_field<'a>(d: &'a Value, key: &str, default: &'a str) -> &'a str {
    d.get(key).and_then(Value::as_str).unwrap_or(default)
}

/// Append the per-token steps of the decoder `d` (see the module docs of `decoder`).
fn push_steps(d: &Value, steps: &mut Vec<Step>) -> Result<(), VocabError> {
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
    decoder_of(&d, &Value::Null)
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

    #[test]
    fn ids_from_the_file_are_bounded_before_any_table_is_sized() {
        // A 70-byte file with id 1e11 aborted the process; 2^62 and 2^64-1 panicked.
        for id in [100_000_000_000u64, 1 << 62, u64::MAX] {
            let json = format!(r#"{{"model": {{"type": "WordLevel", "vocab": {{"a": {id}}}}}}}"#);
            let err = read(&json).unwrap_err().to_string();
            assert!(err.contains(&format!("token id {id} is out of range")), "{err}");
            let json = format!(
                r#"{{"model": {{"type": "WordLevel", "vocab": {{"a": 0}}}}, "added_tokens": [{{"id": {id}, "content": "x"}}]}}"#
            );
            assert!(read(&json).unwrap_err().to_string().contains(&id.to_string()));
        }
    }

    #[test]
    fn sparse_added_token_ids_keep_working() {
        // As in tiktoken-style vocabularies: added tokens numbered past a gap.
        let json = r#"{"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []},
            "added_tokens": [{"id": 5, "content": "<|x|>"}, {"id": 3, "content": "<|y|>"}]}"#;
        let bytes = read(json).unwrap().decode().unwrap();
        assert_eq!(bytes, vec![b"a".to_vec(), b"b".to_vec(), vec![], b"<|y|>".to_vec(), vec![], b"<|x|>".to_vec()]);
    }
}
