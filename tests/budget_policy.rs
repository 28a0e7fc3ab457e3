//! Budget policies on worked examples, and the HeadKV score files (real ones when present).

use headwise::Error;
use headwise::policy::budget::{HeadKvOptions, HeadKvVariant, headkv, pyramid, uniform};
use headwise::policy::head_scores::HeadScores;
use std::path::PathBuf;

#[test]
fn pyramid_matches_the_spec_example() {
    // C = 128, W = 8, L = 32: B = 120, min = 6, max = 234, steps = 7, prefix budgets 234 .. 17,
    // 4016 prefix tokens in all (not 32 * 120 = 3840).
    let b = pyramid(128, 8, 32, 100_000, 20).unwrap();
    assert_eq!(b.len(), 32);
    assert_eq!((b[0], b[31]), (234 + 8, 17 + 8));
    assert!(b.windows(2).all(|w| w[0] - w[1] == 7));
    assert_eq!(b.iter().map(|&x| x - 8).sum::<u32>(), 4016);
}

#[test]
fn pyramid_branches() {
    // q < C: nothing compressed.
    assert_eq!(pyramid(128, 8, 4, 100, 20).unwrap(), vec![100; 4]);
    // C <= q < 2B = 240: uniform SnapKV.
    assert_eq!(pyramid(128, 8, 4, 239, 20).unwrap(), vec![128; 4]);
    // q = 241: max = 234 >= q - W = 233, so max = 233, min = 240 - 233 = 7,
    // steps = (233 - 7) / 31 = 7.
    let b = pyramid(128, 8, 32, 241, 20).unwrap();
    assert_eq!((b[0], b[1], b[31]), (233 + 8, 226 + 8, 233 - 31 * 7 + 8));
    for (args, field) in [
        ((8, 8, 32, 500, 20), "capacity"),
        ((128, 8, 1, 500, 20), "layers"),
        ((128, 8, 32, 500, 0), "beta"),
        ((128, 8, 32, 4, 20), "prompt_len"),
    ] {
        let (c, w, l, q, beta) = args;
        assert!(matches!(pyramid(c, w, l, q, beta), Err(Error::Invalid { field: f, .. }) if f == field));
    }
    assert_eq!(uniform(2048, 32).unwrap(), 2048);
    assert!(uniform(32, 32).is_err());
}

#[test]
fn headkv_worked_examples() {
    // Equal scores: every head gets the base budget. B = 120, floor(B / 1.5) = 80, pool = 320,
    // min = 40, cap = 0.25 * 320 + 40 = 120 (+ W).
    let caps = headkv(&[1.0; 4], 128, 8, &HeadKvOptions::default()).unwrap();
    assert_eq!(caps, vec![128; 4]);
    // Round half to even: B = 6, floor(6 / 1.5) = 4, pool = 12, min = 2, s = 1/8, 3/8, 1/2:
    // 3.5 -> 4, 6.5 -> 6, 8 -> 8 (+ W = 8).
    let caps = headkv(&[1.0, 3.0, 4.0], 14, 8, &HeadKvOptions::default()).unwrap();
    assert_eq!(caps, vec![12, 14, 16]);
    // temp = 2 sharpens: s = [1, 9, 16] / 26.
    let t2 = HeadKvOptions { temp: 2.0, ..Default::default() };
    let caps = headkv(&[1.0, 3.0, 4.0], 14, 8, &t2).unwrap();
    let want: Vec<u32> =
        [1.0f32, 9.0, 16.0].iter().map(|x| (x / 26.0 * 12.0 + 2.0).round_ties_even() as u32 + 8).collect();
    assert_eq!(caps, want);
    // KVCache-Factory: B = base (no - W), no temp: B = 14, floor(14 / 1.5) = 9, pool = 27,
    // min = 5: 0.125 * 27 + 5 = 8.375 -> 8, 15.125 -> 15, 18.5 -> 18.
    let kf = HeadKvOptions { variant: HeadKvVariant::KvCacheFactory, temp: 2.0, ..Default::default() };
    assert_eq!(headkv(&[1.0, 3.0, 4.0], 14, 8, &kf).unwrap(), vec![16, 23, 26]);
    for (imp, field) in
        [(&[][..], "importance"), (&[1.0, f32::NAN][..], "importance[1]"), (&[0.0, 0.0][..], "importance")]
    {
        assert!(
            matches!(headkv(imp, 128, 8, &HeadKvOptions::default()), Err(Error::Invalid { field: f, .. }) if f == field)
        );
    }
    let bad_beta = HeadKvOptions { beta: 0.5, ..Default::default() };
    assert!(headkv(&[1.0], 128, 8, &bad_beta).is_err());
    assert!(headkv(&[1.0], 8, 8, &HeadKvOptions::default()).is_err());
}

#[test]
fn score_files_parse_and_map_to_kv_heads() {
    let s = HeadScores::parse_json(r#"{"0-0":[1,3],"0-1":[2],"1-1":[0.5,0.5],"1-0":[4]}"#).unwrap();
    assert_eq!((s.layers(), s.heads()), (2, 2));
    assert_eq!((s.importance(0, 0), s.importance(1, 0), s.importance(1, 1)), (2.0, 4.0, 0.5));
    let kv = s.to_kv_heads(1).unwrap();
    assert_eq!(kv.as_slice(), &[2.0, 2.25]);
    assert!(s.to_kv_heads(3).is_err());
    for bad in [
        "",
        "[]",
        "{}",
        r#"{"0-0":[]}"#,
        r#"{"0-0":[1],"0-1":[2],"1-0":[3]}"#,
        r#"{"a-0":[1]}"#,
        r#"{"0-0":["x"]}"#,
        r#"{"0-0":[1e308,1e308]}"#,
        r#"{"0-0":5}"#,
    ] {
        assert!(matches!(HeadScores::parse_json(bad), Err(Error::Invalid { .. })), "{bad:?}");
    }
}

#[test]
fn real_headkv_files() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/head-scores/headkv");
    if !dir.is_dir() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true but {} is missing", dir.display());
        eprintln!("budget_policy: real HeadKV files NOT CHECKED: {} not found", dir.display());
        return;
    }
    for f in [
        "Meta-Llama-3-8B-Instruct_retrieval_heads.json",
        "Meta-Llama-3-8B-Instruct_retrieval_reasoning_heads.json",
        "Mistral-7B-Instruct-v0.2_retrieval_reasoning_heads.json",
    ] {
        let s = HeadScores::load(dir.join(f)).unwrap();
        assert_eq!((s.layers(), s.heads()), (32, 32), "{f}");
        let kv = s.to_kv_heads(8).unwrap();
        let caps = headkv(kv.as_slice(), 128, 8, &HeadKvOptions::default()).unwrap();
        // Each cap is round(s * pool + min) + W with min = 40: at least 48, and the rounding
        // moves the total by at most half a token per head from L * H * B.
        assert!(caps.iter().all(|&c| c >= 48), "{f}");
        let prefix: i64 = caps.iter().map(|&c| i64::from(c) - 8).sum();
        assert!((prefix - 256 * 120).abs() <= 128, "{f}: {prefix}");
        assert!(caps.iter().any(|&c| c > 200), "{f}: HeadKV should favour a few heads strongly");
    }
}
