//! Fuzzing the readers of untrusted files: random and mutated tokenizer JSON and
//! GGUF bytes must give a vocabulary or an error, never a panic or an abort
//! (an abort ends this test binary, which fails the run). Every case that reads
//! also decodes, so the decoder chain is fuzzed too. Each test prints how many
//! cases it tried (`cargo test -- --nocapture`).

use std::io::Cursor;
use std::sync::atomic::{AtomicUsize, Ordering};

use _core::vocab::{gguf_vocab, tokenizer_json, VocabError, SPARE_IDS};
use proptest::prelude::*;
use proptest::test_runner::{FileFailurePersistence, TestCaseError, TestRunner};
use serde_json::{json, Map, Value};

const CASES: u32 = 2048;

/// Failures found here are saved to, and replayed first from, this file (commit it).
const REGRESSIONS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/rust/tests/readers_fuzz.proptest-regressions");

fn config() -> ProptestConfig {
    let persistence = FileFailurePersistence::Direct(REGRESSIONS);
    ProptestConfig { cases: CASES, failure_persistence: Some(Box::new(persistence)), ..ProptestConfig::default() }
}

/// Run `test` on `CASES` values of `strategy`, then print how many it tried;
/// a failure (shrunk to a minimal case) fails the test.
fn fuzz<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let tried = AtomicUsize::new(0);
    let result = TestRunner::new(config()).run(&strategy, |v| {
        tried.fetch_add(1, Ordering::Relaxed);
        test(v)
    });
    println!("[fuzz] {name}: {} cases", tried.load(Ordering::Relaxed));
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

/// Read and decode: the vocabulary's size, or the error.
fn json_outcome(text: &str) -> Result<usize, VocabError> {
    tokenizer_json::read(text).and_then(|raw| raw.decode()).map(|v| v.len())
}

fn gguf_outcome(bytes: &[u8]) -> Result<usize, VocabError> {
    gguf_vocab::read_from(Cursor::new(bytes), "fuzz").and_then(|raw| raw.decode()).map(|v| v.len())
}

// -- tokenizer JSON --------------------------------------------------------------

const HOSTILE: [u64; 10] = [0, 1, 2, 1 << 20, 1 << 31, 1 << 32, 1 << 40, 1 << 62, i64::MAX as u64, u64::MAX];

fn id() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..3000, prop::sample::select(HOSTILE.to_vec())]
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "[a-z▁Ġ#<>0-9x]{0,6}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::vec(("[a-z_]{0,8}", inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn decoder() -> impl Strategy<Value = Value> {
    let kinds =
        ["ByteLevel", "ByteFallback", "Replace", "Metaspace", "WordPiece", "BPEDecoder", "Fuse", "Strip", "CTC"];
    let step = (prop::sample::select(kinds.to_vec()), "[a-z▁#<>]{0,3}", "[a-z ▁]{0,4}", any_json()).prop_map(
        |(kind, pattern, content, other)| {
            json!({"type": kind, "pattern": {"String": pattern}, "content": content,
                   "replacement": pattern, "prefix": pattern, "suffix": content, "extra": other})
        },
    );
    step.prop_recursive(3, 16, 5, |inner| {
        prop::collection::vec(inner, 0..5).prop_map(|ds| json!({"type": "Sequence", "decoders": ds}))
    })
}

fn tokenizer_file() -> impl Strategy<Value = Value> {
    let kind = prop::sample::select(vec!["BPE", "WordPiece", "WordLevel", "Unigram", "Other"]);
    let map_vocab = prop::collection::btree_map("[a-z▁Ġ#<>0-9x]{0,5}", id(), 0..12)
        .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k, Value::from(v))).collect()));
    let list_vocab = prop::collection::vec(("[a-z▁<>0-9x]{0,5}", any::<f64>()), 0..12)
        .prop_map(|l| Value::from(l.into_iter().map(|(p, s)| json!([p, s])).collect::<Vec<_>>()));
    let added = prop::collection::vec((id(), "[a-z<|>]{0,6}"), 0..5)
        .prop_map(|a| Value::from(a.into_iter().map(|(i, c)| json!({"id": i, "content": c})).collect::<Vec<_>>()));
    (kind, prop_oneof![map_vocab, list_vocab], added, prop_oneof![Just(Value::Null), decoder()], any_json()).prop_map(
        |(kind, vocab, added, decoder, pre)| {
            json!({"model": {"type": kind, "vocab": vocab, "merges": []}, "added_tokens": added,
                   "decoder": decoder, "pre_tokenizer": pre})
        },
    )
}

