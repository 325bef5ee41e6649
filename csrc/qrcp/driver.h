// Host drivers of the column-pivoted QR, shared by the CPU and CUDA back ends.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

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

// Deterministic blocked QRCP (dgeqp3/dlaqps). A: m x n float or double.
// form_q = false skips forming Q (returned empty): the randomized driver only needs pivots.
QRCPTuple qrcp_geqp3(const at::Tensor& A, const StopRules& rules, int64_t block_size, bool form_q = true);
// Randomized QRCP (HQRRP / Duersch-Gu): pivot blocks chosen from a Gaussian sketch.
QRCPTuple qrcp_randomized(const at::Tensor& A, const StopRules& rules, int64_t block_size, int64_t seed);

// The qrlora::qrcp op (sentinels: rank/tau/abstol/reltol < 0 = not set, block_size <= 0 = default).
QRCPTuple qrcp_op(const at::Tensor& A, int64_t rank, double tau, double abstol, double reltol,
                  c10::string_view method, int64_t block_size, int64_t seed);

}  // namespace qrlora::qrcp
