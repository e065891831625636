//! Bindings of the token-byte trie. `genlm_anyio.trie` wraps this class with the
//! public API; arrays are passed by address (see `buffers`).

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::buffers::{slice, slice_mut};
use crate::trie::{Trie, TrieError, Weight};

fn to_py_err(e: TrieError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// The flat trie over a vocabulary's byte strings.
#[pyclass(module = "genlm_anyio._core", name = "TrieCore", frozen)]
pub struct PyTrie {
    inner: Trie,
}

#[derive(Clone, Copy)]
enum Reduction {
    Sum,
    Max,
    LogSumExp,
}

impl Reduction {
    fn run<W: Weight>(self, trie: &Trie, ws: &[W], rows: Option<usize>, out: &mut [f64]) -> Result<(), TrieError> {
        match (self, rows) {
            (Reduction::Sum, None) => trie.weight_sum(ws, out),
            (Reduction::Max, None) => trie.weight_max(ws, out),
            (Reduction::LogSumExp, None) => trie.weight_logsumexp(ws, out),
            (Reduction::Sum, Some(r)) => trie.batch_weight_sum(ws, r, out),
            (Reduction::Max, Some(r)) => trie.batch_weight_max(ws, r, out),
            (Reduction::LogSumExp, Some(r)) => trie.batch_weight_logsumexp(ws, r, out),
        }
    }
}

impl PyTrie {
    fn check_node(&self, node: u32) -> PyResult<u32> {
        if (node as usize) < self.inner.num_nodes() {
            Ok(node)
        } else {
            Err(PyValueError::new_err(format!(
                "node {node} is not a node of this trie (it has {} nodes)",
                self.inner.num_nodes()
            )))
        }
    }

    /// Fill the int64 array at `out` (of length `len`) from `values`.
    fn fill_i64(&self, out: usize, len: usize, values: impl Iterator<Item = u32>) -> PyResult<()> {
        let dst = unsafe { slice_mut::<i64>(out, len, "out")? };
        for (d, v) in dst.iter_mut().zip(values) {
            *d = i64::from(v);
        }
        Ok(())
    }

    fn mask_out(&self, out: usize) -> PyResult<&mut [u8]> {
        unsafe { slice_mut::<u8>(out, self.inner.vocab_size(), "out") }
    }
}

#[pymethods]
impl PyTrie {
    /// Build from a sequence of `bytes` (Tokens included), one per token id.
    #[new]
    fn new(py: Python<'_>, tokens: &PyAny) -> PyResult<Self> {
        let tokens: Vec<&[u8]> = tokens
            .iter()?
            .enumerate()
            .map(|(i, item)| {
                let item = item?;
                item.downcast::<PyBytes>().map(PyBytes::as_bytes).map_err(|_| {
                    PyTypeError::new_err(format!(
                        "vocabulary entry {i} must be bytes, not {}",
                        item.get_type().name().unwrap_or("?")
                    ))
                })
            })
            .collect::<PyResult<_>>()?;
        let inner = py.allow_threads(|| Trie::new(&tokens));
        Ok(PyTrie { inner })
    }

    #[getter]
    fn num_nodes(&self) -> usize {
        self.inner.num_nodes()
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    /// `(byte, child)` pairs in increasing byte order.
    fn children(&self, node: u32) -> PyResult<Vec<(u8, u32)>> {
        let (bytes, nodes) = self.inner.children(self.check_node(node)?);
        Ok(bytes.iter().copied().zip(nodes.iter().copied()).collect())
    }

    fn node_of(&self, prefix: &[u8]) -> Option<u32> {
        self.inner.node_of(prefix)
    }

    fn prefix<'py>(&self, py: Python<'py>, node: u32) -> PyResult<&'py PyBytes> {
        Ok(PyBytes::new(py, &self.inner.prefix(self.check_node(node)?)))
    }

    fn parent(&self, node: u32) -> PyResult<Option<u32>> {
        Ok(self.inner.parent(self.check_node(node)?))
    }

    /// `(start, stop)` of the node's tokens in the sorted token order.
    fn tokens_under_range(&self, node: u32) -> PyResult<(usize, usize)> {
        Ok(self.inner.tokens_under_range(self.check_node(node)?))
    }

    /// Fill the int64 array at `out` (length V) with the token ids in trie order.
    fn sorted_tokens(&self, out: usize) -> PyResult<()> {
        self.fill_i64(out, self.inner.vocab_size(), self.inner.sorted_tokens().iter().copied())
    }

    /// Fill the int64 array at `out` (length V) with each token's node.
    fn token_nodes(&self, out: usize) -> PyResult<()> {
        self.fill_i64(out, self.inner.vocab_size(), (0..self.inner.vocab_size()).map(|t| self.inner.token_node(t)))
    }

    /// Fill the int64 array at `out` (length num_nodes) with each node's parent (the root's is 0).
    fn parents(&self, out: usize) -> PyResult<()> {
        let n = self.inner.num_nodes() as u32;
        self.fill_i64(out, n as usize, (0..n).map(|c| self.inner.parent(c).unwrap_or(0)))
    }

    /// Per-node reduction (`"sum"`, `"max"`, `"logsumexp"`) of the float32
    /// (`wide=False`) or float64 array at `ws`, of shape (V,) or (rows, V), into
    /// the float64 array at `out`, (num_nodes,) or (rows, num_nodes); the GIL is
    /// released while it computes.
    fn reduce(&self, py: Python<'_>, kind: &str, ws: usize, wide: bool, rows: Option<usize>, out: usize) -> PyResult<()> {
        let reduction = match kind {
            "sum" => Reduction::Sum,
            "max" => Reduction::Max,
            "logsumexp" => Reduction::LogSumExp,
            _ => return Err(PyValueError::new_err(format!("unknown reduction {kind:?}"))),
        };
        let r = rows.unwrap_or(1);
        let (v, n) = (self.inner.vocab_size(), self.inner.num_nodes());
        let trie = &self.inner;
        let dst = unsafe { slice_mut::<f64>(out, r * n, "out")? };
        if wide {
            let w = unsafe { slice::<f64>(ws, r * v, "ws")? };
            py.allow_threads(|| reduction.run(trie, w, rows, dst))
        } else {
            let w = unsafe { slice::<f32>(ws, r * v, "ws")? };
            py.allow_threads(|| reduction.run(trie, w, rows, dst))
        }
        .map_err(to_py_err)
    }

    /// Tokens whose bytes start with `prefix`, into the bool mask at `out`.
    fn mask_startswith(&self, prefix: &[u8], out: usize) -> PyResult<()> {
        self.inner.mask_startswith(prefix, self.mask_out(out)?).map_err(to_py_err)
    }

    /// Tokens whose bytes are a prefix of `data`.
    fn mask_prefix_of(&self, data: &[u8], out: usize) -> PyResult<()> {
        self.inner.mask_prefix_of(data, self.mask_out(out)?).map_err(to_py_err)
    }

    /// Tokens whose bytes drive the DFA at `transitions` (int32, (n_states, 256))
    /// from `state` through live states only; `live` is a bool array (n_states,).
    fn dfa_mask(&self, py: Python<'_>, transitions: usize, n_states: usize, state: i64, live: usize, out: usize) -> PyResult<()> {
        let table = unsafe { slice::<i32>(transitions, n_states * 256, "transitions")? };
        let live: Vec<bool> = unsafe { slice::<u8>(live, n_states, "live")? }.iter().map(|&b| b != 0).collect();
        let dst = self.mask_out(out)?;
        let trie = &self.inner;
        py.allow_threads(|| trie.dfa_mask(table, n_states, state, &live, dst)).map_err(to_py_err)
    }
}

pub fn register(m: &PyModule) -> PyResult<()> {
    m.add_class::<PyTrie>()
}
