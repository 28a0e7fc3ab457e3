//! include/headwise.h is cbindgen's C header for src/capi/ (feature `capi`), committed so
//! engines need neither Rust tooling nor cbindgen to include it. This test regenerates it with
//! the pinned cbindgen (a dev-dependency, so it runs offline) and fails on any difference;
//! `HEADWISE_BLESS=1` rewrites the file instead. It parses the source only, so it runs with or
//! without the feature. A test binary copied away from the source tree (scripts/gpu_pass.sh)
//! says NOT RUN, except under `CI=true`, where it must run.

mod common;

use std::path::Path;

fn generate(root: &Path) -> String {
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        // src/capi/ holds the whole ABI: cbindgen follows mod.rs's `mod` items into its files.
        // Parsing it alone keeps the header independent of the rest of the crate and of
        // `cargo metadata`.
        .with_src(root.join("src").join("capi").join("mod.rs"))
        .generate()
        .expect("cbindgen");
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).expect("cbindgen writes UTF-8")
}

#[test]
fn headwise_h_matches_cbindgen() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if !root.join("src").join("capi").join("mod.rs").exists() {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        assert!(!ci, "CI=true but src/capi/ is missing from {}", root.display());
        eprintln!("cbindgen_fresh: NOT RUN: no source tree at {}", root.display());
        return;
    }
    let fresh = generate(root);
    common::assert_fresh("include/headwise.h", &fresh, "cbindgen_fresh");
}
