//! Bindings of the token-byte trie. `genlm_anyio.trie` wraps this class with the
//! public API; arrays are Python objects exporting a buffer, checked by `buffers`.

use pyo3::exceptions::PyValueError;
use pyo3::once_cell::GILOnceCell;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyLong, PyTuple};
use pyo3::PyTypeInfo;

use super::buffers::{Buffer, BufferMut, Dim, Floats, Ints};
use super::errors::entry_point;
use crate::trie::{Trie, TrieError, Weight, WordKey};

/// `numpy.empty`, looked up once.
static NUMPY_EMPTY: GILOnceCell<PyObject> = GILOnceCell::new();

/// A new, uninitialized float64 numpy array of shape `shape`.
fn new_f64_array(py: Python<'_>, shape: Vec<usize>) -> PyResult<&PyAny> {
    let empty = match NUMPY_EMPTY.get(py) {
        Some(empty) => empty,
        None => {
            let empty: PyObject = py.import("numpy")?.getattr("empty")?.into();
            NUMPY_EMPTY.get_or_init(py, || empty)
        }
    };
    empty.as_ref(py).call1((PyTuple::new(py, shape), "float64"))
}

/// The flat trie over a vocabulary's byte strings.
#[pyclass(module = "genlm_anyio._core", name = "TrieCore", frozen, text_signature = "(items, encode)")]
pub struct PyTrie {
    inner: Trie,
    first_plain: Option<usize>,
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

    /// Fill the int64 array `out` of length `len` from `values`.
    fn fill_i64(out: &PyAny, len: usize, values: impl Iterator<Item = i64>) -> PyResult<()> {
        let mut dst = BufferMut::<i64>::new(out, "out", &[Dim::Is(len)], &[])?;
        for (d, v) in dst.as_mut_slice().iter_mut().zip(values) {
            *d = v;
        }
        Ok(())
    }

    /// `out` as a bool mask of shape (V,), sharing no memory with `inputs`.
    fn mask_out<'py>(&self, out: &'py PyAny, inputs: &[&dyn super::buffers::Input]) -> PyResult<BufferMut<'py, u8>> {
        BufferMut::new(out, "out", &[Dim::Is(self.inner.vocab_size())], inputs)
    }
}

/// The key of a `bytes` entry: a token when it is a bytes subclass with an int `token_id`.
fn bytes_key(item: &PyAny) -> PyResult<WordKey> {
    if PyBytes::is_exact_type_of(item) {
        return Ok(WordKey::Plain);
    }
    match item.getattr(pyo3::intern!(item.py(), "token_id")) {
        Ok(id) if id.downcast::<PyLong>().is_ok() => Ok(WordKey::Token(id.extract::<i64>()?)),
        _ => Ok(WordKey::Plain),
    }
}

#[pymethods]
impl PyTrie {
    /// Build from a sequence of entries. A `bytes` entry (Tokens included) is its
    /// bytes; any other entry `x` is `encode(i, x)`, a list of symbol ids (256 or
    /// more for non-bytes symbols).
    #[new]
    fn new(py: Python<'_>, items: &PyAny, encode: &PyAny) -> PyResult<Self> {
        entry_point("TrieCore", || Self::build(py, items, encode))
    }

    #[getter]
    fn num_nodes(&self) -> PyResult<usize> {
        entry_point("TrieCore.num_nodes", || Ok(self.inner.num_nodes()))
    }

    #[getter]
    fn vocab_size(&self) -> PyResult<usize> {
        entry_point("TrieCore.vocab_size", || Ok(self.inner.vocab_size()))
    }

    #[getter]
    fn root(&self) -> PyResult<u32> {
        entry_point("TrieCore.root", || Ok(self.inner.root()))
    }

    /// The first duplicate pair of entries `(earlier, later)`, if any.
    #[getter]
    fn duplicate(&self) -> PyResult<Option<(usize, usize)>> {
        entry_point("TrieCore.duplicate", || Ok(self.inner.duplicate()))
    }