/// A byte-level edit of a text: (position, bytes removed, bytes inserted).
fn edits() -> impl Strategy<Value = Vec<(usize, usize, Vec<u8>)>> {
    let insert = prop::collection::vec(prop::sample::select(b"{}[],:\"0123456789e-.x\\".to_vec()), 0..4);
    prop::collection::vec((any::<usize>(), 0usize..4, insert), 1..5)
}

fn apply(mut bytes: Vec<u8>, edits: &[(usize, usize, Vec<u8>)]) -> Vec<u8> {
    for (at, cut, insert) in edits {
        let at = if bytes.is_empty() { 0 } else { at % bytes.len() };
        let end = (at + cut).min(bytes.len());
        bytes.splice(at..end, insert.iter().copied());
    }
    bytes
}

// -- GGUF ----------------------------------------------------------------------

const STRING: u32 = 8;
const ARRAY: u32 = 9;

fn fixed_size(ty: u32) -> usize {
    match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        _ => 8,
    }
}

fn g_string(b: &[u8]) -> Vec<u8> {
    [&(b.len() as u64).to_le_bytes()[..], b].concat()
}

fn g_array(item: u32, items: &[Vec<u8>]) -> Vec<u8> {
    let mut v = item.to_le_bytes().to_vec();
    v.extend((items.len() as u64).to_le_bytes());
    v.extend(items.concat());
    v
}

/// (type, encoded value) of any GGUF type, arrays nested up to three deep.
fn value() -> impl Strategy<Value = (u32, Vec<u8>)> {
    let scalar = prop_oneof![
        (prop::sample::select(vec![0u32, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12]), any::<[u8; 8]>())
            .prop_map(|(t, b)| (t, b[..fixed_size(t)].to_vec())),
        prop::collection::vec(any::<u8>(), 0..12).prop_map(|b| (STRING, g_string(&b))),
    ];
    scalar.prop_recursive(3, 24, 4, |inner| {
        // Items take the first item's type; others are dropped.
        prop::collection::vec(inner, 1..4).prop_map(|items| {
            let ty = items[0].0;
            let same: Vec<Vec<u8>> = items.into_iter().filter(|(t, _)| *t == ty).map(|(_, v)| v).collect();
            (ARRAY, g_array(ty, &same))
        })
    })
}

fn gguf(kvs: &[(Vec<u8>, u32, Vec<u8>)], version: u32) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(version.to_le_bytes());
    out.extend(0u64.to_le_bytes());
    out.extend((kvs.len() as u64).to_le_bytes());
    for (k, ty, v) in kvs {
        out.extend(g_string(k));
        out.extend(ty.to_le_bytes());
        out.extend(v);
    }
    out
}

/// A well-formed GGUF file (the tokenizer keys among random metadata) and its tokens.
fn gguf_file() -> impl Strategy<Value = (Vec<u8>, Vec<Vec<u8>>)> {
    let tokens = prop::collection::vec(prop::collection::vec(any::<u8>(), 0..8), 0..16);
    let extras = prop::collection::vec(("[a-z.]{0,8}", value()), 0..5);
    let model = prop::sample::select(vec!["gpt2", "llama", "t5", "bert", "gemma4"]);
    (tokens, extras, model, any::<usize>(), prop::sample::select(vec![2u32, 3])).prop_map(
        |(tokens, extras, model, at, version)| {
            // Every token is a control token (type 3): its bytes are its piece.
            let types: Vec<Vec<u8>> = tokens.iter().map(|_| 3i32.to_le_bytes().to_vec()).collect();
            let strings: Vec<Vec<u8>> = tokens.iter().map(|t| g_string(t)).collect();
            let mut kvs = vec![
                (b"tokenizer.ggml.model".to_vec(), STRING, g_string(model.as_bytes())),
                (b"tokenizer.ggml.tokens".to_vec(), ARRAY, g_array(STRING, &strings)),
                (b"tokenizer.ggml.token_type".to_vec(), ARRAY, g_array(5, &types)),
            ];
            for (i, (key, (ty, v))) in extras.into_iter().enumerate() {
                kvs.insert((at + i) % (kvs.len() + 1), (format!("x.{key}").into_bytes(), ty, v));
            }
            (gguf(&kvs, version), tokens)
        },
    )
}

