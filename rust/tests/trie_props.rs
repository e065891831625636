//! Property tests of the trie against brute force over random vocabularies.

use _core::trie::{Trie, TrieError, WordKey};
use proptest::prelude::*;
use proptest::test_runner::{FailurePersistence, FileFailurePersistence};

/// Failures proptest found, replayed before new cases (and added to on a new failure).
const REGRESSIONS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/rust/tests/trie_props.proptest-regressions");

fn regressions() -> Option<Box<dyn FailurePersistence>> {
    Some(Box::new(FileFailurePersistence::Direct(REGRESSIONS)))
}

#[test]
fn the_committed_regressions_are_found() {
    assert!(regressions().unwrap().load_persisted_failures2(None).len() >= 2, "no seeds read from {REGRESSIONS}");
}

fn vocab() -> impl Strategy<Value = Vec<Vec<u8>>> {
    // A small alphabet (with 0x00 and 0xFF) makes shared prefixes and duplicates common.
    let byte = prop::sample::select(vec![0u8, b'a', b'b', b'c', 0xFF]);
    prop::collection::vec(prop::collection::vec(byte, 0..6), 1..120)
}

fn refs(v: &[Vec<u8>]) -> Vec<&[u8]> {
    v.iter().map(Vec::as_slice).collect()
}

fn under(v: &[Vec<u8>], prefix: &[u8]) -> Vec<usize> {
    (0..v.len()).filter(|&t| v[t].starts_with(prefix)).collect()
}

fn bytes(symbols: &[u32]) -> Vec<u8> {
    symbols.iter().map(|&s| u8::try_from(s).unwrap()).collect()
}

fn trie_of(v: &[Vec<u8>]) -> Trie {
    Trie::new(&refs(v))
}

