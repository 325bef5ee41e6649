// The extension's one binding file: registers the qrlora:: torch ops (CPU and, in CUDA builds,
// CUDA implementations) and a tiny Python module with build information.
#include <torch/extension.h>
#include <torch/library.h>

#include "qrcp/driver.h"
#include "qrcp/form_q.h"

#define QRLORA_STR_(x) #x
#define QRLORA_STR(x) QRLORA_STR_(x)

TORCH_LIBRARY(qrlora, m) {
  // Sentinels: rank/tau/abstol/reltol < 0 mean "not set", block_size <= 0 the default.
  // mode "raw" returns (H, tau, perm) in the first two slots (see qrcp/driver.h).
  m.def("qrcp(Tensor A, int rank, float tau, float abstol, float reltol, str method, int block_size, "
        "int seed, str mode=\"reduced\") -> (Tensor Q, Tensor R, Tensor perm)");
  // The same factorisation of each matrix of a B x m x n batch; one list entry per matrix.
  m.def("qrcp_batched(Tensor A, int rank, float tau, float abstol, float reltol, str method, int block_size, "
        "int seed, str mode=\"reduced\") -> (Tensor[] Q, Tensor[] R, Tensor[] perm)");
  // Q (m x c) from c Householder reflectors, as torch.linalg.householder_product; on the CPU
  // bit-identical at any thread count (qrcp/form_q.h).
  m.def("householder_q(Tensor H, Tensor tau) -> Tensor");
}

TORCH_LIBRARY_IMPL(qrlora, CPU, m) {
  m.impl("qrcp", &qrlora::qrcp::qrcp_op);
  m.impl("qrcp_batched", &qrlora::qrcp::qrcp_batched_op);
  m.impl("householder_q", &qrlora::qrcp::householder_q);
}

#ifdef QRLORA_WITH_CUDA
TORCH_LIBRARY_IMPL(qrlora, CUDA, m) {
  m.impl("qrcp", &qrlora::qrcp::qrcp_op);
  m.impl("qrcp_batched", &qrlora::qrcp::qrcp_batched_op);
  m.impl("householder_q", &qrlora::qrcp::householder_q);
}
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  pybind11::list archs;
#ifdef QRLORA_WITH_CUDA
  info["kind"] = "cuda";
#ifdef QRLORA_CUDA_ARCHS
  // Passed by setup.py as e.g. 80_90 (no ';' or ',' survives a compiler command line intact).
  std::string list = QRLORA_STR(QRLORA_CUDA_ARCHS);
  size_t start = 0;
  while (start <= list.size()) {
    const size_t end = std::min(list.find('_', start), list.size());
    if (end > start) archs.append("sm_" + list.substr(start, end - start));
    start = end + 1;
  }
#endif
#else
  info["kind"] = "cpu";
#endif
  info["archs"] = archs;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "qrlora_kernels C++/CUDA extension: registers torch.ops.qrlora.*";
  m.def("build_info", &build_info, "Which kind of extension this is (cpu or cuda) and its GPU architectures.");
}