/// Hostile edits of a binary file: counts and types overwritten, bits flipped, bytes inserted or cut.
fn binary_edits() -> impl Strategy<Value = Vec<(usize, u8, u64)>> {
    prop::collection::vec(
        (any::<usize>(), 0u8..5, prop_oneof![prop::sample::select(HOSTILE.to_vec()), any::<u64>()]),
        1..5,
    )
}

fn apply_binary(mut b: Vec<u8>, edits: &[(usize, u8, u64)]) -> Vec<u8> {
    for &(at, kind, value) in edits {
        let at = if b.is_empty() { 0 } else { at % b.len() };
        let put = |b: &mut Vec<u8>, bytes: &[u8]| {
            let end = (at + bytes.len()).min(b.len());
            b.splice(at..end, bytes.iter().copied());
        };
        match kind {
            0 => put(&mut b, &value.to_le_bytes()),
            1 => put(&mut b, &((value % 16) as u32).to_le_bytes()),
            2 if !b.is_empty() => b[at] ^= 1 << (value % 8),
            3 => put(&mut b, &value.to_le_bytes()[..(value % 8) as usize]),
            _ => b.truncate(at),
        }
    }
    b
}

#[test]
fn tokenizer_json_files_give_a_vocabulary_or_an_error() {
    fuzz("tokenizer JSON files", tokenizer_file(), |file| {
        if let Ok(n) = json_outcome(&file.to_string()) {
            // Ids were bounded by the entries before any table was sized.
            let entries = file["model"]["vocab"].as_object().map_or(0, |m| m.len())
                + file["model"]["vocab"].as_array().map_or(0, |l| l.len())
                + file["added_tokens"].as_array().map_or(0, |a| a.len());
            prop_assert!((n as u64) < 2 * entries as u64 + SPARE_IDS);
        }
        Ok(())
    });
}

#[test]
fn mutated_tokenizer_json_gives_a_vocabulary_or_an_error() {
    fuzz("mutated tokenizer JSON", (tokenizer_file(), edits()), |(file, edits)| {
        let bytes = apply(file.to_string().into_bytes(), &edits);
        let _ = json_outcome(&String::from_utf8_lossy(&bytes));
        Ok(())
    });
}

#[test]
fn arbitrary_json_gives_a_vocabulary_or_an_error() {
    fuzz("arbitrary JSON", (any_json(), any_json()), |(v, model)| {
        let _ = json_outcome(&v.to_string());
        let _ = json_outcome(&json!({"model": model, "decoder": v}).to_string());
        Ok(())
    });
}

#[test]
fn well_formed_gguf_gives_its_tokens() {
    fuzz("well-formed GGUF", gguf_file(), |(bytes, tokens)| {
        let raw = gguf_vocab::read_from(Cursor::new(&bytes), "fuzz").unwrap();
        prop_assert_eq!(raw.decode().unwrap(), tokens);
        Ok(())
    });
}

#[test]
fn mutated_gguf_gives_a_vocabulary_or_an_error() {
    fuzz("mutated GGUF", (gguf_file(), binary_edits()), |((bytes, _), edits)| {
        let _ = gguf_outcome(&apply_binary(bytes, &edits));
        Ok(())
    });
}

#[test]
fn random_gguf_bodies_give_a_vocabulary_or_an_error() {
    let header = (2u32..4, prop::sample::select(HOSTILE.to_vec()), prop::collection::vec(any::<u8>(), 0..300));
    fuzz("random GGUF bodies", header, |(version, n_kv, body)| {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend(version.to_le_bytes());
        bytes.extend(0u64.to_le_bytes());
        bytes.extend(n_kv.to_le_bytes());
        bytes.extend(body);
        let _ = gguf_outcome(&bytes);
        Ok(())
    });
}
