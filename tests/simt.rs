//! Acceptance tests of the CPU SIMT emulator itself (`cuda/simt/`), through the self-test kernels
//! in `cuda/simt/selftest.cu`:
//! - exact results of barriers, shuffles, votes, atomics, shared memory, WMMA and half/bf16
//!   conversions, in every schedule order;
//! - planted kernel bugs reported in every order, naming the thread and the offending line;
//! - the schedule knob exposing a missing barrier that the default order hides;
//! - in sanitized builds, AddressSanitizer catching a shared-memory overrun at its line.
#![cfg(feature = "emulator")]

use headwise::simt_selftest as selftest;
use std::process::Command;

/// Orders every test runs under: the environment's (CI sets HEADWISE_EMU_SCHEDULE), then fixed
/// ones, then a fresh random seed (reports carry the seed for replay).
const SCHEDULES: &[Option<&str>] =
    &[None, Some("forward"), Some("reverse"), Some("random:1"), Some("random:2"), Some("random")];

const SELFTEST_SOURCE: &str = include_str!("../cuda/simt/selftest.cu");

/// "selftest.cu:<line>" of the line carrying the `@planted:<marker>` comment.
fn planted_site(marker: &str) -> String {
    let tag = format!("@planted:{marker}");
    let lines: Vec<usize> = SELFTEST_SOURCE
        .lines()
        .enumerate()
        .filter(|(_, text)| text.trim_end().ends_with(&tag))
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(lines.len(), 1, "marker {tag} must occur on exactly one line of selftest.cu");
    format!("selftest.cu:{}", lines[0])
}

fn under_schedule<R>(schedule: Option<&str>, f: impl FnOnce() -> R) -> R {
    match schedule {
        Some(spec) => selftest::with_schedule(spec, f).expect("valid schedule"),
        None => f(),
    }
}

fn expect_exact(test: &str) {
    for &schedule in SCHEDULES {
        if let Err(e) = under_schedule(schedule, || selftest::run(test)) {
            panic!("{test} (schedule {}): {e}", schedule.unwrap_or("from the environment"));
        }
    }
}

/// Checks that the planted bug is reported in every order, and that the report names every
/// marked line and contains each of `phrases`.
fn expect_report(test: &str, markers: &[&str], phrases: &[&str]) {
    for &schedule in SCHEDULES {
        let order = schedule.unwrap_or("from the environment");
        let report = match under_schedule(schedule, || selftest::run(test)) {
            Ok(()) => panic!("{test} (schedule {order}): the planted bug was not reported"),
            Err(report) => report,
        };
        for marker in markers {
            let site = planted_site(marker);
            assert!(
                report.contains(&site),
                "{test} (schedule {order}): report does not name {site}: {report}"
            );
        }
        for phrase in phrases {
            assert!(report.contains(phrase), "{test} (schedule {order}): report lacks {phrase:?}: {report}");
        }
    }
}

#[test]
fn every_self_test_is_covered() {
    let source = include_str!("simt.rs");
    for name in selftest::POSITIVE.iter().chain(selftest::PLANTED) {
        assert!(source.contains(&format!("\"{name}\"")), "self-test {name} is not run by tests/simt.rs");
    }
}

#[test]
fn shuffles_with_widths() {
    expect_exact("shuffles");
}

#[test]
fn votes_matches_and_reductions_with_partial_masks() {
    // Full masks over a partial warp: allowed by default, an error in the masks mode.
    lenient(|| expect_exact("votes"));
}

#[test]
fn half_warps_with_disjoint_masks() {
    expect_exact("disjoint_masks");
}

#[test]
fn block_barriers_count_and_or() {
    expect_exact("block_reductions");
}

#[test]
fn block_of_1024_threads() {
    expect_exact("big_block");
}

#[test]
fn atomics_from_many_blocks() {
    expect_exact("atomics");
}

#[test]
fn dynamic_shared_memory_is_aligned_and_poisoned() {
    expect_exact("dynamic_shared");
}

#[test]
fn static_shared_memory_across_blocks() {
    expect_exact("static_shared");
}

#[test]
fn wmma_f16_matches_a_plain_loop() {
    expect_exact("wmma_f16");
}

