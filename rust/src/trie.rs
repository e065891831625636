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

use std::ops::Range;

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

/// Items grouped by an index, as one table (compressed sparse rows): group
/// `g`'s items are `items[start[g]..start[g + 1]]`, in the order they were given.
#[derive(Debug, Clone)]
struct Groups {
    /// Where each group starts in `items` (one entry per group, plus the end).
    start: Vec<u32>,
    items: Vec<u32>,
}

impl Groups {
    /// `n` groups of the `(group, item)` pairs, each group's items in the order given.
    fn of_pairs(n: usize, pairs: impl Iterator<Item = (u32, u32)> + Clone) -> Groups {
        let mut start = vec![0u32; n + 1];
        for (g, _) in pairs.clone() {
            start[g as usize + 1] += 1;
        }
        for g in 0..n {
            start[g + 1] += start[g];
        }
        let mut next = start.clone();
        let mut items = vec![0u32; start[n] as usize];
        for (g, item) in pairs {
            let slot = &mut next[g as usize];
            items[*slot as usize] = item;
            *slot += 1;
        }
        Groups { start, items }
    }

    /// The positions in `items` of groups `first..last` (one run, as they are consecutive).
    fn span(&self, first: u32, last: u32) -> Range<usize> {
        self.start[first as usize] as usize..self.start[last as usize] as usize
    }

    fn range(&self, g: u32) -> Range<usize> {
        self.span(g, g + 1)
    }

    fn of(&self, g: u32) -> &[u32] {
        &self.items[self.range(g)]
    }
}

/// The trie; see the module documentation for the two numberings.
///
/// Field names say what indexes an array and what it holds:
/// `<index>_<what>`, where the index is a `lex` node, a public `node`, a
/// `token` (a vocabulary entry) or a `chain`, and the value is named after what
/// it is (`token_leaf[t]`: the leaf of entry `t`; `lex_node[x]`: the public node
/// of lex node `x`). A [`Groups`] field lists several per index
/// (`lex_children.of(x)`: the lex children of `x`).
#[derive(Debug, Clone)]
pub struct Trie {
    // -- lex nodes --
    /// Parent of each lex node (the root is its own parent).
    lex_parent: Vec<u32>,
    /// The symbol on the edge into each lex node (0 for the root).
    lex_symbol: Vec<u32>,
    /// One past the last lex node of each lex node's subtree.
    lex_subtree_end: Vec<u32>,
    /// The children of each lex node, in increasing symbol (and lex id) order.
    lex_children: Groups,
    /// The symbol of each child in `lex_children.items`.
    lex_children_symbol: Vec<u32>,
    /// The entries whose full string is each lex node's prefix; `items` holds
    /// every entry in (symbols, index) order, so the entries under lex node `x`
    /// are the run `lex_tokens.span(x, lex_subtree_end[x])`.
    lex_tokens: Groups,
    /// The public node of each lex node.
    lex_node: Vec<u32>,
    // -- entries --
    /// The lex node of each entry's full string.
    token_lex: Vec<u32>,
    /// The position of each entry in `lex_tokens.items`.
    token_rank: Vec<u32>,
    /// The leaf of each entry.
    token_leaf: Vec<u32>,
    /// The chain of each entry's leaf.
    token_chain: Vec<u32>,
    // -- public nodes --
    /// Parent of each node (the root is its own parent).
    node_parent: Vec<u32>,
    /// The children of each node, in increasing id order.
    node_children: Groups,
    /// The lex node of each prefix node (NONE for leaves).
    node_lex: Vec<u32>,
    /// The entry of each leaf (NONE for prefix nodes).
    node_token: Vec<u32>,
    /// The chain each node belongs to.
    node_chain: Vec<u32>,
    // -- chains --
    /// Chains: maximal runs of consecutive nodes in which every node but the
    /// first has exactly one child (the node before it), so all of a chain's
    /// nodes have the same entries under them. Reductions compute one value per
    /// chain. Chains are numbered in node order, so a chain's parent chain has
    /// a larger id and the root's chain is the last.
    chain_parent: Vec<u32>,
    /// The first duplicate entry `(earlier, later)`, with `later` as small as possible.
    duplicate: Option<(usize, usize)>,
}

/// The lexicographic prefix trie of a vocabulary (see [`lex_prefixes`]).
struct LexPrefixes {
    parent: Vec<u32>,
    symbol: Vec<u32>,
    subtree_end: Vec<u32>,
    /// The lex node of each entry's full string.
    token_lex: Vec<u32>,
}

