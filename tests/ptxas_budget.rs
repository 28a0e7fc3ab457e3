//! ptxas budget and SASS checks (issue 14).
//!
//! Compiles every `cuda/*.cu` once for sm_90 with build.rs's flags plus `-Xptxas -v`, reads the
//! registers, static shared memory, stack frame and spills ptxas reports per kernel, and
//! disassembles the fatbin (`cuobjdump -sass`, which needs `nvdisasm` beside it) to count
//! 128-bit global loads (`LDG.E.128`), tensor-core MMAs (`HMMA`) and local-memory accesses
//! (`LDL`/`STL`) per kernel. It fails when
//! - a kernel uses more registers than its budget in `cuda/ptxas_budget.tsv`,
//! - its static shared memory differs from the table,
//! - it spills or has a stack frame / local memory beyond the table's (0 except recorded findings),
//! - a kernel that must use 16-byte row loads has no `LDG.E.128`, or one that must run on the
//!   tensor cores has no `HMMA`,
//! - a kernel of an instantiation list has no table row, or a table row names no kernel.
//!
//! The table also records the block size each operation launches with (the constants in
//! src/attention.rs, src/cache.rs, src/select/, src/redundancy.rs, src/heavy_hitters.rs; see
//! `launch_rules`) and the occupancy this implies on an H100 (sm_90). BENCHMARKS.md prints it between the
//! `ptxas-budget` markers; `table_and_benchmarks_agree` keeps the copy current without nvcc.
//!
//! `HEADWISE_BLESS=1 cargo test --test ptxas_budget` rewrites the table from this compile and the
//! BENCHMARKS.md section from the table. Without nvcc the compile check says NOT RUN and passes,
//! except under `HEADWISE_REQUIRE_NVCC=1` (CI), where it fails.

use std::collections::BTreeMap;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const TABLE: &str = "cuda/ptxas_budget.tsv";
const ARCH: &str = "sm_90";
const BEGIN: &str =
    "<!-- ptxas-budget:begin (generated from cuda/ptxas_budget.tsv by tests/ptxas_budget.rs) -->";
const END: &str = "<!-- ptxas-budget:end -->";

/// Known spills (findings, not goals): kernel -> why its stack/spill budget is not 0. Every
/// other kernel must have none. Shrinking one of these is an improvement: bless the table.
const KNOWN_SPILLS: &[(&str, &str)] = &[];