    /// The index of the first plain `bytes` entry (not a token), if any.
    #[getter]
    fn first_plain(&self) -> PyResult<Option<usize>> {
        entry_point("TrieCore.first_plain", || Ok(self.first_plain))
    }

    /// `(label, child)` pairs in increasing child order; the label is the edge's
    /// symbol, or `-1 - i` for the leaf of entry `i`.
    #[pyo3(text_signature = "($self, node)")]
    fn children(&self, node: u32) -> PyResult<Vec<(i64, u32)>> {
        entry_point("TrieCore.children", || {
            let node = self.check_node(node)?;
            let label = |c: u32| match self.inner.leaf_token(c) {
                Some(t) => -1 - i64::from(t),
                None => i64::from(self.inner.symbol(c).unwrap_or(0)),
            };
            Ok(self.inner.children(node).iter().map(|&c| (label(c), c)).collect())
        })
    }

    #[pyo3(text_signature = "($self, prefix)")]
    fn node_of(&self, prefix: &[u8]) -> PyResult<Option<u32>> {
        entry_point("TrieCore.node_of", || Ok(self.inner.node_of_bytes(prefix)))
    }

    /// The symbols from the root to `node`.
    #[pyo3(text_signature = "($self, node)")]
    fn prefix(&self, node: u32) -> PyResult<Vec<u32>> {
        entry_point("TrieCore.prefix", || Ok(self.inner.prefix(self.check_node(node)?)))
    }

    #[pyo3(text_signature = "($self, node)")]
    fn parent(&self, node: u32) -> PyResult<Option<u32>> {
        entry_point("TrieCore.parent", || Ok(self.inner.parent(self.check_node(node)?)))
    }

    /// `(start, stop)` of the node's entries in the sorted entry order.
    #[pyo3(text_signature = "($self, node)")]
    fn tokens_under_range(&self, node: u32) -> PyResult<(usize, usize)> {
        entry_point("TrieCore.tokens_under_range", || Ok(self.inner.tokens_under_range(self.check_node(node)?)))
    }

    /// Fill the int64 array `out` (V,) with the entries in trie order.
    #[pyo3(text_signature = "($self, out)")]
    fn sorted_tokens(&self, out: &PyAny) -> PyResult<()> {
        entry_point("TrieCore.sorted_tokens", || {
            let sorted = self.inner.sorted_tokens().iter().map(|&t| i64::from(t));
            Self::fill_i64(out, self.inner.vocab_size(), sorted)
        })
    }

    /// Fill the int64 array `out` (V,) with each entry's leaf.
    #[pyo3(text_signature = "($self, out)")]
    fn token_leaves(&self, out: &PyAny) -> PyResult<()> {
        entry_point("TrieCore.token_leaves", || {
            let v = self.inner.vocab_size();
            Self::fill_i64(out, v, (0..v).map(|t| i64::from(self.inner.token_leaf(t))))
        })
    }

    /// Fill the int64 array `out` (num_nodes,) with each leaf's entry (-1 for prefix nodes).
    #[pyo3(text_signature = "($self, out)")]
    fn node_tokens(&self, out: &PyAny) -> PyResult<()> {
        entry_point("TrieCore.node_tokens", || {
            let n = self.inner.num_nodes() as u32;
            Self::fill_i64(out, n as usize, (0..n).map(|c| self.inner.leaf_token(c).map_or(-1, i64::from)))
        })
    }

    /// Fill the int64 array `out` (num_nodes,) with each node's parent (the root's is itself).
    #[pyo3(text_signature = "($self, out)")]
    fn node_parents(&self, out: &PyAny) -> PyResult<()> {
        entry_point("TrieCore.node_parents", || {
            let n = self.inner.num_nodes() as u32;
            Self::fill_i64(out, n as usize, (0..n).map(|c| i64::from(self.inner.parent(c).unwrap_or(c))))
        })
    }

