// The one host driver of the blocked column-pivoted QR (LAPACK dgeqp3 with dlaqps panels),
// shared by both back ends: panels run on the device (panel_cpu.cpp / panel_cuda.cu), the
// trailing update is one ATen GEMM per panel (MKL or cuBLAS), and the host reads back one
// small record per panel to apply the stopping rules.
#include "driver.h"

#include "fixed_order_blas.h"
#include "form_q.h"
#include "panel.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

// Per-phase NVTX ranges for Nsight Systems on CUDA (header-only NVTX 3 from the toolkit; nothing to link).
#if defined(QRLORA_WITH_CUDA) && defined(__has_include)
#if __has_include(<nvtx3/nvToolsExt.h>)
#include <nvtx3/nvToolsExt.h>
#define QRLORA_HAVE_NVTX 1
#endif
#endif

namespace qrlora::qrcp {
namespace {

constexpr int64_t kDefaultBlock = 32;

// "qrcp/panel", "qrcp/trailing_update", "qrcp/norms", "qrcp/form_q" inside the Python layer's
// "qrcp/geqp3" range; active for CUDA tensors only (a no-op on the CPU and in CPU-only builds).
class PhaseRange {
 public:
  PhaseRange(const char* name, const at::Tensor& t) {
#ifdef QRLORA_HAVE_NVTX
    active_ = t.is_cuda();
    if (active_) nvtxRangePushA(name);
#else
    (void)name;
    (void)t;
#endif
  }
  ~PhaseRange() {
#ifdef QRLORA_HAVE_NVTX
    if (active_) nvtxRangePop();
#endif
  }
  PhaseRange(const PhaseRange&) = delete;
  PhaseRange& operator=(const PhaseRange&) = delete;

