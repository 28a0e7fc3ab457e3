//! DuoAttention / RLKV gate files: any text either parses into gates that satisfy the documented
//! invariants, or is an `Error::Invalid` naming the gates; never a panic.
#![no_main]

use headwise::Error;
use headwise::policy::heads::{HeadGates, StreamingSize};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let gates = match HeadGates::parse_tsv(&text) {
        Ok(g) => g,
        Err(Error::Invalid { field, .. }) => {
            assert!(field.starts_with("gates"), "error names {field:?}");
            return;
        }
        Err(e) => panic!("not an Invalid error: {e}"),
    };
    let rows = text.lines().filter(|l| !l.trim().is_empty()).count();
    assert_eq!(gates.layers(), rows);
    assert!(gates.kv_heads() >= 1);
    let heads: Vec<(usize, usize)> =
        (0..gates.layers()).flat_map(|l| (0..gates.kv_heads()).map(move |h| (l, h))).collect();
    for &(l, h) in &heads {
        assert!((0.0..=1.0).contains(&gates.gate(l, h)), "gate ({l}, {h}) not clipped");
    }
    let derived = f64::from(data.first().copied().unwrap_or(0)) / 255.0;
    for sparsity in [0.0, derived, 1.0] {
        let full = gates.select_full(sparsity).expect("sparsity in [0, 1]");
        // A threshold rule: no compressed head has a larger gate than a full one.
        let max_compressed = heads
            .iter()
            .filter(|&&(l, h)| !full.is_full(l, h))
            .map(|&(l, h)| gates.gate(l, h))
            .fold(f64::NEG_INFINITY, f64::max);
        for &(l, h) in heads.iter().filter(|&&(l, h)| full.is_full(l, h)) {
            assert!(gates.gate(l, h) >= max_compressed);
        }
        if sparsity == 0.0 {
            assert_eq!(full.count_full(), heads.len(), "sparsity 0 compresses nothing");
        }
        let layout = full.layer_layout(gates.layers() - 1, &[7, 0], 3, StreamingSize::RLKV).unwrap();
        assert_eq!(layout.segments().len(), 2 * gates.kv_heads());
    }
});
