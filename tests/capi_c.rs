//! The C ABI from C: compiles tests/c/capi_test.c against include/headwise.h with the system C
//! compiler (`CC`, else `cc`), links it to the cdylib this `cargo test` built and, separately,
//! to the staticlib, runs each and requires exit status 0. Also compiles the header as C++
//! (`CXX`, else `c++`), the language most engines include it from. No GPU needed: the C program
//! checks that the GPU entry points say there is none and runs every operation on the emulator.
// The C program runs every operation on the emulator store.
#![cfg(all(feature = "capi", feature = "emulator"))]

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The directory holding the cdylib and the staticlib: cargo builds the library (every crate
/// type) before any integration test, into the `deps` directory this test binary runs from.
fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent().expect("test binary directory").to_path_buf()
}

/// What a program linking the staticlib must add: the system libraries Rust's std and the C++
/// emulator need, as `cargo rustc --features capi --crate-type staticlib -- --print
/// native-static-libs` prints them on Linux (README, "Linking from an engine").
const STATIC_LINK_LIBS: &[&str] =
    &["-lstdc++", "-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl", "-lc"];

fn tool(var: &str, default: &str) -> String {
    std::env::var(var).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_string())
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Builds tests/c/capi_test.c with `link` as the library arguments, runs it, requires success.
fn build_and_run(name: &str, link: &[String]) {
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("capi_c");
    std::fs::create_dir_all(&out_dir).unwrap();
    let exe = out_dir.join(name);
    let cc = tool("CC", "cc");
    let compiled = run(Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-g"])
        .arg("-I")
        .arg(root().join("include"))
        .arg(root().join("tests/c/capi_test.c"))
        .args(link)
        .arg("-lm")
        .arg("-o")
        .arg(&exe));
    assert!(compiled.status.success(), "{cc} failed to build tests/c/capi_test.c ({name})");
    // Without cargo's LD_LIBRARY_PATH: it lists target/debug before deps/, and the libheadwise.so
    // cargo last copied there may come from a build without `capi`; the rpath names deps/.
    let ran = run(Command::new(&exe).env_remove("LD_LIBRARY_PATH"));
    assert!(ran.status.success(), "tests/c/capi_test.c failed ({name}: {})", ran.status);
    let stdout = String::from_utf8_lossy(&ran.stdout);
    assert!(stdout.contains(", 0 failed"), "{name}: no pass line");
    assert!(stdout.contains("emulator decode attention"), "{name}: the emulator part did not run");
}

#[test]
fn c_program_passes_against_the_shared_library() {
    let dir = library_dir();
    let lib = dir.join(format!("{}headwise{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX));
    assert!(lib.exists(), "{} is missing: the [lib] crate-type must include cdylib", lib.display());
    // rpath, so the program finds the library without LD_LIBRARY_PATH.
    let link = [
        "-L".to_string(),
        dir.display().to_string(),
        "-lheadwise".into(),
        format!("-Wl,-rpath,{}", dir.display()),
    ];
    build_and_run("capi_test_shared", &link);
}

#[test]
fn c_program_passes_against_the_static_library() {
    let lib = library_dir().join("libheadwise.a");
    assert!(lib.exists(), "{} is missing: the [lib] crate-type must include staticlib", lib.display());
    // The archive by path, so the linker cannot pick the shared library beside it.
    let mut link = vec![lib.display().to_string()];
    link.extend(STATIC_LINK_LIBS.iter().map(|s| s.to_string()));
    build_and_run("capi_test_static", &link);
}

#[test]
fn header_compiles_as_cpp() {
    let cxx = tool("CXX", "c++");
    let out = run(Command::new(&cxx)
        .args(["-x", "c++", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-pedantic", "-fsyntax-only"])
        .arg(root().join("include/headwise.h")));
    assert!(out.status.success(), "{cxx} rejects include/headwise.h");
}
