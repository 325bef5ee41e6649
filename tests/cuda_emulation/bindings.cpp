// The test-only extension: the qrcp ops of csrc/qrcp/driver.cpp, built with QRLORA_CUDA_EMULATION so
// that every panel and norm recomputation runs the CUDA kernels (emulated on the CPU), registered as
// torch.ops.qrlora_cuda_emulation.* beside the real torch.ops.qrlora.*.
#include <torch/library.h>

#include "../../csrc/qrcp/driver.h"

TORCH_LIBRARY(qrlora_cuda_emulation, m) {
  m.def("qrcp(Tensor A, int rank, float tau, float abstol, float reltol, str method, int block_size, "
        "int seed, str mode=\"reduced\") -> (Tensor Q, Tensor R, Tensor perm)");
}

TORCH_LIBRARY_IMPL(qrlora_cuda_emulation, CPU, m) { m.impl("qrcp", &qrlora::qrcp::qrcp_op); }
