//! include/headwise.h is cbindgen's C header for src/capi/ (feature `capi`), committed so
//! engines need neither Rust tooling nor cbindgen to include it. This test regenerates it with
//! the pinned cbindgen (a dev-dependency, so it runs offline) and fails on any difference;
//! `HEADWISE_BLESS=1` rewrites the file instead. It parses the source only, so it runs with or
//! without the feature. A test binary copied away from the source tree (scripts/gpu_pass.sh)
//! says NOT RUN, except under `CI=true`, where it must run.

mod common;

use std::path::Path;

/// The C ABI's source files, in name order so the header does not depend on directory order.
fn sources(root: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(root.join("src").join("capi"))
        .expect("src/capi")
        .map(|e| e.expect("src/capi entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .collect();
    files.sort();
    files
}

fn generate(root: &Path) -> String {
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml");
    // src/capi/ holds the whole ABI; parsing its files alone keeps the header independent of
    // the rest of the crate and of `cargo metadata`.
    let bindings = sources(root)
        .into_iter()
        .fold(cbindgen::Builder::new().with_config(config), |b, f| b.with_src(f))
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
