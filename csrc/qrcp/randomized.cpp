// Randomized blocked QRCP (HQRRP, Martinsson et al. 2017; Duersch & Gu 2017), shared by both
// back ends and written only with ATen ops: each block's pivots come from a deterministic QRCP
// of a small Gaussian sketch Y = Omega A, after which the block is an unpivoted Householder QR
// (geqrf) and one compact-WY GEMM update, so the flops and speed are those of unpivoted QR.
#include "driver.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace qrlora::qrcp {
namespace {

constexpr int64_t kDefaultRandomizedBlock = 64;
constexpr int64_t kOversampling = 8;
// Panel width of the pivot QRCP on the (b + 8)-row sketch. With so few rows the per-column work of
// a dlaqps step is dominated by the panel's partial updates (O(panel width)), not the dot product, so
// narrow panels with more (cheap, BLAS-3) trailing updates win: 8 took 0.14 s of sketch QRCPs at
// 4096^2 against 0.24 s with the default 32 (benchmarks/qr_notes.md).
constexpr int64_t kSketchPanel = 8;

at::Tensor gaussian(int64_t rows, int64_t cols, at::Generator& gen, const at::TensorOptions& opts) {
  // Drawn on the CPU so that a seed gives the same sketch on every device.
  return at::randn({rows, cols}, gen, opts.device(at::kCPU)).to(opts.device());
}

// Moves the block's chosen columns (local indices `chosen`, in order) to the front of `count`
// columns with the fewest column moves: at most 2 * chosen.size() columns change place.
std::pair<std::vector<int64_t>, std::vector<int64_t>> front_moves(const int64_t* chosen, int64_t nchosen,
                                                                  int64_t count) {
  std::vector<int64_t> order(count), where(count);
  for (int64_t j = 0; j < count; ++j) order[j] = where[j] = j;
  for (int64_t i = 0; i < nchosen; ++i) {
    const int64_t src = where[chosen[i]];
    const int64_t displaced = order[i];
    std::swap(order[i], order[src]);
    where[chosen[i]] = i;
    where[displaced] = src;
  }
  std::vector<int64_t> dst, src;
  for (int64_t j = 0; j < count; ++j)
    if (order[j] != j) {
      dst.push_back(j);
      src.push_back(order[j]);
    }
  return {dst, src};
}

}  // namespace