/// The public numbering's nodes and their links, laid out from the lex trie.
struct PublicNodes {
    lex_node: Vec<u32>,
    token_leaf: Vec<u32>,
    node_parent: Vec<u32>,
    node_lex: Vec<u32>,
    node_token: Vec<u32>,
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
        let order = sorted_order(words);
        let duplicate = find_duplicate(words, keys, &order);
        let lex = lex_prefixes(words, &order);
        let l = lex.parent.len();
        let lex_children = Groups::of_pairs(l, (1..l as u32).map(|c| (lex.parent[c as usize], c)));
        let lex_children_symbol = lex_children.items.iter().map(|&c| lex.symbol[c as usize]).collect();
        // `order` is grouped by lex node already (lex ids follow the sorted strings).
        let lex_tokens = Groups::of_pairs(l, order.iter().map(|&t| (lex.token_lex[t as usize], t)));
        let mut token_rank = vec![0u32; words.len()];
        for (rank, &t) in lex_tokens.items.iter().enumerate() {
            token_rank[t as usize] = rank as u32;
        }
        let public = public_nodes(&lex, &lex_children, &lex_tokens);
        let n = public.node_parent.len();
        let node_children = Groups::of_pairs(n, (0..n as u32 - 1).map(|c| (public.node_parent[c as usize], c)));
        let (node_chain, chain_parent) = chains(&node_children, &public.node_parent);
        let token_chain = public.token_leaf.iter().map(|&leaf| node_chain[leaf as usize]).collect();
        Trie {
            lex_parent: lex.parent,
            lex_symbol: lex.symbol,
            lex_subtree_end: lex.subtree_end,
            lex_children,
            lex_children_symbol,
            lex_tokens,
            lex_node: public.lex_node,
            token_lex: lex.token_lex,
            token_rank,
            token_leaf: public.token_leaf,
            token_chain,
            node_parent: public.node_parent,
            node_children,
            node_lex: public.node_lex,
            node_token: public.node_token,
            node_chain,
            chain_parent,
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
        self.node_children.of(node)
    }

