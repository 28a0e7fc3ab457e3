//! Builds the kernels twice from the same `cuda/*.cu` sources:
//!
//! 1. with nvcc into one fatbin per file (SASS for the listed architectures plus PTX for the
//!    newest), embedded in the library and loaded lazily by the GPU backend;
//! 2. with the host C++ compiler against the CPU SIMT emulator (`cuda/simt/`), into the static
//!    library the emulator backend calls.
//!
//! Kernel names come from each file's instantiation list (`X(hw_name, ...)` lines), so the fatbin
//! symbol table and the emulator entry points cannot drift apart.
//!
//! Environment:
//! - `NVCC`, `CUDA_HOME`/`CUDA_PATH`, `PATH`, then the PyPI layout
//!   `<site-packages>/nvidia/cu13/bin/nvcc`: where nvcc is looked for, in that order.
//! - `HEADWISE_CUDA_ARCHS=80,90`: the SASS architectures (default 80,86,89,90; PTX for the last).
//! - `HEADWISE_REQUIRE_NVCC=1`: a missing or failing nvcc is a build error instead of a warning
//!   (builds with the `cuda` feature; without it there is nothing to compile with nvcc).
//! - `HEADWISE_EMU_SANITIZE=1`: build the emulator with AddressSanitizer and UBSan.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const DEFAULT_ARCHS: &str = "80,86,89,90";

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let cuda = manifest.join("cuda");

    println!("cargo:rerun-if-changed=cuda");
    println!("cargo:rerun-if-changed=build.rs");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "HEADWISE_CUDA_ARCHS",
        "HEADWISE_REQUIRE_NVCC",
        "HEADWISE_EMU_SANITIZE",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let kernel_files = sorted_files(&cuda, "cu");
    let selftest_files = sorted_files(&cuda.join("simt"), "cu");
    let modules: Vec<Module> = kernel_files.iter().map(|p| Module::read(p)).collect();
    let selftests: Vec<Module> = selftest_files.iter().map(|p| Module::read(p)).collect();

    // Each backend is built only when its feature is on: an engine using the GPU kernels alone
    // needs no C++ emulator, one using the emulator alone no nvcc.
    let emulator = env::var_os("CARGO_FEATURE_EMULATOR").is_some();
    if emulator {
        build_emulator(&cuda, &kernel_files, &selftest_files);
    }
    let fatbins = if env::var_os("CARGO_FEATURE_CUDA").is_some() {
        build_fatbins(&cuda, &out, &modules)
    } else {
        // HEADWISE_REQUIRE_NVCC asks for the kernels of builds that have a GPU path; a build
        // without the `cuda` feature has none to require (CI sets the variable for every step).
        None
    };
    write_kernel_table(&out, &modules, &selftests, fatbins.as_ref(), emulator);
}

/// One `.cu` file and the kernel names its instantiation list declares.
struct Module {
    stem: String,
    path: PathBuf,
    kernels: Vec<String>,
}

impl Module {
    fn read(path: &Path) -> Module {
        let src = fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let mut kernels = Vec::new();
        let mut rest = src.as_str();
        while let Some(i) = rest.find("X(hw_") {
            let name: String =
                rest[i + 2..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !kernels.contains(&name) {
                kernels.push(name);
            }
            rest = &rest[i + 2..];
        }
        Module {
            stem: path.file_stem().unwrap().to_string_lossy().into_owned(),
            path: path.to_owned(),
            kernels,
        }
    }
}

fn sorted_files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == ext))
            .collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

