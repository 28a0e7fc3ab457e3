// nvcuda::wmma for host builds: the m16n16k16 shape with __half or __nv_bfloat16 inputs and
// float accumulators.
//
// Fragment layout differs from the GPU. Here every lane holds the whole 16x16 tile, row-major by
// the fragment's logical (row, column): matrix_a (m, k), matrix_b (k, n), accumulator (m, n);
// under HEADWISE_EMU_ADVERSARIAL=wmma (adversarial.h) in a random order drawn per launch instead.
// num_elements is therefore 256, not the GPU's per-lane share (8 or 16), and x[i] names a
// different element than on the GPU. The GPU's layout is opaque, so portable kernels may only
// apply the same operation to every element (scale, convert, fill), and that works identically
// here. mma_sync and store_matrix_sync check that all 32 lanes hold identical fragments, which
// catches lane-dependent element access.
//
// The *_sync functions are warp collectives: all 32 lanes must arrive (checked like a shuffle),
// pointer, ldm and layout must be the same in every lane, and the memory access or the multiply
// happens once, for the whole warp, when the last lane arrives, as it would in lockstep.
// The GPU's alignment rules are enforced: pointers 256-bit aligned, ldm a multiple of 16 bytes.
// Products of f16/bf16 values are exact in float; each output element accumulates from the C
// value through k = 0..15 in order, rounding to float after each addition.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>

#include "adversarial.h"
#include "half.h"
#include "runtime.h"
#include "sync.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
class fragment {
    static_assert(M == 16 && N == 16 && K == 16, "the emulator implements the m16n16k16 shape only");
    static_assert(std::is_same<Use, accumulator>::value
                      ? std::is_same<T, float>::value
                      : (std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value),
                  "the emulator implements __half/__nv_bfloat16 inputs with float accumulators");
    static_assert(std::is_same<Use, accumulator>::value == std::is_same<Layout, void>::value,
                  "matrix_a/matrix_b fragments need row_major or col_major; accumulators none");

  public:
    using element_type = T;
    static constexpr int num_elements = 16 * 16;
    T x[num_elements];
};

template <class Use, int M, int N, int K, class T, class Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f,
                          const typename fragment<Use, M, N, K, T, Layout>::element_type& value) {
    for (T& e : f.x) e = value;
}

namespace detail {

using Accumulator = fragment<accumulator, 16, 16, 16, float>;

// Which permutation maps a fragment's x[i] to its tile elements (adversarial.h, wmma mode).
template <class Frag>
struct FragmentUse;
template <int M, int N, int K, class T, class L>
struct FragmentUse<fragment<matrix_a, M, N, K, T, L>> { static constexpr int value = 0; };
template <int M, int N, int K, class T, class L>
struct FragmentUse<fragment<matrix_b, M, N, K, T, L>> { static constexpr int value = 1; };
template <int M, int N, int K, class T, class L>
struct FragmentUse<fragment<accumulator, M, N, K, T, L>> { static constexpr int value = 2; };

// Offset of tile element (row, col) in memory with leading dimension ldm.
inline size_t tile_offset(bool row_major, int row, int col, unsigned ldm) {
    return row_major ? static_cast<size_t>(row) * ldm + col : static_cast<size_t>(col) * ldm + row;
}

template <class T>
inline void check_memory_args(const char* function, const void* ptr, unsigned ldm,
                              const char* file, int line) {
    if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0) {
        hw_simt::kernel_error(file, line, "%s: pointer %p is not 256-bit aligned, as the GPU requires",
                              function, ptr);
    }
    if ((static_cast<size_t>(ldm) * sizeof(T)) % 16 != 0) {
        hw_simt::kernel_error(file, line, "%s: ldm %u is not a multiple of 16 bytes (%zu elements), "
                              "as the GPU requires", function, ldm, 16 / sizeof(T));
    }
}

// Index of the first lane whose fragment differs from lane 0's, or -1.
template <class Task, class Frag>
inline int first_differing_lane(hw_simt::WarpTask* const* tasks, const Frag* Task::*member) {
    const Frag* first = static_cast<Task*>(tasks[0])->*member;
    for (int lane = 1; lane < 32; ++lane) {
        if (std::memcmp(first->x, (static_cast<Task*>(tasks[lane])->*member)->x, sizeof first->x) != 0)
            return lane;
    }
    return -1;
}

template <class Frag, class T>
struct LoadTask : hw_simt::WarpTask {
    Frag* frag;
    const T* src;
    unsigned ldm;
    bool row_major;

    static int run(hw_simt::WarpTask* const* tasks) {
        const LoadTask* first = static_cast<LoadTask*>(tasks[0]);
        const uint16_t* slot = hw_simt::wmma_permutations[FragmentUse<Frag>::value];
        for (int r = 0; r < 16; ++r)
            for (int c = 0; c < 16; ++c)
                first->frag->x[slot[r * 16 + c]] = first->src[tile_offset(first->row_major, r, c, first->ldm)];
        for (int lane = 1; lane < 32; ++lane)
            std::memcpy(static_cast<LoadTask*>(tasks[lane])->frag->x, first->frag->x, sizeof first->frag->x);
        return -1;
    }
};

