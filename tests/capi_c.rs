//! The C ABI from C: compiles tests/c/capi_test.c against include/headwise.h with the system C
//! compiler (`CC`, else `cc`), links it to the cdylib this `cargo test` built, runs it and
//! requires exit status 0. Also compiles the header as C++ (`CXX`, else `c++`), the language
//! most engines include it from. No GPU needed: the C program checks that the GPU entry points
//! say there is none.
#![cfg(feature = "capi")]

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The directory holding the cdylib: cargo builds the library (every crate type) before any
/// integration test, into the `deps` directory this test binary runs from.
fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().expect("test binary directory").to_path_buf();
    let lib = dir.join(format!("{}headwise{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX));
    assert!(lib.exists(), "{} is missing: the [lib] crate-type must include cdylib", lib.display());
    dir
}

fn tool(var: &str, default: &str) -> String {
    std::env::var(var).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_string())
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    out
}

#[test]
fn c_program_passes_against_the_library() {
    let lib_dir = library_dir();
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("capi_c");
    std::fs::create_dir_all(&out_dir).unwrap();
    let exe = out_dir.join("capi_test");
    let cc = tool("CC", "cc");
    let compiled = run(Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-g"])
        .arg("-I")
        .arg(root().join("include"))
        .arg(root().join("tests/c/capi_test.c"))
        .arg("-L")
        .arg(&lib_dir)
        .arg("-lheadwise")
        // rpath, so the program finds the library without LD_LIBRARY_PATH.
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .arg("-lm")
        .arg("-o")
        .arg(&exe));
    assert!(compiled.status.success(), "{cc} failed to build tests/c/capi_test.c");
    let ran = run(&mut Command::new(&exe));
    assert!(ran.status.success(), "tests/c/capi_test.c failed ({})", ran.status);
    assert!(String::from_utf8_lossy(&ran.stdout).contains(", 0 failed"));
}

#[test]
fn header_compiles_as_cpp() {
    let cxx = tool("CXX", "c++");
    let out = run(Command::new(&cxx)
        .args(["-x", "c++", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-pedantic", "-fsyntax-only"])
        .arg(root().join("include/headwise.h")));
    assert!(out.status.success(), "{cxx} rejects include/headwise.h");
}
