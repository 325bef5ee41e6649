// Host drivers of the column-pivoted QR, shared by the CPU and CUDA back ends.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <tuple>
#include <vector>

namespace qrlora::qrcp {

// Stopping rules; a negative value means "not set" (the op's sentinels).
struct StopRules {
  int64_t kmax = -1;     // factor at most this many columns (rank=)
  double abstol = -1;    // stop when the largest remaining column norm <= abstol (xGEQP3RK ABSTOL)
  double reltol = -1;    // ... <= reltol * largest column norm of A (xGEQP3RK RELTOL)
  double tau = -1;       // stop when 1 - ||R22||_F^2 / ||A||_F^2 >= tau (energy captured)
  bool any_tolerance() const { return abstol >= 0 || reltol >= 0 || tau > 0; }
  // Whether the factorisation may stop in state (largest remaining norm, remaining energy).
  bool satisfied(double maxnorm, double energy, double maxnorm0, double energy0) const {
    if (abstol >= 0 && maxnorm <= abstol) return true;
    if (reltol >= 0 && maxnorm <= reltol * maxnorm0) return true;
    if (tau > 0 && (energy0 <= 0 || 1.0 - energy / energy0 >= tau)) return true;
    return false;
  }
};

using QRCPTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Every op entry point holds one: the factorisations compute in the input's precision, but under
// an active autocast region the ATen products inside (at::mm) would run in bf16/fp16, and with
// TF32 allowed (torch.set_float32_matmul_precision("high")) cuBLAS would round float32 products to
// TF32. Both guards are thread-local: nothing global changes. (oneDNN's bfloat16 float32 matmuls on
// the CPU have no thread-local switch; qrlora_kernels/qr.py turns them off around the op.)
struct FullPrecision {
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
  at::NoTF32Guard no_tf32;
};

// What a factorisation returns, with k the number of columns factored (torch.linalg.qr's and
// numpy's mode names):
//   kReduced: (Q m x k, R k x n, perm);
//   kR:       (empty, R, perm): Q is never formed;
//   kRaw:     (H m x n, tau k, perm), LAPACK geqp3's compact form: H[:, :k] holds the
//             Householder vectors below its diagonal and R = triu(H[:k]); H[k:, k:] is
//             unspecified. Forming Q (orgqr) costs about as much as the factorisation itself;
//             the leading r columns need only the first r reflectors.
enum class OutputMode { kReduced, kR, kRaw };

// Deterministic blocked QRCP (dgeqp3/dlaqps). A: m x n float or double.
QRCPTuple qrcp_geqp3(const at::Tensor& A, const StopRules& rules, int64_t block_size,
                     OutputMode mode = OutputMode::kReduced);
// Randomized QRCP (HQRRP / Duersch-Gu): pivot blocks chosen from a Gaussian sketch.
QRCPTuple qrcp_randomized(const at::Tensor& A, const StopRules& rules, int64_t block_size, int64_t seed,
                          OutputMode mode = OutputMode::kReduced);
// The result in `mode` from H (m x >= k, column k of A's pivoted QR in H[:, k]), tau and perm.
QRCPTuple finish(const at::Tensor& H, const at::Tensor& tau, const at::Tensor& perm, int64_t k, OutputMode mode);

// The qrlora::qrcp op (sentinels: rank/tau/abstol/reltol < 0 = not set, block_size <= 0 = default;
// mode "reduced", "r" or "raw").
QRCPTuple qrcp_op(const at::Tensor& A, int64_t rank, double tau, double abstol, double reltol,
                  c10::string_view method, int64_t block_size, int64_t seed, c10::string_view mode);

// The qrlora::qrcp_batched op: the same factorisation of every matrix of A (B x m x n), with
// matrix b's randomized sketch seeded by seed + b. On the CPU the matrices are factored
// concurrently, one per thread (each single-threaded): for the many same-shape weights of a
// model this beats threading inside each factorisation, whose per-column steps synchronise.
// On CUDA they run one after another on the current stream (batched panel kernels are future work).
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> qrcp_batched_op(
    const at::Tensor& A, int64_t rank, double tau, double abstol, double reltol, c10::string_view method,
    int64_t block_size, int64_t seed, c10::string_view mode);

}  // namespace qrlora::qrcp
