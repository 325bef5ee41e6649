// CUDA panel of the blocked column-pivoted QR (LAPACK dlaqps), five small kernels per column:
// pivot selection + swap, the panel's earlier reflectors applied to the pivot column,
// Householder generation, the fused trailing pass (F's column = one GEMV over the trailing
// matrix, pivot-row update, norm downdate with the Drmac-Bujanovic safeguard), and the step's
// bookkeeping. Nothing synchronises with the host: a column whose downdated norm became
// unreliable sets a device flag that turns the panel's remaining launches into no-ops, and
// the driver reads the step count once per panel.
#include "panel.h"
#include "reflector.h"

#include <ATen/Dispatch.h>
#ifndef QRLORA_CUDA_EMULATION
// c10 only (not ATen/cuda/CUDAContext.h): that header pulls in cuBLAS/cuSPARSE headers,
// which minimal toolkits (nvcc + cudart, libraries from pip wheels) do not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define QRLORA_LAUNCH(kernel, grid, block, stream) kernel<<<grid, block, 0, stream>>>
#endif
// (The tests also compile this file as C++ for the CPU, with tests/cuda_emulation/cuda_emulation.h
// standing in for the CUDA built-ins and the launches: see that header.)

#include <cmath>
#include <limits>
#include <type_traits>

namespace qrlora::qrcp {
namespace {

#if !defined(QRLORA_CUDA_EMULATION) || defined(QRLORA_EMULATE_GPU_BLOCK_SIZES)
constexpr int kSingleBlock = 1024;   // one-block kernels: pivot choice, Householder
constexpr int kPassBlock = 256;      // trailing pass: one warp per trailing column
constexpr int kElementwiseBlock = 256;
#else
// Emulated on the CPU (one fiber per CUDA thread): smaller blocks, still of several warps, unless the
// tests ask for the GPU's own sizes.
constexpr int kSingleBlock = 128;
constexpr int kPassBlock = 64;
constexpr int kElementwiseBlock = 64;
#endif
constexpr int kWarpsPerPassBlock = kPassBlock / 32;

// state[0]: steps done; state[1]: panel finished early; state[2]: a column was flagged this step.

template <typename T>
__device__ inline T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ inline T warp_max(T v) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_down_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide reduction; every thread gets the result. `shared` holds >= 32 values.
template <typename T, bool kMax>
__device__ T block_reduce(T v, T* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  v = kMax ? warp_max(v) : warp_sum(v);
  __syncthreads();  // earlier readers of shared[0] are done
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? shared[lane] : T(0);
    v = kMax ? warp_max(v) : warp_sum(v);
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  return shared[0];
}

// ||x|| without overflow/underflow: float squares fit in double; double needs scaling.
template <typename T>
__device__ T block_norm(const T* x, int64_t len, double* shared) {
  if constexpr (std::is_same_v<T, float>) {
    double s = 0;
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) s += double(x[i]) * double(x[i]);
    return static_cast<float>(sqrt(block_reduce<double, false>(s, shared)));
  } else {
    double amax = 0;
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) amax = max(amax, fabs(x[i]));
    amax = block_reduce<double, true>(amax, shared);
    if (amax == 0.0 || !isfinite(amax)) return amax;
    double s = 0;
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
      const double t = x[i] / amax;
      s += t * t;
    }
    return amax * sqrt(block_reduce<double, false>(s, shared));
  }
}

template <typename T>
__global__ void pivot_kernel(T* C, T* vn1, T* vn2, int64_t* perm, T* Ft, double* info, const int* state,
                             int64_t m, int64_t n, int64_t off, int64_t j, int64_t info_stride, double escale) {
  if (state[1]) return;
  __shared__ T s_val[32];
  __shared__ int64_t s_idx[32];
  __shared__ double s_energy[32];
  __shared__ int64_t s_pvt;
  const int64_t k = off + j;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  T best = T(-1);
  // k, not n: if no norm beats -1 (all NaN, e.g. after an overflow), the pivot stays in bounds (as on the CPU).
  int64_t best_idx = k;
  double energy = 0;
  for (int64_t c = k + threadIdx.x; c < n; c += blockDim.x) {
    const T v = vn1[c];
    if (v > best) {
      best = v;
      best_idx = c;
    }
    const double e = double(v) * escale;
    energy += e * e;
  }
  // idamax semantics: the largest value, the first index among equals.
  for (int o = 16; o > 0; o >>= 1) {
    const T ov = __shfl_down_sync(0xffffffffu, best, o);
    const int64_t oi = __shfl_down_sync(0xffffffffu, best_idx, o);
    if (ov > best || (ov == best && oi < best_idx)) {
      best = ov;
      best_idx = oi;
    }
  }
  energy = warp_sum(energy);
  if (lane == 0) {
    s_val[warp] = best;
    s_idx[warp] = best_idx;
    s_energy[warp] = energy;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < nwarps; ++w) {
      if (s_val[w] > best || (s_val[w] == best && s_idx[w] < best_idx)) {
        best = s_val[w];
        best_idx = s_idx[w];
      }
      energy += s_energy[w];
    }
    s_pvt = best_idx;
    info[1 + j] = double(best);
    info[1 + info_stride + j] = energy;
  }
  __syncthreads();
  const int64_t pvt = s_pvt;
  if (pvt == k) return;
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
    const T a = C[pvt * m + i];
    C[pvt * m + i] = C[k * m + i];
    C[k * m + i] = a;
  }
  for (int64_t t = threadIdx.x; t < j; t += blockDim.x) {
    const T a = Ft[t * n + (pvt - off)];
    Ft[t * n + (pvt - off)] = Ft[t * n + (k - off)];
    Ft[t * n + (k - off)] = a;
  }
  if (threadIdx.x == 0) {
    const int64_t p = perm[pvt];
    perm[pvt] = perm[k];
    perm[k] = p;
    vn1[pvt] = vn1[k];
    vn2[pvt] = vn2[k];
  }
}

