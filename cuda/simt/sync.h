// Block barriers, warp shuffles, votes, matches and reductions under their CUDA names.
//
// Each takes the caller's file and line as trailing default arguments, so the emulator's error
// reports point at the kernel's call site without any macro around the call.
#pragma once

#include <cstdint>
#include <cstring>

#include "half.h"
#include "runtime.h"
#include "types.h"

#define HW_SIMT_CALL_SITE const char *file = __builtin_FILE(), int line = __builtin_LINE()

inline void __syncthreads(HW_SIMT_CALL_SITE) {
    hw_simt::block_barrier(hw_simt::BarrierOp::Sync, 1, file, line);
}
inline int __syncthreads_count(int predicate, HW_SIMT_CALL_SITE) {
    return hw_simt::block_barrier(hw_simt::BarrierOp::Count, predicate, file, line);
}
inline int __syncthreads_and(int predicate, HW_SIMT_CALL_SITE) {
    return hw_simt::block_barrier(hw_simt::BarrierOp::And, predicate, file, line);
}
inline int __syncthreads_or(int predicate, HW_SIMT_CALL_SITE) {
    return hw_simt::block_barrier(hw_simt::BarrierOp::Or, predicate, file, line);
}

inline void __syncwarp(unsigned mask = 0xffffffffu, HW_SIMT_CALL_SITE) {
    hw_simt::warp_collective(hw_simt::WarpOp::SyncWarp, mask, 0, 0, 0, file, line);
}

// The emulator has no notion of which lanes happen to execute together, so this is every lane
// of the warp that has not exited: the most a converged warp could report. Code that needs the
// exact set of a divergent branch is not portable across GPU generations either.
inline unsigned __activemask() { return hw_simt::live_lanes(); }

inline unsigned __ballot_sync(unsigned mask, int predicate, HW_SIMT_CALL_SITE) {
    return static_cast<unsigned>(
        hw_simt::warp_collective(hw_simt::WarpOp::Ballot, mask, predicate != 0, 0, 0, file, line));
}
inline int __any_sync(unsigned mask, int predicate, HW_SIMT_CALL_SITE) {
    return static_cast<int>(
        hw_simt::warp_collective(hw_simt::WarpOp::Any, mask, predicate != 0, 0, 0, file, line));
}
inline int __all_sync(unsigned mask, int predicate, HW_SIMT_CALL_SITE) {
    return static_cast<int>(
        hw_simt::warp_collective(hw_simt::WarpOp::All, mask, predicate != 0, 0, 0, file, line));
}

namespace hw_simt {
namespace detail {

// Collectives move raw bits; 64-bit operands travel whole (the GPU does two 32-bit shuffles
// with the same lanes, which is indistinguishable).
template <class T>
inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "collective operands are at most 64 bits");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof v);
    return bits;
}
template <class T>
inline T from_bits(uint64_t bits) {
    T v;
    std::memcpy(static_cast<void*>(&v), &bits, sizeof v);  // T is trivially copyable
    return v;
}
template <class T>
inline T shuffle(WarpOp op, unsigned mask, T var, int32_t b, int width, const char* file, int line) {
    return from_bits<T>(warp_collective(op, mask, to_bits(var), b, width, file, line));
}

}  // namespace detail
}  // namespace hw_simt

// Non-template overloads, as in CUDA, so that arguments convert the way nvcc converts them.
#define HW_SIMT_SHUFFLES(T)                                                                      \
    inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize,                \
                         HW_SIMT_CALL_SITE) {                                                    \
        return hw_simt::detail::shuffle(hw_simt::WarpOp::ShflIdx, mask, var, srcLane, width,     \
                                        file, line);                                             \
    }                                                                                            \
    inline T __shfl_up_sync(unsigned mask, T var, unsigned int delta, int width = warpSize,      \
                            HW_SIMT_CALL_SITE) {                                                 \
        return hw_simt::detail::shuffle(hw_simt::WarpOp::ShflUp, mask, var,                      \
                                        static_cast<int32_t>(delta), width, file, line);         \
    }                                                                                            \
    inline T __shfl_down_sync(unsigned mask, T var, unsigned int delta, int width = warpSize,    \
                              HW_SIMT_CALL_SITE) {                                               \
        return hw_simt::detail::shuffle(hw_simt::WarpOp::ShflDown, mask, var,                    \
                                        static_cast<int32_t>(delta), width, file, line);         \
    }                                                                                            \
    inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize,           \
                             HW_SIMT_CALL_SITE) {                                                \
        return hw_simt::detail::shuffle(hw_simt::WarpOp::ShflXor, mask, var, laneMask, width,    \
                                        file, line);                                             \
    }

