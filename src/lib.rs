//! headwise: CUDA kernels for head-wise, variable-budget KV-cache attention.
//!
//! Each (sequence, layer, KV head) keeps its own number of cached tokens in real ragged storage
//! ([`layout`]); kernels append, compress and attend over it. Every kernel runs three ways: on
//! the GPU ([`gpu::GpuStore`]), through the CPU SIMT emulator from the same CUDA source
//! ([`emu::EmuStore`]), and as a plain CPU [`reference`](mod@reference). See ARCHITECTURE.md for the map.
#![deny(missing_docs)]
#![doc = include_str!("../README.md")]

pub mod attention;
pub mod cache;
#[cfg(feature = "capi")]
pub mod capi;
pub mod dtype;
pub mod emu;
pub mod error;
pub mod gpu;
pub mod invariants;
mod kernels;
pub mod layout;
#[rustfmt::skip]
pub mod params;
pub mod policy;
pub mod redundancy;
pub mod reference;
pub mod select;
#[doc(hidden)]
pub mod simt_selftest;
pub mod store;

pub use attention::{AttentionOptions, AttentionWorkspace};
pub use cache::LayerCache;
pub use dtype::{DType, KvElem};
pub use emu::{EmuBuf, EmuStore};
pub use error::{Error, Result};
pub use gpu::{GpuBuf, GpuStore};
pub use layout::{LayerLayout, LayoutBuilder, Segment, SegmentMode};
pub use store::Store;
