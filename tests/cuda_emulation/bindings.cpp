// The test-only extension: the qrcp ops of csrc/qrcp/driver.cpp, built with QRLORA_CUDA_EMULATION so
// that every panel and norm recomputation runs the CUDA kernels (emulated on the CPU), registered as
// torch.ops.qrlora_cuda_emulation.* beside the real torch.ops.qrlora.*.
#include <torch/library.h>

#include "../../csrc/qrcp/driver.h"

// The op namespace: qrlora_cuda_emulation, or another one for a second build (e.g. at the GPU's block
// sizes) loaded beside the first. Two macro levels, so that the name is expanded before TORCH_LIBRARY
// pastes it.
#ifndef QRLORA_EMULATION_NAMESPACE
#define QRLORA_EMULATION_NAMESPACE qrlora_cuda_emulation
#endif
#define QRLORA_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define QRLORA_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

QRLORA_LIBRARY(QRLORA_EMULATION_NAMESPACE, m) {
  m.def("qrcp(Tensor A, int rank, float tau, float abstol, float reltol, str method, int block_size, "
        "int seed, str mode=\"reduced\") -> (Tensor Q, Tensor R, Tensor perm)");
}

QRLORA_LIBRARY_IMPL(QRLORA_EMULATION_NAMESPACE, CPU, m) { m.impl("qrcp", &qrlora::qrcp::qrcp_op); }
