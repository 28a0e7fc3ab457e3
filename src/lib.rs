//! headwise: CUDA kernels for head-wise, variable-budget KV-cache attention.
//!
//! Each (sequence, layer, KV head) keeps its own number of cached tokens in real ragged storage
//! ([`layout`]); kernels append, compress and attend over it. Every kernel runs three ways: on
//! the GPU (`gpu::GpuStore`, feature `cuda`), through the CPU SIMT emulator from the same CUDA
//! source (`emu::EmuStore`, feature `emulator`), and as a plain CPU [`reference`](mod@reference).
//! Both features are on by default. See ARCHITECTURE.md for the map.
#![deny(missing_docs)]
#![doc = include_str!("../README.md")]

pub mod attention;
pub mod cache;
#[cfg(feature = "capi")]
pub mod capi;
// The C ABI's store handles need a backend; layouts and policies alone are the Rust API's.
#[cfg(all(feature = "capi", not(any(feature = "cuda", feature = "emulator"))))]
compile_error!("the `capi` feature needs the `cuda` or the `emulator` feature (or both, the default)");
pub mod dtype;
#[cfg(feature = "emulator")]
pub mod emu;
pub mod error;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod heavy_hitters;
pub mod invariants;
mod kernels;
pub mod layout;
#[rustfmt::skip]
pub mod params;
pub mod policy;
pub mod prompt;
pub mod redundancy;
pub mod reference;
pub mod scores;
pub mod select;
#[cfg(feature = "emulator")]
#[doc(hidden)]
pub mod simt_selftest;
pub mod store;

pub use attention::{AttentionOptions, AttentionWorkspace};
pub use cache::LayerCache;
pub use dtype::{DType, KvElem};
#[cfg(feature = "emulator")]
pub use emu::{EmuBuf, EmuStore};
pub use error::{Error, Result};
#[cfg(feature = "cuda")]
pub use gpu::{GpuBuf, GpuStore};
pub use layout::{LayerLayout, LayoutBuilder, Segment, SegmentMode};
pub use store::Store;