#[test]
fn wmma_bf16_matches_a_plain_loop() {
    expect_exact("wmma_bf16");
}

#[test]
fn vector_types_have_cuda_alignment() {
    expect_exact("vector_types");
}

#[test]
fn half_and_bf16_conversions_are_exact() {
    expect_exact("conversions");
}

#[test]
fn invalid_launches_are_refused() {
    expect_exact("launch_errors");
}

#[test]
fn a_kernel_error_leaves_the_emulator_usable() {
    expect_exact("recovery");
}

#[test]
fn invalid_schedule_is_refused() {
    let err = selftest::set_thread_schedule(Some("sideways")).unwrap_err();
    assert!(err.contains("sideways"), "{err}");
    selftest::set_thread_schedule(Some("random:12")).unwrap();
    selftest::set_thread_schedule(None).unwrap();
}

#[test]
fn early_return_before_barrier() {
    expect_report("planted_early_return", &["early-return"], &["thread (5,0,0)", "early return"]);
}

#[test]
fn threads_at_different_barriers() {
    expect_report(
        "planted_divergent_barrier",
        &["divergent-low", "divergent-high"],
        &["divergent __syncthreads"],
    );
}

#[test]
fn shuffle_reading_an_exited_lane() {
    // The default report; the masks mode reports the exit itself (while others wait).
    lenient(|| {
        expect_report(
            "planted_lane_exited",
            &["lane-exited"],
            &["thread (6,0,0) [warp 0, lane 6]", "reads lane 7, which has exited"],
        )
    });
}

#[test]
fn lane_waiting_at_another_collective() {
    expect_report("planted_lane_elsewhere", &["elsewhere-ballot", "elsewhere-shfl"], &["same collective"]);
}

#[test]
fn lane_missing_from_its_own_mask() {
    // The default report (other lanes' masks name exited lanes, which the masks mode reports).
    lenient(|| {
        expect_report(
            "planted_mask_without_self",
            &["mask-without-self"],
            &["thread (0,0,0) [warp 0, lane 0]", "does not name the calling lane 0"],
        )
    });
}

#[test]
fn mismatched_collectives() {
    expect_report("planted_mismatched_collectives", &["mismatch-xor", "mismatch-down"], &["same collective"]);
}

#[test]
fn collectives_waiting_in_a_cycle() {
    expect_report(
        "planted_cyclic_wait",
        &["cycle-lane0", "cycle-lane1"],
        &["thread (0,0,0) [warp 0, lane 0]", "deadlock"],
    );
}

#[test]
fn warps_deadlocked_between_barrier_and_shuffles() {
    expect_report(
        "planted_deadlock",
        &["deadlock-shfl", "deadlock-barrier"],
        &["thread (1,0,0) [warp 0, lane 1]", "deadlock"],
    );
}

#[test]
fn misaligned_wmma_pointer() {
    expect_report("planted_wmma_misaligned", &["wmma-misaligned"], &["256-bit aligned"]);
}

#[test]
fn schedule_order_exposes_a_missing_barrier() {
    // The its mode would replace the fixed orders with random ones.
    let race =
        |spec| lenient(|| selftest::with_schedule(spec, selftest::race_wrong_values).unwrap().unwrap());
    assert_eq!(race("forward"), 0, "forward order runs each writer before its reader");
    let reverse = race("reverse");
    assert_eq!(reverse, 255, "reverse order runs every reader but thread 0 before its writer");
    let random = race("random:1");
    assert!(random > 0 && random < 255, "random order: {random} stale reads");
}

const OVERRUN_CHILD: &str = "HEADWISE_SIMT_OVERRUN_CHILD";

