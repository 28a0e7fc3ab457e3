//! HeadKV score files: any text either parses into a full grid of finite importances (which the
//! HeadKV budget policy then accepts or rejects with a typed error), or is an `Error::Invalid`
//! naming the scores; never a panic.
#![no_main]

use headwise::Error;
use headwise::policy::budget::{HeadKvOptions, HeadKvVariant, headkv};
use headwise::policy::head_scores::HeadScores;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let scores = match HeadScores::parse_json(&text) {
        Ok(s) => s,
        Err(Error::Invalid { field, .. }) => {
            assert!(field.starts_with("head scores"), "error names {field:?}");
            return;
        }
        Err(e) => panic!("not an Invalid error: {e}"),
    };
    let (layers, heads) = (scores.layers(), scores.heads());
    assert_eq!(scores.as_slice().len(), layers * heads);
    assert!(scores.as_slice().iter().all(|x| x.is_finite()), "{:?}", scores.as_slice());
    for kv in [0, 1, 2, heads, heads + 1] {
        match scores.to_kv_heads(kv) {
            Ok(m) => {
                assert!(kv > 0 && heads % kv == 0);
                assert_eq!((m.layers(), m.heads()), (layers, kv));
            }
            Err(Error::Invalid { field, .. }) => {
                assert_eq!(field, "kv_heads");
                assert!(kv == 0 || heads % kv != 0);
            }
            Err(e) => panic!("not an Invalid error: {e}"),
        }
    }
    let base = u32::from(data.first().copied().unwrap_or(0)) * 4;
    for variant in [HeadKvVariant::HeadKvRepo, HeadKvVariant::KvCacheFactory] {
        let opts = HeadKvOptions { variant, ..Default::default() };
        match headkv(scores.as_slice(), base, 8, &opts) {
            Ok(b) => {
                assert_eq!(b.len(), layers * heads);
                assert!(b.iter().all(|&x| x >= 8), "every head keeps its window");
            }
            Err(Error::Invalid { .. }) => {}
            Err(e) => panic!("not an Invalid error: {e}"),
        }
    }
});