    /// The symbol on the edge into `node`; None for the root and for leaves.
    pub fn symbol(&self, node: u32) -> Option<u32> {
        let lx = self.node_lex[node as usize];
        (lx != NONE && lx != 0).then(|| self.lex_symbol[lx as usize])
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
        let slots = self.lex_children.range(lx);
        let at = self.lex_children_symbol[slots.clone()].binary_search(&s).ok()?;
        Some(self.lex_children.items[slots.start + at])
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
            out.push(self.lex_symbol[lx as usize]);
            lx = self.lex_parent[lx as usize];
        }
        out.reverse();
        out
    }

    /// Entries in (symbols, index) order.
    pub fn sorted_tokens(&self) -> &[u32] {
        &self.lex_tokens.items
    }

    /// The entries under `node` as a range of [`Trie::sorted_tokens`].
    pub fn tokens_under_range(&self, node: u32) -> (usize, usize) {
        match self.node_lex[node as usize] {
            NONE => {
                let r = self.token_rank[self.node_token[node as usize] as usize] as usize;
                (r, r + 1)
            }
            lx => {
                let run = self.lex_tokens.span(lx, self.lex_subtree_end[lx as usize]);
                (run.start, run.end)
            }
        }
    }

    pub fn tokens_under(&self, node: u32) -> &[u32] {
        let (lo, hi) = self.tokens_under_range(node);
        &self.lex_tokens.items[lo..hi]
    }

    /// The entries whose string ends at lex node `lx`.
    fn lex_tokens_at(&self, lx: u32) -> &[u32] {
        self.lex_tokens.of(lx)
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
            let slots = self.lex_children.range(lx);
            let row = &transitions[s * 256..(s + 1) * 256];
            for (&sym, &child) in self.lex_children_symbol[slots.clone()].iter().zip(&self.lex_children.items[slots]) {
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

/// The entries in (symbols, index) order.
fn sorted_order<S: Symbol>(words: &[&[S]]) -> Vec<u32> {
    let mut order: Vec<u32> = (0..words.len() as u32).collect();
    order.par_sort_unstable_by(|&a, &b| words[a as usize].cmp(words[b as usize]).then(a.cmp(&b)));
    order
}

/// The lexicographic prefix trie, in one pass over the entries in `order`
/// (sorted by [`sorted_order`]): each entry opens the lex nodes of the symbols
/// after its longest common prefix with the one before it, and closes the
/// subtrees of the previous entry's nodes below that prefix.
fn lex_prefixes<S: Symbol>(words: &[&[S]], order: &[u32]) -> LexPrefixes {
    let mut lex =
        LexPrefixes { parent: vec![0], symbol: vec![0], subtree_end: vec![0], token_lex: vec![0; words.len()] };
    // `path[d]` is the lex node of the current prefix of length d.
    let mut path: Vec<u32> = vec![0];
    let mut prev: &[S] = &[];
    for &t in order {
        let word = words[t as usize];
        let common = word.iter().zip(prev).take_while(|(a, b)| a == b).count();
        for &closed in &path[common + 1..] {
            lex.subtree_end[closed as usize] = lex.parent.len() as u32;
        }
        path.truncate(common + 1);
        for &s in &word[common..] {
            let id = lex.parent.len() as u32;
            lex.parent.push(*path.last().unwrap());
            lex.symbol.push(s.into());
            lex.subtree_end.push(0);
            path.push(id);
        }
        lex.token_lex[t as usize] = *path.last().unwrap();
        prev = word;
    }
    let l = lex.parent.len() as u32;
    for &open in &path {
        lex.subtree_end[open as usize] = l;
    }
    lex
}

/// The public numbering, laid out top-down: each lex node's subtree takes the
/// id range `[start, start + size)`, its parts (its children's subtrees and the
/// leaves of the entries ending at it) in the order of their smallest entry,
/// and the node itself last.
fn public_nodes(lex: &LexPrefixes, lex_children: &Groups, lex_tokens: &Groups) -> PublicNodes {
    let (l, v) = (lex.parent.len(), lex.token_lex.len());
    // `first[x]`: the smallest entry under lex node x, which orders it among its
    // siblings; `size[x]`: the public nodes in its subtree (prefix nodes and leaves).
    let mut first: Vec<u32> = (0..l as u32).map(|x| lex_tokens.of(x).iter().copied().min().unwrap_or(NONE)).collect();
    let mut size: Vec<u32> = (0..l as u32).map(|x| 1 + lex_tokens.of(x).len() as u32).collect();
    for x in (1..l).rev() {
        let p = lex.parent[x] as usize;
        first[p] = first[p].min(first[x]);
        size[p] += size[x];
    }
    let mut start = vec![0u32; l];
    let mut lex_node = vec![0u32; l];
    let mut token_leaf = vec![0u32; v];
    // (smallest entry, is a leaf, entry or lex child) of each part of one node.
    let mut parts: Vec<(u32, bool, u32)> = Vec::new();
    for x in 0..l as u32 {
        let mut cursor = start[x as usize];
        parts.clear();
        parts.extend(lex_tokens.of(x).iter().map(|&t| (t, true, t)));
        parts.extend(lex_children.of(x).iter().map(|&c| (first[c as usize], false, c)));
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
        lex_node[x as usize] = cursor;
    }
    let num_nodes = size[0] as usize;
    let root = (num_nodes - 1) as u32;
    let mut public = PublicNodes {
        node_parent: vec![root; num_nodes],
        node_lex: vec![NONE; num_nodes],
        node_token: vec![NONE; num_nodes],
        lex_node,
        token_leaf,
    };
    for x in 0..l {
        let node = public.lex_node[x] as usize;
        public.node_lex[node] = x as u32;
        public.node_parent[node] = public.lex_node[lex.parent[x] as usize];
    }
    for t in 0..v {
        let leaf = public.token_leaf[t] as usize;
        public.node_token[leaf] = t as u32;
        public.node_parent[leaf] = public.lex_node[lex.token_lex[t] as usize];
    }
    public
}

/// Each node's chain and each chain's parent chain (chains: see `Trie::chain_parent`).
fn chains(node_children: &Groups, node_parent: &[u32]) -> (Vec<u32>, Vec<u32>) {
    let n = node_parent.len();
    let mut node_chain = vec![0u32; n];
    let mut chain_top: Vec<u32> = Vec::new();
    for c in 0..n as u32 {
        if node_children.of(c).len() == 1 {
            // Its only child is the node just before it (postorder).
            node_chain[c as usize] = node_chain[c as usize - 1];
            *chain_top.last_mut().unwrap() = c;
        } else {
            node_chain[c as usize] = chain_top.len() as u32;
            chain_top.push(c);
        }
    }
    let chain_parent = chain_top.iter().map(|&top| node_chain[node_parent[top as usize] as usize]).collect();
    (node_chain, chain_parent)
}
