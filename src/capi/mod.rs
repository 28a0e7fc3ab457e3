//! The C ABI (feature `capi`): `extern "C"` functions over raw pointers and a CUDA stream, for
//! engines written in C or C++. The header `include/headwise.h` is generated from this file by
//! cbindgen (`tests/cbindgen_fresh.rs` keeps it current); the README section "Linking from an
//! engine (C ABI)" is the user's guide. The rules every function follows:
//!
//! - **Status codes.** Every function returns an `int`: [`HEADWISE_OK`] (0) or one code per
//!   [`Error`](crate::Error) variant, plus [`HEADWISE_ERROR_PANIC`] for a bug caught at the boundary. No panic
//!   unwinds into C: every body runs under `catch_unwind` (so the library must be built with
//!   `panic = "unwind"`, Cargo's default).
//! - **Last error.** Every function except the three getters (`headwise_last_error_code`,
//!   `headwise_last_error_message`, `headwise_status_name`) replaces the calling thread's last
//!   error: empty after success, the `Error`'s message after a failure.
//! - **Arguments.** NULL pointers, misaligned pointers, unknown enum values, sizes that disagree
//!   with a handle's shape and arithmetic overflow are reported as
//!   [`HEADWISE_ERROR_INVALID_ARGUMENT`], never undefined behaviour. What cannot be checked
//!   (that a non-NULL pointer really points to enough live memory, that a handle is live) is the
//!   caller's promise, as in any C library.
//! - **Handles** are opaque, created by `*_create`/`*_parse` functions and released by the
//!   matching `*_free` (NULL is accepted and ignored). A failed creation stores NULL in `*out`.
//!   Handles are not synchronized: one thread at a time per handle, and per store handle
//!   together with the caches and rings made from it.
//! - **Stores.** A store handle says where memory lives and kernels run: a CUDA device and the
//!   engine's stream (`headwise_gpu_create`; caches take device pointers), or the CPU SIMT
//!   emulator (`headwise_emulator_create`; caches take host pointers), which runs the same
//!   kernels on a machine without a GPU. Every other function is the same for both.
//! - **GPU calls** enqueue on the engine's stream and return without waiting (see the function
//!   docs for the exceptions); they leave the calling thread's current CUDA context as they
//!   found it. Emulator calls return when their kernels have run.
//!
//! The module is split by concern: `errors` (status codes, last error, the boundary), `args`
//! (argument checks), `layout`, `policy`, `store` (GPU and emulator stores), `cache`,
//! `attention`, `select` and `evict`. Everything public is re-exported here, so the C names and
//! `headwise::capi::*` stay flat.

mod args;
mod attention;
mod cache;
mod errors;
mod evict;
mod layout;
mod policy;
mod select;
mod store;

pub use args::*;
pub use attention::*;
pub use cache::*;
pub use errors::*;
pub use evict::*;
pub use layout::*;
pub use policy::*;
pub use select::*;
pub use store::*;
