//! Packed prompts (token-major with cu_seqlens, mixed lengths in one launch) on the emulator,
//! every dtype, head_dim and a range of group sizes: tests/common/packed.rs.
#![cfg(feature = "emulator")]

mod common;

use half::{bf16, f16};
use headwise::EmuStore;
use headwise::dtype::SUPPORTED_HEAD_DIMS;

#[test]
fn packed_prompts_match_head_major_every_dtype_and_head_dim() {
    for d in SUPPORTED_HEAD_DIMS {
        common::packed::packed_prompts_match_head_major::<_, f16>(&EmuStore, d, 2, 3 + d as u64);
        common::packed::packed_prompts_match_head_major::<_, bf16>(&EmuStore, d, 2, 5 + d as u64);
    }
}

#[test]
fn packed_prompts_match_head_major_group_sizes() {
    for g in [1, 4, 8] {
        common::packed::packed_prompts_match_head_major::<_, bf16>(&EmuStore, 64, g, 7 + g as u64);
    }
}
