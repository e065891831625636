//! A byte trie over a vocabulary, in flat arrays.
//!
//! Nodes are numbered in depth-first preorder with children in increasing byte
//! order, which is the lexicographic order of their prefixes. So a node's subtree
//! is the id range `[n, end[n])`, every child has a larger id than its parent, and
//! with the tokens sorted by bytes, the tokens under a node are one contiguous run
//! of that order, starting with those that end exactly at the node.

use rayon::prelude::*;

/// Why a trie operation refused its input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrieError {
    NanWeight { row: usize, index: usize },
    BadShape(String),
    BadDfa(String),
}

impl std::fmt::Display for TrieError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TrieError::NanWeight { row, index } => {
                write!(f, "weights contain NaN (row {row}, token {index})")
            }
            TrieError::BadShape(m) | TrieError::BadDfa(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for TrieError {}

/// An input weight type.
pub trait Weight: Copy + Send + Sync {
    fn to_f64(self) -> f64;
}

impl Weight for f32 {
    #[inline]
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl Weight for f64 {
    #[inline]
    fn to_f64(self) -> f64 {
        self
    }
}

/// The chain of every node and the parent chain of every chain (see
/// [`Trie::chain_parent`]); the root is a chain of its own, its own parent.
fn chains(parent: &[u32], child_start: &[u32], tok_lo: &[u32]) -> (Vec<u32>, Vec<u32>) {
    let n = parent.len();
    let mut node_chain = vec![0u32; n];
    let mut chain_parent = vec![0u32];
    for c in 1..n {
        let p = c - 1;
        let continues = p != 0
            && parent[c] as usize == p
            && child_start[p + 1] - child_start[p] == 1
            && tok_lo[p + 1] == tok_lo[p];
        node_chain[c] = if continues {
            node_chain[p]
        } else {
            chain_parent.push(node_chain[parent[c] as usize]);
            (chain_parent.len() - 1) as u32
        };
    }
    (node_chain, chain_parent)
}

/// A per-node reduction: an accumulator folded over weights and merged up the trie.
trait Reduce {
    type Acc: Copy + Send;
    const EMPTY: Self::Acc;
    /// Whether a NaN weight always reaches the root's value.
    const PROPAGATES_NAN: bool;
    fn push(acc: Self::Acc, w: f64) -> Self::Acc;
    fn merge(a: Self::Acc, b: Self::Acc) -> Self::Acc;
    fn value(acc: Self::Acc) -> f64;
}

struct Sum;
impl Reduce for Sum {
    type Acc = f64;
    const EMPTY: f64 = 0.0;
    const PROPAGATES_NAN: bool = true;
    #[inline]
    fn push(acc: f64, w: f64) -> f64 {
        acc + w
    }
    #[inline]
    fn merge(a: f64, b: f64) -> f64 {
        a + b
    }
    #[inline]
    fn value(acc: f64) -> f64 {
        acc
    }
}

struct Max;
impl Reduce for Max {
    type Acc = f64;
    const EMPTY: f64 = f64::NEG_INFINITY;
    const PROPAGATES_NAN: bool = false;
    #[inline]
    fn push(acc: f64, w: f64) -> f64 {
        if w > acc { w } else { acc }
    }
    #[inline]
    fn merge(a: f64, b: f64) -> f64 {
        Self::push(a, b)
    }
    #[inline]
    fn value(acc: f64) -> f64 {
        acc
    }
}

/// `(m, s)`: a running max and the sum of `exp(w - m)`, so every node is exact
/// relative to its own max however far it is from the global one.
struct LogSumExp;
impl Reduce for LogSumExp {
    type Acc = (f64, f64);
    const EMPTY: (f64, f64) = (f64::NEG_INFINITY, 0.0);
    const PROPAGATES_NAN: bool = false;
    #[inline]
    fn push(acc: (f64, f64), w: f64) -> (f64, f64) {
        Self::merge(acc, (w, 1.0))
    }
    #[inline]
    fn merge((ma, sa): (f64, f64), (mb, sb): (f64, f64)) -> (f64, f64) {
        if mb == f64::NEG_INFINITY {
            (ma, sa)
        } else if ma == f64::NEG_INFINITY {
            (mb, sb)
        } else if mb > ma {
            (mb, sa * (ma - mb).exp() + sb)
        } else if mb < ma {
            (ma, sa + sb * (mb - ma).exp())
        } else {
            (ma, sa + sb)
        }
    }
    #[inline]
    fn value((m, s): (f64, f64)) -> f64 {
        if m.is_finite() { m + s.ln() } else { m }
    }
}

/// The trie; see the module documentation for the layout.
#[derive(Debug, Clone)]
pub struct Trie {
    /// Parent of each node (the root is its own parent, and is never walked up from).
    parent: Vec<u32>,
    /// The byte on the edge into each node (0 for the root).
    byte: Vec<u8>,
    /// One past the last node of each node's subtree.
    end: Vec<u32>,
    /// Children of node `n`: `child_byte/child_node[child_start[n]..child_start[n + 1]]`.
    child_start: Vec<u32>,
    child_byte: Vec<u8>,
    child_node: Vec<u32>,
    /// Token ids in (bytes, id) order, i.e. grouped by node in preorder.
    sorted_tokens: Vec<u32>,
    /// `tok_lo[n]`: how many tokens sit at nodes with an id below `n` (length N + 1).
    tok_lo: Vec<u32>,
    /// The node of each token's full byte string.
    token_node: Vec<u32>,
    /// Chains: maximal runs of consecutive nodes in which every node but the
    /// last has one child and no token, so all of a chain's nodes have the same
    /// tokens under them. Reductions compute one value per chain (about half as
    /// many as nodes). Chains are numbered in preorder too (parents first).
    chain_parent: Vec<u32>,
    /// The chain of each node, and of each token's node.
    node_chain: Vec<u32>,
    token_chain: Vec<u32>,
}

impl Trie {
    /// Build the trie of `tokens` (one byte string per token id).
    pub fn new(tokens: &[&[u8]]) -> Trie {
        let mut order: Vec<u32> = (0..tokens.len() as u32).collect();
        order.par_sort_unstable_by(|&a, &b| tokens[a as usize].cmp(tokens[b as usize]).then(a.cmp(&b)));

        let mut parent = vec![0u32];
        let mut byte = vec![0u8];
        let mut end = vec![0u32];
        let mut token_node = vec![0u32; tokens.len()];
        // `path[d]` is the node of the current prefix of length d.
        let mut path: Vec<u32> = vec![0];
        let mut prev: &[u8] = &[];
        for &t in &order {
            let bytes = tokens[t as usize];
            let common = bytes.iter().zip(prev).take_while(|(a, b)| a == b).count();
            for &closed in &path[common + 1..] {
                end[closed as usize] = parent.len() as u32;
            }
            path.truncate(common + 1);
            for &b in &bytes[common..] {
                let id = parent.len() as u32;
                parent.push(*path.last().unwrap());
                byte.push(b);
                end.push(0);
                path.push(id);
            }
            token_node[t as usize] = *path.last().unwrap();
            prev = bytes;
        }
        let n = parent.len();
        for &open in &path {
            end[open as usize] = n as u32;
        }

        let mut child_start = vec![0u32; n + 1];
        for &p in &parent[1..] {
            child_start[p as usize + 1] += 1;
        }
        for i in 0..n {
            child_start[i + 1] += child_start[i];
        }
        // Children are visited in increasing id, hence increasing byte, order.
        let mut fill = child_start.clone();
        let mut child_byte = vec![0u8; n.saturating_sub(1)];
        let mut child_node = vec![0u32; n.saturating_sub(1)];
        for c in 1..n {
            let slot = &mut fill[parent[c] as usize];
            child_byte[*slot as usize] = byte[c];
            child_node[*slot as usize] = c as u32;
            *slot += 1;
        }

        let mut tok_lo = vec![0u32; n + 1];
        for &node in &token_node {
            tok_lo[node as usize + 1] += 1;
        }
        for i in 0..n {
            tok_lo[i + 1] += tok_lo[i];
        }

        let (node_chain, chain_parent) = chains(&parent, &child_start, &tok_lo);
        let token_chain = token_node.iter().map(|&node| node_chain[node as usize]).collect();
        Trie {
            parent,
            byte,
            end,
            child_start,
            child_byte,
            child_node,
            sorted_tokens: order,
            tok_lo,
            token_node,
            chain_parent,
            node_chain,
            token_chain,
        }
    }

    pub fn num_nodes(&self) -> usize {
        self.parent.len()
    }

    pub fn vocab_size(&self) -> usize {
        self.token_node.len()
    }

    /// The children of `node`: their bytes and node ids, in increasing byte order.
    pub fn children(&self, node: u32) -> (&[u8], &[u32]) {
        let (lo, hi) = (self.child_start[node as usize] as usize, self.child_start[node as usize + 1] as usize);
        (&self.child_byte[lo..hi], &self.child_node[lo..hi])
    }

    pub fn child(&self, node: u32, b: u8) -> Option<u32> {
        let (bytes, nodes) = self.children(node);
        bytes.binary_search(&b).ok().map(|i| nodes[i])
    }

    pub fn node_of(&self, prefix: &[u8]) -> Option<u32> {
        prefix.iter().try_fold(0u32, |node, &b| self.child(node, b))
    }

    pub fn prefix(&self, mut node: u32) -> Vec<u8> {
        let mut out = Vec::new();
        while node != 0 {
            out.push(self.byte[node as usize]);
            node = self.parent[node as usize];
        }
        out.reverse();
        out
    }

    pub fn parent(&self, node: u32) -> Option<u32> {
        (node != 0).then(|| self.parent[node as usize])
    }

    pub fn subtree_end(&self, node: u32) -> u32 {
        self.end[node as usize]
    }

    pub fn sorted_tokens(&self) -> &[u32] {
        &self.sorted_tokens
    }

    /// The tokens under `node` as a range of [`Trie::sorted_tokens`].
    pub fn tokens_under_range(&self, node: u32) -> (usize, usize) {
        (self.tok_lo[node as usize] as usize, self.tok_lo[self.end[node as usize] as usize] as usize)
    }

    pub fn tokens_under(&self, node: u32) -> &[u32] {
        let (lo, hi) = self.tokens_under_range(node);
        &self.sorted_tokens[lo..hi]
    }

    /// The tokens whose bytes are exactly `node`'s prefix.
    pub fn tokens_at(&self, node: u32) -> &[u32] {
        let lo = self.tok_lo[node as usize] as usize;
        let hi = self.tok_lo[node as usize + 1] as usize;
        &self.sorted_tokens[lo..hi]
    }

    pub fn token_node(&self, token: usize) -> u32 {
        self.token_node[token]
    }

    fn check_len(&self, what: &str, got: usize, want: usize) -> Result<(), TrieError> {
        if got == want {
            Ok(())
        } else {
            Err(TrieError::BadShape(format!("{what} has {got} entries, expected {want}")))
        }
    }

    fn first_nan<W: Weight>(ws: &[W]) -> Option<usize> {
        ws.iter().position(|w| w.to_f64().is_nan())
    }

    /// One row into `out`: each token's weight into its chain, each chain (in
    /// reverse preorder, children first) into its parent chain, then every node
    /// gets its chain's value. Three loops of fixed length and no data-dependent
    /// branches: the weights are read in order, and the writes go to chains that
    /// are mostly near each other.
    fn fold_row<R: Reduce, W: Weight>(&self, ws: &[W], out: &mut [f64]) {
        let mut acc = vec![R::EMPTY; self.chain_parent.len()];
        for (&chain, w) in self.token_chain.iter().zip(ws) {
            let a = &mut acc[chain as usize];
            *a = R::push(*a, w.to_f64());
        }
        for k in (1..acc.len()).rev() {
            let p = self.chain_parent[k] as usize;
            acc[p] = R::merge(acc[p], acc[k]);
        }
        for (o, &chain) in out.iter_mut().zip(&self.node_chain) {
            *o = R::value(acc[chain as usize]);
        }
    }

    fn reduce<R: Reduce, W: Weight>(&self, ws: &[W], rows: usize, out: &mut [f64]) -> Result<(), TrieError> {
        let (v, n) = (self.vocab_size(), self.num_nodes());
        self.check_len("weights", ws.len(), rows * v)?;
        self.check_len("output", out.len(), rows * n)?;
        let row_of = |r: usize| &ws[r * v..(r + 1) * v];
        // Sums propagate NaN to the root, so only a NaN root needs a scan; a max
        // would drop NaN silently, so those rows are scanned up front.
        let check = |r: usize, root: Option<f64>| match root {
            Some(x) if !x.is_nan() => Ok(()),
            _ => match Self::first_nan(row_of(r)) {
                Some(index) => Err(TrieError::NanWeight { row: r, index }),
                None => Ok(()),
            },
        };
        if !R::PROPAGATES_NAN {
            (0..rows).try_for_each(|r| check(r, None))?;
        }
        if v > 0 {
            out.par_chunks_mut(n).zip(ws.par_chunks(v)).for_each(|(o, w)| self.fold_row::<R, W>(w, o));
        } else {
            out.chunks_mut(n).for_each(|o| self.fold_row::<R, W>(&[], o));
        }
        if R::PROPAGATES_NAN {
            (0..rows).try_for_each(|r| check(r, Some(out[r * n])))?;
        }
        Ok(())
    }

    /// Per node, the sum of the weights of the tokens under it.
    pub fn weight_sum<W: Weight>(&self, ws: &[W], out: &mut [f64]) -> Result<(), TrieError> {
        self.reduce::<Sum, W>(ws, 1, out)
    }

    /// Per node, the max of the weights of the tokens under it (`-inf` for none).
    pub fn weight_max<W: Weight>(&self, ws: &[W], out: &mut [f64]) -> Result<(), TrieError> {
        self.reduce::<Max, W>(ws, 1, out)
    }

    /// Per node, `ln(sum(exp(logws)))` over the tokens under it, stable at every node.
    pub fn weight_logsumexp<W: Weight>(&self, logws: &[W], out: &mut [f64]) -> Result<(), TrieError> {
        self.reduce::<LogSumExp, W>(logws, 1, out)
    }

    /// [`Trie::weight_sum`] of each row of the row-major `(rows, V)` array `ws`, rows in parallel.
    pub fn batch_weight_sum<W: Weight>(&self, ws: &[W], rows: usize, out: &mut [f64]) -> Result<(), TrieError> {
        self.reduce::<Sum, W>(ws, rows, out)
    }

    pub fn batch_weight_max<W: Weight>(&self, ws: &[W], rows: usize, out: &mut [f64]) -> Result<(), TrieError> {
        self.reduce::<Max, W>(ws, rows, out)
    }

    pub fn batch_weight_logsumexp<W: Weight>(&self, ws: &[W], rows: usize, out: &mut [f64]) -> Result<(), TrieError> {
        self.reduce::<LogSumExp, W>(ws, rows, out)
    }

    fn mask_of(&self, out: &mut [u8], tokens: impl Iterator<Item = u32>) -> Result<(), TrieError> {
        self.check_len("mask", out.len(), self.vocab_size())?;
        out.fill(0);
        for t in tokens {
            out[t as usize] = 1;
        }
        Ok(())
    }

    /// Mask of the tokens whose bytes start with `prefix`.
    pub fn mask_startswith(&self, prefix: &[u8], out: &mut [u8]) -> Result<(), TrieError> {
        let under = self.node_of(prefix).map_or(&[][..], |n| self.tokens_under(n));
        self.mask_of(out, under.iter().copied())
    }

    /// Mask of the tokens whose bytes are a prefix of `data`.
    pub fn mask_prefix_of(&self, data: &[u8], out: &mut [u8]) -> Result<(), TrieError> {
        let mut nodes = vec![0u32];
        let mut node = 0u32;
        for &b in data {
            match self.child(node, b) {
                Some(c) => {
                    nodes.push(c);
                    node = c;
                }
                None => break,
            }
        }
        self.mask_of(out, nodes.iter().flat_map(|&n| self.tokens_at(n).iter().copied()))
    }

    /// Mask of the tokens whose bytes a byte-level DFA follows from `state`
    /// through live states only (`transitions`: row-major `(n_states, 256)`, -1 = no edge).
    pub fn dfa_mask(
        &self,
        transitions: &[i32],
        n_states: usize,
        state: i64,
        live: &[bool],
        out: &mut [u8],
    ) -> Result<(), TrieError> {
        if transitions.len() != n_states * 256 {
            return Err(TrieError::BadDfa(format!(
                "transitions has {} entries, expected {n_states} x 256",
                transitions.len()
            )));
        }
        if live.len() != n_states {
            return Err(TrieError::BadDfa(format!("live has {} entries, expected {n_states}", live.len())));
        }
        if let Some(bad) = transitions.iter().find(|&&s| s < -1 || s as i64 >= n_states as i64) {
            return Err(TrieError::BadDfa(format!("transition target {bad} is outside [-1, {n_states})")));
        }
        if state < 0 || state as u64 >= n_states as u64 {
            return Err(TrieError::BadDfa(format!("state {state} is outside [0, {n_states})")));
        }
        self.check_len("mask", out.len(), self.vocab_size())?;
        out.fill(0);
        if !live[state as usize] {
            return Ok(());
        }
        let mut stack = vec![(0u32, state as usize)];
        while let Some((node, s)) = stack.pop() {
            for &t in self.tokens_at(node) {
                out[t as usize] = 1;
            }
            let (bytes, nodes) = self.children(node);
            let row = &transitions[s * 256..(s + 1) * 256];
            for (&b, &child) in bytes.iter().zip(nodes) {
                let next = row[b as usize];
                if next >= 0 && live[next as usize] {
                    stack.push((child, next as usize));
                }
            }
        }
        Ok(())
    }
}
