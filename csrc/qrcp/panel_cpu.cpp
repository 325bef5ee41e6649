// CPU panel of the blocked column-pivoted QR: LAPACK dlaqps, written as plain loops because
// ATen's per-call overhead (several microseconds) times a dozen calls per column would
// dominate at n = 4096. The one pass over the trailing matrix per column (the GEMV that
// produces F) is fused with the pivot-row update and the norm downdate, so each step reads
// the trailing matrix once.
#include "panel.h"
#include "reflector.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace qrlora::qrcp {
namespace {

// Everything one step's trailing pass needs (see trailing_pass_cpu.inc).
template <typename T>
struct TrailingPass {
  T* C;
  int64_t m, n, off, j, k;
  T tau;
  const T* auxv;
  const T* w;
  T* Ft;
  T* vn1;
  const T* vn2;
  int32_t* flags;
  bool downdate;
  T tol3z;
};

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define QRLORA_HAVE_AVX2_PASS 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "trailing_pass_cpu.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif
namespace baseline {
#include "trailing_pass_cpu.inc"
}  // namespace baseline

template <typename T>
bool run_trailing_pass(const TrailingPass<T>& p, int64_t b, int64_t e) {
#ifdef QRLORA_HAVE_AVX2_PASS
  static const bool use_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (use_avx2) return avx2::trailing_pass(p, b, e);
#endif
  return baseline::trailing_pass(p, b, e);
}

// Below this many elements per thread a parallel region costs more than it saves (OpenMP
// fork/barrier is several microseconds, far worse when the 2 cores are shared).
constexpr int64_t kMinParallelWork = 32768;

template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t len) {
  // Eight independent partial sums: lets the compiler vectorise without -ffast-math.
  T s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= len; i += 8)
    for (int u = 0; u < 8; ++u) s[u] += a[i + u] * b[i + u];
  T r = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  for (; i < len; ++i) r += a[i] * b[i];
  return r;
}

// Euclidean norm without overflow or underflow (LAPACK nrm2 semantics). float squares fit in
// double's range, so one pass in double suffices; double needs the scaled two-pass form.
inline float safe_norm(const float* x, int64_t len) {
  double s = 0;
  for (int64_t i = 0; i < len; ++i) s += double(x[i]) * double(x[i]);
  return static_cast<float>(std::sqrt(s));
}

inline double safe_norm(const double* x, int64_t len) {
  double amax = 0;
  for (int64_t i = 0; i < len; ++i) amax = std::max(amax, std::abs(x[i]));
  if (amax == 0.0 || !std::isfinite(amax)) return amax;
  double s = 0;
  for (int64_t i = 0; i < len; ++i) {
    const double t = x[i] / amax;
    s += t * t;
  }
  return amax * std::sqrt(s);
}

// What each thread reports after its share of a step's trailing pass: the first column of
// largest partial norm in its share (the next step's pivot candidate) and whether it flagged an
// unreliable norm. One cache line each: no false sharing.
struct alignas(64) StepPartial {
  double best = -1;
  int64_t pivot = 0;
  bool flagged = false;
};

// Thread tid's share [b, e) of the trailing columns [first, end). Shares start on multiples of
// four columns from `first`, so every column falls in the same four-column group of the pass
// (trailing_pass_cpu.inc) whatever the thread count, and the arithmetic does not depend on it.
inline std::pair<int64_t, int64_t> share(int64_t first, int64_t end, int tid, int nth) {
  const int64_t groups = (end - first + 3) / 4;
  const auto at = [&](int t) { return std::min(end, first + 4 * (groups * t / nth)); };
  return {at(tid), at(tid + 1)};
}

