//! DuoAttention / RLKV head policies on the authors' real gate files and on small files.

use headwise::Error;
use headwise::layout::SegmentMode;
use headwise::policy::heads::{HeadGates, StreamingSize, duo_attention_config};
use std::path::PathBuf;

fn data_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/head-scores");
    if dir.is_dir() {
        Some(dir)
    } else {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true but {} is missing", dir.display());
        eprintln!("head_policy: real files NOT CHECKED: {} not found", dir.display());
        None
    }
}

/// Full-head counts of the authors' selection (`np.clip(np.loadtxt(f), 0, 1)`, plus U(0, 1e-6)
/// noise, `gates >= np.quantile(gates, s)`), computed with numpy 2.4.6 over 30 noise seeds, which
/// all gave the same count. Sparsities 0.2, 0.4, 0.5, 0.6, 0.75, 0.8.
const SPARSITIES: [f64; 6] = [0.2, 0.4, 0.5, 0.6, 0.75, 0.8];
const NUMPY_FULL_COUNTS: [(&str, usize, usize, [usize; 6]); 5] = [
    ("duo-attention/Llama-3.1-8B-Inst.tsv", 32, 8, [205, 154, 128, 103, 64, 52]),
    ("duo-attention/Qwen-2.5-7B-Inst.tsv", 28, 4, [89, 67, 56, 45, 28, 23]),
    ("rlkv/Llama-3.1-8B-R1.tsv", 32, 8, [205, 154, 128, 103, 64, 52]),
    ("rlkv/Qwen-2.5-7B-R1.tsv", 28, 4, [89, 67, 56, 45, 28, 23]),
    ("rlkv/Qwen-3-4B-Thinking.tsv", 36, 8, [230, 173, 144, 115, 72, 58]),
];

#[test]
fn real_gate_files_reproduce_the_quantile_selection() {
    let Some(dir) = data_dir() else { return };
    for (file, layers, kv_heads, counts) in NUMPY_FULL_COUNTS {
        let gates = HeadGates::load(dir.join(file)).unwrap();
        assert_eq!((gates.layers(), gates.kv_heads()), (layers, kv_heads), "{file}");
        for (s, want) in SPARSITIES.into_iter().zip(counts) {
            let full = gates.select_full(s).unwrap();
            assert_eq!(full.count_full(), want, "{file} sparsity {s}");
            // A threshold rule: no compressed head has a larger gate than a full one, and among
            // equal gates the lower index is compressed first.
            let idx = |l: usize, h: usize| (gates.gate(l, h), l * kv_heads + h);
            let heads: Vec<(usize, usize)> =
                (0..layers).flat_map(|l| (0..kv_heads).map(move |h| (l, h))).collect();
            let max_compressed = heads
                .iter()
                .filter(|&&(l, h)| !full.is_full(l, h))
                .map(|&(l, h)| idx(l, h))
                .fold(None, |m: Option<(f64, usize)>, x| match m {
                    Some(m) if m.0 > x.0 || (m.0 == x.0 && m.1 > x.1) => Some(m),
                    _ => Some(x),
                });
            if let Some((g, i)) = max_compressed {
                for &(l, h) in heads.iter().filter(|&&(l, h)| full.is_full(l, h)) {
                    let (fg, fi) = idx(l, h);
                    assert!(
                        fg > g || (fg == g && fi > i),
                        "{file} s={s}: full head {fi} ranks below compressed {i}"
                    );
                }
            }
            assert!(
                (full.achieved_sparsity() - (1.0 - want as f64 / (layers * kv_heads) as f64)).abs() < 1e-12
            );
        }
    }
}

#[test]
fn real_duo_attention_config() {
    let Some(dir) = data_dir() else { return };
    let text = std::fs::read_to_string(dir.join("duo-attention/Llama-3.1-8B-Inst.config.json")).unwrap();
    assert_eq!(duo_attention_config(&text).unwrap(), StreamingSize { sink: 128, window: 256 });
}

