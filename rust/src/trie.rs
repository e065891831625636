//! A trie over a vocabulary of symbol strings, in flat arrays, numbered as
//! genlm-backend numbers its `TokenCharacterTrie`.
//!
//! Symbols are `u32`: a byte is its own value, and callers map any other
//! symbol (an end-of-sequence object, say) to an id of 256 or more.
//!
//! Two numberings live side by side:
//! - the *public* one: every distinct prefix of an entry is a node, and every
//!   vocabulary entry has a leaf node of its own below the node of its full
//!   string. A node's children are ordered by the first vocabulary entry under
//!   them (the order in which inserting entries one by one would create them),
//!   and nodes are numbered in postorder of that tree. So children have smaller
//!   ids than their parents, the root is the last node, and the nodes of a
//!   subtree form one id range ending at its top.
//! - an internal *lexicographic* one over the prefix nodes only (preorder,
//!   children in increasing symbol order), in which the entries under a prefix
//!   are one run of the entries sorted by (symbols, index). Navigation and
//!   masks use it; reductions use the public one.

use rayon::prelude::*;

const NONE: u32 = u32::MAX;

/// Why a trie operation refused its input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrieError {
    /// A NaN weight at `index` (in batch row `row`; None for a single vector).
    NanWeight {
        row: Option<usize>,
        index: usize,
    },
    BadShape(String),
    BadDfa(String),
}

impl std::fmt::Display for TrieError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TrieError::NanWeight { row: Some(row), index } => {
                write!(f, "weights contain NaN (row {row}, token {index})")
            }
            TrieError::NanWeight { row: None, index } => write!(f, "weights contain NaN (token {index})"),
            TrieError::BadShape(m) | TrieError::BadDfa(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for TrieError {}

/// What makes a vocabulary entry distinct from another with the same symbols.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum WordKey {
    /// A plain byte string: two equal ones are a duplicate.
    Plain,
    /// A token with an id: two with equal symbols and equal ids are a duplicate.
    Token(i64),
    /// Anything else; the caller checks these for duplicates.
    Other,
}
/// A symbol type entries can be given in: bytes (the fast path) or `u32`.
pub trait Symbol: Copy + Ord + Into<u32> + Sync {}
impl Symbol for u8 {}
impl Symbol for u32 {}

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
        if w > acc {
            w
        } else {
            acc
        }
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
        if m.is_finite() {
            m + s.ln()
        } else {
            m
        }
    }
}

/// The trie; see the module documentation for the two numberings.
#[derive(Debug, Clone)]
pub struct Trie {
    // -- the lexicographic prefix trie ("lex" ids) --
    /// Parent of each lex node (the root is its own parent).
    lex_parent: Vec<u32>,
    /// The symbol on the edge into each lex node (0 for the root).
    lex_sym: Vec<u32>,
    /// One past the last lex node of each lex node's subtree.
    lex_end: Vec<u32>,
    /// Children of lex node `n`: `child_sym/child_lex[child_start[n]..child_start[n + 1]]`.
    child_start: Vec<u32>,
    child_sym: Vec<u32>,
    child_lex: Vec<u32>,
    /// Entries in (symbols, index) order, i.e. grouped by lex node in preorder.
    sorted_tokens: Vec<u32>,
    /// The position of each entry in `sorted_tokens`.
    token_rank: Vec<u32>,
    /// `tok_lo[n]`: how many entries end at lex nodes below `n` (length L + 1).
    tok_lo: Vec<u32>,
    /// The lex node of each entry's full string.
    token_lex: Vec<u32>,
    // -- the public numbering --
    /// The public id of each lex node.
    lex_node: Vec<u32>,
    /// The lex node of each public node (NONE for leaves).
    node_lex: Vec<u32>,
    /// The entry of each leaf (NONE for prefix nodes).
    node_token: Vec<u32>,
    /// The leaf of each entry.
    token_leaf: Vec<u32>,
    /// Parent of each node (the root is its own parent).
    node_parent: Vec<u32>,
    /// Children of node `n` in increasing id order: `kids[kid_start[n]..kid_start[n + 1]]`.
    kid_start: Vec<u32>,
    kids: Vec<u32>,
    /// Chains: maximal runs of consecutive nodes in which every node but the
    /// first has exactly one child (the node before it), so all of a chain's
    /// nodes have the same entries under them. Reductions compute one value per
    /// chain. Chains are numbered in node order, so a
    /// chain's parent chain has a larger id and the root's chain is the last.
    chain_parent: Vec<u32>,
    node_chain: Vec<u32>,
    token_chain: Vec<u32>,
    /// The first duplicate entry `(earlier, later)`, with `later` as small as possible.
    duplicate: Option<(usize, usize)>,
}