fn close(a: f64, b: f64) -> bool {
    (a == b) || (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs()))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: regressions(), ..ProptestConfig::default() })]

    #[test]
    fn structure_matches_brute_force(v in vocab()) {
        let trie = Trie::new(&refs(&v));
        prop_assert_eq!(trie.vocab_size(), v.len());
        let mut leaves = 0;
        for n in 0..trie.num_nodes() as u32 {
            let p = bytes(&trie.prefix(n));
            let mut got = trie.tokens_under(n).to_vec();
            got.sort_unstable();
            if let Some(t) = trie.leaf_token(n) {
                leaves += 1;
                prop_assert_eq!(trie.token_leaf(t as usize), n);
                prop_assert_eq!(&p, &v[t as usize]);
                prop_assert_eq!(got, vec![t]);
                prop_assert!(trie.children(n).is_empty());
            } else {
                prop_assert_eq!(trie.node_of_bytes(&p), Some(n));
                let want: Vec<u32> = under(&v, &p).into_iter().map(|t| t as u32).collect();
                prop_assert!(!want.is_empty());
                prop_assert_eq!(got, want);
            }
            for &c in trie.children(n) {
                prop_assert_eq!(trie.parent(c), Some(n));
                prop_assert!(c < n);
                if let Some(s) = trie.symbol(c) {
                    prop_assert_eq!(bytes(&trie.prefix(c)), [&p[..], &[s as u8]].concat());
                    prop_assert_eq!(trie.child(n, s), Some(c));
                }
            }
        }
        prop_assert_eq!(leaves, v.len());
        prop_assert_eq!(trie.parent(trie.root()), None);
        prop_assert_eq!(trie.node_of_bytes(b"zz"), None);
    }

    #[test]
    fn numbering_is_genlm_backends(v in vocab()) {
        // genlm-backend's construction: insert entries in order into dicts (a
        // symbol edge or a (None, i) leaf edge), then number nodes in postorder.
        let mut kids: Vec<Vec<(Option<u32>, usize)>> = vec![vec![]];
        for word in &v {
            let mut cur = 0;
            for &b in word {
                let edge = Some(u32::from(b));
                cur = match kids[cur].iter().find(|(e, _)| *e == edge) {
                    Some(&(_, c)) => c,
                    None => {
                        kids.push(vec![]);
                        let c = kids.len() - 1;
                        kids[cur].push((edge, c));
                        c
                    }
                };
            }
            kids.push(vec![]);
            let leaf = kids.len() - 1;
            kids[cur].push((None, leaf));
        }
        let mut number = vec![0usize; kids.len()];
        let mut next = 0;
        let mut stack = vec![(0usize, 0usize)];
        while let Some((node, k)) = stack.pop() {
            if k < kids[node].len() {
                stack.push((node, k + 1));
                stack.push((kids[node][k].1, 0));
            } else {
                number[node] = next;
                next += 1;
            }
        }
        let trie = trie_of(&v);
        prop_assert_eq!(trie.num_nodes(), kids.len());
        prop_assert_eq!(trie.root() as usize, number[0]);
        for (old, edges) in kids.iter().enumerate() {
            let got: Vec<(Option<u32>, u32)> = trie
                .children(number[old] as u32)
                .iter()
                .map(|&c| (trie.symbol(c), c))
                .collect();
            let want: Vec<(Option<u32>, u32)> = edges.iter().map(|&(e, c)| (e, number[c] as u32)).collect();
            prop_assert_eq!(got, want);
            for &(e, c) in edges {
                if e.is_none() {
                    prop_assert!(trie.leaf_token(number[c] as u32).is_some());
                }
            }
        }
    }

    #[test]
    fn reductions_match_brute_force(v in vocab(), seed in any::<u64>(), neg_inf_every in 0usize..4) {
        let trie = Trie::new(&refs(&v));
        let n = trie.num_nodes();
        let mut state = seed | 1;
        let mut next = || { state ^= state << 13; state ^= state >> 7; state ^= state << 17; (state % 1000) as f64 / 100.0 - 5.0 };
        let ws: Vec<f64> = (0..v.len()).map(|i| if neg_inf_every > 0 && i % (neg_inf_every + 1) == 0 { f64::NEG_INFINITY } else { next() }).collect();
        let (mut sum, mut max, mut lse) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        let exp_ws: Vec<f64> = ws.iter().map(|w| w.exp()).collect();
        trie.weight_sum(&exp_ws, &mut sum).unwrap();
        trie.weight_max(&ws, &mut max).unwrap();
        trie.weight_logsumexp(&ws, &mut lse).unwrap();
        for node in 0..n as u32 {
            let toks = match trie.leaf_token(node) {
                Some(t) => vec![t as usize],
                None => under(&v, &bytes(&trie.prefix(node))),
            };
            let s: f64 = toks.iter().map(|&t| exp_ws[t]).sum();
            let m = toks.iter().map(|&t| ws[t]).fold(f64::NEG_INFINITY, f64::max);
            prop_assert!(close(sum[node as usize], s));
            prop_assert_eq!(max[node as usize], m);
            if s == 0.0 {
                prop_assert_eq!(lse[node as usize], f64::NEG_INFINITY);
            } else {
                prop_assert!(close(lse[node as usize], s.ln()), "{} vs {}", lse[node as usize], s.ln());
            }
        }
        // Batched rows equal the single rows.
        let rows = 3;
        let batch: Vec<f32> = (0..rows * v.len()).map(|i| (i % 7) as f32 - 2.5).collect();
        for (kind, _) in [("sum", ()), ("max", ()), ("lse", ())] {
            let mut out = vec![0.0; rows * n];
            match kind {
                "sum" => trie.batch_weight_sum(&batch, rows, &mut out).unwrap(),
                "max" => trie.batch_weight_max(&batch, rows, &mut out).unwrap(),
                _ => trie.batch_weight_logsumexp(&batch, rows, &mut out).unwrap(),
            }
            for r in 0..rows {
                let mut single = vec![0.0; n];
                let row = &batch[r * v.len()..(r + 1) * v.len()];
                match kind {
                    "sum" => trie.weight_sum(row, &mut single).unwrap(),
                    "max" => trie.weight_max(row, &mut single).unwrap(),
                    _ => trie.weight_logsumexp(row, &mut single).unwrap(),
                }
                // Equal up to the order in which the root's subtrees are merged.
                for (a, b) in out[r * n..(r + 1) * n].iter().zip(&single) {
                    prop_assert!(close(*a, *b), "{} vs {}", a, b);
                }
            }
        }
    }

    #[test]
    fn masks_match_brute_force(v in vocab(), data in prop::collection::vec(prop::sample::select(vec![0u8, b'a', b'b', 0xFF]), 0..7), dfa_seed in any::<u64>()) {
        let trie = Trie::new(&refs(&v));
        let mut out = vec![0u8; v.len()];
        trie.mask_startswith(&data, &mut out).unwrap();
        for t in 0..v.len() { prop_assert_eq!(out[t] == 1, v[t].starts_with(&data)); }
        trie.mask_prefix_of(&data, &mut out).unwrap();
        for t in 0..v.len() { prop_assert_eq!(out[t] == 1, data.starts_with(&v[t])); }

        // A random DFA over 4 states.
        let s = 4usize;
        let mut x = dfa_seed | 1;
        let mut rnd = |m: u64| { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x % m };
        let table: Vec<i32> = (0..s * 256).map(|_| rnd(s as u64 + 1) as i32 - 1).collect();
        let live: Vec<bool> = (0..s).map(|_| rnd(4) != 0).collect();
        let start = rnd(s as u64) as i64;
        trie.dfa_mask(&table, s, start, &live, &mut out).unwrap();
        for t in 0..v.len() {
            let mut st = start;
            let mut ok = live[st as usize];
            for &b in &v[t] {
                if !ok { break; }
                let nx = table[st as usize * 256 + b as usize];
                ok = nx >= 0 && live[nx as usize];
                st = nx as i64;
            }
            prop_assert_eq!(out[t] == 1, ok, "token {:?}", v[t]);
        }
    }
}