// One step's serial part (pivot swap, column update, Householder, auxv) runs on thread 0; the
// trailing pass is split by columns over all threads. The whole panel is ONE parallel region
// with two barriers per step (instead of a fork/join per step), and the next pivot search is
// folded into the pass, so the serial part stays O(m * j).
template <typename T>
void factor_panel_impl(Workspace& ws, int64_t off, int64_t nb) {
  const int64_t m = ws.m, n = ws.n, info_stride = ws.nb;
  T* C = ws.C.data_ptr<T>();
  T* vn1 = ws.vn1.data_ptr<T>();
  T* vn2 = ws.vn2.data_ptr<T>();
  int64_t* perm = ws.perm.data_ptr<int64_t>();
  T* tau = ws.tau.data_ptr<T>();
  T* Ft = ws.Ft.data_ptr<T>();
  T* auxv = ws.aux.data_ptr<T>();
  T* w = auxv + info_stride;
  int32_t* flags = ws.recompute.data_ptr<int32_t>();
  double* info = ws.info.data_ptr<double>();
  const T tol3z = std::sqrt(std::numeric_limits<T>::epsilon());
  const double escale = ws.energy_scale;

  int threads = 1;
#ifdef _OPENMP
  if (!at::in_parallel_region() && (m - off) * (n - off) >= int64_t(at::get_num_threads()) * kMinParallelWork)
    threads = at::get_num_threads();
#endif
  std::vector<StepPartial> partial(threads);
  int64_t kb = 0;
  T beta = 0;  // of the step in flight; written by thread 0 only

  auto panel = [&](int tid, int nth) {
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t k = off + j;
      if (tid == 0) {
        // Pivot: first column of largest partial norm (idamax), plus the stopping-rule records.
        // The remaining energy is summed here, in column order, rather than per share: O(n) next
        // to the pass's O(m n), and the same sum (to the bit) at any thread count.
        int64_t pvt = k;
        T best = T(-1);
        double energy = 0;
        for (int64_t c = k; c < n; ++c) {
          const double e = double(vn1[c]) * escale;
          energy += e * e;
        }
        if (j == 0) {
          for (int64_t c = k; c < n; ++c) {
            if (vn1[c] > best) {
              best = vn1[c];
              pvt = c;
            }
          }
        } else {
          // Shares are in column order, so "strictly greater" keeps the first maximum.
          for (int t = 0; t < nth; ++t) {
            if (partial[t].best > double(best)) {
              best = T(partial[t].best);
              pvt = partial[t].pivot;
            }
          }
        }
        info[1 + j] = double(best);
        info[1 + info_stride + j] = energy;
        if (pvt != k) {
          std::swap_ranges(C + pvt * m, C + pvt * m + m, C + k * m);
          for (int64_t t = 0; t < j; ++t) std::swap(Ft[t * n + (pvt - off)], Ft[t * n + (k - off)]);
          std::swap(perm[pvt], perm[k]);
          vn1[pvt] = vn1[k];
          vn2[pvt] = vn2[k];
        }
        T* col = C + k * m;
        const int64_t len = m - k;
        // Bring column k up to date with the panel's earlier reflectors: col -= V_panel F(k, :)^T.
        for (int64_t t = 0; t < j; ++t) {
          const T f = Ft[t * n + (k - off)];
          const T* vt = C + (off + t) * m + k;
          for (int64_t i = 0; i < len; ++i) col[k + i] -= f * vt[i];
        }
        // Householder reflector (dlarfg): H = I - tau v v^T with v[0] = 1, H col = beta e1.
        T alpha = col[k];
        T xnorm = len > 1 ? safe_norm(col + k + 1, len - 1) : T(0);
        T tk = 0;
        beta = alpha;
        if (xnorm != T(0)) {
          beta = -std::copysign(std::hypot(alpha, xnorm), alpha);
          // dlarfg's tiny-beta case (see reflector.h): scaled up, exactly, until beta is in range.
          const int knt = tiny_beta_rescalings(beta);
          for (int t = 0; t < knt; ++t) {
            for (int64_t i = 1; i < len; ++i) col[k + i] *= SafeMin<T>::inverse;
            alpha *= SafeMin<T>::inverse;
          }
          if (knt > 0) {
            xnorm = safe_norm(col + k + 1, len - 1);
            beta = -std::copysign(std::hypot(alpha, xnorm), alpha);
          }
          tk = (beta - alpha) / beta;
          const T scal = T(1) / (alpha - beta);
          for (int64_t i = 1; i < len; ++i) col[k + i] *= scal;
          for (int t = 0; t < knt; ++t) beta *= SafeMin<T>::value;
        }
        tau[k] = tk;
        col[k] = T(1);
        // auxv = -tau V_panel^T v : the incremental term of F's new column.
        for (int64_t t = 0; t < j; ++t) auxv[t] = -tk * dot(C + (off + t) * m + k, col + k, len);
        for (int64_t t = 0; t < j; ++t) w[t] = C[(off + t) * m + k];
        w[j] = T(1);
      }
#ifdef _OPENMP
      if (nth > 1) {  // an orphaned barrier would bind to a caller's region (qrcp_batched's)
#pragma omp barrier
      }
#endif
      // The one pass over the trailing matrix: F's column, the pivot-row update, the norm
      // downdate; then this share's candidate for the next pivot.
      {
        const auto [b, e] = share(k + 1, n, tid, nth);
        const TrailingPass<T> pass{C, m, n, off, j, k, tau[k], auxv, w, Ft, vn1, vn2, flags, k + 1 < m, tol3z};
        StepPartial mine;
        mine.pivot = b;
        mine.flagged = b < e && run_trailing_pass(pass, b, e);
        for (int64_t c = b; c < e; ++c) {
          if (double(vn1[c]) > mine.best) {
            mine.best = double(vn1[c]);
            mine.pivot = c;
          }
        }
        partial[tid] = mine;
      }
#ifdef _OPENMP
      if (nth > 1) {  // an orphaned barrier would bind to a caller's region (qrcp_batched's)
#pragma omp barrier
      }
#endif
      if (tid == 0) {
        // Nobody reads these before the next barrier: the next pass touches columns > k + 1 only.
        for (int64_t c = off; c <= k; ++c) Ft[j * n + (c - off)] = T(0);
        C[k * m + k] = beta;
        kb = j + 1;
      }
      // Unreliable norms: end the panel here; the driver applies the update and recomputes them.
      bool any = false;
      for (int t = 0; t < nth; ++t) any = any || partial[t].flagged;
      if (any) break;
    }
  };
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    panel(omp_get_thread_num(), omp_get_num_threads());
  } else {
    panel(0, 1);
  }