impl Trie {
    /// The trie of byte strings (one per entry; no duplicate check).
    pub fn new(tokens: &[&[u8]]) -> Trie {
        Trie::from_words(tokens, &vec![WordKey::Other; tokens.len()])
    }

    /// The trie of symbol strings `words` (bytes, or `u32` symbols), with
    /// `keys[i]` saying when entry `i` duplicates another (see [`Trie::duplicate`]).
    pub fn from_words<S: Symbol>(words: &[&[S]], keys: &[WordKey]) -> Trie {
        assert_eq!(words.len(), keys.len(), "one key per word");
        let v = words.len();
        let mut order: Vec<u32> = (0..v as u32).collect();
        order.par_sort_unstable_by(|&a, &b| words[a as usize].cmp(words[b as usize]).then(a.cmp(&b)));

        // The lexicographic trie, in one pass over the sorted entries.
        let mut lex_parent = vec![0u32];
        let mut lex_sym = vec![0u32];
        let mut lex_end = vec![0u32];
        let mut token_lex = vec![0u32; v];
        // `path[d]` is the lex node of the current prefix of length d.
        let mut path: Vec<u32> = vec![0];
        let mut prev: &[S] = &[];
        for &t in &order {
            let word = words[t as usize];
            let common = word.iter().zip(prev).take_while(|(a, b)| a == b).count();
            for &closed in &path[common + 1..] {
                lex_end[closed as usize] = lex_parent.len() as u32;
            }
            path.truncate(common + 1);
            for &s in &word[common..] {
                let id = lex_parent.len() as u32;
                lex_parent.push(*path.last().unwrap());
                lex_sym.push(s.into());
                lex_end.push(0);
                path.push(id);
            }
            token_lex[t as usize] = *path.last().unwrap();
            prev = word;
        }
        let l = lex_parent.len();
        for &open in &path {
            lex_end[open as usize] = l as u32;
        }

        // Lex children, in increasing lex id and hence symbol order.
        let child_start = prefix_counts(l, lex_parent[1..].iter().map(|&p| p as usize));
        let mut fill = child_start.clone();
        let mut child_sym = vec![0u32; l - 1];
        let mut child_lex = vec![0u32; l - 1];
        for c in 1..l {
            let slot = &mut fill[lex_parent[c] as usize];
            child_sym[*slot as usize] = lex_sym[c];
            child_lex[*slot as usize] = c as u32;
            *slot += 1;
        }
        let tok_lo = prefix_counts(l, token_lex.iter().map(|&n| n as usize));
        let mut token_rank = vec![0u32; v];
        for (r, &t) in order.iter().enumerate() {
            token_rank[t as usize] = r as u32;
        }
        let duplicate = find_duplicate(words, keys, &order);

        // The public numbering. `first[n]`: the smallest entry under lex node n,
        // which orders it among its siblings; `size[n]`: the public nodes in its
        // subtree (prefix nodes and leaves).
        let at = |n: usize| &order[tok_lo[n] as usize..tok_lo[n + 1] as usize];
        let mut first: Vec<u32> = (0..l).map(|n| at(n).first().copied().unwrap_or(NONE)).collect();
        let mut size: Vec<u32> = (0..l).map(|n| 1 + at(n).len() as u32).collect();
        for n in (1..l).rev() {
            let p = lex_parent[n] as usize;
            first[p] = first[p].min(first[n]);
            size[p] += size[n];
        }
        let num_nodes = size[0] as usize;
        // Each lex node's subtree takes the id range [start, start + size); its
        // children's ranges come first, in order, and the node itself last.
        let mut start = vec![0u32; l];
        let mut lex_node = vec![0u32; l];
        let mut token_leaf = vec![0u32; v];
        let mut parts: Vec<(u32, bool, u32)> = Vec::new();
        for x in 0..l {
            let mut cursor = start[x];
            let (lo, hi) = (child_start[x] as usize, child_start[x + 1] as usize);
            if lo == hi {
                for &t in at(x) {
                    token_leaf[t as usize] = cursor;
                    cursor += 1;
                }
                lex_node[x] = cursor;
                continue;
            }
            parts.clear();
            parts.extend(at(x).iter().map(|&t| (t, true, t)));
            parts.extend(child_lex[lo..hi].iter().map(|&c| (first[c as usize], false, c)));
            parts.sort_unstable_by_key(|p| p.0);
            for &(_, leaf, id) in &parts {
                if leaf {
                    token_leaf[id as usize] = cursor;
                    cursor += 1;
                } else {
                    start[id as usize] = cursor;
                    cursor += size[id as usize];
                }
            }
            lex_node[x] = start[x] + size[x] - 1;
        }

        let root = (num_nodes - 1) as u32;
        let mut node_lex = vec![NONE; num_nodes];
        let mut node_token = vec![NONE; num_nodes];
        let mut node_parent = vec![root; num_nodes];
        for x in 0..l {
            node_lex[lex_node[x] as usize] = x as u32;
            node_parent[lex_node[x] as usize] = lex_node[lex_parent[x] as usize];
        }
        for t in 0..v {
            node_token[token_leaf[t] as usize] = t as u32;
            node_parent[token_leaf[t] as usize] = lex_node[token_lex[t] as usize];
        }
        let kid_start = prefix_counts(num_nodes, node_parent[..num_nodes - 1].iter().map(|&p| p as usize));
        let mut fill = kid_start.clone();
        let mut kids = vec![0u32; num_nodes - 1];
        for c in 0..num_nodes - 1 {
            let slot = &mut fill[node_parent[c] as usize];
            kids[*slot as usize] = c as u32;
            *slot += 1;
        }

        let mut node_chain = vec![0u32; num_nodes];
        let mut chain_top: Vec<u32> = Vec::new();
        for c in 0..num_nodes {
            if kid_start[c + 1] - kid_start[c] == 1 {
                // Its only child is the node just before it (postorder).
                node_chain[c] = node_chain[c - 1];
                *chain_top.last_mut().unwrap() = c as u32;
            } else {
                node_chain[c] = chain_top.len() as u32;
                chain_top.push(c as u32);
            }
        }
        let chain_parent: Vec<u32> =
            chain_top.iter().map(|&top| node_chain[node_parent[top as usize] as usize]).collect();
        let token_chain = token_leaf.iter().map(|&leaf| node_chain[leaf as usize]).collect();
        Trie {
            lex_parent,
            lex_sym,
            lex_end,
            child_start,
            child_sym,
            child_lex,
            sorted_tokens: order,
            token_rank,
            tok_lo,
            token_lex,
            lex_node,
            node_lex,
            node_token,
            token_leaf,
            node_parent,
            kid_start,
            kids,
            chain_parent,
            node_chain,
            token_chain,
            duplicate,
        }
    }