QRCPTuple qrcp_randomized(const at::Tensor& A, const StopRules& rules, int64_t block_size, int64_t seed,
                          OutputMode mode) {
  const int64_t m = A.size(0), n = A.size(1), mn = std::min(m, n);
  const auto opts = A.options();
  const auto long_opts = opts.dtype(at::kLong);
  if (mn == 0) return finish(at::empty({m, n}, opts), at::zeros({0}, opts), at::arange(n, long_opts), 0, mode);
  const int64_t kcap = rules.kmax >= 0 ? std::min(rules.kmax, mn) : mn;
  const int64_t nb = std::max<int64_t>(1, block_size > 0 ? block_size : kDefaultRandomizedBlock);
  const int64_t sketch_rows = nb + kOversampling;
  const double eps = A.scalar_type() == at::kDouble ? std::numeric_limits<double>::epsilon()
                                                    : std::numeric_limits<float>::epsilon();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed));

  // Column-major working copy (Wt row-major = W column-major): geqrf panels and the WY update
  // read whole columns, and moving a column is copying one contiguous row of Wt.
  at::Tensor Wt = A.t().clone(at::MemoryFormat::Contiguous);
  at::Tensor W = Wt.t();
  at::Tensor perm = at::arange(n, long_opts);
  at::Tensor tau_all = at::zeros({mn}, opts);
  // The sketch Y = Omega A, stored transposed (Yt row-major): each block's pivot QRCP then copies
  // its columns with a memcpy, and moving a column of Y is moving a contiguous row of Yt.
  at::Tensor Yt = at::matmul(W.t(), gaussian(sketch_rows, m, gen, opts).t());
  at::Tensor Y = Yt.t();

  // Exact column norms, for the tolerance rules only (scaled, in double: no overflow).
  const bool tolerance = rules.any_tolerance();
  double escale = 1.0, maxnorm0 = 0.0, energy0 = 0.0;
  if (tolerance) {
    const double amax = W.abs().max().item<double>();
    const at::Tensor norms = (W.to(at::kDouble) / std::max(amax, 1e-300)).norm(2, {0}) * amax;
    maxnorm0 = norms.max().item<double>();
    escale = maxnorm0 > 0 ? std::min(1.0 / maxnorm0, 1e300) : 1.0;
    energy0 = (norms * escale).square().sum().item<double>();
  }

  int64_t k = 0, kstop = -1;
  while (k < kcap) {
    const int64_t b = std::min(nb, kcap - k);
    // 1. The block's pivots: deterministic QRCP of the sketch's remaining columns.
    StopRules sketch_rules;
    sketch_rules.kmax = b;
    const at::Tensor sketch_perm =
        std::get<2>(qrcp_geqp3(Y.slice(1, k, n).to(at::kCPU), sketch_rules, kSketchPanel, OutputMode::kR)).contiguous();
    auto [dst, src] = front_moves(sketch_perm.data_ptr<int64_t>(), b, n - k);
    if (!dst.empty()) {
      const at::Tensor d = at::tensor(dst, long_opts.device(at::kCPU)).add_(k).to(opts.device());
      const at::Tensor s = at::tensor(src, long_opts.device(at::kCPU)).add_(k).to(opts.device());
      Wt.index_copy_(0, d, Wt.index_select(0, s));
      Yt.index_copy_(0, d, Yt.index_select(0, s));
      perm.index_copy_(0, d, perm.index_select(0, s));
    }
    // 2. Unpivoted Householder QR of the panel.
    auto [panel, tau_b] = at::geqrf(W.slice(0, k, m).slice(1, k, k + b));
    W.slice(0, k, m).slice(1, k, k + b).copy_(panel);
    tau_all.slice(0, k, k + b).copy_(tau_b);
    const bool last = k + b >= kcap;
    // 3. Q^T on the trailing columns through the compact WY form Q = I - V T V^T, with
    //    T^{-1} = triu(V^T V, 1) + diag(1 / tau) (the UT transform). A reflector with tau = 0
    //    is the identity: its column of V is zeroed so that T stays finite.
    if (k + b < n) {
      const at::Tensor live = tau_b.ne(0);
      at::Tensor V = panel.tril(-1);
      V.slice(0, 0, b).diagonal().fill_(1);
      V.mul_(live.to(opts.dtype()).unsqueeze(0));
      const at::Tensor Tinv = at::matmul(V.t(), V).triu(1) +
                              at::diag(at::where(live, tau_b.reciprocal(), at::ones_like(tau_b)));
      const at::Tensor T = at::linalg_solve_triangular(Tinv, at::eye(b, opts), /*upper=*/true);
      at::Tensor A22 = W.slice(0, k, m).slice(1, k + b, n);
      // V^T A22 as (A22^T V)^T: MKL splits the long dimension better this way (~15% faster here).
      const at::Tensor X = at::matmul(T.t(), at::matmul(A22.t(), V).t());
      if (last && !tolerance) {
        // Truncated (Duersch-Gu): only R's last b rows of the trailing columns are needed.
        A22.slice(0, 0, b).addmm_(V.slice(0, 0, b), X, 1, -1);
      } else {
        A22.addmm_(V, X, 1, -1);
      }
    }
    // 4. Stopping rules, state by state inside the block: the remaining energy of column c
    //    after k + i steps is ||trailing rows of c||^2 plus the squares of R rows i..b-1.
    if (tolerance) {
      const at::Tensor Rb = (W.slice(0, k, k + b).slice(1, k, n).triu().to(at::kDouble) * escale).square();
      at::Tensor tail = at::zeros({n - k}, opts.dtype(at::kDouble));
      if (k + b < m && k + b < n) {
        const at::Tensor W22 = W.slice(0, k + b, m).slice(1, k + b, n);
        // float32: one reduction in double straight from W22 (a float's square cannot overflow a double);
        // float64: scaled first, so that huge entries cannot overflow the squares.
        tail.slice(0, b, n - k).copy_(W22.scalar_type() == at::kFloat
                                          ? at::linalg_vector_norm(W22, 2, {0}, false, at::kDouble).mul_(escale).square_()
                                          : (W22 * escale).square().sum(0));
      }
      const at::Tensor below = Rb.flip(0).cumsum(0).flip(0) + tail.unsqueeze(0);  // b x (n - k)
      const at::Tensor active = at::arange(n - k, long_opts).unsqueeze(0) >= at::arange(b, long_opts).unsqueeze(1);
      const at::Tensor res = at::where(active, below, at::zeros_like(below));
      const at::Tensor maxnorm = std::get<0>(res.max(1)).sqrt().div(escale).to(at::kCPU);
      const at::Tensor energy = res.sum(1).to(at::kCPU);
      const double* mx = maxnorm.data_ptr<double>();
      const double* en = energy.data_ptr<double>();
      for (int64_t i = 0; i < b && kstop < 0; ++i)
        if (rules.satisfied(mx[i], en[i], maxnorm0, energy0)) kstop = k + i;
      if (kstop >= 0) break;
    }
    if (last) {
      k += b;
      break;
    }
    // 5. Sketch of the trailing matrix: Duersch-Gu update Y2 -= Y1 R11^{-1} R12, or a fresh
    //    sketch when R11 is too ill-conditioned for the solve (rank-deficient input).
    if (k + b < n) {
      const at::Tensor R11 = W.slice(0, k, k + b).slice(1, k, k + b).triu();
      const at::Tensor d = R11.diagonal().abs();
      const double dmax = d.max().item<double>(), dmin = d.min().item<double>();
      if (dmax > 0 && dmin > dmax * std::sqrt(eps)) {
        const at::Tensor Z = at::linalg_solve_triangular(R11, W.slice(0, k, k + b).slice(1, k + b, n), true);
        Y.slice(1, k + b, n).addmm_(Y.slice(1, k, k + b), Z, 1, -1);
      } else if (k + b < m) {
        Y.slice(1, k + b, n).copy_(at::matmul(gaussian(sketch_rows, m - k - b, gen, opts),
                                              W.slice(0, k + b, m).slice(1, k + b, n)));
      }
    }
    k += b;
  }
  return finish(W, tau_all, perm, kstop >= 0 ? kstop : k, mode);
}

}  // namespace qrlora::qrcp
