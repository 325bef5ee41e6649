// CPU stand-ins for the CUDA built-ins that csrc/qrcp/panel_cuda.cu uses, so that the tests can
// compile that file as C++ and run its kernels, unchanged, on a machine without a GPU.
//
// Every CUDA thread of a block is a fiber (ucontext), all on the calling OS thread; blocks run one
// after another, and within a block a fiber runs until it reaches a barrier or returns. A barrier
// opens once every live thread has reached it: __syncthreads() over the block, and a warp shuffle
// over the warp, whose lanes exchange values through per-thread slots. What the GPU leaves undefined
// is an error here: threads waiting at different __syncthreads() calls (or lanes in different
// shuffles), a barrier or full-warp shuffle after some of its threads have returned, barriers that can
// never open (a deadlock), and an empty or oversized launch. __shared__ variables are function
// statics: one copy per kernel, right because no two blocks run at once (but, unlike on the GPU,
// zeroed at first and kept across blocks, so a read before any write goes unnoticed). The schedule is
// deterministic: round robin, or seeded random permutations of the blocks and, at every pass, of the
// ready threads (QRLORA_CUDA_EMULATION_SEED), which expose races between two barriers. Not emulated:
// races inside a stretch between barriers (a thread runs it without interruption), memory-model
// subtleties, timing. This checks the kernels' arithmetic, indexing and barrier structure.
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
  const void* site = nullptr;  // where it waits: the barrier's call site (and a shuffle's phase)
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
inline void wait_at(State state, const void* site) {
  Block& b = *current_block;
  Fiber& f = b.fibers[b.current];
  f.state = state;
  f.site = site;
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

inline void fail(Block& b, const std::string& what) {
  if (!b.error) b.error = std::make_exception_ptr(std::runtime_error("cuda emulation: " + what));
}

// The threads [begin, end) of a block, as one barrier sees them.
struct Party {
  bool live = false;     // some have not returned
  bool arrived = true;   // every live one waits in `state`
  bool any_done = false; // some have returned
  bool same_site = true; // every live one waits at the same call site
};

inline Party survey(const Block& b, int begin, int end, State state) {
  Party p;
  const void* site = nullptr;
  for (int t = begin; t < end; ++t) {
    const Fiber& f = b.fibers[t];
    if (f.state == State::kDone) {
      p.any_done = true;
      continue;
    }
    if (!p.live) site = f.site;
    p.live = true;
    p.arrived &= f.state == state;
    p.same_site &= f.site == site;
  }
  return p;
}

inline void resume(Block& b, int begin, int end) {
  for (int t = begin; t < end; ++t)
    if (b.fibers[t].state != State::kDone) b.fibers[t].state = State::kRunning;
}

// Opens every barrier whose live threads have all arrived; false when none could open. A barrier whose
// threads wait at different call sites, or that some threads of its block (warp) have already left by
// returning, is undefined on the GPU: an error here (set in b.error).
inline bool release(Block& b) {
  const int n = static_cast<int>(b.fibers.size());
  const Party block = survey(b, 0, n, State::kAtBlockBarrier);
  if (!block.live) return false;
  if (block.arrived) {
    if (!block.same_site) fail(b, "the threads of a block wait at different __syncthreads() calls");
    if (block.any_done) fail(b, "__syncthreads() after some threads of the block have returned");
    if (b.error) return false;
    resume(b, 0, n);
    return true;
  }
  bool any = false;
  for (int w = 0; w < n; w += 32) {
    const int end = std::min(n, w + 32);
    const Party warp = survey(b, w, end, State::kAtWarpBarrier);
    if (!warp.live || !warp.arrived) continue;
    if (!warp.same_site) fail(b, "the lanes of warp " + std::to_string(w / 32) + " are in different shuffles");
    if (warp.any_done)
      fail(b, "a full-warp shuffle in warp " + std::to_string(w / 32) + " after some of its lanes returned");
    if (b.error) return false;
    resume(b, w, end);
    any = true;
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
  if (block <= 0 || block > 1024 || grid <= 0 || grid > 2147483647)
    throw std::runtime_error("cuda emulation: invalid configuration (grid " + std::to_string(grid) + ", block " +
                             std::to_string(block) + "), as cudaLaunchKernel would report");
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
  // Blocks run one after another: in index order, or shuffled under the seed like the threads.
  std::vector<int64_t> blocks(grid);
  std::iota(blocks.begin(), blocks.end(), 0);
  if (shuffled) std::shuffle(blocks.begin(), blocks.end(), rng);
  Block* const outer = current_block;
  current_block = &b;
  for (int64_t g : blocks) {
    if (b.error) break;
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
        fail(b, "deadlock in block " + std::to_string(g) + ", barriers that cannot open:" + describe(b));
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

// Not inlined: the return address names the call site, so that threads at different barriers are told apart.
__attribute__((noinline)) inline void __syncthreads() {
  qrlora_emulation::wait_at(qrlora_emulation::State::kAtBlockBarrier, __builtin_return_address(0));
}

template <class T>
__attribute__((noinline)) T __shfl_down_sync(unsigned mask, T value, unsigned delta) {
  static_assert(sizeof(T) <= 8, "cuda emulation: shuffles of up to 8 bytes");
  using qrlora_emulation::State;
  if (mask != 0xffffffffu) throw std::runtime_error("cuda emulation: only full-warp shuffles are emulated");
  auto& b = *qrlora_emulation::current_block;
  const unsigned t = threadIdx.x, lane = t % 32, source = t + delta;
  const char* site = static_cast<const char*>(__builtin_return_address(0));
  std::memcpy(b.slots[t].data(), &value, sizeof(T));
  qrlora_emulation::wait_at(State::kAtWarpBarrier, site);
  T out = value;
  if (lane + delta < 32 && source < b.fibers.size()) {
    if (b.fibers[source].state == State::kDone)
      throw std::runtime_error("cuda emulation: a full-warp shuffle reads lane " + std::to_string(lane + delta) +
                               ", which has already returned");
    std::memcpy(&out, b.slots[source].data(), sizeof(T));
  }
  qrlora_emulation::wait_at(State::kAtWarpBarrier, site + 1);  // the exchange's second phase
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
