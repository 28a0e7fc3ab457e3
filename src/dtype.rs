//! Element types of the cache: f16 and bf16 (the `half` crate's types, bit-compatible with
//! CUDA's `__half` and `__nv_bfloat16`).

use crate::store::Elem;

/// A K/V element type the kernels support.
pub trait KvElem: Elem + Default + std::fmt::Debug {
    /// The runtime tag of this type.
    const DTYPE: DType;
    /// Converts from f32 (round to nearest even, as CUDA's `__float2half`/`__float2bfloat16`).
    fn from_f32(x: f32) -> Self;
    /// Converts to f32 (exact).
    fn to_f32(self) -> f32;
}

/// Runtime tag of a [`KvElem`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        2
    }
    /// Short name used in kernel names and messages.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

impl KvElem for half::f16 {
    const DTYPE: DType = DType::F16;
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}

impl KvElem for half::bf16 {
    const DTYPE: DType = DType::BF16;
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
}

/// Head dimensions the kernels are instantiated for.
pub const SUPPORTED_HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// Checks `head_dim` against [`SUPPORTED_HEAD_DIMS`].
pub fn check_head_dim(head_dim: usize) -> crate::Result<()> {
    if SUPPORTED_HEAD_DIMS.contains(&head_dim) {
        Ok(())
    } else {
        Err(crate::Error::invalid(
            "head_dim",
            format!("{head_dim} is not supported; supported: 64, 128, 256"),
        ))
    }
}