// Pivot column rows k..m-1 -= (panel's earlier Householder vectors) x F(k, 0:j)^T.
template <typename T>
__global__ void apply_panel_kernel(T* C, const T* Ft, const int* state, int64_t m, int64_t n, int64_t off,
                                   int64_t j) {
  if (state[1]) return;
  const int64_t k = off + j;
  const int64_t i = k + blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= m) return;
  T acc = C[k * m + i];
  for (int64_t t = 0; t < j; ++t) acc -= Ft[t * n + (k - off)] * C[(off + t) * m + i];
  C[k * m + i] = acc;
}

// aux layout: [0, nb) auxv = -tau V^T v; [nb, 2nb+1) pivot-row weights; 2nb+1 tau; 2nb+2 beta.
template <typename T>
__global__ void householder_kernel(T* C, T* tau, T* aux, const int* state, int64_t m, int64_t off, int64_t j,
                                   int64_t nb) {
  if (state[1]) return;
  __shared__ double s_red[32];
  __shared__ T s_tau, s_scale;
  const int64_t k = off + j, len = m - k;
  T* col = C + k * m;
  T alpha = col[k];
  T xnorm = len > 1 ? block_norm(col + k + 1, len - 1, s_red) : T(0);
  // dlarfg's tiny-beta case (see reflector.h). Every thread has alpha and xnorm, so every thread takes the
  // same branch: the column is scaled up, exactly, until beta is in range, and its norm recomputed.
  const int knt = xnorm != T(0) ? tiny_beta_rescalings(T(-copysign(hypot(alpha, xnorm), alpha))) : 0;
  if (knt > 0) {
    for (int t = 0; t < knt; ++t) {
      for (int64_t i = k + 1 + threadIdx.x; i < m; i += blockDim.x) col[i] *= SafeMin<T>::inverse;
      alpha *= SafeMin<T>::inverse;
    }
    __syncthreads();
    xnorm = block_norm(col + k + 1, len - 1, s_red);
  }
  if (threadIdx.x == 0) {
    T tk = 0, beta = alpha, scale = 1;
    if (xnorm != T(0)) {
      beta = -copysign(hypot(alpha, xnorm), alpha);
      tk = (beta - alpha) / beta;
      scale = T(1) / (alpha - beta);
      for (int t = 0; t < knt; ++t) beta *= SafeMin<T>::value;
    }
    s_tau = tk;
    s_scale = scale;
    tau[k] = tk;
    aux[2 * nb + 1] = tk;
    aux[2 * nb + 2] = beta;
  }
  __syncthreads();
  if (s_tau != T(0))
    for (int64_t i = k + 1 + threadIdx.x; i < m; i += blockDim.x) col[i] *= s_scale;
  __syncthreads();
  if (threadIdx.x == 0) col[k] = T(1);
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int64_t t = warp; t < j; t += nwarps) {
    const T* vt = C + (off + t) * m;
    T s = 0;
    for (int64_t i = k + lane; i < m; i += 32) s += vt[i] * col[i];
    s = warp_sum(s);
    if (lane == 0) aux[t] = -s_tau * s;
  }
  for (int64_t t = threadIdx.x; t < j; t += blockDim.x) aux[nb + t] = C[(off + t) * m + k];
  if (threadIdx.x == 0) aux[nb + j] = T(1);
}