HW_SIMT_SHUFFLES(int)
HW_SIMT_SHUFFLES(unsigned int)
HW_SIMT_SHUFFLES(long)
HW_SIMT_SHUFFLES(unsigned long)
HW_SIMT_SHUFFLES(long long)
HW_SIMT_SHUFFLES(unsigned long long)
HW_SIMT_SHUFFLES(float)
HW_SIMT_SHUFFLES(double)
HW_SIMT_SHUFFLES(__half)
HW_SIMT_SHUFFLES(__half2)
HW_SIMT_SHUFFLES(__nv_bfloat16)
HW_SIMT_SHUFFLES(__nv_bfloat162)
#undef HW_SIMT_SHUFFLES

#define HW_SIMT_MATCHES(T)                                                                       \
    inline unsigned __match_any_sync(unsigned mask, T value, HW_SIMT_CALL_SITE) {                \
        return static_cast<unsigned>(                                                            \
            hw_simt::warp_collective(hw_simt::WarpOp::MatchAny, mask,                            \
                                     hw_simt::detail::to_bits(value), 0, sizeof(T), file, line)); \
    }                                                                                            \
    inline unsigned __match_all_sync(unsigned mask, T value, int* pred, HW_SIMT_CALL_SITE) {     \
        const unsigned lanes = static_cast<unsigned>(                                            \
            hw_simt::warp_collective(hw_simt::WarpOp::MatchAll, mask,                            \
                                     hw_simt::detail::to_bits(value), 0, sizeof(T), file, line)); \
        *pred = lanes != 0;                                                                      \
        return lanes;                                                                            \
    }

HW_SIMT_MATCHES(int)
HW_SIMT_MATCHES(unsigned int)
HW_SIMT_MATCHES(long)
HW_SIMT_MATCHES(unsigned long)
HW_SIMT_MATCHES(long long)
HW_SIMT_MATCHES(unsigned long long)
HW_SIMT_MATCHES(float)
HW_SIMT_MATCHES(double)
#undef HW_SIMT_MATCHES

// sm_80 warp reductions (redux.sync).
#define HW_SIMT_REDUCE(name, T, op)                                                              \
    inline T name(unsigned mask, T value, HW_SIMT_CALL_SITE) {                                   \
        return static_cast<T>(hw_simt::warp_collective(                                          \
            op, mask, static_cast<uint32_t>(value), 0, 0, file, line));                          \
    }

HW_SIMT_REDUCE(__reduce_add_sync, unsigned, hw_simt::WarpOp::ReduceAdd)
HW_SIMT_REDUCE(__reduce_add_sync, int, hw_simt::WarpOp::ReduceAdd)
HW_SIMT_REDUCE(__reduce_min_sync, unsigned, hw_simt::WarpOp::ReduceMinU)
HW_SIMT_REDUCE(__reduce_min_sync, int, hw_simt::WarpOp::ReduceMinS)
HW_SIMT_REDUCE(__reduce_max_sync, unsigned, hw_simt::WarpOp::ReduceMaxU)
HW_SIMT_REDUCE(__reduce_max_sync, int, hw_simt::WarpOp::ReduceMaxS)
HW_SIMT_REDUCE(__reduce_and_sync, unsigned, hw_simt::WarpOp::ReduceAnd)
HW_SIMT_REDUCE(__reduce_or_sync, unsigned, hw_simt::WarpOp::ReduceOr)
HW_SIMT_REDUCE(__reduce_xor_sync, unsigned, hw_simt::WarpOp::ReduceXor)
#undef HW_SIMT_REDUCE