#[test]
fn small_files_and_layouts() {
    // 2 layers x 3 KV heads; one negative and one >1 value get clipped; a tie at 0.5.
    let g = HeadGates::parse_tsv("0.9\t-0.01\t0.5\n0.5\t1.2\t0.1\n").unwrap();
    assert_eq!((g.layers(), g.kv_heads()), (2, 3));
    assert_eq!((g.gate(0, 1), g.gate(1, 1)), (0.0, 1.0));
    // n = 6: sparsity 0.5 -> virtual index 2.5 -> 3 compressed: gates 0.0, 0.1 and the tied
    // 0.5 with the lower index (layer 0 head 2).
    let full = g.select_full(0.5).unwrap();
    let got: Vec<bool> =
        (0..2).flat_map(|l| (0..3).map(move |h| (l, h))).map(|(l, h)| full.is_full(l, h)).collect();
    assert_eq!(got, vec![true, false, false, true, true, false]);
    assert_eq!(g.select_full(0.0).unwrap().count_full(), 6);
    assert_eq!(g.select_full(1.0).unwrap().count_full(), 1, "np.quantile(g, 1) is the max, which stays full");

    let layout = full.layer_layout(0, &[100, 7], 16, StreamingSize::RLKV).unwrap();
    assert_eq!(layout.segments().len(), 6);
    let s = layout.segment(1, 0);
    assert_eq!((s.mode, s.len, s.capacity), (SegmentMode::Full, 7, 23));
    let s = layout.segment(0, 1);
    assert_eq!((s.mode, s.len, s.capacity), (SegmentMode::Streaming { sink: 16, window: 64 }, 0, 80));
}

#[test]
fn malformed_files_are_errors() {
    for (text, field) in [
        ("", "gates"),
        ("\n\n", "gates"),
        ("0.1\t0.2\n0.3\n", "gates line 2"),
        ("0.1\tabc\n", "gates line 1 column 2"),
        ("0.1\tnan\n", "gates line 1 column 2"),
        ("inf\n", "gates line 1 column 1"),
    ] {
        match HeadGates::parse_tsv(text) {
            Err(Error::Invalid { field: f, .. }) => assert_eq!(f, field, "{text:?}"),
            other => panic!("{text:?}: expected an error naming {field}, got {other:?}"),
        }
    }
    let g = HeadGates::parse_tsv("0.5 0.2\n").unwrap();
    for s in [-0.1, 1.5, f64::NAN] {
        assert!(matches!(g.select_full(s), Err(Error::Invalid { field, .. }) if field == "sparsity"));
    }
    let full = g.select_full(0.5).unwrap();
    assert!(full.layer_layout(1, &[4], 0, StreamingSize::RLKV).is_err());
    assert!(full.layer_layout(0, &[4], 0, StreamingSize { sink: 4, window: 0 }).is_err());
    assert!(duo_attention_config("{").is_err());
    assert!(duo_attention_config(r#"{"sink_size": 4}"#).is_err());
    assert!(duo_attention_config(r#"{"sink_size": -4, "recent_size": 8}"#).is_err());
    assert_eq!(
        duo_attention_config(
            r#"{"sink_size": 128, "recent_size": 256, "deploy_sink_size": 64, "deploy_recent_size": 256}"#
        )
        .unwrap(),
        StreamingSize::DUO_ATTENTION_DEPLOY
    );
}

#[test]
fn files_written_by_the_test() {
    let dir = std::env::temp_dir().join(format!("headwise-gates-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tsv = dir.join("full_attention_heads.tsv");
    std::fs::write(&tsv, "1.0\t0.0\n0.25\t0.75\n-0.001\t1.001\n").unwrap();
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, r#"{"sink_size": 128, "recent_size": 256, "deploy_sink_size": null}"#).unwrap();
    let gates = HeadGates::load(&tsv).unwrap();
    assert_eq!((gates.layers(), gates.kv_heads()), (3, 2));
    // 6 heads, sparsity 0.5 -> virtual index 2.5 -> 3 compressed: the two 0.0 gates (one clipped
    // from -0.001; the lower index first) and 0.25.
    let full = gates.select_full(0.5).unwrap();
    let got: Vec<bool> =
        (0..3).flat_map(|l| (0..2).map(move |h| (l, h))).map(|(l, h)| full.is_full(l, h)).collect();
    assert_eq!(got, vec![true, false, false, true, false, true]);
    let size = duo_attention_config(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    assert_eq!(size, StreamingSize { sink: 128, window: 256 });
    let layout = full.layer_layout(1, &[1000], 32, size).unwrap();
    assert_eq!(layout.segment(0, 0).capacity, 384);
    assert_eq!(layout.segment(0, 1).capacity, 1032);
    assert!(matches!(HeadGates::load(dir.join("missing.tsv")), Err(Error::Invalid { .. })));
    std::fs::remove_dir_all(&dir).unwrap();
}