fn env_flag(name: &str) -> bool {
    env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Block size and required instructions per kernel, by name prefix (longest match first).
/// Block sizes mirror the launch constants of the host operations.
fn launch_rules(kernel: &str) -> (u32, &'static str) {
    const RULES: &[(&str, u32, &str)] = &[
        ("hw_attention_merge_", 128, "-"),          // attention.rs THREADS
        ("hw_attention_", 128, "ldg128"),           // attention.rs THREADS
        ("hw_append_", 128, "ldg128"),              // cache.rs 32 * APPEND_WARPS_PER_BLOCK
        ("hw_h2o_mass_", 128, "ldg128"),            // attention.rs THREADS (attention_with_mass)
        ("hw_h2o_evict_", 256, "ldg128"),           // heavy_hitters.rs EVICT_THREADS (compaction)
        ("hw_relayout_", 256, "ldg128"),            // cache.rs RELAYOUT_THREADS
        ("hw_query_push_", 256, "ldg128"),          // redundancy.rs (vecs.div_ceil(256), 256)
        ("hw_rkv_norms_", 128, "ldg128"),           // redundancy.rs TILE_THREADS (by_tiles)
        ("hw_rkv_importance_", 128, "ldg128,hmma"), // redundancy.rs TILE_THREADS
        ("hw_rkv_similarity_", 128, "ldg128,hmma"), // redundancy.rs TILE_THREADS
        ("hw_rkv_select_", 256, "ldg128"),          // redundancy.rs SELECT_THREADS (compaction)
        ("hw_select_stats_merge", 256, "-"),        // select.rs ELEMENTWISE_THREADS
        ("hw_select_stats_", 128, "ldg128,hmma"),   // select.rs TILE_THREADS
        ("hw_select_score_", 128, "ldg128,hmma"),   // select.rs TILE_THREADS
        ("hw_select_knorm_", 128, "ldg128"),        // select.rs TILE_THREADS (one warp per token)
        ("hw_scores_ea_logits_", 128, "ldg128"),    // scores.rs LOGIT_THREADS
        ("hw_scores_ea_finish_", 256, "ldg128"),    // scores.rs FINISH_THREADS
        ("hw_select_pool", 256, "-"),               // select.rs ELEMENTWISE_THREADS
        ("hw_select_adakv", 256, "-"),              // select.rs TOP_THREADS
        ("hw_select_topk", 256, "-"),               // select.rs TOP_THREADS
        ("hw_select_threshold", 256, "-"),          // select.rs TOP_THREADS
        ("hw_select_gather_", 128, "ldg128"),       // select.rs TILE_THREADS
    ];
    RULES
        .iter()
        .find(|(p, _, _)| kernel.starts_with(p))
        .map(|&(_, t, n)| (t, n))
        .unwrap_or_else(|| panic!("{kernel}: add its block size and required instructions to launch_rules"))
}

/// Kernel names of every cuda/*.cu instantiation list (the `X(hw_...` lines build.rs reads).
fn listed_kernels() -> Vec<String> {
    let mut names = Vec::new();
    for path in cu_files() {
        let src = fs::read_to_string(&path).unwrap();
        let mut rest = src.as_str();
        while let Some(i) = rest.find("X(hw_") {
            let name: String =
                rest[i + 2..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !names.contains(&name) {
                names.push(name);
            }
            rest = &rest[i + 2..];
        }
    }
    names.sort();
    names
}

fn cu_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(root().join("cuda"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    files.sort();
    files
}

/// What ptxas and the disassembly say about one kernel.
#[derive(Clone, Debug, Default, PartialEq)]
struct Measured {
    regs: u32,
    smem: u32,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
    lmem: u32,
    ldg128: u32,
    hmma: u32,
    local_insts: u32,
}

/// One row of cuda/ptxas_budget.tsv.
#[derive(Clone, Debug, PartialEq)]
struct Row {
    kernel: String,
    arch: String,
    threads: u32,
    max_regs: u32,
    smem: u32,
    max_spill: u32,
    needs: String,
    blocks_per_sm: u32,
    occupancy_pct: u32,
}

const COLUMNS: &str =
    "kernel\tarch\tthreads\tmax_regs\tsmem_bytes\tmax_spill_bytes\tneeds\tblocks_per_sm\toccupancy_pct";

/// Resident blocks per SM on an H100 (sm_90) for a kernel with `regs` registers per thread,
/// `smem` bytes of static shared memory and `threads` per block: 65536 registers per SM
/// allocated per warp in units of 256, 2048 threads (64 warps) and 32 blocks per SM, 228 KB of
/// shared memory per SM with 1 KB reserved per block (allocation unit 128 bytes).
fn h100_blocks_per_sm(regs: u32, smem: u32, threads: u32) -> u32 {
    let warps = threads.div_ceil(32);
    let regs_per_warp = (regs.max(1) * 32).div_ceil(256) * 256;
    let by_regs = (65536 / regs_per_warp) / warps;
    let by_threads = 64 / warps;
    let smem_per_block = (smem + 1024).div_ceil(128) * 128;
    let by_smem = (228 * 1024) / smem_per_block;
    by_regs.min(by_threads).min(by_smem).min(32)
}

fn row_for(kernel: &str, m: &Measured) -> Row {
    let (threads, needs) = launch_rules(kernel);
    let blocks = h100_blocks_per_sm(m.regs, m.smem, threads);
    Row {
        kernel: kernel.to_owned(),
        arch: ARCH.to_owned(),
        threads,
        max_regs: m.regs,
        smem: m.smem,
        max_spill: m.stack.max(m.spill_stores).max(m.spill_loads).max(m.lmem),
        needs: needs.to_owned(),
        blocks_per_sm: blocks,
        occupancy_pct: blocks * threads.div_ceil(32) * 100 / 64,
    }
}

fn format_table(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str("# ptxas budget per kernel (tests/ptxas_budget.rs; HEADWISE_BLESS=1 rewrites it).\n");
    s.push_str("# max_spill_bytes: stack/spill/local bytes allowed, 0 but for recorded findings.\n");
    s.push_str("# needs: instructions the SASS must contain. blocks_per_sm/occupancy_pct: H100.\n");
    s.push_str(COLUMNS);
    s.push('\n');
    for r in rows {
        writeln!(
            s,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            r.kernel,
            r.arch,
            r.threads,
            r.max_regs,
            r.smem,
            r.max_spill,
            r.needs,
            r.blocks_per_sm,
            r.occupancy_pct
        )
        .unwrap();
    }
    s
}

fn parse_table(text: &str) -> Vec<Row> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with('#') || line.trim().is_empty() || line == COLUMNS {
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        assert_eq!(f.len(), 9, "{TABLE}:{}: expected 9 tab-separated fields", i + 1);
        let n = |j: usize| -> u32 { f[j].parse().unwrap_or_else(|_| panic!("{TABLE}:{}: field {j}", i + 1)) };
        rows.push(Row {
            kernel: f[0].into(),
            arch: f[1].into(),
            threads: n(2),
            max_regs: n(3),
            smem: n(4),
            max_spill: n(5),
            needs: f[6].into(),
            blocks_per_sm: n(7),
            occupancy_pct: n(8),
        });
    }
    rows
}

fn committed_table() -> Vec<Row> {
    parse_table(&fs::read_to_string(root().join(TABLE)).unwrap_or_default())
}

/// The BENCHMARKS.md section printed from the table.
fn benchmarks_section(table_text: &str, rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str(BEGIN);
    s.push('\n');
    let note = table_text.lines().find_map(|l| l.strip_prefix("# compiled: ")).unwrap_or("not recorded");
    writeln!(s, "Compiled: {note}. Occupancy: resident blocks per SM and warps/64 on an H100.").unwrap();
    s.push('\n');
    s.push_str("| kernel | threads | regs (max) | static smem B | spill B | SASS must have | blocks/SM | occupancy |\n");
    s.push_str("|---|---:|---:|---:|---:|---|---:|---:|\n");
    for r in rows {
        writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {}% |",
            r.kernel, r.threads, r.max_regs, r.smem, r.max_spill, r.needs, r.blocks_per_sm, r.occupancy_pct
        )
        .unwrap();
    }
    s.push_str(END);
    s
}

fn replace_section(doc: &str, section: &str) -> Option<String> {
    let b = doc.find(BEGIN)?;
    let e = doc[b..].find(END)? + b + END.len();
    Some(format!("{}{}{}", &doc[..b], section, &doc[e..]))
}

/// nvcc's location, the way build.rs looks for it (NVCC, CUDA_HOME/CUDA_PATH, PATH, then the
/// PyPI layout `<site-packages>/nvidia/cu13/bin/nvcc`).
fn find_nvcc() -> Option<PathBuf> {
    if let Ok(p) = env::var("NVCC") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let mut candidates = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(home) = env::var(var) {
            candidates.push(Path::new(&home).join("bin").join("nvcc"));
        }
    }
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    let script = "import site\nfor p in site.getsitepackages()+[site.getusersitepackages()]: print(p)";
    if let Ok(o) = Command::new("python3").args(["-c", script]).output() {
        for l in String::from_utf8_lossy(&o.stdout).lines() {
            candidates.push(Path::new(l).join("nvidia").join("cu13").join("bin").join("nvcc"));
        }
    }
    candidates.into_iter().find(|p| p.is_file())
}