    /// Per-node reduction (`"sum"`, `"max"`, `"logsumexp"`) of the float32 or
    /// float64 weights `ws`, of shape (V,) (or (B, V) if `batch`), into the
    /// float64 array `out`, (num_nodes,) (or (B, num_nodes)), a new numpy array
    /// if None; returns `out`. The GIL is released while it computes.
    #[pyo3(text_signature = "($self, kind, ws, batch, out)")]
    fn reduce<'py>(
        &self,
        py: Python<'py>,
        kind: &str,
        ws: &'py PyAny,
        batch: bool,
        out: Option<&'py PyAny>,
    ) -> PyResult<&'py PyAny> {
        entry_point("TrieCore.reduce", || self.reduce_into(py, kind, ws, batch, out))
    }

    /// Tokens whose bytes start with `prefix`, into the bool mask `out` (V,).
    #[pyo3(text_signature = "($self, prefix, out)")]
    fn mask_startswith(&self, prefix: &[u8], out: &PyAny) -> PyResult<()> {
        entry_point("TrieCore.mask_startswith", || {
            Ok(self.inner.mask_startswith(prefix, self.mask_out(out, &[])?.as_mut_slice())?)
        })
    }

    /// Tokens whose bytes are a prefix of `data`, into the bool mask `out` (V,).
    #[pyo3(text_signature = "($self, data, out)")]
    fn mask_prefix_of(&self, data: &[u8], out: &PyAny) -> PyResult<()> {
        entry_point("TrieCore.mask_prefix_of", || {
            Ok(self.inner.mask_prefix_of(data, self.mask_out(out, &[])?.as_mut_slice())?)
        })
    }

    /// Tokens whose bytes drive the DFA `transitions` (int32 or int64, (S, 256))
    /// from `state` through live states only, into the bool mask `out` (V,);
    /// `live` is a bool array (S,).
    #[pyo3(text_signature = "($self, transitions, state, live, out)")]
    fn dfa_mask(&self, py: Python<'_>, transitions: &PyAny, state: i64, live: &PyAny, out: &PyAny) -> PyResult<()> {
        entry_point("TrieCore.dfa_mask", || self.dfa_mask_into(py, transitions, state, live, out))
    }
}

impl PyTrie {
    /// `TrieCore(items, encode)`: bytes go into `flat`; the symbols of other
    /// entries into `encoded`, and only then does the build run over u32
    /// symbols instead of bytes.
    fn build(py: Python<'_>, items: &PyAny, encode: &PyAny) -> PyResult<Self> {
        let mut flat: Vec<u8> = Vec::new();
        let mut ends: Vec<usize> = Vec::new();
        let mut encoded: Vec<(usize, Vec<u32>)> = Vec::new();
        let mut keys: Vec<WordKey> = Vec::new();
        let mut first_plain = None;
        for (i, item) in items.iter()?.enumerate() {
            let item = item?;
            let key = if let Ok(bytes) = item.downcast::<PyBytes>() {
                flat.extend_from_slice(bytes.as_bytes());
                bytes_key(item)?
            } else {
                encoded.push((i, encode.call1((i, item))?.extract()?));
                WordKey::Other
            };
            if key == WordKey::Plain && first_plain.is_none() {
                first_plain = Some(i);
            }
            keys.push(key);
            ends.push(flat.len());
        }
        let inner = py.allow_threads(|| {
            let mut lo = 0;
            let byte_words: Vec<&[u8]> = ends
                .iter()
                .map(|&hi| {
                    let w = &flat[lo..hi];
                    lo = hi;
                    w
                })
                .collect();
            if encoded.is_empty() {
                return Trie::from_words(&byte_words, &keys);
            }
            let mut words: Vec<Vec<u32>> =
                byte_words.iter().map(|w| w.iter().map(|&b| u32::from(b)).collect()).collect();
            for (i, symbols) in encoded {
                words[i] = symbols;
            }
            let refs: Vec<&[u32]> = words.iter().map(Vec::as_slice).collect();
            Trie::from_words(&refs, &keys)
        });
        Ok(PyTrie { inner, first_plain })
    }