// One warp per trailing column c: F(c, j), the pivot-row entry R(k, c), and c's norm downdate.
template <typename T>
__global__ void trailing_pass_kernel(T* C, T* vn1, const T* vn2, T* Ft, const T* aux, int* flags, int* state,
                                     int64_t m, int64_t n, int64_t off, int64_t j, int64_t nb, T tol3z) {
  if (state[1]) return;
  const int64_t k = off + j;
  const int lane = threadIdx.x & 31;
  const int64_t c = k + 1 + blockIdx.x * int64_t(kWarpsPerPassBlock) + (threadIdx.x >> 5);
  if (c >= n) return;
  const T* col = C + k * m;
  T* row = C + c * m;
  T s = 0;
  for (int64_t i = k + lane; i < m; i += 32) s += row[i] * col[i];
  s = warp_sum(s);
  if (lane != 0) return;
  const int64_t fc = c - off;
  T f = aux[2 * nb + 1] * s;
  for (int64_t t = 0; t < j; ++t) f += Ft[t * n + fc] * aux[t];
  Ft[j * n + fc] = f;
  T r = row[k] - f;
  for (int64_t t = 0; t < j; ++t) r -= aux[nb + t] * Ft[t * n + fc];
  row[k] = r;
  const T v1 = vn1[c];
  if (k + 1 < m && v1 != T(0)) {
    T temp = fabs(r) / v1;
    temp = max(T(0), (T(1) + temp) * (T(1) - temp));
    const T ratio = v1 / vn2[c];
    if (temp * ratio * ratio <= tol3z) {
      flags[c] = 1;
      state[2] = 1;
    } else {
      vn1[c] = v1 * sqrt(temp);
    }
  }
}

template <typename T>
__global__ void finish_step_kernel(T* C, T* Ft, const T* aux, int* state, double* info, int64_t m, int64_t n,
                                   int64_t off, int64_t j, int64_t nb) {
  const bool done = state[1] != 0;
  __syncthreads();  // every thread has read the flag before thread 0 may set it
  if (done) return;
  const int64_t k = off + j;
  for (int64_t c = off + threadIdx.x; c <= k; c += blockDim.x) Ft[j * n + (c - off)] = T(0);
  if (threadIdx.x == 0) {
    C[k * m + k] = aux[2 * nb + 2];
    state[0] = int(j + 1);
    info[0] = double(j + 1);
    if (state[2]) state[1] = 1;
  }
}

template <typename T>
__global__ void recompute_norms_kernel(const T* C, T* vn1, T* vn2, int* flags, int64_t m, int64_t row_start,
                                       int64_t col_start) {
  __shared__ double s_red[32];
  const int64_t c = col_start + blockIdx.x;
  if (!flags[c]) return;  // uniform across the block
  const T norm = block_norm(C + c * m + row_start, m - row_start, s_red);
  if (threadIdx.x == 0) {
    vn1[c] = vn2[c] = norm;
    flags[c] = 0;
  }
}

int64_t blocks_for(int64_t work, int64_t per_block) { return (work + per_block - 1) / per_block; }

}  // namespace

void factor_panel_cuda(Workspace& ws, int64_t off, int64_t nb) {
  const c10::cuda::CUDAGuard guard(ws.C.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t m = ws.m, n = ws.n, stride = ws.nb;
  ws.state.zero_();
  AT_DISPATCH_FLOATING_TYPES(ws.C.scalar_type(), "qrcp_panel_cuda", [&] {
    using T = scalar_t;
    T* C = ws.C.data_ptr<T>();
    T* vn1 = ws.vn1.data_ptr<T>();
    T* vn2 = ws.vn2.data_ptr<T>();
    T* Ft = ws.Ft.data_ptr<T>();
    T* aux = ws.aux.data_ptr<T>();
    T* tau = ws.tau.data_ptr<T>();
    int64_t* perm = ws.perm.data_ptr<int64_t>();
    int* flags = ws.recompute.data_ptr<int>();
    int* state = ws.state.data_ptr<int>();
    double* info = ws.info.data_ptr<double>();
    const T tol3z = std::sqrt(std::numeric_limits<T>::epsilon());
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t k = off + j;
      QRLORA_LAUNCH(pivot_kernel<T>, 1, kSingleBlock, stream)(C, vn1, vn2, perm, Ft, info, state, m, n, off, j, stride,
                                                     ws.energy_scale);
      if (j > 0)
        QRLORA_LAUNCH(apply_panel_kernel<T>, blocks_for(m - k, kElementwiseBlock), kElementwiseBlock, stream)(
            C, Ft, state, m, n, off, j);
      QRLORA_LAUNCH(householder_kernel<T>, 1, kSingleBlock, stream)(C, tau, aux, state, m, off, j, stride);
      if (k + 1 < n)
        QRLORA_LAUNCH(trailing_pass_kernel<T>, blocks_for(n - k - 1, kWarpsPerPassBlock), kPassBlock, stream)(
            C, vn1, vn2, Ft, aux, flags, state, m, n, off, j, stride, tol3z);
      QRLORA_LAUNCH(finish_step_kernel<T>, 1, kElementwiseBlock, stream)(C, Ft, aux, state, info, m, n, off, j, stride);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void recompute_norms_cuda(Workspace& ws, int64_t row_start, int64_t col_start) {
  if (col_start >= ws.n) return;
  const c10::cuda::CUDAGuard guard(ws.C.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(ws.C.scalar_type(), "qrcp_norms_cuda", [&] {
    QRLORA_LAUNCH(recompute_norms_kernel<scalar_t>, ws.n - col_start, kElementwiseBlock, stream)(
        ws.C.data_ptr<scalar_t>(), ws.vn1.data_ptr<scalar_t>(), ws.vn2.data_ptr<scalar_t>(),
        ws.recompute.data_ptr<int>(), ws.m, row_start, col_start);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace qrlora::qrcp
