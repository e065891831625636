//! Bindings of the byte vocabulary: every entry point returns
//! `(list[bytes], list[str])`, the bytes of each id and its string form.

use std::path::PathBuf;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use super::errors::entry_point;
use crate::vocab::{gguf_vocab, tokenizer_json, PieceKind, RawVocab, StrFallback, VocabError};

type Decoded = (Vec<Vec<u8>>, Vec<String>);

fn parse_fallback(name: &str) -> PyResult<StrFallback> {
    StrFallback::parse(name).ok_or_else(|| {
        PyValueError::new_err(format!("byte2str_fallback must be 'tokenizer', 'latin1' or 'replace', not {name:?}"))
    })
}

fn decode(raw: &RawVocab, fallback: StrFallback) -> Result<Decoded, VocabError> {
    let bytes = raw.decode()?;
    let strings = raw.strings(&bytes, fallback);
    Ok((bytes, strings))
}

fn to_python(py: Python<'_>, (bytes, strings): Decoded) -> (PyObject, PyObject) {
    let bytes = PyList::new(py, bytes.iter().map(|b| PyBytes::new(py, b)));
    (bytes.into(), strings.into_py(py))
}

/// Decode a `tokenizers` JSON (`backend_tokenizer.to_str()` or `tokenizer.json`).
#[pyfunction]
#[pyo3(text_signature = "(text, fallback)")]
fn vocab_from_tokenizer_json(py: Python<'_>, text: &str, fallback: &str) -> PyResult<(PyObject, PyObject)> {
    entry_point("vocab_from_tokenizer_json", || {
        let fallback = parse_fallback(fallback)?;
        let decoded = py.allow_threads(|| tokenizer_json::read(text).and_then(|raw| decode(&raw, fallback)))?;
        Ok(to_python(py, decoded))
    })
}

/// Decode pieces listed by id (`None` for an unused id) with a decoder given as
/// `tokenizers` decoder JSON; ids flagged in `verbatim` are their text as written.
#[pyfunction]
#[pyo3(text_signature = "(pieces, verbatim, decoder, fallback)")]
fn vocab_from_pieces(
    py: Python<'_>,
    pieces: Vec<Option<String>>,
    verbatim: Vec<bool>,
    decoder: &str,
    fallback: &str,
) -> PyResult<(PyObject, PyObject)> {
    entry_point("vocab_from_pieces", || {
        let fallback = parse_fallback(fallback)?;
        if verbatim.len() != pieces.len() {
            return Err(PyValueError::new_err(format!(
                "verbatim has {} entries for {} pieces",
                verbatim.len(),
                pieces.len()
            )));
        }
        let decoded = py.allow_threads(|| {
            let decoder = tokenizer_json::decoder_from_json(decoder)?;
            let pieces = pieces
                .into_iter()
                .zip(verbatim)
                .map(|(p, v)| p.map(|p| (p.into_bytes(), if v { PieceKind::Verbatim } else { PieceKind::Decoded })))
                .collect();
            decode(&RawVocab { pieces, decoder }, fallback)
        })?;
        Ok(to_python(py, decoded))
    })
}

/// Decode the vocabulary stored in a GGUF file (OSError if it cannot be read,
/// ValueError if it is not a well-formed GGUF tokenizer).
#[pyfunction]
#[pyo3(text_signature = "(path, fallback)")]
fn vocab_from_gguf(py: Python<'_>, path: PathBuf, fallback: &str) -> PyResult<(PyObject, PyObject)> {
    entry_point("vocab_from_gguf", || {
        let fallback = parse_fallback(fallback)?;
        let decoded = py.allow_threads(|| gguf_vocab::read(&path).and_then(|raw| decode(&raw, fallback)))?;
        Ok(to_python(py, decoded))
    })
}

pub fn register(m: &PyModule) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(vocab_from_tokenizer_json, m)?)?;
    m.add_function(wrap_pyfunction!(vocab_from_pieces, m)?)?;
    m.add_function(wrap_pyfunction!(vocab_from_gguf, m)?)?;
    Ok(())
}