    /// Nodes: the prefix nodes and one leaf per entry.
    pub fn num_nodes(&self) -> usize {
        self.node_parent.len()
    }

    pub fn vocab_size(&self) -> usize {
        self.token_leaf.len()
    }

    /// The root: the last node.
    pub fn root(&self) -> u32 {
        (self.num_nodes() - 1) as u32
    }

    /// The first pair of duplicate entries `(earlier, later)`: equal symbols and,
    /// by their keys, both [`WordKey::Plain`] or both tokens with one id. Of all
    /// such pairs, the one whose later entry comes first.
    pub fn duplicate(&self) -> Option<(usize, usize)> {
        self.duplicate
    }

    /// The children of `node`, in increasing id order (leaves included).
    pub fn children(&self, node: u32) -> &[u32] {
        let n = node as usize;
        &self.kids[self.kid_start[n] as usize..self.kid_start[n + 1] as usize]
    }

    /// The symbol on the edge into `node`; None for the root and for leaves.
    pub fn symbol(&self, node: u32) -> Option<u32> {
        let lx = self.node_lex[node as usize];
        (lx != NONE && lx != 0).then(|| self.lex_sym[lx as usize])
    }

    /// The entry whose leaf `node` is; None for prefix nodes.
    pub fn leaf_token(&self, node: u32) -> Option<u32> {
        let t = self.node_token[node as usize];
        (t != NONE).then_some(t)
    }