#[test]
fn duplicates_empty_tokens_and_extreme_bytes() {
    let v: Vec<&[u8]> = vec![b"ab", b"", b"a", b"ab", b"\x00", b"\xff\xff", b""];
    let trie = Trie::new(&v);
    let root = trie.root();
    let ab = trie.node_of_bytes(b"ab").unwrap();
    // Every entry has its own leaf, below the node of its bytes.
    assert_eq!(trie.parent(trie.token_leaf(1)), Some(root));
    assert_eq!(trie.parent(trie.token_leaf(6)), Some(root));
    assert_ne!(trie.token_leaf(0), trie.token_leaf(3));
    assert_eq!(trie.parent(trie.token_leaf(0)), Some(ab));
    assert_eq!(trie.parent(trie.token_leaf(3)), Some(ab));
    assert_eq!(trie.tokens_under(trie.node_of_bytes(b"a").unwrap()), &[2, 0, 3]);
    // The root's edges in order of first entry: "a" (entry 0), leaf 1, \x00 (4), \xff (5), leaf 6.
    let edges: Vec<Option<u32>> = trie.children(root).iter().map(|&c| trie.symbol(c)).collect();
    assert_eq!(edges, vec![Some(u32::from(b'a')), None, Some(0), Some(0xff), None]);
    let mut out = vec![0.0; trie.num_nodes()];
    trie.weight_sum(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], &mut out).unwrap();
    assert_eq!(out[root as usize], 28.0);
    assert_eq!(out[ab as usize], 5.0);
    assert_eq!(out[trie.token_leaf(3) as usize], 4.0);
}

