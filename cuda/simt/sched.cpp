// The emulator's scheduler: launches, one fiber per CUDA thread, block barriers, warp
// collectives, and the error reports that replace hangs and undefined results.
//
// Execution model. Blocks run one after another. Within a block, exactly one thread runs at a
// time, until it reaches a barrier, a warp collective or its end; then the next runnable thread
// in schedule order runs (switching directly, fiber to fiber). A thread that arrives at a
// collective deposits its operand and blocks; the arrival that completes the collective computes
// every participant's result and makes them all runnable again, itself included, so that after
// each barrier or collective the threads resume in schedule order. When no thread is runnable,
// control returns to the launching context, which either finds the block finished or explains
// the deadlock.
//
// Kernel errors are raised on the fiber that detects them: the message is written, the fiber
// switches to the launching context for good, and the block's remaining fibers are simply never
// resumed (their stacks are reinitialized by the next launch).
#include <sys/time.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "adversarial.h"
#include "fiber.h"
#include "simt.h"
#include "traffic.h"

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

namespace hw_simt {
namespace {

constexpr uint32_t kWarpSize = 32;
constexpr uint32_t kMaxBlockThreads = 1024;
constexpr uint32_t kMaxWarps = kMaxBlockThreads / kWarpSize;
constexpr uint32_t kBitmapWords = kMaxBlockThreads / 64;
constexpr uint32_t kFullMask = 0xffffffffu;
// sm_90's largest opt-in dynamic shared memory per block (sm_80 allows 163 KiB, sm_86/89 99 KiB).
constexpr uint32_t kMaxDynamicShared = 227 * 1024;
constexpr size_t kDynamicSharedAlign = 128;

struct Site {
    const char* file;
    int line;
};

bool same_site(Site a, Site b) {
    return a.line == b.line && (a.file == b.file || std::strcmp(a.file, b.file) == 0);
}

const char* op_name(WarpOp op) {
    switch (op) {
        case WarpOp::SyncWarp: return "__syncwarp";
        case WarpOp::ShflIdx: return "__shfl_sync";
        case WarpOp::ShflUp: return "__shfl_up_sync";
        case WarpOp::ShflDown: return "__shfl_down_sync";
        case WarpOp::ShflXor: return "__shfl_xor_sync";
        case WarpOp::Ballot: return "__ballot_sync";
        case WarpOp::Any: return "__any_sync";
        case WarpOp::All: return "__all_sync";
        case WarpOp::MatchAny: return "__match_any_sync";
        case WarpOp::MatchAll: return "__match_all_sync";
        case WarpOp::ReduceAdd: return "__reduce_add_sync";
        case WarpOp::ReduceMinU:
        case WarpOp::ReduceMinS: return "__reduce_min_sync";
        case WarpOp::ReduceMaxU:
        case WarpOp::ReduceMaxS: return "__reduce_max_sync";
        case WarpOp::ReduceAnd: return "__reduce_and_sync";
        case WarpOp::ReduceOr: return "__reduce_or_sync";
        case WarpOp::ReduceXor: return "__reduce_xor_sync";
        case WarpOp::WmmaLoad: return "wmma::load_matrix_sync";
        case WarpOp::WmmaStore: return "wmma::store_matrix_sync";
        case WarpOp::WmmaMma: return "wmma::mma_sync";
    }
    return "?";
}

const char* barrier_name(BarrierOp op) {
    switch (op) {
        case BarrierOp::Sync: return "__syncthreads";
        case BarrierOp::Count: return "__syncthreads_count";
        case BarrierOp::And: return "__syncthreads_and";
        case BarrierOp::Or: return "__syncthreads_or";
    }
    return "?";
}

bool is_shuffle(WarpOp op) {
    return op == WarpOp::ShflIdx || op == WarpOp::ShflUp || op == WarpOp::ShflDown ||
           op == WarpOp::ShflXor;
}

bool is_wmma(WarpOp op) {
    return op == WarpOp::WmmaLoad || op == WarpOp::WmmaStore || op == WarpOp::WmmaMma;
}

// splitmix64: tiny, fast, and good enough to shuffle threads and blocks.
class Random {
  public:
    void seed(uint64_t s) { state_ = s; }
    uint64_t next() {
        uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        return z ^ (z >> 31);
    }
    // Uniform in [0, n) (multiply-shift; the bias is irrelevant here).
    uint32_t below(uint32_t n) { return static_cast<uint32_t>(((next() >> 32) * n) >> 32); }

  private:
    uint64_t state_ = 0;
};

enum class Order : uint8_t { Forward, Reverse, Random };

struct Schedule {
    Order order = Order::Forward;
    uint64_t seed = 0;  // Random only
};

// Visits block indices 0..count-1 once each in the schedule's order. The random order is a
// full-period LCG modulo the next power of two, skipping values >= count: a permutation in O(1)
// memory, whatever the grid size.
class BlockOrder {
  public:
    BlockOrder(uint64_t count, Order order, Random& rng) : count_(count), order_(order) {
        while (modulus_ < count) modulus_ <<= 1;
        multiplier_ = (rng.next() & ~3ull) | 1ull;  // == 1 (mod 4) and odd increment: full period
        increment_ = rng.next() | 1ull;
        state_ = rng.next() & (modulus_ - 1);
    }
    uint64_t next() {
        switch (order_) {
            case Order::Forward: return emitted_++;
            case Order::Reverse: return count_ - 1 - emitted_++;
            case Order::Random:
                do {
                    state_ = (multiplier_ * state_ + increment_) & (modulus_ - 1);
                } while (state_ >= count_);
                return state_;
        }
        return 0;
    }

