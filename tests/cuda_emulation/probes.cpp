// Kernels that misuse barriers, and one that uses them right, to show that the emulation
// (cuda_emulation.h) reports what the GPU would leave undefined: torch.ops.qrlora_cuda_emulation.probe.
#include "cuda_emulation.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace {

constexpr int kBlock = 64;

// Per-block sum of threadIdx.x through warp shuffles and shared memory (block_reduce's pattern).
__global__ void block_sums(int64_t* out) {
  __shared__ int64_t partial[32];
  int64_t v = threadIdx.x;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t total = 0;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) total += partial[w];
    out[blockIdx.x] = total;
  }
}

__global__ void different_syncthreads(int64_t*) {
  if (threadIdx.x < 16) __syncthreads();
  __syncthreads();
}

__global__ void syncthreads_after_return(int64_t*) {
  if (threadIdx.x >= 32) return;
  __syncthreads();
}

__global__ void shuffle_after_return(int64_t* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[0] = __shfl_down_sync(0xffffffffu, int64_t(1), 1);
}

__global__ void split_warp(int64_t* out) {
  if (threadIdx.x % 2) {
    out[0] = __shfl_down_sync(0xffffffffu, int64_t(1), 1);
  } else {
    __syncthreads();
  }
}

at::Tensor probe(c10::string_view name) {
  at::Tensor out = at::full({3}, -1, at::kLong);
  int64_t* p = out.data_ptr<int64_t>();
  if (name == "block_sums") QRLORA_LAUNCH(block_sums, 3, kBlock, 0)(p);
  else if (name == "different_syncthreads") QRLORA_LAUNCH(different_syncthreads, 1, kBlock, 0)(p);
  else if (name == "syncthreads_after_return") QRLORA_LAUNCH(syncthreads_after_return, 1, kBlock, 0)(p);
  else if (name == "shuffle_after_return") QRLORA_LAUNCH(shuffle_after_return, 1, kBlock, 0)(p);
  else if (name == "split_warp") QRLORA_LAUNCH(split_warp, 1, kBlock, 0)(p);
  else if (name == "empty_grid") QRLORA_LAUNCH(block_sums, 0, kBlock, 0)(p);
  else TORCH_CHECK(false, "unknown probe ", std::string(name));
  return out;
}

}  // namespace

#ifndef QRLORA_EMULATION_NAMESPACE
#define QRLORA_EMULATION_NAMESPACE qrlora_cuda_emulation
#endif
#define QRLORA_LIBRARY_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define QRLORA_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

QRLORA_LIBRARY_FRAGMENT(QRLORA_EMULATION_NAMESPACE, m) { m.def("probe(str name) -> Tensor"); }
QRLORA_LIBRARY_IMPL(QRLORA_EMULATION_NAMESPACE, CompositeExplicitAutograd, m) { m.impl("probe", &probe); }