    /// The body of `TrieCore.reduce`.
    fn reduce_into<'py>(
        &self,
        py: Python<'py>,
        kind: &str,
        ws: &'py PyAny,
        batch: bool,
        out: Option<&'py PyAny>,
    ) -> PyResult<&'py PyAny> {
        let reduction = match kind {
            "sum" => Reduction::Sum,
            "max" => Reduction::Max,
            "logsumexp" => Reduction::LogSumExp,
            _ => return Err(PyValueError::new_err(format!("unknown reduction {kind:?}"))),
        };
        let name = if kind == "logsumexp" { "logws" } else { "ws" };
        let (v, n) = (self.inner.vocab_size(), self.inner.num_nodes());
        let ws = if batch {
            Floats::new(ws, name, &[Dim::Any("B"), Dim::Is(v)])?
        } else {
            Floats::new(ws, name, &[Dim::Is(v)])?
        };
        let rows = batch.then(|| ws.shape()[0]);
        let out_shape: &[Dim] = match rows {
            Some(r) => &[Dim::Is(r), Dim::Is(n)],
            None => &[Dim::Is(n)],
        };
        let out = match out {
            Some(out) => out,
            None => new_f64_array(py, rows.map_or(vec![n], |r| vec![r, n]))?,
        };
        let mut dst = BufferMut::<f64>::new(out, "out", out_shape, &[&ws])?;
        let dst = dst.as_mut_slice();
        let trie = &self.inner;
        match &ws {
            Floats::F32(w) => {
                let w = w.as_slice();
                py.allow_threads(|| reduction.run(trie, w, rows, dst))
            }
            Floats::F64(w) => {
                let w = w.as_slice();
                py.allow_threads(|| reduction.run(trie, w, rows, dst))
            }
        }?;
        Ok(out)
    }

    /// The body of `TrieCore.dfa_mask`.
    fn dfa_mask_into(
        &self,
        py: Python<'_>,
        transitions: &PyAny,
        state: i64,
        live: &PyAny,
        out: &PyAny,
    ) -> PyResult<()> {
        let table = Ints::new(transitions, "transitions", &[Dim::Any("S"), Dim::Is(256)])?;
        let n_states = table.shape()[0];
        let live = Buffer::<u8>::new(live, "live", &[Dim::Is(n_states)])?;
        let mut out = self.mask_out(out, &[&table, &live])?;
        let dst = out.as_mut_slice();
        let alive: Vec<bool> = live.as_slice().iter().map(|&b| b != 0).collect();
        let trie = &self.inner;
        match &table {
            Ints::I32(t) => {
                let t = t.as_slice();
                py.allow_threads(|| trie.dfa_mask(t, n_states, state, &alive, dst))
            }
            Ints::I64(t) => {
                let t = t.as_slice();
                py.allow_threads(|| trie.dfa_mask(t, n_states, state, &alive, dst))
            }
        }?;
        Ok(())
    }
}

/// Copy the float64 array `src` into `out`, which must have its shape, be
/// writable and share no memory with it (the torch trie's `out=`).
#[pyfunction]
#[pyo3(text_signature = "(src, out)")]
fn copy_into(src: &PyAny, out: &PyAny) -> PyResult<()> {
    entry_point("copy_into", || {
        let src = Buffer::<f64>::of_any_shape(src, "src")?;
        let shape: Vec<Dim> = src.shape().iter().map(|&d| Dim::Is(d)).collect();
        BufferMut::<f64>::new(out, "out", &shape, &[&src])?.as_mut_slice().copy_from_slice(src.as_slice());
        Ok(())
    })
}

pub fn register(m: &PyModule) -> PyResult<()> {
    m.add_class::<PyTrie>()?;
    m.add_function(wrap_pyfunction!(copy_into, m)?)
}
