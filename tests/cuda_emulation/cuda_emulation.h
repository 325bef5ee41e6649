// CPU stand-ins for the CUDA built-ins that csrc/qrcp/panel_cuda.cu uses, so that the tests can
// compile that file as C++ and run its kernels, unchanged, on a machine without a GPU.
//
// Every CUDA thread of a block is a fiber (ucontext), all on the calling OS thread; blocks run one
// after another, and within a block a fiber runs until it reaches a barrier or returns. A barrier
// opens once every thread still running has reached it: __syncthreads() over the block (a thread
// that has returned no longer counts, as on the GPU), and a warp shuffle over the warp, whose lanes
// exchange values through per-warp slots. What the GPU leaves undefined is an error here: a shuffle
// that reads a lane which has already returned, and barriers that can never open (threads of a warp
// split between a shuffle and __syncthreads, or a __syncthreads some threads skip and then wait at a
// different one), reported as a deadlock. __shared__ variables are function statics: one copy per
// kernel, right because no two blocks run at once. The schedule is deterministic: round robin, or
// seeded random permutations (QRLORA_CUDA_EMULATION_SEED), which expose races between barriers.
// Not emulated: memory-model subtleties and timing. This checks the kernels' arithmetic, indexing
// and barrier structure.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#define QRLORA_CUDA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

// Device math: the CUDA headers put these overloads in the global namespace.
using std::copysign;
using std::fabs;
using std::hypot;
using std::isfinite;
using std::max;
using std::min;
using std::sqrt;

struct uint3 {
  unsigned int x = 0, y = 0, z = 0;
};

inline thread_local uint3 threadIdx, blockIdx, blockDim, gridDim;

namespace qrlora_emulation {

enum class State { kRunning, kAtBlockBarrier, kAtWarpBarrier, kDone };

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  State state = State::kRunning;
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<std::array<unsigned char, 8>> slots;  // one per thread: its value in a warp shuffle
  ucontext_t scheduler;
  int current = 0;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;
};

inline thread_local Block* current_block = nullptr;

// Back to the scheduler, in `state`; returns when the scheduler resumes this thread.
inline void wait_at(State state) {
  Block& b = *current_block;
  Fiber& f = b.fibers[b.current];
  f.state = state;
  swapcontext(&f.context, &b.scheduler);
  if (b.error) throw std::runtime_error("cuda emulation: aborted");  // another thread failed
}

inline void fiber_entry() {
  Block& b = *current_block;
  try {
    (*b.body)();
  } catch (...) {
    if (!b.error) b.error = std::current_exception();
  }
  b.fibers[b.current].state = State::kDone;
  swapcontext(&b.fibers[b.current].context, &b.scheduler);
}

inline std::string describe(const Block& b) {
  std::string out;
  for (size_t t = 0; t < b.fibers.size(); ++t) {
    const State s = b.fibers[t].state;
    if (s == State::kDone) continue;
    out += " t" + std::to_string(t) + (s == State::kAtBlockBarrier ? ":__syncthreads" : ":shuffle");
    if (out.size() > 200) return out + " ...";
  }
  return out;
}

// Opens every barrier whose live threads have all arrived; false when none could open.
inline bool release(Block& b) {
  const int n = static_cast<int>(b.fibers.size());
  bool any = false;
  bool all_at_block = true, any_live = false;
  for (const Fiber& f : b.fibers) {
    if (f.state == State::kDone) continue;
    any_live = true;
    all_at_block &= f.state == State::kAtBlockBarrier;
  }
  if (!any_live) return false;
  if (all_at_block) {
    for (Fiber& f : b.fibers)
      if (f.state != State::kDone) f.state = State::kRunning;
    return true;
  }
  for (int w = 0; w < n; w += 32) {
    bool all_at_warp = true, live = false;
    for (int t = w; t < std::min(n, w + 32); ++t) {
      if (b.fibers[t].state == State::kDone) continue;
      live = true;
      all_at_warp &= b.fibers[t].state == State::kAtWarpBarrier;
    }
    if (live && all_at_warp) {
      for (int t = w; t < std::min(n, w + 32); ++t)
        if (b.fibers[t].state != State::kDone) b.fibers[t].state = State::kRunning;
      any = true;
    }
  }
  return any;
}

// After an error: resumes every unfinished thread until it has returned (a suspended one throws
// "aborted" at its barrier and unwinds), so that no stack is dropped with live frames on it.
inline void unwind(Block& b) {
  for (bool live = true; live;) {
    live = false;
    for (size_t t = 0; t < b.fibers.size(); ++t) {
      if (b.fibers[t].state == State::kDone) continue;
      live = true;
      b.current = static_cast<int>(t);
      threadIdx = {static_cast<unsigned>(t), 0, 0};
      swapcontext(&b.scheduler, &b.fibers[t].context);
    }
  }
}

