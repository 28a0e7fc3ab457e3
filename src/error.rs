//! The crate's one error type. Every public entry point validates its inputs on the host and
//! returns one of these before anything is launched.

use thiserror::Error;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a headwise call.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// An argument is out of range or inconsistent: `field` names it, `reason` states the bound.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The argument or field at fault, e.g. `segments[3].len`.
        field: String,
        /// What was expected and what was given.
        reason: String,
    },
    /// A `Full` segment has no free row left; compress it or regrow the layout first.
    #[error("segment {segment} is full ({capacity} rows): compress it or regrow the layout")]
    SegmentFull {
        /// Segment index (`sequence * kv_heads + kv_head`).
        segment: usize,
        /// Its capacity in rows.
        capacity: u32,
    },
    /// No usable CUDA driver or device.
    #[error("no GPU available: {0}")]
    NoGpu(String),
    /// The library was built without nvcc, so it carries no GPU kernels.
    #[error(
        "headwise was built without nvcc, so it has no GPU kernels: install CUDA (or \
         `pip install nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96 \
         nvidia-cuda-cccl==13.0.85 nvidia-nvvm==13.0.88`), set NVCC if needed, and rebuild"
    )]
    NoKernels,
    /// An error reported by the CUDA driver.
    #[cfg(feature = "cuda")]
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    /// The call needs a backend this build left out: `feature` is `cuda` (the GPU path) or
    /// `emulator` (the CPU SIMT emulator). Only the C ABI, whose functions exist in every
    /// build, reports it; in Rust the missing backend's types do not exist.
    #[error("headwise was built without the `{feature}` feature, which this call needs")]
    FeatureOff {
        /// The Cargo feature that is off.
        feature: &'static str,
    },
    /// A compaction broke one of its guarantees (a kept row differs from its source, a window
    /// or sink token is missing, a count differs from the budget). Only raised when the
    /// invariant checks are on ([`crate::invariants`]); it means a bug in headwise.
    #[error("invariant violated after {operation}: {detail}")]
    Invariant {
        /// The operation that was checked (`select::compress`, `redundancy::evict`,
        /// `heavy_hitters::evict_by_mass`, `regrow`).
        operation: &'static str,
        /// What was found.
        detail: String,
    },
    /// The CPU SIMT emulator found a bug in a kernel run (divergent barrier, deadlock, bad
    /// shuffle mask, ...) or rejected the launch.
    #[error("emulator, kernel {kernel}: {message}")]
    Emulator {
        /// Kernel name.
        kernel: &'static str,
        /// The emulator's report: block, thread, lane and source line.
        message: String,
    },
}

impl Error {
    /// Shorthand for [`Error::Invalid`].
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::Invalid { field: field.into(), reason: reason.into() }
    }
}