#else
  panel(0, 1);
#endif
  info[0] = double(kb);
}

template <typename T>
void recompute_norms_impl(Workspace& ws, int64_t row_start, int64_t col_start) {
  const int64_t m = ws.m;
  const T* C = ws.C.data_ptr<T>();
  T* vn1 = ws.vn1.data_ptr<T>();
  T* vn2 = ws.vn2.data_ptr<T>();
  int32_t* flags = ws.recompute.data_ptr<int32_t>();
  at::parallel_for(col_start, ws.n, 16, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      if (!flags[c]) continue;
      vn1[c] = vn2[c] = safe_norm(C + c * m + row_start, m - row_start);
      flags[c] = 0;
    }
  });
}

}  // namespace

void factor_panel_cpu(Workspace& ws, int64_t offset, int64_t nb) {
  if (ws.C.scalar_type() == at::kDouble) factor_panel_impl<double>(ws, offset, nb);
  else factor_panel_impl<float>(ws, offset, nb);
}

void recompute_norms_cpu(Workspace& ws, int64_t row_start, int64_t col_start) {
  if (ws.C.scalar_type() == at::kDouble) recompute_norms_impl<double>(ws, row_start, col_start);
  else recompute_norms_impl<float>(ws, row_start, col_start);
}

}  // namespace qrlora::qrcp