fn env_flag(name: &str) -> bool {
    env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

fn build_emulator(cuda: &Path, kernel_files: &[PathBuf], selftest_files: &[PathBuf]) {
    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++17")
        .include(cuda)
        // Emulated kernels are ~20x slower than plain loops already; -O0 would cost another ~4x,
        // so the emulator is optimised in every profile.
        .opt_level(2)
        .debug(true)
        .flag("-fno-strict-aliasing")
        .warnings(false);
    if env_flag("HEADWISE_EMU_SANITIZE") {
        b.flag("-fsanitize=address,undefined").flag("-fno-omit-frame-pointer").define("HW_SIMT_ASAN", "1");
    }
    for f in sorted_files(&cuda.join("simt"), "cpp") {
        b.file(f);
    }
    // .cu files are CUDA C++; under the emulator they are plain C++17.
    for f in kernel_files.iter().chain(selftest_files) {
        b.file(f);
    }
    b.flag("-xc++");
    b.compile("headwise_emu");
    println!("cargo:rustc-link-lib=static=headwise_emu");
    if env_flag("HEADWISE_EMU_SANITIZE") {
        // The instrumented objects call into the sanitizer runtimes; rustc does not link them.
        println!("cargo:rustc-link-lib=dylib=asan");
        println!("cargo:rustc-link-lib=dylib=ubsan");
    }
}

/// nvcc's location, or why none was found.
fn find_nvcc() -> Result<PathBuf, String> {
    if let Ok(p) = env::var("NVCC") {
        let p = PathBuf::from(p);
        return if p.is_file() { Ok(p) } else { Err(format!("NVCC={} is not a file", p.display())) };
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(home) = env::var(var) {
            let p = Path::new(&home).join("bin").join("nvcc");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let p = dir.join("nvcc");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    for site in python_site_dirs() {
        let p = site.join("nvidia").join("cu13").join("bin").join("nvcc");
        if p.is_file() {
            return Ok(p);
        }
    }
    Err("no nvcc in NVCC, CUDA_HOME, CUDA_PATH, PATH or a Python site-packages \
         (pip install nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 \
         nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-nvvm==13.0.88)"
        .into())
}

/// site-packages folders of the `python3` on PATH, where pip puts the CUDA wheels.
fn python_site_dirs() -> Vec<PathBuf> {
    let script = "import site,sys\nfor p in site.getsitepackages()+[site.getusersitepackages()]: print(p)";
    match Command::new("python3").args(["-c", script]).output() {
        Ok(o) if o.status.success() => {
            String::from_utf8_lossy(&o.stdout).lines().map(PathBuf::from).collect()
        }
        _ => Vec::new(),
    }
}

fn gencode_flags() -> Vec<String> {
    let archs = env::var("HEADWISE_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_ARCHS.into());
    let archs: Vec<&str> = archs.split(',').map(str::trim).filter(|a| !a.is_empty()).collect();
    assert!(!archs.is_empty(), "HEADWISE_CUDA_ARCHS is empty");
    let mut flags = Vec::new();
    for (i, a) in archs.iter().enumerate() {
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()), "bad arch {a:?} in HEADWISE_CUDA_ARCHS");
        let code = if i + 1 == archs.len() { format!("[sm_{a},compute_{a}]") } else { format!("sm_{a}") };
        flags.push(format!("-gencode=arch=compute_{a},code={code}"));
    }
    flags
}

/// Compiles every kernel file to a fatbin in OUT_DIR. None when nvcc is unavailable (and not
/// required); the GPU backend then reports that at run time.
fn build_fatbins(cuda: &Path, out: &Path, modules: &[Module]) -> Option<Vec<PathBuf>> {
    let require = env_flag("HEADWISE_REQUIRE_NVCC");
    let nvcc = match find_nvcc() {
        Ok(p) => p,
        Err(why) => {
            if require {
                panic!("HEADWISE_REQUIRE_NVCC is set but {why}");
            }
            println!("cargo:warning=headwise: GPU kernels not built: {why}");
            return None;
        }
    };
    let gencode = gencode_flags();
    let results: Vec<Result<PathBuf, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = modules
            .iter()
            .map(|m| {
                let (nvcc, gencode) = (&nvcc, &gencode);
                scope.spawn(move || {
                    let dst = out.join(format!("{}.fatbin", m.stem));
                    let output = Command::new(nvcc)
                        .args(["-fatbin", "-std=c++17", "-O3", "--use_fast_math"])
                        .arg("-I")
                        .arg(cuda)
                        .args(gencode)
                        .arg("-o")
                        .arg(&dst)
                        .arg(&m.path)
                        .output()
                        .map_err(|e| format!("running {}: {e}", nvcc.display()))?;
                    if output.status.success() {
                        Ok(dst)
                    } else {
                        Err(format!(
                            "nvcc failed on {}:\n{}{}",
                            m.path.display(),
                            String::from_utf8_lossy(&output.stdout),
                            String::from_utf8_lossy(&output.stderr)
                        ))
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut fatbins = Vec::new();
    for r in results {
        match r {
            Ok(p) => fatbins.push(p),
            Err(why) if require => panic!("{why}"),
            Err(why) => {
                for line in why.lines() {
                    println!("cargo:warning=headwise: {line}");
                }
                println!("cargo:warning=headwise: GPU kernels not built");
                return None;
            }
        }
    }
    Some(fatbins)
}

/// Writes OUT_DIR/kernel_table.rs: the embedded fatbins, which module holds each kernel, and the
/// emulator entry points, all from the instantiation lists.
fn write_kernel_table(
    out: &Path,
    modules: &[Module],
    selftests: &[Module],
    fatbins: Option<&Vec<PathBuf>>,
    emulator: bool,
) {
    let mut s = String::new();
    s.push_str("// Generated by build.rs from the instantiation lists in cuda/*.cu. Do not edit.\n");
    writeln!(s, "/// Fatbin bytes per kernel file, in `MODULES` order (None: built without nvcc).").unwrap();
    writeln!(s, "#[cfg(feature = \"cuda\")]").unwrap();
    writeln!(s, "pub(crate) const FATBINS: [Option<&[u8]>; {}] = [", modules.len()).unwrap();
    for (i, _) in modules.iter().enumerate() {
        match fatbins {
            Some(f) => writeln!(s, "    Some(include_bytes!({:?})),", f[i].display().to_string()).unwrap(),
            None => writeln!(s, "    None,").unwrap(),
        }
    }
    s.push_str("];\n");
    writeln!(s, "/// Kernel file stems, e.g. \"append\" for cuda/append.cu.").unwrap();
    writeln!(s, "#[cfg(feature = \"cuda\")]").unwrap();
    writeln!(s, "pub(crate) const MODULES: [&str; {}] = [", modules.len()).unwrap();
    for m in modules {
        writeln!(s, "    {:?},", m.stem).unwrap();
    }
    s.push_str("];\n");
    writeln!(s, "/// (kernel name, index into MODULES).").unwrap();
    s.push_str("pub(crate) const KERNELS: &[(&str, usize)] = &[\n");
    for (i, m) in modules.iter().enumerate() {
        for k in &m.kernels {
            writeln!(s, "    ({k:?}, {i}),").unwrap();
        }
    }
    s.push_str("];\n");
    if !emulator {
        fs::write(out.join("kernel_table.rs"), s).unwrap();
        return;
    }
    s.push_str("unsafe extern \"C\" {\n");
    for m in modules.iter().chain(selftests) {
        for k in &m.kernels {
            writeln!(
                s,
                "    fn hw_emu_{k}(p: *const ::core::ffi::c_void, l: *const crate::params::HwLaunch, e: *mut crate::params::HwEmuError) -> i32;"
            )
            .unwrap();
        }
    }
    s.push_str("}\n");
    s.push_str("/// Emulator entry point of a kernel (or emulator self-test kernel) by name.\n");
    s.push_str("pub(crate) fn emu_entry(name: &str) -> Option<crate::emu::EmuEntry> {\n    match name {\n");
    for m in modules.iter().chain(selftests) {
        for k in &m.kernels {
            writeln!(s, "        {k:?} => Some(hw_emu_{k}),").unwrap();
        }
    }
    s.push_str("        _ => None,\n    }\n}\n");
    fs::write(out.join("kernel_table.rs"), s).unwrap();
}
