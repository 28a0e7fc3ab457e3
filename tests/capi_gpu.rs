//! The C ABI's GPU entry points on a real GPU (`--features capi,gpu-tests`; with the features on
//! and no GPU they fail, so a GPU run cannot pass by skipping): the decode loop of
//! tests/common/capi_loop.rs, C functions on raw device pointers against the Rust API, bit for
//! bit, on the Rust store's own stream. tests/capi_emu.rs runs the same loop on the emulator.
#![cfg(all(feature = "capi", feature = "gpu-tests"))]

mod common;

use common::capi_loop::{CStoreUnderTest, decode_loop_matches_the_rust_api, ok};
use half::{bf16, f16};
use headwise::capi::*;
use headwise::store::Elem;
use headwise::{GpuBuf, GpuStore};
use std::ffi::c_void;
use std::ptr::null_mut;

impl CStoreUnderTest for GpuStore {
    fn c_handle(&self) -> *mut HeadwiseStore {
        let mut out = null_mut();
        // SAFETY: the store's own stream (primary context of its device); out-pointer to a local.
        ok(unsafe { headwise_gpu_create(0, self.stream().cu_stream().cast(), &mut out) });
        out
    }
    unsafe fn view<T: Elem>(ptr: *mut c_void, len: usize) -> GpuBuf<T> {
        // SAFETY: forwarded.
        unsafe { GpuBuf::borrowed(ptr, len) }
    }
}

fn store() -> GpuStore {
    GpuStore::new(0).unwrap_or_else(|e| panic!("gpu-tests enabled but no usable GPU: {e}"))
}

#[test]
fn c_abi_decode_loop_matches_the_rust_api_bf16() {
    decode_loop_matches_the_rust_api::<_, bf16>(&store(), HEADWISE_DTYPE_BF16, HEADWISE_DTYPE_F16);
}

#[test]
fn c_abi_decode_loop_matches_the_rust_api_f16() {
    decode_loop_matches_the_rust_api::<_, f16>(&store(), HEADWISE_DTYPE_F16, HEADWISE_DTYPE_BF16);
}
