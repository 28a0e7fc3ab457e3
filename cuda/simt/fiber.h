// Execution contexts for emulated CUDA threads (internal to the emulator).
//
// Every emulated thread runs on its own stack as a cooperative fiber on the launching OS thread.
// The scheduler switches fibers at every barrier and warp collective, so a switch has to be
// cheap: on x86-64 it is a dozen instructions of hand-written assembly (callee-saved registers,
// stack pointer, MXCSR and the x87 control word), ~15 ns. Everywhere else, or with
// -DHW_SIMT_UCONTEXT=1, it falls back to <ucontext.h>, whose swapcontext makes a sigprocmask
// system call per switch (~230 ns: slower, still correct).
#pragma once

#include <cstddef>
#include <cstdint>

#if !defined(HW_SIMT_UCONTEXT)
#if defined(__x86_64__)
#define HW_SIMT_UCONTEXT 0
#else
#define HW_SIMT_UCONTEXT 1
#endif
#endif

#if HW_SIMT_UCONTEXT
#include <ucontext.h>
#endif

// AddressSanitizer must be told about every stack switch, or it reports the fibers' own stack
// accesses as wild. GCC defines __SANITIZE_ADDRESS__; clang answers __has_feature.
#if defined(__SANITIZE_ADDRESS__)
#define HW_SIMT_HAS_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define HW_SIMT_HAS_ASAN 1
#endif
#endif
#ifndef HW_SIMT_HAS_ASAN
#define HW_SIMT_HAS_ASAN 0
#endif

namespace hw_simt {

// A fiber's saved context plus the bounds of the stack it runs on. The launching OS thread's own
// context (the scheduler's) is a Fiber too, with no stack of ours.
struct Fiber {
#if HW_SIMT_UCONTEXT
    ucontext_t uc;
#else
    void* sp = nullptr;
#endif
    // Lowest address and size of the stack; the ASan annotations need them. For the scheduler's
    // fiber they are learned from ASan itself on the first switch back.
    void* stack_lo = nullptr;
    size_t stack_size = 0;
#if HW_SIMT_HAS_ASAN
    void* fake_stack = nullptr;
#endif
#if HW_SIMT_UCONTEXT
    // makecontext passes only int arguments, so the entry point travels in the Fiber itself.
    void (*entry)(void*) = nullptr;
    void* arg = nullptr;
#endif
};

// One mmap'd fiber stack with an inaccessible guard page below it, so an overflow faults at once
// instead of silently corrupting the neighbouring stack. Stacks are pooled by the scheduler and
// reused across blocks and launches; only the pages a kernel touches are ever backed by memory.
class FiberStack {
  public:
    static constexpr size_t kSize = 256 * 1024;

    // nullptr when the address space cannot be had (reported as a launch error, not a crash).
    static FiberStack* create();
    ~FiberStack();
    FiberStack(const FiberStack&) = delete;
    FiberStack& operator=(const FiberStack&) = delete;

    void* lo() const { return lo_; }

  private:
    FiberStack(void* mapping, void* lo) : mapping_(mapping), lo_(lo) {}
    void* mapping_;
    void* lo_;
};

using FiberEntry = void (*)(void* arg);

// Prepares `f` to run entry(arg) on `stack` the first time it is switched to. entry must never
// return: a finished fiber switches away with fiber_exit(). Under ASan this also clears the
// poison that frames of the stack's previous fiber left behind (a fiber that switches away for
// good never unwinds its frames).
void fiber_prepare(Fiber& f, FiberStack& stack, FiberEntry entry, void* arg);

// The first thing an entry function calls (completes the ASan switch that started it).
// `from` is the fiber that switched to it.
void fiber_started(Fiber& from);

// Saves the running context into `from` and resumes `to`. Returns when some fiber switches back
// to `from`; `from` must be the fiber that is running.
void fiber_switch(Fiber& from, Fiber& to);

// Like fiber_switch for a fiber that will never be resumed (it finished, or is being abandoned
// after a kernel error): ASan releases its bookkeeping instead of expecting a return.
void fiber_exit(Fiber& from, Fiber& to);

}  // namespace hw_simt
