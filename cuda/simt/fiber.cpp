// Fiber stacks and context switches; see fiber.h for why they exist.
#include "fiber.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>

#if HW_SIMT_HAS_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace hw_simt {

FiberStack* FiberStack::create() {
    const size_t guard = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* mapping = mmap(nullptr, kSize + guard, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (mapping == MAP_FAILED) return nullptr;
    if (mprotect(mapping, guard, PROT_NONE) != 0) {
        munmap(mapping, kSize + guard);
        return nullptr;
    }
    return new FiberStack(mapping, static_cast<char*>(mapping) + guard);
}

FiberStack::~FiberStack() {
    munmap(mapping_, kSize + (static_cast<char*>(lo_) - static_cast<char*>(mapping_)));
}

#if !HW_SIMT_UCONTEXT

// hw_simt_ctx_switch(void** save_sp, void* next_sp): pushes the callee-saved registers and the
// floating-point control state on the current stack, stores the stack pointer in *save_sp, and
// unwinds the same frame layout from next_sp. Caller-saved state is the compiler's business
// because this is an ordinary call. Saved frame, from the saved stack pointer upwards:
//   [0] MXCSR (4 bytes) + x87 control word (2) + pad   [8] r15  [16] r14  [24] r13  [32] r12
//   [40] rbx  [48] rbp  [56] return address
// hw_simt_ctx_entry is the return address of a fresh frame (see fiber_prepare): it calls r13(r12)
// with an aligned stack. Its CFI marks the end of the call chain for unwinders (ASan reports,
// debuggers).
asm(R"(
    .pushsection .text
    .p2align 4
    .globl hw_simt_ctx_switch
    .hidden hw_simt_ctx_switch
    .type hw_simt_ctx_switch, @function
hw_simt_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size hw_simt_ctx_switch, .-hw_simt_ctx_switch

    .p2align 4
    .globl hw_simt_ctx_entry
    .hidden hw_simt_ctx_entry
    .type hw_simt_ctx_entry, @function
hw_simt_ctx_entry:
    .cfi_startproc
    .cfi_undefined rip
    movq %r12, %rdi
    callq *%r13
    ud2
    .cfi_endproc
    .size hw_simt_ctx_entry, .-hw_simt_ctx_entry
    .popsection
)");

extern "C" {
void hw_simt_ctx_switch(void** save_sp, void* next_sp) __attribute__((visibility("hidden")));
void hw_simt_ctx_entry() __attribute__((visibility("hidden")));
}

void fiber_prepare(Fiber& f, FiberStack& stack, FiberEntry entry, void* arg) {
    char* top = static_cast<char*>(stack.lo()) + FiberStack::kSize;
    // 64 bytes of slack above the frame; the frame itself must start 16-byte aligned so that
    // hw_simt_ctx_entry's call sees the ABI's stack alignment.
    void** frame = reinterpret_cast<void**>(top - 128);
    uint32_t mxcsr;
    uint16_t fpcw;
    asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(mxcsr), "=m"(fpcw));
    uint64_t fp_state = mxcsr | (static_cast<uint64_t>(fpcw) << 32);
    std::memcpy(&frame[0], &fp_state, sizeof fp_state);
    frame[1] = nullptr;                                        // r15
    frame[2] = nullptr;                                        // r14
    frame[3] = reinterpret_cast<void*>(entry);                 // r13
    frame[4] = arg;                                            // r12
    frame[5] = nullptr;                                        // rbx
    frame[6] = nullptr;                                        // rbp: ends frame-pointer walks
    frame[7] = reinterpret_cast<void*>(&hw_simt_ctx_entry);    // return address
    f.sp = frame;
    f.stack_lo = stack.lo();
    f.stack_size = FiberStack::kSize;
#if HW_SIMT_HAS_ASAN
    __asan_unpoison_memory_region(stack.lo(), FiberStack::kSize);
#endif
}

static inline void raw_switch(Fiber& from, Fiber& to) { hw_simt_ctx_switch(&from.sp, to.sp); }

#else  // HW_SIMT_UCONTEXT

static void ucontext_entry(unsigned hi, unsigned lo) {
    Fiber* f = reinterpret_cast<Fiber*>((static_cast<uintptr_t>(hi) << 32) | lo);
    f->entry(f->arg);
}

void fiber_prepare(Fiber& f, FiberStack& stack, FiberEntry entry, void* arg) {
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = stack.lo();
    f.uc.uc_stack.ss_size = FiberStack::kSize;
    f.uc.uc_link = nullptr;
    f.entry = entry;
    f.arg = arg;
    const uintptr_t self = reinterpret_cast<uintptr_t>(&f);
    makecontext(&f.uc, reinterpret_cast<void (*)()>(&ucontext_entry), 2,
                static_cast<unsigned>(self >> 32), static_cast<unsigned>(self & 0xffffffffu));
    f.stack_lo = stack.lo();
    f.stack_size = FiberStack::kSize;
#if HW_SIMT_HAS_ASAN
    __asan_unpoison_memory_region(stack.lo(), FiberStack::kSize);
#endif
}

static inline void raw_switch(Fiber& from, Fiber& to) { swapcontext(&from.uc, &to.uc); }

#endif  // HW_SIMT_UCONTEXT

void fiber_started(Fiber& from) {
#if HW_SIMT_HAS_ASAN
    const void* lo = nullptr;
    size_t size = 0;
    __sanitizer_finish_switch_fiber(nullptr, &lo, &size);
    from.stack_lo = const_cast<void*>(lo);
    from.stack_size = size;
#else
    (void)from;
#endif
}

void fiber_switch(Fiber& from, Fiber& to) {
#if HW_SIMT_HAS_ASAN
    __sanitizer_start_switch_fiber(&from.fake_stack, to.stack_lo, to.stack_size);
#endif
    raw_switch(from, to);
#if HW_SIMT_HAS_ASAN
    __sanitizer_finish_switch_fiber(from.fake_stack, nullptr, nullptr);
#endif
}

void fiber_exit(Fiber& from, Fiber& to) {
#if HW_SIMT_HAS_ASAN
    __sanitizer_start_switch_fiber(nullptr, to.stack_lo, to.stack_size);
#endif
    raw_switch(from, to);
    __builtin_unreachable();
}

}  // namespace hw_simt
