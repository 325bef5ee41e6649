// Q from the compact Householder form, bit-identical at any CPU thread count (see form_q.h).
#include "form_q.h"

#include "driver.h"
#include "fixed_order_blas.h"

#include <algorithm>

namespace qrlora::qrcp {
namespace {

constexpr int64_t kBlock = 32;

// T (b x b, upper triangular) with H_0 ... H_{b-1} = I - V T V^T, from G = V^T V (LAPACK dlarft,
// forward, columnwise): T[i, i] = tau_i, T[:i, i] = -tau_i T[:i, :i] G[:i, i]. b^3 work, serial.
template <class scalar_t>
at::Tensor block_reflector_factor(const at::Tensor& G, const at::Tensor& tau) {
  const int64_t b = tau.size(0);
  at::Tensor T = at::zeros({b, b}, tau.options());
  auto t = T.accessor<scalar_t, 2>();
  const auto g = G.accessor<scalar_t, 2>();
  const auto s = tau.accessor<scalar_t, 1>();
  for (int64_t i = 0; i < b; ++i) {
    t[i][i] = s[i];
    for (int64_t r = 0; r < i; ++r) {
      double acc = 0;
      for (int64_t j = r; j < i; ++j) acc += static_cast<double>(t[r][j]) * static_cast<double>(g[j][i]);
      t[r][i] = static_cast<scalar_t>(-static_cast<double>(s[i]) * acc);
    }
  }
  return T;
}

}  // namespace

at::Tensor householder_q(const at::Tensor& H, const at::Tensor& tau) {
  const FullPrecision full_precision;
  TORCH_CHECK(H.dim() == 2 && tau.dim() == 1, "householder_q: expected H (m x c) and tau (c), got ", H.sizes(),
              " and ", tau.sizes());
  const int64_t m = H.size(0), c = H.size(1);
  TORCH_CHECK(c <= m && tau.size(0) == c, "householder_q: H must be m x c with c <= m and tau of length c, got ",
              H.sizes(), " and ", tau.sizes());
  TORCH_CHECK(H.scalar_type() == tau.scalar_type() && H.device() == tau.device(),
              "householder_q: H and tau must share dtype and device");
  TORCH_CHECK(H.scalar_type() == at::kFloat || H.scalar_type() == at::kDouble,
              "householder_q: expected float32 or float64, got ", H.scalar_type());
  TORCH_CHECK(!H.requires_grad() && !tau.requires_grad(),
              "householder_q is not differentiable; detach H and tau (or use torch.linalg.householder_product)");
  if (!H.is_cpu()) return at::linalg_householder_product(H, tau).contiguous();
  at::Tensor Q = at::eye(m, c, H.options());
  if (c == 0) return Q;
  const at::Tensor tau_c = tau.contiguous();
  // Apply the blocks last to first: Q[j:, j:] = (I - V T V^T) Q[j:, j:]. Columns j..j+b of that
  // view are still columns of the identity (dorgqr factors them separately; the same product).
  for (int64_t j = ((c - 1) / kBlock) * kBlock; j >= 0; j -= kBlock) {
    const int64_t b = std::min(kBlock, c - j);
    at::Tensor V = H.slice(0, j, m).slice(1, j, j + b).tril(-1);
    V.diagonal().fill_(1);
    at::Tensor T;
    AT_DISPATCH_FLOATING_TYPES(H.scalar_type(), "householder_q", [&] {
      T = block_reflector_factor<scalar_t>(gram(V), tau_c.slice(0, j, j + b));
    });
    apply_block_reflector(Q.slice(0, j, m).slice(1, j, c), V, T);
  }
  return Q;
}

}  // namespace qrlora::qrcp
