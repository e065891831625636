//! The Python module `genlm_anyio._core`.

use pyo3::prelude::*;

mod buffers;
mod trie;
mod vocab;

#[pymodule]
fn _core(_py: Python<'_>, m: &PyModule) -> PyResult<()> {
    vocab::register(m)?;
    trie::register(m)?;
    Ok(())
}
