//! The C ABI on the emulator store (`headwise_emulator_create`, `--features capi`): the decode
//! loop of tests/common/capi_loop.rs, C functions against the Rust API bit for bit, in both
//! dtypes, plus the emulator handle's own argument checks. Runs everywhere: no GPU needed.
#![cfg(all(feature = "capi", feature = "emulator"))]

mod common;

use common::capi_loop::{CStoreUnderTest, decode_loop_matches_the_rust_api, ok};
use half::{bf16, f16};
use headwise::capi::*;
use headwise::store::Elem;
use headwise::{EmuBuf, EmuStore};
use std::ffi::c_void;
use std::ptr::null_mut;

impl CStoreUnderTest for EmuStore {
    fn c_handle(&self) -> *mut HeadwiseStore {
        let mut out = null_mut();
        // SAFETY: out-pointer to a local.
        ok(unsafe { headwise_emulator_create(&mut out) });
        out
    }
    unsafe fn view<T: Elem>(ptr: *mut c_void, len: usize) -> EmuBuf<T> {
        // SAFETY: forwarded.
        unsafe { EmuBuf::borrowed(ptr.cast(), len) }.unwrap()
    }
}

#[test]
fn c_abi_decode_loop_on_the_emulator_matches_the_rust_api_bf16() {
    decode_loop_matches_the_rust_api::<_, bf16>(&EmuStore, HEADWISE_DTYPE_BF16, HEADWISE_DTYPE_F16);
}

#[test]
fn c_abi_decode_loop_on_the_emulator_matches_the_rust_api_f16() {
    decode_loop_matches_the_rust_api::<_, f16>(&EmuStore, HEADWISE_DTYPE_F16, HEADWISE_DTYPE_BF16);
}

/// Emulator memory is host memory: misaligned and NULL pointers are refused by name, and a
/// ring of the emulator cannot evict a cache of another store.
#[test]
fn emulator_handle_checks_its_arguments() {
    let store = EmuStore.c_handle();
    let mut layout: *mut HeadwiseLayout = null_mut();
    let budgets = [8u32, 8];
    // SAFETY: arrays of 2 elements; out-pointer to a local.
    ok(unsafe {
        headwise_layout_pack(1, 2, 0, std::ptr::null(), budgets.as_ptr(), null_mut(), null_mut(), &mut layout)
    });
    let mut mem = vec![0u128; 16 * 64 * 2 / 16 + 1];
    let base = mem.as_mut_ptr().cast::<u8>();
    let mut cache: *mut HeadwiseCache = null_mut();
    // SAFETY: mem holds 16 rows * 64 * 2 bytes (+16); out-pointers to locals.
    unsafe {
        assert_eq!(
            headwise_cache_create(
                store,
                layout,
                HEADWISE_DTYPE_BF16,
                64,
                null_mut(),
                base.cast(),
                &mut cache
            ),
            HEADWISE_ERROR_INVALID_ARGUMENT
        );
        assert!(cache.is_null());
        // 1 byte off: not even aligned for bf16.
        assert_eq!(
            headwise_cache_create(
                store,
                layout,
                HEADWISE_DTYPE_BF16,
                64,
                base.add(1).cast(),
                base.cast(),
                &mut cache
            ),
            HEADWISE_ERROR_INVALID_ARGUMENT
        );
        let mut msg = vec![0u8; 256];
        let n = headwise_last_error_message(msg.as_mut_ptr().cast(), msg.len());
        assert!(String::from_utf8_lossy(&msg[..n.min(255)]).contains('k'), "names the field");
        ok(headwise_cache_create(
            store,
            layout,
            HEADWISE_DTYPE_BF16,
            64,
            base.cast(),
            base.cast(),
            &mut cache,
        ));
        // 2 bytes off: aligned for bf16 but not for the kernels' 16-byte rows.
        let q = base.add(2).cast::<c_void>();
        let out = base.cast::<c_void>();
        assert_eq!(
            headwise_cache_attention(cache, q, 1, out, null_mut(), 0.0, 0),
            HEADWISE_ERROR_INVALID_ARGUMENT
        );
        ok(headwise_store_synchronize(store));
        ok(headwise_cache_free(cache));
        ok(headwise_layout_free(layout));
        ok(headwise_store_free(store));
    }
}