fn num_before(s: &str, unit: &str) -> u32 {
    // "... 1368 bytes spill stores" -> 1368 for unit "bytes spill stores".
    s.find(unit)
        .and_then(|i| s[..i].trim_end().rsplit(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// `-Xptxas -v` output -> per-kernel registers, smem, stack, spills.
fn parse_ptxas(log: &str, out: &mut BTreeMap<String, Measured>) {
    let mut current: Option<String> = None;
    for line in log.lines() {
        if let Some(i) = line.find("Compiling entry function '") {
            let rest = &line[i + "Compiling entry function '".len()..];
            let name = rest.split('\'').next().unwrap().to_owned();
            assert!(line.contains(&format!("for '{ARCH}'")), "unexpected arch: {line}");
            out.entry(name.clone()).or_default();
            current = Some(name);
        } else if let Some(name) = &current {
            let m = out.get_mut(name).unwrap();
            if line.contains("bytes stack frame") {
                m.stack = num_before(line, "bytes stack frame");
                m.spill_stores = num_before(line, "bytes spill stores");
                m.spill_loads = num_before(line, "bytes spill loads");
            }
            if line.contains("Used ") && line.contains(" registers") {
                m.regs = num_before(line, "registers");
                m.smem = num_before(line, "bytes smem");
                m.lmem = num_before(line, "bytes lmem");
            }
        }
    }
}

/// `cuobjdump -sass` output -> per-kernel instruction counts.
fn parse_sass(sass: &str, out: &mut BTreeMap<String, Measured>) {
    let mut current: Option<String> = None;
    for line in sass.lines() {
        if let Some(i) = line.find("Function : ") {
            let name = line[i + "Function : ".len()..].trim().to_owned();
            current = Some(name);
            continue;
        }
        let Some(name) = &current else { continue };
        let Some(m) = out.get_mut(name) else { continue };
        // Instruction lines look like `/*0130*/  LDG.E.128 R4, desc[UR4][R2.64] ;`.
        let Some(code) = line.split("*/").nth(1) else { continue };
        let op = code
            .trim_start()
            .trim_start_matches(|c: char| c == '@' || c == '!' || c == 'P' || c.is_ascii_digit());
        let op = op.split_whitespace().next().unwrap_or("");
        if op.starts_with("LDG.E.128") {
            m.ldg128 += 1;
        }
        if op.starts_with("HMMA") {
            m.hmma += 1;
        }
        if op.starts_with("LDL") || op.starts_with("STL") {
            m.local_insts += 1;
        }
    }
}

/// Compiles each cuda/*.cu for sm_90 (in parallel) and measures every kernel.
fn measure(nvcc: &Path) -> Result<BTreeMap<String, Measured>, String> {
    let bin = nvcc.parent().unwrap();
    let cuobjdump = bin.join("cuobjdump");
    if !cuobjdump.is_file() || !bin.join("nvdisasm").is_file() {
        return Err(format!(
            "no cuobjdump + nvdisasm beside {} (pip install nvidia-cuda-cuobjdump==13.2.51 \
             nvidia-cuda-nvdisasm==13.2.51)",
            nvcc.display()
        ));
    }
    let dir = env::temp_dir().join(format!("headwise-ptxas-{}", std::process::id()));
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let cuda = root().join("cuda");
    let files = cu_files();
    let results: Vec<Result<(String, String), String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = files
            .iter()
            .map(|f| {
                let (dir, cuda, cuobjdump, bin) = (&dir, &cuda, &cuobjdump, bin);
                scope.spawn(move || {
                    let stem = f.file_stem().unwrap().to_string_lossy().into_owned();
                    let fatbin = dir.join(format!("{stem}.fatbin"));
                    // build.rs's flags, one architecture, ptxas verbose.
                    let o = Command::new(nvcc)
                        .args(["-fatbin", "-std=c++17", "-O3", "--use_fast_math", "-Xptxas", "-v"])
                        .arg("-I")
                        .arg(cuda)
                        .arg("-gencode=arch=compute_90,code=sm_90")
                        .arg("-o")
                        .arg(&fatbin)
                        .arg(f)
                        .output()
                        .map_err(|e| format!("{}: {e}", nvcc.display()))?;
                    let log = format!(
                        "{}{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    );
                    if !o.status.success() {
                        return Err(format!("nvcc failed on {}:\n{log}", f.display()));
                    }
                    let path = env::join_paths(
                        std::iter::once(bin.to_path_buf())
                            .chain(env::split_paths(&env::var_os("PATH").unwrap_or_default())),
                    )
                    .unwrap();
                    let s = Command::new(cuobjdump)
                        .arg("-sass")
                        .arg(&fatbin)
                        .env("PATH", path)
                        .output()
                        .map_err(|e| format!("{}: {e}", cuobjdump.display()))?;
                    if !s.status.success() {
                        return Err(format!(
                            "cuobjdump -sass failed: {}",
                            String::from_utf8_lossy(&s.stderr)
                        ));
                    }
                    Ok((log, String::from_utf8_lossy(&s.stdout).into_owned()))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let _ = fs::remove_dir_all(&dir);
    let mut out = BTreeMap::new();
    let mut sass_all = Vec::new();
    for r in results {
        let (log, sass) = r?;
        parse_ptxas(&log, &mut out);
        sass_all.push(sass);
    }
    for sass in &sass_all {
        parse_sass(sass, &mut out);
    }
    Ok(out)
}

fn nvcc_version(nvcc: &Path) -> String {
    Command::new(nvcc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .find(|l| l.contains("release"))
                .map(|l| l.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Every problem of `measured` against `table` and the instantiation lists, one line each.
fn violations(measured: &BTreeMap<String, Measured>, table: &[Row], listed: &[String]) -> Vec<String> {
    let mut v = Vec::new();
    let rows: BTreeMap<&str, &Row> = table.iter().map(|r| (r.kernel.as_str(), r)).collect();
    for k in listed {
        if !rows.contains_key(k.as_str()) {
            v.push(format!("{k}: in an instantiation list but has no row in {TABLE}"));
        }
        if !measured.contains_key(k) {
            v.push(format!("{k}: in an instantiation list but nvcc compiled no such kernel"));
        }
    }
    for r in table {
        if !listed.contains(&r.kernel) {
            v.push(format!("{}: row in {TABLE} names no kernel of cuda/*.cu", r.kernel));
        }
    }
    for (k, m) in measured {
        if !listed.contains(k) {
            v.push(format!("{k}: compiled but in no instantiation list"));
        }
        let Some(r) = rows.get(k.as_str()) else { continue };
        if m.regs > r.max_regs {
            v.push(format!("{k}: {} registers, budget {}", m.regs, r.max_regs));
        }
        if m.smem != r.smem {
            v.push(format!("{k}: {} bytes static smem, table says {}", m.smem, r.smem));
        }
        let spill = m.stack.max(m.spill_stores).max(m.spill_loads).max(m.lmem);
        if spill > r.max_spill {
            v.push(format!(
                "{k}: spills/local memory ({} B stack, {} B spill stores, {} B spill loads, {} B lmem), allowed {}",
                m.stack, m.spill_stores, m.spill_loads, m.lmem, r.max_spill
            ));
        }
        if r.max_spill == 0 && m.local_insts > 0 {
            v.push(format!("{k}: {} LDL/STL instructions in its SASS", m.local_insts));
        }
        if r.max_spill > 0 && !KNOWN_SPILLS.iter().any(|(n, _)| n == k) {
            v.push(format!("{k}: table allows {} spill bytes but it is not a recorded finding", r.max_spill));
        }
        let needs: Vec<&str> = r.needs.split(',').filter(|n| *n != "-").collect();
        if needs.contains(&"ldg128") && m.ldg128 == 0 {
            v.push(format!("{k}: no LDG.E.128 in its SASS (16-byte row loads lost)"));
        }
        if needs.contains(&"hmma") && m.hmma == 0 {
            v.push(format!("{k}: no HMMA in its SASS (tensor-core MMA lost)"));
        }
        let (threads, rule_needs) = launch_rules(k);
        if r.threads != threads || r.needs != rule_needs {
            v.push(format!(
                "{k}: table threads/needs {}/{} but launch_rules says {threads}/{rule_needs}",
                r.threads, r.needs
            ));
        }
        let occ = row_for(k, &Measured { regs: r.max_regs, smem: r.smem, ..Default::default() });
        if (r.blocks_per_sm, r.occupancy_pct) != (occ.blocks_per_sm, occ.occupancy_pct) {
            v.push(format!("{k}: occupancy columns do not follow from regs/smem/threads"));
        }
    }
    v
}

#[test]
fn kernels_within_ptxas_budget_and_keep_their_sass() {
    let require = env_flag("HEADWISE_REQUIRE_NVCC");
    let Some(nvcc) = find_nvcc() else {
        assert!(!require, "HEADWISE_REQUIRE_NVCC=1 but no nvcc found (NVCC, CUDA_HOME, PATH, pip layout)");
        eprintln!("ptxas_budget: NOT RUN: no nvcc");
        return;
    };
    let t0 = std::time::Instant::now();
    let measured = match measure(&nvcc) {
        Ok(m) => m,
        Err(why) => {
            assert!(!require, "HEADWISE_REQUIRE_NVCC=1 but {why}");
            eprintln!("ptxas_budget: NOT RUN: {why}");
            return;
        }
    };
    eprintln!(
        "ptxas_budget: {} kernels compiled and disassembled in {:.1} s",
        measured.len(),
        t0.elapsed().as_secs_f64()
    );
    let listed = listed_kernels();
    if env_flag("HEADWISE_BLESS") {
        let rows: Vec<Row> =
            measured.iter().filter(|(k, _)| listed.contains(k)).map(|(k, m)| row_for(k, m)).collect();
        let mut text = format_table(&rows);
        let date = Command::new("date")
            .args(["-u", "+%Y-%m-%d"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        text.insert_str(
            0,
            &format!("# compiled: {date}, {}, {ARCH}, nvcc -O3 --use_fast_math\n", nvcc_version(&nvcc)),
        );
        fs::write(root().join(TABLE), &text).unwrap();
        let doc = fs::read_to_string(root().join("BENCHMARKS.md")).unwrap();
        let doc = replace_section(&doc, &benchmarks_section(&text, &rows))
            .expect("BENCHMARKS.md lacks the ptxas-budget markers");
        fs::write(root().join("BENCHMARKS.md"), doc).unwrap();
    }
    let v = violations(&measured, &committed_table(), &listed);
    for (k, m) in &measured {
        let r = committed_table().into_iter().find(|r| &r.kernel == k);
        if let Some(r) = r.filter(|r| m.regs < r.max_regs) {
            eprintln!(
                "ptxas_budget: {k} uses {} registers, under its budget {}: bless to tighten",
                m.regs, r.max_regs
            );
        }
    }
    assert!(v.is_empty(), "ptxas budget / SASS check failed:\n  {}", v.join("\n  "));
}

/// The table covers exactly the instantiation lists and BENCHMARKS.md prints it (no nvcc needed).
#[test]
fn table_and_benchmarks_agree() {
    let text = fs::read_to_string(root().join(TABLE)).unwrap();
    let rows = parse_table(&text);
    let listed = listed_kernels();
    let in_table: Vec<String> = rows.iter().map(|r| r.kernel.clone()).collect();
    let mut sorted = in_table.clone();
    sorted.sort();
    assert_eq!(sorted, listed, "{TABLE} rows differ from the instantiation lists: bless with nvcc");
    for r in &rows {
        assert_eq!(r.arch, ARCH);
        let occ = row_for(&r.kernel, &Measured { regs: r.max_regs, smem: r.smem, ..Default::default() });
        assert_eq!(
            (r.threads, r.needs.as_str()),
            (occ.threads, occ.needs.as_str()),
            "{}: launch_rules changed",
            r.kernel
        );
        assert_eq!(
            (r.blocks_per_sm, r.occupancy_pct),
            (occ.blocks_per_sm, occ.occupancy_pct),
            "{}",
            r.kernel
        );
        assert!(
            r.max_spill == 0 || KNOWN_SPILLS.iter().any(|(n, _)| *n == r.kernel),
            "{}: unrecorded spill",
            r.kernel
        );
    }
    let doc = fs::read_to_string(root().join("BENCHMARKS.md")).unwrap();
    let fresh = replace_section(&doc, &benchmarks_section(&text, &rows))
        .expect("BENCHMARKS.md lacks the ptxas-budget markers");
    assert!(
        fresh == doc,
        "BENCHMARKS.md's ptxas table differs from {TABLE}: run `HEADWISE_BLESS=1 cargo test --test ptxas_budget`"
    );
}

#[test]
fn h100_occupancy_arithmetic() {
    // 255 regs x 128 threads: 8192 regs per warp, 8 warps fit, 2 blocks of 4 warps.
    assert_eq!(h100_blocks_per_sm(255, 0, 128), 2);
    // 32 regs x 256 threads: thread-limited at 8 blocks (2048 threads).
    assert_eq!(h100_blocks_per_sm(32, 0, 256), 8);
    // 16 regs x 32 threads: the 32-block limit.
    assert_eq!(h100_blocks_per_sm(16, 0, 32), 32);
    // 45184 B smem + 1 KB reserved -> 46208 B per block: 5 blocks in 228 KB.
    assert_eq!(h100_blocks_per_sm(64, 45184, 128), 5);
    // A parse of real ptxas lines.
    let mut m = BTreeMap::new();
    parse_ptxas(
        "ptxas info    : Compiling entry function 'hw_x' for 'sm_90'\n\
         ptxas info    : Function properties for hw_x\n    \
         256 bytes stack frame, 1368 bytes spill stores, 512 bytes spill loads\n\
         ptxas info    : Used 255 registers, used 1 barriers, 256 bytes cumulative stack size, 20512 bytes smem\n",
        &mut m,
    );
    let x = &m["hw_x"];
    assert_eq!((x.regs, x.smem, x.stack, x.spill_stores, x.spill_loads), (255, 20512, 256, 1368, 512));
}
