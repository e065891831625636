//! Rust core of genlm-anyio: the exact bytes of every token of a tokenizer's
//! vocabulary, and a byte trie over a vocabulary with mass propagation and masks.
//!
//! The pure-Rust modules (`vocab`, `trie`) are usable and tested without Python;
//! the `python` feature adds the PyO3 bindings in `py`.

pub mod trie;
pub mod vocab;

#[cfg(feature = "python")]
mod py;