#[test]
fn duplicates_by_key() {
    let words: Vec<Vec<u32>> = vec![vec![1], vec![1], vec![1], vec![2], vec![1]];
    let refs: Vec<&[u32]> = words.iter().map(Vec::as_slice).collect();
    let keys = [WordKey::Token(0), WordKey::Token(1), WordKey::Other, WordKey::Plain, WordKey::Token(0)];
    assert_eq!(Trie::from_words(&refs, &keys).duplicate(), Some((0, 4)));
    let keys = [WordKey::Plain, WordKey::Token(1), WordKey::Plain, WordKey::Plain, WordKey::Token(1)];
    assert_eq!(Trie::from_words(&refs, &keys).duplicate(), Some((0, 2)));
    let keys = [WordKey::Other, WordKey::Other, WordKey::Token(3), WordKey::Plain, WordKey::Plain];
    assert_eq!(Trie::from_words(&refs, &keys).duplicate(), None);
    // Non-byte symbols are ordinary symbols.
    let words: Vec<Vec<u32>> = vec![vec![300], vec![97, 300]];
    let refs: Vec<&[u32]> = words.iter().map(Vec::as_slice).collect();
    let trie = Trie::from_words(&refs, &[WordKey::Other; 2]);
    assert_eq!(trie.num_nodes(), 6);
    assert_eq!(trie.prefix(trie.token_leaf(1)), vec![97, 300]);
    assert_eq!(trie.node_of(&[300]), trie.parent(trie.token_leaf(0)));
}

#[test]
fn errors_name_the_problem() {
    let v: Vec<&[u8]> = vec![b"a", b"b"];
    let trie = Trie::new(&v);
    let mut out = vec![0.0; trie.num_nodes()];
    assert_eq!(trie.weight_sum(&[1.0, f64::NAN], &mut out), Err(TrieError::NanWeight { row: None, index: 1 }));
    assert_eq!(trie.weight_max(&[f64::NAN, 1.0], &mut out), Err(TrieError::NanWeight { row: None, index: 0 }));
    let mut batch_out = vec![0.0; 2 * trie.num_nodes()];
    let err = trie.batch_weight_logsumexp(&[0.0, 0.0, 0.0, f64::NAN], 2, &mut batch_out).unwrap_err();
    assert_eq!(err, TrieError::NanWeight { row: Some(1), index: 1 });
    assert!(err.to_string().contains("NaN"));
    // inf - inf is a legitimate NaN sum, not an input error.
    trie.weight_sum(&[f64::INFINITY, f64::NEG_INFINITY], &mut out).unwrap();
    assert!(out[trie.root() as usize].is_nan());
    assert!(matches!(trie.weight_sum(&[1.0], &mut out), Err(TrieError::BadShape(_))));
    let mut mask = vec![0u8; 2];
    let table = vec![-1i32; 256];
    assert!(trie.dfa_mask(&table, 1, 1, &[true], &mut mask).unwrap_err().to_string().contains("state 1"));
    assert!(trie.dfa_mask(&table, 2, 0, &[true, true], &mut mask).is_err());
    let bad = vec![5i32; 256];
    assert!(trie.dfa_mask(&bad, 1, 0, &[true], &mut mask).unwrap_err().to_string().contains("target 5"));
}

#[test]
fn logsumexp_is_stable_far_from_the_global_max() {
    let v: Vec<&[u8]> = vec![b"a", b"b", b"bb"];
    let trie = Trie::new(&v);
    let mut out = vec![0.0; trie.num_nodes()];
    trie.weight_logsumexp(&[0.0, -2000.0, -2000.0], &mut out).unwrap();
    let b = trie.node_of_bytes(b"b").unwrap() as usize;
    let root = trie.root() as usize;
    assert!((out[b] - (-2000.0 + 2f64.ln())).abs() < 1e-9, "{}", out[b]);
    assert!((out[root] - 0.0).abs() < 1e-12);
    trie.weight_logsumexp(&[f64::NEG_INFINITY; 3], &mut out).unwrap();
    assert!(out.iter().all(|&x| x == f64::NEG_INFINITY));
    trie.weight_logsumexp(&[f64::INFINITY, 0.0, 0.0], &mut out).unwrap();
    assert_eq!(out[root], f64::INFINITY);
}
