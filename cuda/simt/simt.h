// CPU SIMT emulator: what compat.cuh gives kernel sources when the compiler is not nvcc.
//
// The same .cu files compile with the host C++ compiler against this header and run on the CPU
// with real SIMT semantics, so kernels are tested on machines without a GPU:
//   - one cooperative fiber per CUDA thread on the launching OS thread; blocks run one after
//     another, the threads of a block take turns and switch only at barriers, warp collectives
//     and exit (fiber.h, sched.cpp);
//   - __syncthreads, __syncwarp, shuffles, votes, matches and reductions honor their masks and
//     report misuse (divergent barriers, lanes that never arrive, mismatched collectives,
//     deadlocks, reads from lanes that take no part) as errors naming block, thread, lane and
//     the kernel's file:line, instead of hanging or returning garbage (sync.h);
//   - HEADWISE_EMU_SCHEDULE=forward|reverse|random|random:<seed> picks the order in which
//     threads (and blocks) run, so that races hidden by one order show in another;
//   - HEADWISE_EMU_ADVERSARIAL=all|<list> turns on stricter checks than the defaults: random
//     WMMA fragment layouts, masks naming exited lanes, shuffled order with more yield points,
//     poisoned static shared memory, the >48 KiB dynamic shared memory opt-in (adversarial.h);
//   - __half/__nv_bfloat16 bit-identical to the toolkit (half.h), nvcuda::wmma (wmma.h), the
//     usual intrinsics and atomics (intrinsics.h).
// Not modeled: memory-ordering bugs (execution is sequentially consistent), spin-waits on other
// threads (a thread only yields at a collective, so a spin loop never ends), grid-wide sync,
// clusters, TMA, cp.async, inline PTX (guard it with #ifdef __CUDA_ARCH__, which is undefined
// here, as is __CUDACC__).
#pragma once

#ifdef __CUDACC__
#error "simt/simt.h is the host emulator; nvcc builds get CUDA itself through compat.cuh"
#endif

#include "params.h"

#include "half.h"
#include "intrinsics.h"
#include "runtime.h"
#include "sync.h"
#include "traffic.h"
#include "types.h"
#include "wmma.h"

#define HW_SIMT_EMULATOR 1

// The emulator's kernel entry point: hw_emu_<name>(params, launch, err) runs `call` once per
// thread of the grid with `p` bound to a copy of the parameters (read-only, as in CUDA).
#define HW_KERNEL_ENTRY_BOUNDED(name, ParamsT, max_threads, call)                                 \
    static void hw_simt_body_##name(const void* hw_simt_params) {                                 \
        const ParamsT& p = *static_cast<const ParamsT*>(hw_simt_params);                          \
        call;                                                                                      \
    }                                                                                              \
    extern "C" int hw_emu_##name(const void* params, const HwLaunch* launch, HwEmuError* err) {  \
        ParamsT p{};                                                                               \
        if (params != nullptr) p = *static_cast<const ParamsT*>(params);                           \
        return ::hw_simt::launch(#name, &hw_simt_body_##name, params != nullptr ? &p : nullptr,  \
                                 (max_threads), launch, err);                                      \
    }
#define HW_KERNEL_ENTRY(name, ParamsT, call) HW_KERNEL_ENTRY_BOUNDED(name, ParamsT, 1024, call)

// The block's dynamic shared memory: a fresh heap buffer of the launch's dyn_smem_bytes, 128-byte
// aligned, filled with 0xffa5 half-words (a NaN in every float width, an unlikely integer) at
// every block start so that reads before writes show; ASan sees its exact size.
#define HW_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::hw_simt::dynamic_shared())
