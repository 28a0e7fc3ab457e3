//! Inputs the fuzzers in `fuzz/` (`cargo fuzz`, see README.md) found crashing a target, kept as
//! plain tests so `cargo test` guards the fix without libFuzzer. Each input is also a seed of
//! its target (`fuzz/seeds/<target>/`), so the fuzzer starts from it.

use headwise::Error;
use headwise::policy::head_scores::HeadScores;

fn invalid_field<T: std::fmt::Debug>(r: headwise::Result<T>) -> String {
    match r {
        Err(Error::Invalid { field, .. }) => field,
        other => panic!("expected Error::Invalid, got {other:?}"),
    }
}

/// head_scores_json, crash-b348c3d3: the mean of "1-0" (6.7e52) is finite in f64 but not in the
/// f32 the scores are kept in, and the parser stored `inf` as an importance (the target asserts
/// every parsed importance is finite). Seed `crash-f32-overflow.json`.
#[test]
fn head_score_mean_that_overflows_f32() {
    let text = r#"{"0-0": [0.5, 0.25], "0-1": [1.0], "1-0": [0,0, 2e53], "1-1": [3]}"#;
    assert_eq!(invalid_field(HeadScores::parse_json(text)), r#"head scores key "1-0""#);
    // The largest finite f32 mean still parses; the negative side overflows too.
    let ok = HeadScores::parse_json(r#"{"0-0": [3.4028234e38]}"#).unwrap();
    assert_eq!(ok.importance(0, 0), f32::MAX);
    assert_eq!(invalid_field(HeadScores::parse_json(r#"{"0-0": [-1e39]}"#)), r#"head scores key "0-0""#);
}
