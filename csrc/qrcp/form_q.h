// Forming Q from the compact Householder form (LAPACK orgqr).
#pragma once

#include <ATen/ATen.h>

namespace qrlora::qrcp {

// Q = H_0 H_1 ... H_{c-1} I[:, :c], m x c with orthonormal columns, from the c reflectors stored
// below the diagonal of H (m x c, m >= c) with scalars tau (c): what
// torch.linalg.householder_product(H, tau) returns, row-major. On the CPU it is blocked like
// dorgqr, with every BLAS call in a fixed, thread-count-independent order (fixed_order_blas.h),
// so Q is bit-identical at any thread count (LAPACK's threaded orgqr is not, from 2 threads on);
// on CUDA it is torch.linalg.householder_product (cuSOLVER).
at::Tensor householder_q(const at::Tensor& H, const at::Tensor& tau);

}  // namespace qrlora::qrcp
