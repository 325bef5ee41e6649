// LAPACK dlarfg's guard against a tiny beta, shared by the CPU and CUDA panels.
//
// A Householder step computes beta = -sign(alpha) hypot(alpha, ||x||) and scales x by 1 / (alpha - beta).
// When beta is below safmin = (smallest normal) / eps -- the residual of exactly repeated columns shrinks by
// about eps a step and becomes subnormal; a column of subnormal entries -- beta has lost most of its bits and the
// reciprocal overflows: tau and the reflector come out wrong or non-finite. dlarfg scales alpha and x up by
// 1 / safmin (a power of two, so exactly) until beta is in range, recomputes ||x|| and beta there, and scales
// beta back afterwards. The reflector (v, tau) is then that of the scaled column, which is the same reflector.
#pragma once

#include <cfloat>

#if defined(__CUDACC__)
#define QRLORA_HOST_DEVICE __host__ __device__
#else
#define QRLORA_HOST_DEVICE
#endif

namespace qrlora::qrcp {

template <typename T>
struct SafeMin;
template <>
struct SafeMin<float> {
  static constexpr float value = FLT_MIN / FLT_EPSILON;  // 2^-103
  static constexpr float inverse = 1.0f / value;        // 2^103
};
template <>
struct SafeMin<double> {
  static constexpr double value = DBL_MIN / DBL_EPSILON;  // 2^-970
  static constexpr double inverse = 1.0 / value;         // 2^970
};

// How many times alpha and x must be multiplied by SafeMin<T>::inverse (0 in all but the tiny-beta case;
// at most 1 for a finite nonzero beta, capped at 20 as in dlarfg).
template <typename T>
QRLORA_HOST_DEVICE inline int tiny_beta_rescalings(T beta) {
  T b = beta < T(0) ? -beta : beta;
  int knt = 0;
  while (b < SafeMin<T>::value && knt < 20) {
    b *= SafeMin<T>::inverse;
    ++knt;
  }
  return knt;
}

}  // namespace qrlora::qrcp
