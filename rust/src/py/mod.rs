//! The Python module `genlm_anyio._core`.
//!
//! Every function and method it exports runs its body through
//! [`errors::entry_point`], and every core error reaches Python through the
//! conversions in `errors`: bad input is a ValueError or TypeError naming the
//! argument, a file that cannot be read an OSError, a panic a ValueError.

use pyo3::prelude::*;

mod buffers;
mod errors;
mod trie;
mod vocab;

#[pymodule]
fn _core(_py: Python<'_>, m: &PyModule) -> PyResult<()> {
    vocab::register(m)?;
    trie::register(m)?;
    Ok(())
}
