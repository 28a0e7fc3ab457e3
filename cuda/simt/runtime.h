// The emulator's runtime interface: what the CUDA-named functions in the other headers and the
// kernel entry macro call into (implemented in sched.cpp). Kernel code never calls these
// directly.
#pragma once

#include <cstdint>

#include "params.h"

namespace hw_simt {

// Warp-wide operations. Lanes meet at one of these, the scheduler checks that they agree (same
// operation, same mask) and computes every lane's result once all lanes named in the mask have
// arrived.
enum class WarpOp : uint8_t {
    SyncWarp,
    ShflIdx,
    ShflUp,
    ShflDown,
    ShflXor,
    Ballot,
    Any,
    All,
    MatchAny,
    MatchAll,
    ReduceAdd,
    ReduceMinU,
    ReduceMinS,
    ReduceMaxU,
    ReduceMaxS,
    ReduceAnd,
    ReduceOr,
    ReduceXor,
    // WMMA (through warp_task).
    WmmaLoad,
    WmmaStore,
    WmmaMma,
};

enum class BarrierOp : uint8_t { Sync, Count, And, Or };

// Deposits `value` for the calling lane and returns once every lane named in `mask` has arrived
// (lanes that exited are not waited for). Shuffles use b (source lane, delta or lane mask) and
// width; match uses width for the operand size in bytes. Reports a kernel error (and never
// returns) on a misuse, naming file:line, which the CUDA-named wrappers take from their call site.
uint64_t warp_collective(WarpOp op, uint32_t mask, uint64_t value, int32_t b, int32_t width,
                         const char* file, int line);

// Work that a whole warp performs at once when it converges (WMMA): the lanes arrive with
// their own task objects, and the last one to arrive runs complete() on all of them before any
// lane continues, as the warp would in lockstep. complete() returns -1, or the lane whose task
// does not agree with lane 0's (which abandons the kernel with an error naming that lane).
struct WarpTask {
    int (*complete)(WarpTask* const* lane_tasks);
};

// A collective over the full warp (all 32 lanes must take part) that runs `task` once every
// lane has arrived; value, b and width must be the same in every lane (WMMA: pointer, leading
// dimension, layout).
void warp_task(WarpOp op, WarpTask* task, uint64_t value, int32_t b, int32_t width,
               const char* file, int line);

// __syncthreads and its count/and/or forms; returns the block-wide count or flag.
int block_barrier(BarrierOp op, int predicate, const char* file, int line);

// Under HEADWISE_EMU_ADVERSARIAL=its, lets another thread run (atomics and fences call it);
// otherwise, and outside a launch, does nothing.
void yield_point();

// Lanes of the calling thread's warp that have not exited.
uint32_t live_lanes();

// The running block's dynamic shared memory (null when the launch asked for none).
unsigned char* dynamic_shared();

// Abandons the running kernel with an error at file:line.
[[noreturn]] void kernel_error(const char* file, int line, const char* format, ...)
    __attribute__((format(printf, 3, 4)));

// Runs body(params) once per thread of the grid described by `launch`, at most
// `max_block_threads` threads per block (a kernel's __launch_bounds__). Returns 0, or nonzero
// with err->message filled (err may be null) when the launch is invalid or the kernel misbehaves.
using KernelBody = void (*)(const void* params);
int launch(const char* kernel, KernelBody body, const void* params, uint32_t max_block_threads,
           const HwLaunch* launch, HwEmuError* err);

}  // namespace hw_simt