// Runs body() as every thread of every block of a grid; rethrows the first error.
inline void run_grid(int64_t grid, int block, const std::function<void()>& body) {
  if (block <= 0 || block > 1024) throw std::runtime_error("cuda emulation: invalid block size");
  constexpr size_t kStack = 64 * 1024;
  Block b;
  b.fibers.resize(block);
  b.slots.resize(block);
  b.body = &body;
  // The order in which a pass runs the threads that are ready: 0, 1, 2, ... by default; with
  // QRLORA_CUDA_EMULATION_SEED set, a fresh random permutation each pass (a race-free kernel gives
  // the same bits under every schedule: the tests compare).
  std::vector<int> order(block);
  std::iota(order.begin(), order.end(), 0);
  const char* seed = std::getenv("QRLORA_CUDA_EMULATION_SEED");
  const bool shuffled = seed != nullptr && *seed != '\0';
  static thread_local std::mt19937_64 rng;
  static thread_local std::string rng_seed;
  if (shuffled && rng_seed != seed) {  // seeded once per value, then running on across launches
    rng_seed = seed;
    rng.seed(std::strtoull(seed, nullptr, 10));
  }
  Block* const outer = current_block;
  current_block = &b;
  for (int64_t g = 0; g < grid && !b.error; ++g) {
    for (int t = 0; t < block; ++t) {
      Fiber& f = b.fibers[t];
      f.stack.resize(kStack);
      f.state = State::kRunning;
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack.data();
      f.context.uc_stack.ss_size = kStack;
      f.context.uc_link = nullptr;
      makecontext(&f.context, fiber_entry, 0);
    }
    blockIdx = {static_cast<unsigned>(g), 0, 0};
    blockDim = {static_cast<unsigned>(block), 1, 1};
    gridDim = {static_cast<unsigned>(grid), 1, 1};
    for (;;) {
      bool ran = false;
      if (shuffled) std::shuffle(order.begin(), order.end(), rng);
      for (int i = 0; i < block && !b.error; ++i) {
        const int t = order[i];
        if (b.fibers[t].state != State::kRunning) continue;
        b.current = t;
        threadIdx = {static_cast<unsigned>(t), 0, 0};
        swapcontext(&b.scheduler, &b.fibers[t].context);
        ran = true;
      }
      if (b.error) {
        unwind(b);
        break;
      }
      if (ran) continue;
      if (!release(b)) {
        bool live = false;
        for (const Fiber& f : b.fibers) live |= f.state != State::kDone;
        if (!live) break;
        b.error = std::make_exception_ptr(std::runtime_error(
            "cuda emulation: deadlock in block " + std::to_string(g) + ", barriers that cannot open:" +
            describe(b)));
        unwind(b);
        break;
      }
    }
  }
  current_block = outer;
  if (b.error) std::rethrow_exception(b.error);
}

template <class... Params>
struct Launch {
  void (*kernel)(Params...);
  int64_t grid;
  int block;
  template <class... Args>
  void operator()(Args&&... args) const {
    const std::function<void()> body = [&] { kernel(args...); };
    run_grid(grid, block, body);
  }
};

template <class... Params>
Launch<Params...> launch(void (*kernel)(Params...), int64_t grid, int block) {
  return {kernel, grid, block};
}

}  // namespace qrlora_emulation

inline void __syncthreads() { qrlora_emulation::wait_at(qrlora_emulation::State::kAtBlockBarrier); }

template <class T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta) {
  static_assert(sizeof(T) <= 8, "cuda emulation: shuffles of up to 8 bytes");
  using qrlora_emulation::State;
  if (mask != 0xffffffffu) throw std::runtime_error("cuda emulation: only full-warp shuffles are emulated");
  auto& b = *qrlora_emulation::current_block;
  const unsigned t = threadIdx.x, lane = t % 32, source = t + delta;
  std::memcpy(b.slots[t].data(), &value, sizeof(T));
  qrlora_emulation::wait_at(State::kAtWarpBarrier);
  T out = value;
  if (lane + delta < 32 && source < b.fibers.size()) {
    if (b.fibers[source].state == State::kDone)
      throw std::runtime_error("cuda emulation: a full-warp shuffle reads lane " + std::to_string(lane + delta) +
                               ", which has already returned");
    std::memcpy(&out, b.slots[source].data(), sizeof(T));
  }
  qrlora_emulation::wait_at(State::kAtWarpBarrier);
  return out;
}

// Launches and the host-side CUDA runtime pieces the panel uses.
#define QRLORA_LAUNCH(kernel, grid, block, stream) ::qrlora_emulation::launch(kernel, grid, block)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)

namespace c10::cuda {
struct CUDAGuard {
  template <class Device>
  explicit CUDAGuard(const Device&) {}
};
inline int getCurrentCUDAStream() { return 0; }
}  // namespace c10::cuda