  private:
    uint64_t count_;
    Order order_;
    uint64_t emitted_ = 0;
    uint64_t modulus_ = 1;
    uint64_t multiplier_, increment_, state_;
};

enum class Wait : uint8_t { None, Barrier, Warp, Exited };

struct Thread {
    Fiber fiber;
    uint3 idx;
    uint32_t linear, warp, lane;
    Wait wait;
    Site site;  // where it waits
    int barrier_result;
};

// One lane's arrival at a warp collective.
struct Deposit {
    WarpOp op;
    uint32_t mask;
    uint64_t value;
    int32_t b;
    int32_t width;
    WarpTask* task;
    Site site;
    uint64_t result;
};

// A collective some lanes wait at. Lanes meet when they call the same operation with the same
// mask, wherever they call it from (Volta's independent thread scheduling: lanes named in a mask
// may first take part in other collectives whose masks do not name the waiting lanes). Two
// pending collectives never share a mask.
struct Group {
    WarpOp op;
    uint32_t mask;
    uint32_t members;  // lanes that arrived
};

struct Warp {
    uint32_t gone;  // lanes that exited, or do not exist (the block's last warp is partial)
    uint32_t num_groups;
    Group groups[kWarpSize];
    Deposit lanes[kWarpSize];
};

struct Barrier {
    uint32_t waiting;
    BarrierOp op;
    Site site;
    uint32_t true_count;
    const Thread* first;
};

struct Emulator {
    std::mutex launch_mutex;

    // The launch in progress.
    const char* kernel = nullptr;
    KernelBody body = nullptr;
    const void* params = nullptr;
    Schedule schedule;
    Random rng;
    uint32_t num_threads = 0;
    uint32_t num_warps = 0;
    unsigned char* dyn_smem = nullptr;
    uint32_t dyn_smem_bytes = 0;
    std::vector<std::unique_ptr<FiberStack>> stacks;  // grows to the largest block seen

    // The block in progress.
    Thread threads[kMaxBlockThreads];
    Warp warps[kMaxWarps];
    Barrier barrier;
    uint64_t runnable[kBitmapWords];
    uint32_t runnable_count = 0;
    uint32_t live = 0;
    const Thread* first_exited = nullptr;
    Thread* current = nullptr;  // null while the launching context runs
    Fiber* switched_from = nullptr;
    Fiber launcher;  // the launching OS thread's own context

    bool failed = false;
    char message[HW_EMU_ERROR_LEN];
};

// Never destroyed: a Rust thread may still be inside a launch while the process exits.
Emulator& E = *new Emulator();

// Per OS thread, so that a test can pick an order for its own launches without touching the
// process environment that concurrent tests share.
thread_local bool tl_has_schedule = false;
thread_local char tl_schedule[64];

// ---- messages -------------------------------------------------------------------------------

class MessageWriter {
  public:
    MessageWriter(char* buffer, size_t capacity) : buffer_(buffer), capacity_(capacity) {
        buffer_[0] = '\0';
    }
    void vadd(const char* format, va_list args) {
        if (length_ + 1 >= capacity_) return;
        const int n = std::vsnprintf(buffer_ + length_, capacity_ - length_, format, args);
        if (n > 0) length_ = std::min(capacity_ - 1, length_ + static_cast<size_t>(n));
    }
    void add(const char* format, ...) __attribute__((format(printf, 2, 3))) {
        va_list args;
        va_start(args, format);
        vadd(format, args);
        va_end(args);
    }

