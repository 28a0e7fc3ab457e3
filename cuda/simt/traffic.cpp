// Emulator memory-traffic counts: see traffic.h for the model.
#include "traffic.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <unordered_map>
#include <vector>

#include "types.h"

namespace hw_simt {

bool traffic_on = false;

namespace {

struct Watch {
    uintptr_t begin;
    uint64_t len;
    std::vector<uint32_t> reads;  // per byte, this launch
};

struct Lane {
    uintptr_t addr;
    uint32_t bytes;
};
struct Access {
    bool write, shared;
    std::vector<Lane> lanes;
};

// One warp-wide access: (warp, call site, occurrence) within the current block.
struct Key {
    uint32_t warp;
    const char* file;
    int line;
    uint64_t occurrence;
    bool operator==(const Key& o) const {
        return warp == o.warp && file == o.file && line == o.line && occurrence == o.occurrence;
    }
};
struct KeyHash {
    size_t operator()(const Key& k) const {
        uint64_t h = uint64_t(reinterpret_cast<uintptr_t>(k.file)) * 0x9e3779b97f4a7c15ull;
        h ^= (uint64_t(k.line) << 32 | k.warp) + 0x7f4a7c15 + (h << 6) + (h >> 2);
        h ^= k.occurrence * 0xc2b2ae3d27d4eb4full + (h << 6) + (h >> 2);
        return size_t(h);
    }
};
// Per (thread, call site) occurrence counter.
struct SiteKey {
    uint32_t tid;
    const char* file;
    int line;
    bool operator==(const SiteKey& o) const { return tid == o.tid && file == o.file && line == o.line; }
};
struct SiteHash {
    size_t operator()(const SiteKey& k) const {
        return size_t(uint64_t(reinterpret_cast<uintptr_t>(k.file)) * 0x9e3779b97f4a7c15ull ^
                      (uint64_t(k.line) << 32 | k.tid));
    }
};

// Launches hold the emulator's mutex and run on the launching OS thread: all state is per OS
// thread, so concurrent tests do not see each other's counts.
thread_local int tl_enable = -1;  // -1: follow the environment
thread_local std::vector<HwTrafficRecord> tl_records;
thread_local HwTrafficRecord tl_cur{};
thread_local std::vector<Watch> tl_watch;
thread_local uint64_t tl_block = ~0ull;
thread_local std::unordered_map<Key, Access, KeyHash>* tl_acc = nullptr;
thread_local std::unordered_map<SiteKey, uint64_t, SiteHash>* tl_occ = nullptr;

bool env_on() {
    const char* e = std::getenv("HEADWISE_EMU_TRAFFIC");
    return e != nullptr && e[0] != '\0' && std::strcmp(e, "0") != 0;
}

Watch* watched(uintptr_t a) {
    for (Watch& w : tl_watch)
        if (a >= w.begin && a < w.begin + w.len) return &w;
    return nullptr;
}

void tally_global(const Access& a) {
    std::vector<uintptr_t> sectors;
    for (const Lane& l : a.lanes)
        for (uintptr_t s = l.addr / 32; s <= (l.addr + l.bytes - 1) / 32; ++s) sectors.push_back(s);
    std::sort(sectors.begin(), sectors.end());
    const uint64_t n = uint64_t(std::unique(sectors.begin(), sectors.end()) - sectors.begin());
    tl_cur.requests++;
    tl_cur.sectors += n;
    if (!a.write && watched(a.lanes[0].addr) != nullptr) {
        tl_cur.watched_requests++;
        tl_cur.watched_sectors += n;
    }
}

void tally_shared(const Access& a) {
    std::vector<uintptr_t> words;
    for (const Lane& l : a.lanes) {
        tl_cur.smem_bytes += l.bytes;
        for (uintptr_t w = l.addr / 4; w <= (l.addr + l.bytes - 1) / 4; ++w) words.push_back(w);
    }
    std::sort(words.begin(), words.end());
    words.erase(std::unique(words.begin(), words.end()), words.end());
    uint32_t per_bank[32] = {};
    for (uintptr_t w : words) per_bank[w % 32]++;
    const uint64_t degree = *std::max_element(per_bank, per_bank + 32);
    tl_cur.smem_requests++;
    tl_cur.smem_wavefronts += degree;
    tl_cur.smem_ideal_wavefronts += std::max<uint64_t>(1, (words.size() + 31) / 32);
}

// Tallies and forgets the current block's warp-wide accesses (blocks run one after another).
void flush_block() {
    if (tl_acc == nullptr) return;
    for (const auto& kv : *tl_acc) {
        if (kv.second.shared) {
            tally_shared(kv.second);
        } else {
            tally_global(kv.second);
        }
    }
    tl_acc->clear();
    tl_occ->clear();
}

}  // namespace

void traffic_launch_begin(const char* kernel) {
    traffic_on = tl_enable == -1 ? env_on() : tl_enable == 1;
    if (!traffic_on) return;
    tl_cur = HwTrafficRecord{};
    tl_cur.kernel = kernel;
    tl_block = ~0ull;
    for (Watch& w : tl_watch) std::fill(w.reads.begin(), w.reads.end(), 0u);
    tl_acc = new std::unordered_map<Key, Access, KeyHash>();
    tl_occ = new std::unordered_map<SiteKey, uint64_t, SiteHash>();
}

void traffic_record(const void* addr, uint32_t bytes, bool write, bool shared, const char* file, int line) {
    if (!traffic_on || tl_acc == nullptr || bytes == 0) return;
    const uint64_t block = (uint64_t(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    if (block != tl_block) {
        flush_block();
        tl_block = block;
    }
    const uint32_t tid = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    const uint64_t k = (*tl_occ)[SiteKey{tid, file, line}]++;
    Access& a = (*tl_acc)[Key{tid / 32, file, line, k}];
    a.write = write;
    a.shared = shared;
    const uintptr_t p = reinterpret_cast<uintptr_t>(addr);
    a.lanes.push_back(Lane{p, bytes});
    if (shared) return;
    if (write) {
        tl_cur.write_bytes += bytes;
        return;
    }
    tl_cur.read_bytes += bytes;
    if (Watch* w = watched(p)) {
        tl_cur.watched_read_bytes += bytes;
        for (uint32_t i = 0; i < bytes && p + i < w->begin + w->len; ++i) w->reads[p + i - w->begin]++;
    }
}

void traffic_launch_end(bool ok) {
    if (tl_acc == nullptr) return;
    flush_block();
    delete tl_acc;
    delete tl_occ;
    tl_acc = nullptr;
    tl_occ = nullptr;
    traffic_on = false;
    if (!ok) return;  // a failed launch's counts are partial: drop them
    for (const Watch& w : tl_watch)
        for (uint32_t r : w.reads) tl_cur.watched_unique_bytes += r != 0;
    // Bounded when nobody takes them (HEADWISE_EMU_TRAFFIC=1 over a whole test run): the
    // oldest half goes at 65536 records.
    if (tl_records.size() >= (size_t(1) << 16)) tl_records.erase(tl_records.begin(), tl_records.begin() + (1 << 15));
    tl_records.push_back(tl_cur);
}

}  // namespace hw_simt

extern "C" {

// 1: count launches from this OS thread; 0: do not; -1: follow HEADWISE_EMU_TRAFFIC.
void hw_emu_traffic_enable(int on) { hw_simt::tl_enable = on; }

// Moves up to `cap` of this OS thread's records (oldest first) to `out`, returns how many were
// held (call with cap 0 to size the buffer); the records copied are forgotten.
size_t hw_emu_traffic_take(HwTrafficRecord* out, size_t cap) {
    auto& r = hw_simt::tl_records;
    const size_t n = r.size();
    if (cap == 0) return n;
    const size_t m = std::min(n, cap);
    std::copy(r.begin(), r.begin() + long(m), out);
    r.erase(r.begin(), r.begin() + long(m));
    return n;
}

// Watches [addr, addr+len) on this OS thread: reads in it are also summed per launch.
void hw_emu_traffic_watch(const void* addr, uint64_t len) {
    hw_simt::tl_watch.push_back(
        hw_simt::Watch{reinterpret_cast<uintptr_t>(addr), len, std::vector<uint32_t>(len, 0u)});
}

void hw_emu_traffic_unwatch_all(void) { hw_simt::tl_watch.clear(); }

}  // extern "C"