    /// The leaf of entry `token`.
    pub fn token_leaf(&self, token: usize) -> u32 {
        self.token_leaf[token]
    }

    pub fn parent(&self, node: u32) -> Option<u32> {
        (node != self.root()).then(|| self.node_parent[node as usize])
    }

    fn lex_child(&self, lx: u32, s: u32) -> Option<u32> {
        let (lo, hi) = (self.child_start[lx as usize] as usize, self.child_start[lx as usize + 1] as usize);
        self.child_sym[lo..hi].binary_search(&s).ok().map(|i| self.child_lex[lo + i])
    }

    fn lex_of(&self, prefix: impl IntoIterator<Item = u32>) -> Option<u32> {
        prefix.into_iter().try_fold(0u32, |lx, s| self.lex_child(lx, s))
    }

    /// The prefix node reached from `node` by the edge `symbol`.
    pub fn child(&self, node: u32, symbol: u32) -> Option<u32> {
        let lx = self.node_lex[node as usize];
        if lx == NONE {
            return None;
        }
        self.lex_child(lx, symbol).map(|c| self.lex_node[c as usize])
    }

    /// The prefix node of the symbol string `prefix`.
    pub fn node_of(&self, prefix: &[u32]) -> Option<u32> {
        self.lex_of(prefix.iter().copied()).map(|lx| self.lex_node[lx as usize])
    }

    /// The prefix node of the byte string `prefix`.
    pub fn node_of_bytes(&self, prefix: &[u8]) -> Option<u32> {
        self.lex_of(prefix.iter().map(|&b| u32::from(b))).map(|lx| self.lex_node[lx as usize])
    }

    /// The lex node a public node stands for (a leaf: its parent's).
    fn lex_at(&self, node: u32) -> u32 {
        match self.node_lex[node as usize] {
            NONE => self.token_lex[self.node_token[node as usize] as usize],
            lx => lx,
        }
    }

    /// The symbols from the root to `node` (a leaf has its entry's full string).
    pub fn prefix(&self, node: u32) -> Vec<u32> {
        let mut lx = self.lex_at(node);
        let mut out = Vec::new();
        while lx != 0 {
            out.push(self.lex_sym[lx as usize]);
            lx = self.lex_parent[lx as usize];
        }
        out.reverse();
        out
    }

    /// Entries in (symbols, index) order.
    pub fn sorted_tokens(&self) -> &[u32] {
        &self.sorted_tokens
    }

    /// The entries under `node` as a range of [`Trie::sorted_tokens`].
    pub fn tokens_under_range(&self, node: u32) -> (usize, usize) {
        match self.node_lex[node as usize] {
            NONE => {
                let r = self.token_rank[self.node_token[node as usize] as usize] as usize;
                (r, r + 1)
            }
            lx => (self.tok_lo[lx as usize] as usize, self.tok_lo[self.lex_end[lx as usize] as usize] as usize),
        }
    }

    pub fn tokens_under(&self, node: u32) -> &[u32] {
        let (lo, hi) = self.tokens_under_range(node);
        &self.sorted_tokens[lo..hi]
    }