/// Re-runs this test binary as a child that performs the overrun, and checks how it died.
#[test]
fn shared_memory_overrun_is_caught_by_asan() {
    if std::env::var_os(OVERRUN_CHILD).is_some() {
        // The child: AddressSanitizer ends the process here; returning means it did not.
        let outcome = selftest::shared_overrun();
        println!("overrun was not caught: {outcome:?}");
        return;
    }
    if !selftest::built_with_asan() {
        println!(
            "not run: build with HEADWISE_EMU_SANITIZE=1 and run with \
             LD_PRELOAD=$(cc -print-file-name=libasan.so) to check shared-memory overruns"
        );
        return;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new(exe)
        .args(["--exact", "shared_memory_overrun_is_caught_by_asan", "--nocapture", "--test-threads=1"])
        .env(OVERRUN_CHILD, "1")
        // UBSan's bounds check sees the same write first; let it report and go on to ASan's.
        .env("UBSAN_OPTIONS", "halt_on_error=0:print_stacktrace=1")
        .output()
        .expect("run the child test process");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let site = planted_site("shared-overrun");
    assert!(!out.status.success(), "the child survived the overrun:\n{stderr}");
    assert!(stderr.contains("ERROR: AddressSanitizer"), "no AddressSanitizer report:\n{stderr}");
    assert!(stderr.contains(&site), "the report does not name {site}:\n{stderr}");
}

/// Runs `f` with every adversarial mode off (tests of the emulator's default behaviour).
fn lenient<R>(f: impl FnOnce() -> R) -> R {
    selftest::with_adversarial("none", f).expect("valid modes")
}

#[test]
fn invalid_adversarial_modes_are_refused() {
    let err = selftest::set_thread_adversarial(Some("wmma,sideways")).unwrap_err();
    assert!(err.contains("\"sideways\" is not one of"), "{err}");
    selftest::set_thread_adversarial(Some("wmma,masks,its,poison,smem_optin")).unwrap();
    selftest::set_thread_adversarial(Some("all")).unwrap();
    selftest::set_thread_adversarial(None).unwrap();
}

/// Each adversarial mode's planted bug passes with the mode off (forward order) and is caught
/// with it on, with `phrase` in the report.
fn expect_adversarial(mode: &str, phrase: &str) {
    assert!(selftest::ADVERSARIAL_MODES.contains(&mode));
    selftest::with_schedule("forward", || {
        // Under HEADWISE_EMU_ADVERSARIAL=poison, concurrent tests poison static shared memory at
        // every block start, so the mode-off run cannot count on the zeros it wrongly expects.
        let env_poisons = std::env::var("HEADWISE_EMU_ADVERSARIAL")
            .is_ok_and(|v| v.split(',').any(|m| m == "all" || m == "poison"));
        if mode == "poison" && env_poisons {
            eprintln!("poison off: skipped (HEADWISE_EMU_ADVERSARIAL poisons shared memory meanwhile)");
        } else if let Err(e) = selftest::adversarial(mode, false) {
            panic!("{mode} off: the planted bug should go unseen, but: {e}");
        }
        match selftest::adversarial(mode, true) {
            Ok(()) => panic!("{mode} on: the planted bug was not caught"),
            Err(report) => assert!(report.contains(phrase), "{mode} on: report lacks {phrase:?}: {report}"),
        }
    })
    .unwrap();
}

#[test]
fn adversarial_wmma_permutes_fragment_elements() {
    expect_adversarial("wmma", "not tile element");
}

#[test]
fn adversarial_masks_refuse_exited_lanes() {
    expect_adversarial("masks", "__ballot_sync");
    expect_adversarial("masks", "[adversarial masks]");
    expect_adversarial("masks", &planted_adversarial_site("mask-exited"));
}

#[test]
fn adversarial_its_exposes_a_missing_syncwarp() {
    expect_adversarial("its", "stale read");
}

#[test]
fn adversarial_poison_fills_static_shared_memory() {
    if selftest::built_with_asan() {
        // cuda/simt/types.h: the ASan build keeps static shared memory out of the poisoned
        // section so that ASan's redzones guard it; the other CI steps run this check.
        println!("not run: static shared memory is not poisoned in the AddressSanitizer build");
        return;
    }
    expect_adversarial("poison", "uninitialized shared memory");
}

#[test]
fn adversarial_smem_optin_refuses_big_launches_without_the_attribute() {
    expect_adversarial("smem_optin", "without the opt-in");
}

/// "adversarial_selftest.cu:<line>" of the line carrying `@planted:<marker>`.
fn planted_adversarial_site(marker: &str) -> String {
    let source = include_str!("../cuda/simt/adversarial_selftest.cu");
    let tag = format!("@planted:{marker}");
    let line = source.lines().position(|l| l.trim_end().ends_with(&tag)).expect("marker") + 1;
    format!("adversarial_selftest.cu:{line}")
}