 private:
  bool active_ = false;
};

void factor_panel(Workspace& ws, int64_t offset, int64_t nb) {
  PhaseRange range("qrcp/panel", ws.C);
#ifdef QRLORA_CUDA_EMULATION
  factor_panel_cuda(ws, offset, nb);  // tests only: the CUDA panel's kernels, run on the CPU
#else
#ifdef QRLORA_WITH_CUDA
  if (ws.C.is_cuda()) return factor_panel_cuda(ws, offset, nb);
#endif
  TORCH_CHECK(ws.C.is_cpu(), "qrcp: this build of qrlora_kernels._C has no CUDA back end");
  factor_panel_cpu(ws, offset, nb);
#endif
}

void recompute_norms(Workspace& ws, int64_t row_start, int64_t col_start) {
  PhaseRange range("qrcp/norms", ws.C);
#ifdef QRLORA_CUDA_EMULATION
  recompute_norms_cuda(ws, row_start, col_start);
#else
#ifdef QRLORA_WITH_CUDA
  if (ws.C.is_cuda()) return recompute_norms_cuda(ws, row_start, col_start);
#endif
  recompute_norms_cpu(ws, row_start, col_start);
#endif
}

}  // namespace

namespace {

// R (k x n, upper trapezoidal) from the compact form: a copy, no arithmetic.
at::Tensor form_r(const at::Tensor& H, int64_t k) { return H.narrow(0, 0, k).triu().contiguous(); }

// The first k columns of Q from the first k reflectors (bit-identical at any CPU thread count).
at::Tensor form_q(const at::Tensor& H, const at::Tensor& tau, int64_t k) {
  PhaseRange range("qrcp/form_q", H);
  return householder_q(H.narrow(1, 0, k), tau.narrow(0, 0, k));
}

}  // namespace

QRCPTuple finish(const at::Tensor& H, const at::Tensor& tau, const at::Tensor& perm, int64_t k, OutputMode mode) {
  if (mode == OutputMode::kRaw) return {H, tau.narrow(0, 0, k).contiguous(), perm};
  at::Tensor R = form_r(H, k);
  at::Tensor Q = mode == OutputMode::kR ? at::empty({0}, H.options()) : form_q(H, tau, k);
  return {Q, R, perm};
}

QRCPTuple qrcp_geqp3(const at::Tensor& A, const StopRules& rules, int64_t block_size, OutputMode mode) {
  const int64_t m = A.size(0), n = A.size(1), mn = std::min(m, n);
  if (mn == 0) {
    return finish(at::empty({m, n}, A.options()), at::zeros({0}, A.options()),
                  at::arange(n, A.options().dtype(at::kLong)), 0, mode);
  }
  const int64_t kcap = rules.kmax >= 0 ? std::min(rules.kmax, mn) : mn;
  const int64_t nb = std::max<int64_t>(1, std::min(block_size > 0 ? block_size : kDefaultBlock, mn));
  const auto opts = A.options();

  Workspace ws;
  ws.m = m;
  ws.n = n;
  ws.nb = nb;
  // clone, not contiguous(): a column-major input would otherwise be factored in place.
  ws.C = A.t().clone(at::MemoryFormat::Contiguous);
  ws.vn1 = at::empty({n}, opts);
  ws.vn2 = at::empty({n}, opts);
  ws.perm = at::arange(n, opts.dtype(at::kLong));
  ws.tau = at::zeros({mn}, opts);
  ws.Ft = at::zeros({nb, n}, opts);
  ws.aux = at::zeros({2 * nb + 4}, opts);
  ws.recompute = at::ones({n}, opts.dtype(at::kInt));
  ws.state = at::zeros({4}, opts.dtype(at::kInt));
  ws.info = at::zeros({1 + 2 * nb}, opts.dtype(at::kDouble));
  recompute_norms(ws, 0, 0);
  const double maxnorm0 = ws.vn1.max().item<double>();
  ws.energy_scale = maxnorm0 > 0 ? std::min(1.0 / maxnorm0, 1e300) : 1.0;

  int64_t k = 0, kstop = -1;
  double energy0 = -1;
  while (k < kcap) {
    const int64_t off = k;
    factor_panel(ws, off, std::min(nb, kcap - k));
    const at::Tensor info = ws.info.to(at::kCPU);  // the one host synchronisation per panel
    const double* rec = info.data_ptr<double>();
    const int64_t kb = static_cast<int64_t>(rec[0]);
    if (energy0 < 0) energy0 = rec[1 + nb];
    if (rules.any_tolerance()) {
      for (int64_t i = 0; i < kb; ++i) {
        if (rules.satisfied(rec[1 + i], rec[1 + nb + i], maxnorm0, energy0)) {
          kstop = off + i;
          break;
        }
      }
    }
    if (kstop >= 0) break;
    k = off + kb;
    // Truncated (Duersch-Gu): R's rows are complete after the panel, so the last panel's
    // trailing update would only serve output nobody asked for.
    if (k >= kcap) break;
    {
      PhaseRange range("qrcp/trailing_update", ws.C);
      // C -= F V: the panel's one BLAS-3 update (cuBLAS; on the CPU in fixed chunks, so that the
      // factorisation is bit-identical at any thread count).
      sub_product_by_rows(ws.C.slice(0, k, n).slice(1, k, m), ws.Ft.slice(0, 0, kb).slice(1, kb, n - off).t(),
                          ws.C.slice(0, off, k).slice(1, k, m));
    }
    recompute_norms(ws, k, k);
  }
  // C = H^T row-major, so H = C^T is LAPACK's column-major layout.
  return finish(ws.C.t(), ws.tau, ws.perm, kstop >= 0 ? kstop : k, mode);
}

namespace {

StopRules make_rules(const at::Tensor& A, int64_t rank, double tau, double abstol, double reltol) {
  StopRules rules;
  rules.kmax = rank;
  rules.tau = tau;
  rules.abstol = abstol;
  rules.reltol = reltol;
  TORCH_CHECK(rank <= std::min(A.size(-2), A.size(-1)), "qrcp: rank ", rank, " exceeds min(m, n)");
  TORCH_CHECK(tau <= 1.0, "qrcp: tau must lie in (0, 1], got ", tau);
  TORCH_CHECK(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble,
              "qrcp: the op computes in float32 or float64, got ", A.scalar_type());
  return rules;
}

OutputMode parse_mode(c10::string_view mode) {
  if (mode == "reduced") return OutputMode::kReduced;
  if (mode == "r") return OutputMode::kR;
  if (mode == "raw") return OutputMode::kRaw;
  TORCH_CHECK(false, "qrcp: unknown mode '", std::string(mode), "' (expected 'reduced', 'r' or 'raw')");
}

void check_method(c10::string_view method) {
  TORCH_CHECK(method == "geqp3" || method == "randomized", "qrcp: unknown method '", std::string(method),
              "' (expected 'geqp3' or 'randomized')");
}

QRCPTuple dispatch(const at::Tensor& A, const StopRules& rules, c10::string_view method, int64_t block_size,
                   int64_t seed, OutputMode mode) {
  return method == "geqp3" ? qrcp_geqp3(A, rules, block_size, mode)
                           : qrcp_randomized(A, rules, block_size, seed, mode);
}

}  // namespace

QRCPTuple qrcp_op(const at::Tensor& A, int64_t rank, double tau, double abstol, double reltol,
                  c10::string_view method, int64_t block_size, int64_t seed, c10::string_view mode) {
  const FullPrecision full_precision;
  TORCH_CHECK(A.dim() == 2, "qrcp: expected a 2-D matrix, got ", A.dim(), " dimensions");
  const StopRules rules = make_rules(A, rank, tau, abstol, reltol);
  const OutputMode out = parse_mode(mode);
  check_method(method);
  return dispatch(A, rules, method, block_size, seed, out);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> qrcp_batched_op(
    const at::Tensor& A, int64_t rank, double tau, double abstol, double reltol, c10::string_view method,
    int64_t block_size, int64_t seed, c10::string_view mode) {
  const FullPrecision full_precision;
  TORCH_CHECK(A.dim() == 3, "qrcp_batched: expected a batch of matrices (B x m x n), got ", A.dim(), " dimensions");
  const StopRules rules = make_rules(A, rank, tau, abstol, reltol);
  const OutputMode out = parse_mode(mode);
  check_method(method);
  const int64_t batch = A.size(0);
  // Each matrix is factored and reduced at once to what the mode returns, so that no full
  // workspace outlives its matrix. Everything on the CPU, forming Q included, is bit-identical at
  // any thread count, so where a matrix runs (its own thread or all of them) changes only the speed.
  std::vector<QRCPTuple> results(batch);
  auto one = [&](int64_t b) {
    // seed + b modulo 2^64 (the generator's seed is unsigned; signed overflow would be undefined).
    const auto seed_b = static_cast<int64_t>(static_cast<uint64_t>(seed) + static_cast<uint64_t>(b));
    results[b] = dispatch(A[b], rules, method, block_size, seed_b, out);
  };
  if (A.is_cpu() && at::get_num_threads() > 1 && batch >= at::get_num_threads()) {
    // One matrix per thread (the panels and ATen's BLAS run single-threaded inside the region).
    // The CPU factorisation is bit-identical at any thread count, so this changes only the speed;
    // with fewer matrices than threads, each is factored with all of them instead.
    parallel_for_keeping_tls(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) one(b);
    });
  } else {
    for (int64_t b = 0; b < batch; ++b) one(b);
  }
  std::vector<at::Tensor> first, second, perms;
  for (auto& [x, y, perm] : results) {
    first.push_back(std::move(x));
    second.push_back(std::move(y));
    perms.push_back(std::move(perm));
  }
  return {first, second, perms};
}

}  // namespace qrlora::qrcp
