// The one header every kernel includes. Kernel sources compile unchanged with nvcc (GPU) and
// with the host C++ compiler, where they run on the CPU SIMT emulator in simt/ (tests without a
// GPU). Both sides provide:
//   HW_KERNEL_ENTRY(name, ParamsT, call)         entry point `name` running `call` (which
//   HW_KERNEL_ENTRY_BOUNDED(name, ParamsT, n, call)  sees the parameters as `p`); _BOUNDED adds
//                                                __launch_bounds__(n)
//   HW_DYNAMIC_SHARED(T, name);                  T* name = the block's dynamic shared memory
//   HW_SIMT_EMULATOR                             1 under the emulator, 0 under nvcc
// plus the CUDA language, fp16/bf16 types and nvcuda::wmma. Under the emulator neither
// __CUDACC__ nor __CUDA_ARCH__ is defined, so `#ifdef __CUDA_ARCH__` guards inline PTX and
// other device-only code (give the host a plain fallback).
#ifndef HEADWISE_COMPAT_CUH
#define HEADWISE_COMPAT_CUH

#include "params.h"

#ifdef __CUDACC__

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#define HW_SIMT_EMULATOR 0

// GPU entry point: extern "C" so that the driver finds it by name, parameters by value.
#define HW_KERNEL_ENTRY(name, ParamsT, call) \
    extern "C" __global__ void name(const ParamsT p) { call; }
#define HW_KERNEL_ENTRY_BOUNDED(name, ParamsT, max_threads, call) \
    extern "C" __global__ void __launch_bounds__(max_threads) name(const ParamsT p) { call; }

// One file-scope declaration: a block-scope `extern __shared__` array in an extern "C" kernel
// clashes with the same declaration inside a template instantiated in the same file.
extern "C" __shared__ __align__(16) unsigned char hw_dyn_smem[];
#define HW_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(hw_dyn_smem)

#else

#include "simt/simt.h"

#endif

#endif  // HEADWISE_COMPAT_CUH