  private:
    char* buffer_;
    size_t capacity_;
    size_t length_ = 0;
};

void add_schedule(MessageWriter& out) {
    switch (E.schedule.order) {
        case Order::Forward: out.add(" [schedule forward]"); break;
        case Order::Reverse: out.add(" [schedule reverse]"); break;
        case Order::Random:
            out.add(" [schedule random:%llu]", static_cast<unsigned long long>(E.schedule.seed));
            break;
    }
}

// "<kernel>: block (x,y,z), thread (x,y,z) [warp w, lane l]: <text> [schedule ...]"
void vset_message(const Thread* who, const char* format, va_list args) {
    MessageWriter out(E.message, sizeof E.message);
    out.add("%s: block (%u,%u,%u)", E.kernel, blockIdx.x, blockIdx.y, blockIdx.z);
    if (who != nullptr) {
        out.add(", thread (%u,%u,%u) [warp %u, lane %u]", who->idx.x, who->idx.y, who->idx.z,
                who->warp, who->lane);
    }
    out.add(": ");
    out.vadd(format, args);
    add_schedule(out);
    E.failed = true;
}

void set_message(const Thread* who, const char* format, ...) __attribute__((format(printf, 2, 3)));
void set_message(const Thread* who, const char* format, ...) {
    va_list args;
    va_start(args, format);
    vset_message(who, format, args);
    va_end(args);
}

void set_launch_error(const char* format, ...) __attribute__((format(printf, 1, 2)));
void set_launch_error(const char* format, ...) {
    MessageWriter out(E.message, sizeof E.message);
    out.add("%s: invalid launch: ", E.kernel);
    va_list args;
    va_start(args, format);
    out.vadd(format, args);
    va_end(args);
    E.failed = true;
}

[[noreturn]] void outside_launch(const char* what, Site site) {
    std::fprintf(stderr, "headwise simt: %s at %s:%d called outside an emulated kernel launch\n",
                 what, site.file, site.line);
    std::abort();
}

// The calling thread; `what` names the caller for the report when there is none (only then is
// it called, so that the hot path never formats names).
template <class What>
Thread& running_thread(What what, Site site) {
    if (E.current == nullptr) outside_launch(what(), site);
    return *E.current;
}

// ---- switching ------------------------------------------------------------------------------

// Leaves `from` for `next` (or for the launching context when next is null).
void transfer(Fiber& from, Thread* next, bool from_is_done) {
    Fiber* to = &E.launcher;
    E.current = next;
    if (next != nullptr) {
        threadIdx = next->idx;
        to = &next->fiber;
    }
    E.switched_from = &from;
    if (from_is_done) {
        fiber_exit(from, *to);
    } else {
        fiber_switch(from, *to);
    }
}

// Abandons the running kernel after the message was set: the failing fiber never runs again.
[[noreturn]] void abandon() {
    Thread* self = E.current;
    transfer(self->fiber, nullptr, true);
    __builtin_unreachable();
}

[[noreturn]] void fail(const Thread& who, const char* format, ...) __attribute__((format(printf, 2, 3)));
void fail(const Thread& who, const char* format, ...) {
    va_list args;
    va_start(args, format);
    vset_message(&who, format, args);
    va_end(args);
    abandon();
}

// ---- run queue ------------------------------------------------------------------------------

void make_runnable(Thread& t) {
    t.wait = Wait::None;
    E.runnable[t.linear >> 6] |= 1ull << (t.linear & 63);
    ++E.runnable_count;
}

void block_on(Thread& t, Wait wait, Site site) {
    t.wait = wait;
    t.site = site;
    E.runnable[t.linear >> 6] &= ~(1ull << (t.linear & 63));
    --E.runnable_count;
}

// First runnable thread with index >= start, or -1.
int runnable_at_or_after(uint32_t start) {
    const uint32_t words = (E.num_threads + 63) / 64;
    uint32_t word = start >> 6;
    if (word >= words) return -1;
    uint64_t bits = E.runnable[word] & (~0ull << (start & 63));
    for (;;) {
        if (bits != 0) return static_cast<int>(word * 64 + __builtin_ctzll(bits));
        if (++word >= words) return -1;
        bits = E.runnable[word];
    }
}

// Last runnable thread with index <= start, or -1.
int runnable_at_or_before(int start) {
    if (start < 0) return -1;
    int word = start >> 6;
    uint64_t bits = E.runnable[word] & (~0ull >> (63 - (start & 63)));
    for (;;) {
        if (bits != 0) return word * 64 + 63 - __builtin_clzll(bits);
        if (--word < 0) return -1;
        bits = E.runnable[word];
    }
}

int nth_runnable(uint32_t n) {
    for (uint32_t word = 0;; ++word) {
        uint64_t bits = E.runnable[word];
        const uint32_t count = static_cast<uint32_t>(__builtin_popcountll(bits));
        if (n < count) {
            for (; n > 0; --n) bits &= bits - 1;
            return static_cast<int>(word * 64 + __builtin_ctzll(bits));
        }
        n -= count;
    }
}

// The thread to run after `after` (null: the block's first), which may be `after` itself; null
// when nothing can run.
Thread* pick_next(const Thread* after) {
    if (E.runnable_count == 0) return nullptr;
    int index = 0;
    switch (E.schedule.order) {
        case Order::Forward:
            index = runnable_at_or_after(after != nullptr ? after->linear + 1 : 0);
            if (index < 0) index = runnable_at_or_after(0);
            break;
        case Order::Reverse: {
            const int last = static_cast<int>(E.num_threads) - 1;
            index = runnable_at_or_before(after != nullptr ? static_cast<int>(after->linear) - 1 : last);
            if (index < 0) index = runnable_at_or_before(last);
            break;
        }
        case Order::Random: index = nth_runnable(E.rng.below(E.runnable_count)); break;
    }
    return &E.threads[index];
}

// Called by the running thread after it blocked or completed a collective: lets the next
// thread in schedule order run. Returns once this thread is resumed.
void reschedule(Thread& self) {
    Thread* next = pick_next(&self);
    if (next != &self) transfer(self.fiber, next, false);
}

// ---- warp collectives -----------------------------------------------------------------------

Thread& lane_thread(uint32_t warp, uint32_t lane) { return E.threads[warp * kWarpSize + lane]; }

const char* absence(uint32_t warp, uint32_t lane, uint32_t mask) {
    if ((mask >> lane & 1u) == 0) return "is not named in the mask";
    if (warp * kWarpSize + lane >= E.num_threads) return "does not exist (the block's last warp is partial)";
    return "has exited";
}

// A group can complete once every lane of its mask that has not exited arrived.
bool group_ready(const Warp& w, const Group& g) { return (g.mask & ~w.gone & ~g.members) == 0; }

int group_index_of_lane(const Warp& w, uint32_t lane) {
    for (uint32_t i = 0; i < w.num_groups; ++i)
        if ((w.groups[i].members >> lane) & 1u) return static_cast<int>(i);
    return -1;
}

// The lane a shuffle reads, per PTX shfl.sync: c = ((32 - width) << 8) | clamp, where clamp is 0
// for up and 31 otherwise; out-of-segment sources yield the lane's own value. Note the quirk that
// xor may read from a lower segment (documented in the CUDA guide).
uint32_t shuffle_source(WarpOp op, uint32_t lane, int32_t b, int32_t width) {
    const uint32_t segmask = (kWarpSize - static_cast<uint32_t>(width)) & 0x1fu;
    const uint32_t clamp = op == WarpOp::ShflUp ? 0u : 0x1fu;
    const int max_lane = static_cast<int>((lane & segmask) | (clamp & ~segmask));
    const int min_lane = static_cast<int>(lane & segmask);
    const int bval = static_cast<int>(static_cast<uint32_t>(b) & 0x1fu);
    const int l = static_cast<int>(lane);
    int source = l;
    bool valid = true;
    switch (op) {
        case WarpOp::ShflUp: source = l - bval; valid = source >= max_lane; break;
        case WarpOp::ShflDown: source = l + bval; valid = source <= max_lane; break;
        case WarpOp::ShflXor: source = l ^ bval; valid = source <= max_lane; break;
        default: source = min_lane | (bval & static_cast<int>(~segmask & 0x1fu)); break;
    }
    return static_cast<uint32_t>(valid ? source : l);
}

void complete_wmma(Warp& w, uint32_t warp, uint32_t members, uint32_t mask) {
    if (members != kFullMask) {
        const uint32_t missing = static_cast<uint32_t>(__builtin_ctz(~members));
        const Deposit& first = w.lanes[__builtin_ctz(members)];
        fail(lane_thread(warp, static_cast<uint32_t>(__builtin_ctz(members))),
             "%s at %s:%d needs all 32 lanes of the warp, but lane %u %s", op_name(first.op),
             first.site.file, first.site.line, missing, absence(warp, missing, mask));
    }
    const Deposit& lead = w.lanes[0];
    WarpTask* tasks[kWarpSize];
    for (uint32_t lane = 0; lane < kWarpSize; ++lane) {
        const Deposit& d = w.lanes[lane];
        if (d.value != lead.value || d.b != lead.b || d.width != lead.width) {
            fail(lane_thread(warp, lane),
                 "%s at %s:%d gets pointer 0x%llx, ldm %d, layout %d, but lane 0 got 0x%llx, %d, "
                 "%d (%s:%d): WMMA arguments must be the same in every lane",
                 op_name(d.op), d.site.file, d.site.line, static_cast<unsigned long long>(d.value),
                 d.b, d.width, static_cast<unsigned long long>(lead.value), lead.b, lead.width,
                 lead.site.file, lead.site.line);
        }
        tasks[lane] = d.task;
    }
    const int differing = lead.task->complete(tasks);
    if (differing >= 0) {
        const Deposit& d = w.lanes[differing];
        fail(lane_thread(warp, static_cast<uint32_t>(differing)),
             "%s at %s:%d: this lane's fragments differ from lane 0's. The emulator keeps the whole "
             "tile in every lane, so WMMA fragments may only see the same operation on every "
             "element (the GPU's element layout is opaque anyway)",
             op_name(d.op), d.site.file, d.site.line);
    }
}

// Computes every member's result of the group's collective, then releases the members.
void complete(Warp& w, uint32_t warp, uint32_t group_index) {
    const Group g = w.groups[group_index];
    w.groups[group_index] = w.groups[--w.num_groups];
    const uint32_t members = g.members;
    const uint32_t mask = g.mask;
    const WarpOp op = g.op;
    auto each = [members](auto&& fn) {
        for (uint32_t m = members; m != 0; m &= m - 1) fn(static_cast<uint32_t>(__builtin_ctz(m)));
    };
    if (is_shuffle(op)) {
        each([&](uint32_t lane) {
            Deposit& d = w.lanes[lane];
            const uint32_t source = shuffle_source(op, lane, d.b, d.width);
            if ((members >> source & 1u) == 0) {
                fail(lane_thread(warp, lane),
                     "%s at %s:%d (mask 0x%08x) reads lane %u, which %s: the value is undefined in "
                     "CUDA",
                     op_name(op), d.site.file, d.site.line, mask, source,
                     absence(warp, source, mask));
            }
            d.result = w.lanes[source].value;
        });
    } else if (is_wmma(op)) {
        complete_wmma(w, warp, members, mask);
    } else if (op != WarpOp::SyncWarp) {
        // Votes and reductions: one result for every member.
        uint32_t votes = 0;
        uint32_t sum = 0, and_bits = kFullMask, or_bits = 0, xor_bits = 0;
        uint32_t min_u = kFullMask, max_u = 0;
        int32_t min_s = INT32_MAX, max_s = INT32_MIN;
        bool all_equal = true;
        const uint64_t first_value = w.lanes[__builtin_ctz(members)].value;
        each([&](uint32_t lane) {
            const uint64_t v = w.lanes[lane].value;
            const uint32_t v32 = static_cast<uint32_t>(v);
            const int32_t s32 = static_cast<int32_t>(v32);
            if (v != 0) votes |= 1u << lane;
            all_equal = all_equal && v == first_value;
            sum += v32;
            and_bits &= v32;
            or_bits |= v32;
            xor_bits ^= v32;
            min_u = v32 < min_u ? v32 : min_u;
            max_u = v32 > max_u ? v32 : max_u;
            min_s = s32 < min_s ? s32 : min_s;
            max_s = s32 > max_s ? s32 : max_s;
        });
        each([&](uint32_t lane) {
            Deposit& d = w.lanes[lane];
            switch (op) {
                case WarpOp::Ballot: d.result = votes; break;
                case WarpOp::Any: d.result = votes != 0; break;
                case WarpOp::All: d.result = votes == members; break;
                case WarpOp::MatchAny: {
                    uint32_t same = 0;
                    each([&](uint32_t other) {
                        if (w.lanes[other].value == d.value) same |= 1u << other;
                    });
                    d.result = same;
                    break;
                }
                case WarpOp::MatchAll: d.result = all_equal ? members : 0; break;
                case WarpOp::ReduceAdd: d.result = sum; break;
                case WarpOp::ReduceMinU: d.result = min_u; break;
                case WarpOp::ReduceMinS: d.result = static_cast<uint32_t>(min_s); break;
                case WarpOp::ReduceMaxU: d.result = max_u; break;
                case WarpOp::ReduceMaxS: d.result = static_cast<uint32_t>(max_s); break;
                case WarpOp::ReduceAnd: d.result = and_bits; break;
                case WarpOp::ReduceOr: d.result = or_bits; break;
                case WarpOp::ReduceXor: d.result = xor_bits; break;
                default: break;
            }
        });
    }
    each([&](uint32_t lane) { make_runnable(lane_thread(warp, lane)); });
}

uint64_t arrive(WarpOp op, uint32_t mask, uint64_t value, int32_t b, int32_t width,
                WarpTask* task, Site site) {
    Thread& self = running_thread([op] { return op_name(op); }, site);
    Warp& w = E.warps[self.warp];
    const uint32_t bit = 1u << self.lane;
    if ((mask & bit) == 0) {
        fail(self, "%s at %s:%d with mask 0x%08x, which does not name the calling lane %u: "
             "undefined in CUDA", op_name(op), site.file, site.line, mask, self.lane);
    }
    if (adversarial().masks && (mask & w.gone) != 0) {
        const uint32_t lane = static_cast<uint32_t>(__builtin_ctz(mask & w.gone));
        fail(self, "%s at %s:%d with mask 0x%08x names lane %u, which %s: undefined in CUDA "
             "[adversarial masks]", op_name(op), site.file, site.line, mask, lane,
             absence(self.warp, lane, mask));
    }
    if (is_shuffle(op) && (width < 1 || width > 32 || (width & (width - 1)) != 0)) {
        fail(self, "%s at %s:%d with width %d: must be a power of two from 1 to 32",
             op_name(op), site.file, site.line, width);
    }
    uint32_t index = 0;
    while (index < w.num_groups && w.groups[index].mask != mask) ++index;
    if (index == w.num_groups) {
        w.groups[w.num_groups++] = Group{op, mask, 0};
    } else if (w.groups[index].op != op) {
        const uint32_t lane = static_cast<uint32_t>(__builtin_ctz(w.groups[index].members));
        const Deposit& other = w.lanes[lane];
        fail(self, "%s at %s:%d with mask 0x%08x, while lane %u waits at %s at %s:%d with the same "
             "mask: the lanes named in a mask must all call the same collective",
             op_name(op), site.file, site.line, mask, lane, op_name(other.op), other.site.file,
             other.site.line);
    }
    // Joining this collective must not close a cycle with another one: that one waits for this
    // lane while this one waits for one of its lanes. (Longer cycles show as a stall.)
    for (uint32_t i = 0; i < w.num_groups; ++i) {
        const Group& other = w.groups[i];
        const uint32_t blocked = mask & other.members;
        if (i == index || (other.mask & bit) == 0 || blocked == 0) continue;
        const uint32_t lane = static_cast<uint32_t>(__builtin_ctz(blocked));
        const Deposit& d = w.lanes[lane];
        fail(self, "%s at %s:%d with mask 0x%08x waits for lane %u, which waits at %s at %s:%d with "
             "mask 0x%08x naming this lane: neither collective can complete",
             op_name(op), site.file, site.line, mask, lane, op_name(d.op), d.site.file,
             d.site.line, d.mask);
    }
    w.groups[index].members |= bit;
    Deposit& mine = w.lanes[self.lane];
    mine = Deposit{op, mask, value, b, width, task, site, 0};
    block_on(self, Wait::Warp, site);
    if (group_ready(w, w.groups[index])) complete(w, self.warp, index);
    reschedule(self);
    return mine.result;
}

// ---- block life cycle -----------------------------------------------------------------------

void release_barrier() {
    Barrier& bar = E.barrier;
    int result = 0;
    switch (bar.op) {
        case BarrierOp::Sync: break;
        case BarrierOp::Count: result = static_cast<int>(bar.true_count); break;
        case BarrierOp::And: result = bar.true_count == bar.waiting; break;
        case BarrierOp::Or: result = bar.true_count != 0; break;
    }
    for (uint32_t i = 0; i < E.num_threads; ++i) {
        Thread& t = E.threads[i];
        if (t.wait == Wait::Barrier) {
            t.barrier_result = result;
            make_runnable(t);
        }
    }
    bar.waiting = 0;
}

const char* early_exit_hint =
    "a barrier that not every thread of the block reaches is undefined in CUDA (early return "
    "before __syncthreads?)";

[[noreturn]] void thread_exit(Thread& self) {
    block_on(self, Wait::Exited, Site{nullptr, 0});
    --E.live;
    if (E.first_exited == nullptr) E.first_exited = &self;
    const Barrier& bar = E.barrier;
    if (bar.waiting > 0) {
        fail(self, "exits while %u thread(s) wait at %s at %s:%d (thread (%u,%u,%u) first): %s",
             bar.waiting, barrier_name(bar.op), bar.site.file, bar.site.line, bar.first->idx.x,
             bar.first->idx.y, bar.first->idx.z, early_exit_hint);
    }
    Warp& w = E.warps[self.warp];
    const uint32_t bit = 1u << self.lane;
    w.gone |= bit;
    // Warp-mates waiting at collectives that name this lane no longer wait for it.
    for (uint32_t i = w.num_groups; adversarial().masks && i-- > 0;) {
        const Group& g = w.groups[i];
        if ((g.mask & bit) == 0) continue;
        const Deposit& d = w.lanes[__builtin_ctz(g.members)];
        fail(self, "exits while lane %u waits at %s at %s:%d with mask 0x%08x naming this lane: "
             "undefined in CUDA [adversarial masks]", static_cast<uint32_t>(__builtin_ctz(g.members)),
             op_name(d.op), d.site.file, d.site.line, g.mask);
    }
    for (uint32_t i = w.num_groups; i-- > 0;) {  // completing swaps the last group into i
        if ((w.groups[i].mask & bit) != 0 && group_ready(w, w.groups[i])) complete(w, self.warp, i);
    }
    transfer(self.fiber, pick_next(&self), true);
    __builtin_unreachable();
}

void thread_main(void* arg) {
    Thread& self = *static_cast<Thread*>(arg);
    fiber_started(*E.switched_from);
    E.body(E.params);
    thread_exit(self);
}

// Every live thread waits and none can be released: explain the first wait that cannot end.
void diagnose_stall() {
    for (uint32_t i = 0; i < E.num_threads; ++i) {
        const Thread& t = E.threads[i];
        if (t.wait != Wait::Warp) continue;
        const Warp& w = E.warps[t.warp];
        const Deposit& d = w.lanes[t.lane];
        const Group& g = w.groups[group_index_of_lane(w, t.lane)];
        const uint32_t missing = g.mask & ~w.gone & ~g.members;
        const uint32_t lane = static_cast<uint32_t>(__builtin_ctz(missing));
        const Thread& other = lane_thread(t.warp, lane);
        if (other.wait == Wait::Barrier) {
            set_message(&t, "deadlock: waits at %s at %s:%d (mask 0x%08x) for lane %u, which waits "
                        "at %s at %s:%d; the barrier in turn waits for this lane",
                        op_name(d.op), d.site.file, d.site.line, d.mask, lane,
                        barrier_name(E.barrier.op), other.site.file, other.site.line);
        } else {
            const Deposit& o = w.lanes[lane];
            set_message(&t, "deadlock: waits at %s at %s:%d (mask 0x%08x) for lane %u, which waits "
                        "at %s at %s:%d (mask 0x%08x); these collectives wait for each other in a "
                        "cycle",
                        op_name(d.op), d.site.file, d.site.line, d.mask, lane, op_name(o.op),
                        o.site.file, o.site.line, o.mask);
        }
        return;
    }
    // Only barrier waiters would have released each other.
    set_message(nullptr, "deadlock: no thread can proceed");
}

// 0xffa5 in every half-word: NaN as f16, bf16, f32 and f64, and an unlikely integer.
void poison(unsigned char* p, size_t bytes) {
    static const unsigned char pattern[2] = {0xa5, 0xff};
    for (size_t i = 0; i < bytes; ++i) p[i] = pattern[i & 1];
}

bool run_block(uint3 block) {
    blockIdx = block;
    if (E.dyn_smem != nullptr) poison(E.dyn_smem, E.dyn_smem_bytes);
    if (adversarial().poison) {
        const SharedSection statics = static_shared_section();
        poison(statics.bytes, statics.len);
    }
    E.barrier = Barrier{};
    E.first_exited = nullptr;
    E.live = E.num_threads;
    E.runnable_count = E.num_threads;
    for (uint32_t word = 0; word < kBitmapWords; ++word) {
        const uint32_t first = word * 64;
        E.runnable[word] = first >= E.num_threads ? 0
                           : E.num_threads - first >= 64 ? ~0ull
                           : (1ull << (E.num_threads - first)) - 1;
    }
    for (uint32_t i = 0; i < E.num_warps; ++i) {
        Warp& w = E.warps[i];
        const uint32_t present = std::min(kWarpSize, E.num_threads - i * kWarpSize);
        w.num_groups = 0;
        w.gone = present == kWarpSize ? 0 : kFullMask << present;
    }
    for (uint32_t i = 0; i < E.num_threads; ++i) {
        Thread& t = E.threads[i];
        t.idx = uint3{i % blockDim.x, (i / blockDim.x) % blockDim.y, i / (blockDim.x * blockDim.y)};
        t.linear = i;
        t.warp = i / kWarpSize;
        t.lane = i % kWarpSize;
        t.wait = Wait::None;
        fiber_prepare(t.fiber, *E.stacks[i], &thread_main, &t);
    }
    transfer(E.launcher, pick_next(nullptr), false);
    // Back in the launching context: the block finished, failed, or stalled.
    if (E.failed) return false;
    if (E.live > 0) {
        diagnose_stall();
        return false;
    }
    return true;
}

bool parse_schedule(const char* text, Schedule* out) {
    static std::atomic<uint64_t> launches{0};
    if (text == nullptr || *text == '\0' || std::strcmp(text, "forward") == 0) {
        *out = Schedule{Order::Forward, 0};
    } else if (std::strcmp(text, "reverse") == 0) {
        *out = Schedule{Order::Reverse, 0};
    } else if (std::strcmp(text, "random") == 0) {
        // A fresh seed per launch; error messages carry it so that a failure can be replayed.
        timeval now;
        gettimeofday(&now, nullptr);
        Random mix;
        mix.seed(static_cast<uint64_t>(now.tv_sec) * 1000000u + static_cast<uint64_t>(now.tv_usec) +
                 (launches.fetch_add(1) << 40));
        *out = Schedule{Order::Random, mix.next() >> 1};
    } else if (std::strncmp(text, "random:", 7) == 0 && text[7] >= '0' && text[7] <= '9') {
        char* end = nullptr;
        const unsigned long long seed = std::strtoull(text + 7, &end, 10);
        if (*end != '\0') return false;
        *out = Schedule{Order::Random, seed};
    } else {
        return false;
    }
    return true;
}

// Validates the launch and prepares the per-launch state; false with the message set if invalid.
bool configure(KernelBody body, const void* params, uint32_t max_block_threads,
               const HwLaunch* launch) {
    if (params == nullptr) {
        set_launch_error("params is null");
        return false;
    }
    if (launch == nullptr) {
        set_launch_error("launch configuration is null");
        return false;
    }
    const HwLaunch& l = *launch;
    const unsigned long long threads = 1ull * l.block_x * l.block_y * l.block_z;
    if (l.grid_x == 0 || l.grid_y == 0 || l.grid_z == 0 || threads == 0) {
        set_launch_error("grid (%u,%u,%u) or block (%u,%u,%u) has a zero dimension", l.grid_x,
                         l.grid_y, l.grid_z, l.block_x, l.block_y, l.block_z);
        return false;
    }
    if (l.block_x > 1024 || l.block_y > 1024 || l.block_z > 64 || threads > kMaxBlockThreads) {
        set_launch_error("block (%u,%u,%u) exceeds CUDA's limits (x, y <= 1024, z <= 64, at most "
                         "1024 threads)", l.block_x, l.block_y, l.block_z);
        return false;
    }
    if (threads > max_block_threads) {
        set_launch_error("block of %llu threads exceeds the kernel's __launch_bounds__ of %u",
                         threads, max_block_threads);
        return false;
    }
    if (l.grid_x > 0x7fffffffu || l.grid_y > 65535 || l.grid_z > 65535) {
        set_launch_error("grid (%u,%u,%u) exceeds CUDA's limits (x < 2^31, y, z <= 65535)",
                         l.grid_x, l.grid_y, l.grid_z);
        return false;
    }
    if (l.dyn_smem_bytes > kMaxDynamicShared) {
        set_launch_error("%u bytes of dynamic shared memory, more than the %u a block can have",
                         l.dyn_smem_bytes, kMaxDynamicShared);
        return false;
    }
    const char* spec = tl_has_schedule ? tl_schedule : std::getenv("HEADWISE_EMU_SCHEDULE");
    if (!parse_schedule(spec, &E.schedule)) {
        set_launch_error("HEADWISE_EMU_SCHEDULE=\"%s\" is not one of forward, reverse, random, "
                         "random:<seed>", spec);
        return false;
    }
    char bad_modes[HW_EMU_ERROR_LEN];
    if (!adversarial_begin_launch(E.kernel, bad_modes, sizeof bad_modes)) {
        set_launch_error("%s", bad_modes);
        return false;
    }
    if (adversarial().its && E.schedule.order != Order::Random) {
        E.schedule = Schedule{Order::Random, adversarial_seed()};  // reported with errors
    }
    if (adversarial().smem_optin && l.dyn_smem_bytes > kDefaultDynamicShared &&
        l.dyn_smem_bytes > dynamic_shared_limit(E.kernel)) {
        set_launch_error("%u bytes of dynamic shared memory, above %u without the opt-in: set the "
                         "kernel's MAX_DYNAMIC_SHARED_SIZE_BYTES attribute first "
                         "(hw_simt_func_set_max_dynamic_shared) [adversarial smem_optin]",
                         l.dyn_smem_bytes, dynamic_shared_limit(E.kernel));
        return false;
    }
    E.rng.seed(E.schedule.seed);
    E.body = body;
    E.params = params;
    E.num_threads = static_cast<uint32_t>(threads);
    E.num_warps = (E.num_threads + kWarpSize - 1) / kWarpSize;
    while (E.stacks.size() < E.num_threads) {
        FiberStack* stack = FiberStack::create();
        if (stack == nullptr) {
            set_launch_error("could not map %u fiber stacks of %zu KiB", E.num_threads,
                             FiberStack::kSize / 1024);
            return false;
        }
        E.stacks.emplace_back(stack);
    }
    E.dyn_smem_bytes = l.dyn_smem_bytes;
    if (l.dyn_smem_bytes > 0) {
        void* buffer = nullptr;
        if (posix_memalign(&buffer, kDynamicSharedAlign, l.dyn_smem_bytes) != 0) {
            set_launch_error("could not allocate %u bytes of dynamic shared memory", l.dyn_smem_bytes);
            return false;
        }
        E.dyn_smem = static_cast<unsigned char*>(buffer);
    }
    blockDim = dim3(l.block_x, l.block_y, l.block_z);
    gridDim = dim3(l.grid_x, l.grid_y, l.grid_z);
    return true;
}

bool run_grid() {
    const uint64_t blocks = 1ull * gridDim.x * gridDim.y * gridDim.z;
    BlockOrder order(blocks, E.schedule.order, E.rng);
    for (uint64_t n = 0; n < blocks; ++n) {
        const uint64_t b = order.next();
        const uint3 block{static_cast<unsigned>(b % gridDim.x),
                          static_cast<unsigned>((b / gridDim.x) % gridDim.y),
                          static_cast<unsigned>(b / (1ull * gridDim.x * gridDim.y))};
        if (!run_block(block)) return false;
    }
    return true;
}

}  // namespace

uint64_t warp_collective(WarpOp op, uint32_t mask, uint64_t value, int32_t b, int32_t width,
                         const char* file, int line) {
    return arrive(op, mask, value, b, width, nullptr, Site{file, line});
}

void warp_task(WarpOp op, WarpTask* task, uint64_t value, int32_t b, int32_t width,
               const char* file, int line) {
    arrive(op, kFullMask, value, b, width, task, Site{file, line});
}

int block_barrier(BarrierOp op, int predicate, const char* file, int line) {
    const Site site{file, line};
    Thread& self = running_thread([op] { return barrier_name(op); }, site);
    if (E.first_exited != nullptr) {
        const Thread& gone = *E.first_exited;
        fail(self, "%s at %s:%d, but thread (%u,%u,%u) has already exited: %s", barrier_name(op),
             file, line, gone.idx.x, gone.idx.y, gone.idx.z, early_exit_hint);
    }
    Barrier& bar = E.barrier;
    if (bar.waiting == 0) {
        bar.op = op;
        bar.site = site;
        bar.true_count = 0;
        bar.first = &self;
    } else if (bar.op != op || !same_site(bar.site, site)) {
        fail(self, "%s at %s:%d, while thread (%u,%u,%u) waits at %s at %s:%d: all threads of a "
             "block must wait at the same barrier (divergent __syncthreads)", barrier_name(op), file,
             line, bar.first->idx.x, bar.first->idx.y, bar.first->idx.z, barrier_name(bar.op),
             bar.site.file, bar.site.line);
    }
    ++bar.waiting;
    bar.true_count += predicate != 0;
    block_on(self, Wait::Barrier, site);
    if (bar.waiting == E.live) release_barrier();
    reschedule(self);
    return self.barrier_result;
}

void yield_point() {
    if (E.current == nullptr || !adversarial().its) return;
    reschedule(*E.current);  // the caller stays runnable: any runnable thread may go next
}

uint32_t live_lanes() {
    Thread& self = running_thread([] { return "__activemask"; }, Site{"?", 0});
    return ~E.warps[self.warp].gone;
}

unsigned char* dynamic_shared() {
    running_thread([] { return "HW_DYNAMIC_SHARED"; }, Site{"?", 0});
    return E.dyn_smem;
}

void kernel_error(const char* file, int line, const char* format, ...) {
    Thread& self = running_thread([] { return "a kernel error"; }, Site{file, line});
    char detail[HW_EMU_ERROR_LEN];
    va_list args;
    va_start(args, format);
    std::vsnprintf(detail, sizeof detail, format, args);
    va_end(args);
    fail(self, "at %s:%d: %s", file, line, detail);
}

int launch(const char* kernel, KernelBody body, const void* params, uint32_t max_block_threads,
           const HwLaunch* launch, HwEmuError* err) {
    std::lock_guard<std::mutex> lock(E.launch_mutex);
    E.kernel = kernel;
    E.failed = false;
    E.message[0] = '\0';
    E.dyn_smem = nullptr;
    traffic_launch_begin(kernel);
    const bool ok = configure(body, params, max_block_threads, launch) && run_grid();
    traffic_launch_end(ok);
    std::free(E.dyn_smem);
    E.dyn_smem = nullptr;
    E.current = nullptr;
    if (ok) return 0;
    if (err != nullptr) std::snprintf(err->message, sizeof err->message, "%s", E.message);
    return 1;
}

}  // namespace hw_simt

extern "C" {

// Sets the schedule for launches made from the calling OS thread (same syntax as
// HEADWISE_EMU_SCHEDULE, which it overrides); null restores the environment's.
int hw_simt_set_thread_schedule(const char* spec, char* message, size_t message_len) {
    using namespace hw_simt;
    if (spec == nullptr) {
        tl_has_schedule = false;
        return 0;
    }
    Schedule parsed;
    if (std::strlen(spec) >= sizeof tl_schedule || !parse_schedule(spec, &parsed)) {
        if (message != nullptr && message_len > 0) {
            std::snprintf(message, message_len,
                          "schedule \"%s\" is not one of forward, reverse, random, random:<seed>", spec);
        }
        return 1;
    }
    std::strcpy(tl_schedule, spec);
    tl_has_schedule = true;
    return 0;
}

// Whether this library was compiled with AddressSanitizer (HEADWISE_EMU_SANITIZE=1).
int hw_simt_built_with_asan(void) { return HW_SIMT_HAS_ASAN; }

}  // extern "C"
