//! Property tests of the trie against brute force over random vocabularies.

use _core::trie::{Trie, TrieError};
use proptest::prelude::*;

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

fn close(a: f64, b: f64) -> bool {
    (a == b) || (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs()))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn structure_matches_brute_force(v in vocab()) {
        let trie = Trie::new(&refs(&v));
        prop_assert_eq!(trie.vocab_size(), v.len());
        for n in 0..trie.num_nodes() as u32 {
            let p = trie.prefix(n);
            prop_assert_eq!(trie.node_of(&p), Some(n));
            let mut got = trie.tokens_under(n).to_vec();
            got.sort_unstable();
            let want: Vec<u32> = under(&v, &p).into_iter().map(|t| t as u32).collect();
            prop_assert!(!want.is_empty());
            prop_assert_eq!(got, want);
            let (bytes, nodes) = trie.children(n);
            prop_assert!(bytes.windows(2).all(|w| w[0] < w[1]));
            for (&b, &c) in bytes.iter().zip(nodes) {
                prop_assert_eq!(trie.parent(c), Some(n));
                prop_assert_eq!(trie.prefix(c), [&p[..], &[b]].concat());
                prop_assert!(c > n && trie.subtree_end(c) <= trie.subtree_end(n));
            }
        }
        for (t, bytes) in v.iter().enumerate() {
            prop_assert_eq!(trie.prefix(trie.token_node(t)), bytes.clone());
        }
        prop_assert_eq!(trie.node_of(b"zz"), None);
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
            let toks = under(&v, &trie.prefix(node));
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
    assert_eq!(trie.tokens_at(0), &[1, 6]);
    let ab = trie.node_of(b"ab").unwrap();
    assert_eq!(trie.tokens_at(ab), &[0, 3]);
    assert_eq!(trie.token_node(0), trie.token_node(3));
    assert_eq!(trie.tokens_under(trie.node_of(b"a").unwrap()), &[2, 0, 3]);
    assert_eq!(trie.children(0).0, &[0x00, b'a', 0xff]);
    let mut out = vec![0.0; trie.num_nodes()];
    trie.weight_sum(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], &mut out).unwrap();
    assert_eq!(out[0], 28.0);
    assert_eq!(out[ab as usize], 5.0);
}

#[test]
fn errors_name_the_problem() {
    let v: Vec<&[u8]> = vec![b"a", b"b"];
    let trie = Trie::new(&v);
    let mut out = vec![0.0; trie.num_nodes()];
    assert_eq!(trie.weight_sum(&[1.0, f64::NAN], &mut out), Err(TrieError::NanWeight { row: 0, index: 1 }));
    assert_eq!(trie.weight_max(&[f64::NAN, 1.0], &mut out), Err(TrieError::NanWeight { row: 0, index: 0 }));
    let mut batch_out = vec![0.0; 2 * trie.num_nodes()];
    let err = trie.batch_weight_logsumexp(&[0.0, 0.0, 0.0, f64::NAN], 2, &mut batch_out).unwrap_err();
    assert_eq!(err, TrieError::NanWeight { row: 1, index: 1 });
    assert!(err.to_string().contains("NaN"));
    // inf - inf is a legitimate NaN sum, not an input error.
    trie.weight_sum(&[f64::INFINITY, f64::NEG_INFINITY], &mut out).unwrap();
    assert!(out[0].is_nan());
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
    let b = trie.node_of(b"b").unwrap() as usize;
    assert!((out[b] - (-2000.0 + 2f64.ln())).abs() < 1e-9, "{}", out[b]);
    assert!((out[0] - 0.0).abs() < 1e-12);
    trie.weight_logsumexp(&[f64::NEG_INFINITY; 3], &mut out).unwrap();
    assert!(out.iter().all(|&x| x == f64::NEG_INFINITY));
    trie.weight_logsumexp(&[f64::INFINITY, 0.0, 0.0], &mut out).unwrap();
    assert_eq!(out[0], f64::INFINITY);
}
