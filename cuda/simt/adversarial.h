// Adversarial modes: optional checks that make the emulator stricter, closer to what hardware
// leaves undefined (issue 14). Selected per launch by HEADWISE_EMU_ADVERSARIAL=all or a comma
// list of the names below, or per OS thread with hw_simt_set_thread_adversarial (self-tests):
//   wmma        each launch maps fragment elements x[i] to tile elements through a fresh random
//               permutation (one per fragment kind): load/store/mma/fill stay exact, code that
//               indexes x[i] assuming a layout reads the wrong elements;
//   masks       a shuffle, vote or reduction whose mask names a lane that has exited or does
//               not exist is an error (by default such lanes are silently left out);
//   its         independent thread scheduling: threads run in a shuffled order (random schedule
//               with a per-launch seed, reported in errors) and yield at atomics and fences, so
//               warp-synchronous code that communicates through memory without __syncwarp fails;
//   poison      static __shared__ variables of non-template functions are filled with 0xffa5 at
//               every block start (not in the AddressSanitizer build, where ASan guards them),
//               like dynamic shared memory always is (template functions'
//               statics live in COMDAT sections that cannot be enumerated);
//   smem_optin  dynamic shared memory above 48 KiB is refused unless the host opted the kernel
//               in (hw_simt_func_set_max_dynamic_shared, the emulator's
//               CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES).
#pragma once

#include <cstddef>
#include <cstdint>

namespace hw_simt {

struct Adversarial {
    bool wmma = false, masks = false, its = false, poison = false, smem_optin = false;
};

// The modes of the launch in progress (all off outside a launch).
const Adversarial& adversarial();

// Resolves the launch's modes (thread override, else the environment) and draws its WMMA
// permutations; false with `message` filled when the specification is invalid.
bool adversarial_begin_launch(const char* kernel, char* message, size_t message_len);

// Launch seed for the its mode's schedule (drawn by adversarial_begin_launch).
uint64_t adversarial_seed();

// Index in fragment::x of logical tile element `logical` (row-major) for fragment kind `use`
// (0 matrix_a, 1 matrix_b, 2 accumulator): the identity unless the wmma mode is on.
extern const uint16_t* wmma_permutations[3];
inline uint16_t wmma_slot(int use, int logical) { return wmma_permutations[use][logical]; }

// Dynamic shared memory bytes the host allowed `kernel` (48 KiB without an opt-in).
uint32_t dynamic_shared_limit(const char* kernel);
constexpr uint32_t kDefaultDynamicShared = 48 * 1024;

// The bytes of the static __shared__ variables the emulator can find, which the poison mode
// fills as it fills dynamic shared memory; {nullptr, 0} when there are none.
struct SharedSection {
    unsigned char* bytes;
    size_t len;
};
SharedSection static_shared_section();

}  // namespace hw_simt

extern "C" {
// Sets the adversarial modes for launches from the calling OS thread (same syntax as
// HEADWISE_EMU_ADVERSARIAL, "" for none); null restores the environment's. 0, or 1 with a message.
int hw_simt_set_thread_adversarial(const char* spec, char* message, size_t message_len);
// The emulator's cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES) for the kernel named
// name[0..len) (its hw_emu_ entry name without the prefix).
void hw_simt_func_set_max_dynamic_shared(const char* name, size_t len, uint32_t bytes);
}