template <class Frag, class T>
inline void load(Frag& frag, const T* src, unsigned ldm, bool row_major, const char* file, int line) {
    check_memory_args<T>("wmma::load_matrix_sync", src, ldm, file, line);
    LoadTask<Frag, T> task;
    task.complete = &LoadTask<Frag, T>::run;
    task.frag = &frag;
    task.src = src;
    task.ldm = ldm;
    task.row_major = row_major;
    hw_simt::warp_task(hw_simt::WarpOp::WmmaLoad, &task, reinterpret_cast<uintptr_t>(src),
                       static_cast<int32_t>(ldm), row_major ? 0 : 1, file, line);
}

struct StoreTask : hw_simt::WarpTask {
    const Accumulator* frag;
    float* dst;
    unsigned ldm;
    bool row_major;

    static int run(hw_simt::WarpTask* const* tasks) {
        const int differing = first_differing_lane(tasks, &StoreTask::frag);
        if (differing >= 0) return differing;
        const StoreTask* first = static_cast<StoreTask*>(tasks[0]);
        const uint16_t* slot = hw_simt::wmma_permutations[2];
        for (int r = 0; r < 16; ++r)
            for (int c = 0; c < 16; ++c)
                first->dst[tile_offset(first->row_major, r, c, first->ldm)] = first->frag->x[slot[r * 16 + c]];
        return -1;
    }
};

template <class T, class LayoutA, class LayoutB>
struct MmaTask : hw_simt::WarpTask {
    Accumulator* d;
    const fragment<matrix_a, 16, 16, 16, T, LayoutA>* a;
    const fragment<matrix_b, 16, 16, 16, T, LayoutB>* b;
    const Accumulator* c;

    static int run(hw_simt::WarpTask* const* tasks) {
        for (int differing : {first_differing_lane(tasks, &MmaTask::a),
                              first_differing_lane(tasks, &MmaTask::b),
                              first_differing_lane(tasks, &MmaTask::c)}) {
            if (differing >= 0) return differing;
        }
        const MmaTask* first = static_cast<MmaTask*>(tasks[0]);
        const uint16_t* const* slot = hw_simt::wmma_permutations;
        float a[256], b[256], d[256];
        for (int i = 0; i < 256; ++i) {  // logical (row-major) order
            a[i] = static_cast<float>(first->a->x[slot[0][i]]);
            b[i] = static_cast<float>(first->b->x[slot[1][i]]);
        }
        for (int m = 0; m < 16; ++m) {
            for (int n = 0; n < 16; ++n) {
                float acc = first->c->x[slot[2][m * 16 + n]];
                for (int k = 0; k < 16; ++k) acc += a[m * 16 + k] * b[k * 16 + n];
                d[slot[2][m * 16 + n]] = acc;
            }
        }
        // d may alias c, so every lane's result is written only after all inputs were read.
        for (int lane = 0; lane < 32; ++lane)
            std::memcpy(static_cast<MmaTask*>(tasks[lane])->d->x, d, sizeof d);
        return -1;
    }
};

}  // namespace detail

template <class T, class Layout>
inline void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, Layout>& a, const T* ptr,
                             unsigned ldm, HW_SIMT_CALL_SITE) {
    detail::load(a, ptr, ldm, std::is_same<Layout, row_major>::value, file, line);
}

template <class T, class Layout>
inline void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, Layout>& b, const T* ptr,
                             unsigned ldm, HW_SIMT_CALL_SITE) {
    detail::load(b, ptr, ldm, std::is_same<Layout, row_major>::value, file, line);
}

inline void load_matrix_sync(detail::Accumulator& c, const float* ptr, unsigned ldm,
                             layout_t layout, HW_SIMT_CALL_SITE) {
    detail::load(c, ptr, ldm, layout == mem_row_major, file, line);
}

inline void store_matrix_sync(float* ptr, const detail::Accumulator& c, unsigned ldm,
                              layout_t layout, HW_SIMT_CALL_SITE) {
    detail::check_memory_args<float>("wmma::store_matrix_sync", ptr, ldm, file, line);
    detail::StoreTask task;
    task.complete = &detail::StoreTask::run;
    task.frag = &c;
    task.dst = ptr;
    task.ldm = ldm;
    task.row_major = layout == mem_row_major;
    hw_simt::warp_task(hw_simt::WarpOp::WmmaStore, &task, reinterpret_cast<uintptr_t>(ptr),
                       static_cast<int32_t>(ldm), task.row_major ? 0 : 1, file, line);
}

template <class T, class LayoutA, class LayoutB>
inline void mma_sync(detail::Accumulator& d, const fragment<matrix_a, 16, 16, 16, T, LayoutA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LayoutB>& b,
                     const detail::Accumulator& c, HW_SIMT_CALL_SITE) {
    detail::MmaTask<T, LayoutA, LayoutB> task;
    task.complete = &detail::MmaTask<T, LayoutA, LayoutB>::run;
    task.d = &d;
    task.a = &a;
    task.b = &b;
    task.c = &c;
    hw_simt::warp_task(hw_simt::WarpOp::WmmaMma, &task, 0, 0, 0, file, line);
}

}  // namespace wmma
}  // namespace nvcuda