    /// The entries whose string ends at lex node `lx`.
    fn lex_tokens_at(&self, lx: u32) -> &[u32] {
        &self.sorted_tokens[self.tok_lo[lx as usize] as usize..self.tok_lo[lx as usize + 1] as usize]
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

    /// One row into `out`: each entry's weight into its leaf's chain, each chain
    /// (children first) into its parent chain, then every node gets its chain's
    /// value. Three loops of fixed length and no data-dependent branches; the
    /// last one reads the chains in order. (Filling each chain's id range
    /// instead is 3x slower: most chains are one or two nodes long.)
    fn fold_row<R: Reduce, W: Weight>(&self, ws: &[W], out: &mut [f64]) {
        let mut acc = vec![R::EMPTY; self.chain_parent.len()];
        for (&chain, w) in self.token_chain.iter().zip(ws) {
            let a = &mut acc[chain as usize];
            *a = R::push(*a, w.to_f64());
        }
        for k in 0..acc.len() - 1 {
            let p = self.chain_parent[k] as usize;
            acc[p] = R::merge(acc[p], acc[k]);
        }
        for (o, &chain) in out.iter_mut().zip(&self.node_chain) {
            *o = R::value(acc[chain as usize]);
        }
    }

    /// `ws` holds `rows` rows (None: one vector) of V weights.
    fn reduce<R: Reduce, W: Weight>(&self, ws: &[W], rows: Option<usize>, out: &mut [f64]) -> Result<(), TrieError> {
        let (v, n, root) = (self.vocab_size(), self.num_nodes(), self.root() as usize);
        let count = rows.unwrap_or(1);
        self.check_len("weights", ws.len(), count * v)?;
        self.check_len("output", out.len(), count * n)?;
        let row_of = |r: usize| &ws[r * v..(r + 1) * v];
        // Sums propagate NaN to the root, so only a NaN root needs a scan; a max
        // would drop NaN silently, so those rows are scanned up front.
        let check = |r: usize, root: Option<f64>| match root {
            Some(x) if !x.is_nan() => Ok(()),
            _ => match Self::first_nan(row_of(r)) {
                Some(index) => Err(TrieError::NanWeight { row: rows.map(|_| r), index }),
                None => Ok(()),
            },
        };
        if !R::PROPAGATES_NAN {
            (0..count).try_for_each(|r| check(r, None))?;
        }
        if v > 0 {
            out.par_chunks_mut(n).zip(ws.par_chunks(v)).for_each(|(o, w)| self.fold_row::<R, W>(w, o));
        } else {
            out.chunks_mut(n).for_each(|o| self.fold_row::<R, W>(&[], o));
        }
        if R::PROPAGATES_NAN {
            (0..count).try_for_each(|r| check(r, Some(out[r * n + root])))?;
        }
        Ok(())
    }

    /// Per node, the sum of the weights of the entries under it (a leaf: its entry's weight).
    pub fn weight_sum<W: Weight>(&self, ws: &[W], out: &mut [f64]) -> Result<(), TrieError> {
        self.reduce::<Sum, W>(ws, None, out)
    }

    /// Per node, the max of the weights of the entries under it.
    pub fn weight_max<W: Weight>(&self, ws: &[W], out: &mut [f64]) -> Result<(), TrieError> {
        self.reduce::<Max, W>(ws, None, out)
    }

    /// Per node, `ln(sum(exp(logws)))` over the entries under it, stable at every node.
    pub fn weight_logsumexp<W: Weight>(&self, logws: &[W], out: &mut [f64]) -> Result<(), TrieError> {
        self.reduce::<LogSumExp, W>(logws, None, out)
    }

    /// [`Trie::weight_sum`] of each row of the row-major `(rows, V)` array `ws`, rows in parallel.
    pub fn batch_weight_sum<W: Weight>(&self, ws: &[W], rows: usize, out: &mut [f64]) -> Result<(), TrieError> {
        self.reduce::<Sum, W>(ws, Some(rows), out)
    }

    pub fn batch_weight_max<W: Weight>(&self, ws: &[W], rows: usize, out: &mut [f64]) -> Result<(), TrieError> {
        self.reduce::<Max, W>(ws, Some(rows), out)
    }

    pub fn batch_weight_logsumexp<W: Weight>(&self, ws: &[W], rows: usize, out: &mut [f64]) -> Result<(), TrieError> {
        self.reduce::<LogSumExp, W>(ws, Some(rows), out)
    }

    fn mask_of(&self, out: &mut [u8], tokens: impl Iterator<Item = u32>) -> Result<(), TrieError> {
        self.check_len("mask", out.len(), self.vocab_size())?;
        out.fill(0);
        for t in tokens {
            out[t as usize] = 1;
        }
        Ok(())
    }

    /// Mask of the entries whose bytes start with `prefix`.
    pub fn mask_startswith(&self, prefix: &[u8], out: &mut [u8]) -> Result<(), TrieError> {
        let under = self.node_of_bytes(prefix).map_or(&[][..], |n| self.tokens_under(n));
        self.mask_of(out, under.iter().copied())
    }

    /// Mask of the entries whose bytes are a prefix of `data`.
    pub fn mask_prefix_of(&self, data: &[u8], out: &mut [u8]) -> Result<(), TrieError> {
        let mut nodes = vec![0u32];
        let mut lx = 0u32;
        for &b in data {
            match self.lex_child(lx, u32::from(b)) {
                Some(c) => {
                    nodes.push(c);
                    lx = c;
                }
                None => break,
            }
        }
        self.mask_of(out, nodes.iter().flat_map(|&n| self.lex_tokens_at(n).iter().copied()))
    }

    /// Mask of the entries whose bytes a byte-level DFA follows from `state`
    /// through live states only (`transitions`: row-major `(n_states, 256)`, -1 =
    /// no edge). A non-byte symbol has no edge.
    pub fn dfa_mask<S: Copy + Into<i64>>(
        &self,
        transitions: &[S],
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
        if let Some(bad) = transitions.iter().map(|&s| s.into()).find(|&s| s < -1 || s >= n_states as i64) {
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
        while let Some((lx, s)) = stack.pop() {
            for &t in self.lex_tokens_at(lx) {
                out[t as usize] = 1;
            }
            let (lo, hi) = (self.child_start[lx as usize] as usize, self.child_start[lx as usize + 1] as usize);
            let row = &transitions[s * 256..(s + 1) * 256];
            for (&sym, &child) in self.child_sym[lo..hi].iter().zip(&self.child_lex[lo..hi]) {
                let Some(&next) = row.get(sym as usize) else { break };
                let next: i64 = next.into();
                if next >= 0 && live[next as usize] {
                    stack.push((child, next as usize));
                }
            }
        }
        Ok(())
    }
}

/// `counts[i]` = how many of `items` are below `i`, for i in 0..=n (a CSR offset table).
fn prefix_counts(n: usize, items: impl Iterator<Item = usize>) -> Vec<u32> {
    let mut counts = vec![0u32; n + 1];
    for i in items {
        counts[i + 1] += 1;
    }
    for i in 0..n {
        counts[i + 1] += counts[i];
    }
    counts
}

/// See [`Trie::duplicate`]; `order` sorts the entries by (symbols, index).
fn find_duplicate<S: Symbol>(words: &[&[S]], keys: &[WordKey], order: &[u32]) -> Option<(usize, usize)> {
    let mut best: Option<(usize, usize)> = None;
    let mut group: Vec<(WordKey, u32)> = Vec::new();
    let mut i = 0;
    while i < order.len() {
        let word = words[order[i] as usize];
        let mut j = i + 1;
        while j < order.len() && words[order[j] as usize] == word {
            j += 1;
        }
        if j - i > 1 {
            group.clear();
            group.extend(order[i..j].iter().map(|&t| (keys[t as usize], t)));
            group.sort_unstable();
            for pair in group.windows(2) {
                let ((ka, a), (kb, b)) = (pair[0], pair[1]);
                if ka == kb && ka != WordKey::Other && best.is_none_or(|(_, later)| (b as usize) < later) {
                    best = Some((a as usize, b as usize));
                }
            }
        }
        i = j;
    }
    best
}
