// Interface between the one host driver (driver.cpp) and the device-specific panel kernels
// (panel_cpu.cpp, panel_cuda.cu) of the blocked column-pivoted QR (LAPACK dgeqp3 / dlaqps).
#pragma once

#include <ATen/ATen.h>

namespace qrlora::qrcp {

// Layout: the driver works on C = A^T stored row-major (n x m), so column j of A is the
// contiguous row C[j]: column swaps, column norms and the per-column GEMV of dlaqps all read
// contiguous memory, and the trailing update is one GEMM on a strided view.
struct Workspace {
  at::Tensor C;          // n x m, working dtype (float or double)
  at::Tensor vn1, vn2;   // n: partial column norms and the last exactly computed ones
  at::Tensor perm;       // n, int64: C[j] holds original column perm[j]
  at::Tensor tau;        // min(m, n): Householder scalars
  at::Tensor Ft;         // nb x n: F^T of dlaqps, column index relative to the panel offset
  at::Tensor aux;        // 2 * nb + 4 scratch: auxv, pivot-row weights, tau and beta of the step
  at::Tensor recompute;  // n, int32: 1 = norm no longer trustworthy, recompute after the panel
  at::Tensor state;      // 4, int32 (device): [steps done, panel ended early, -, -]
  // Per panel, double: [0] steps done (kb); [1 + i] largest remaining column norm before step i;
  // [1 + nb + i] remaining energy sum_j (vn1_j * energy_scale)^2 before step i.
  at::Tensor info;
  int64_t nb = 0;
  double energy_scale = 1.0;  // 1 / largest initial column norm: keeps squared norms in range
  int64_t m = 0, n = 0;
};

// Factor up to `nb` columns starting at row/column `offset` (dlaqps without the trailing GEMM).
// The panel stops early, after the step that flagged a column whose downdated norm became
// unreliable (Drmac-Bujanovic). Fills ws.info; never synchronises with the host.
void factor_panel_cpu(Workspace& ws, int64_t offset, int64_t nb);
// vn1 = vn2 = ||C[c, row_start:m]|| for every column c >= col_start whose recompute flag is set;
// clears the flags. Overflow/underflow-safe.
void recompute_norms_cpu(Workspace& ws, int64_t row_start, int64_t col_start);

#if defined(QRLORA_WITH_CUDA) || defined(QRLORA_CUDA_EMULATION)
void factor_panel_cuda(Workspace& ws, int64_t offset, int64_t nb);
void recompute_norms_cuda(Workspace& ws, int64_t row_start, int64_t col_start);
#endif

}  // namespace qrlora::qrcp
