// CPU BLAS-3 calls whose rounding does not depend on the thread count.
//
// MKL's own threading picks kernels and splits sums by the number of threads, so one threaded
// GEMM can round differently with 1, 2 or 3 threads (seen on a 1404 x 33 x 32 update). These
// helpers cut each product into fixed chunks, never derived from the thread count, spread the
// chunks over ATen's threads from inside one parallel region, and run every chunk as one BLAS
// call with MKL's thread-local thread count set to 1 for its duration (SerialBlasScope in the .cpp).
// The same calls on the same shapes run serially at any thread count, hence the same bits. On
// CUDA tensors they are single cuBLAS calls.
//
// Being inside a parallel region is not enough by itself: MKL 2024.2 (PyTorch 2.14's wheels) on an
// AVX-512 Xeon ran a 32 x 1500 x 129 product serially there but still split its long sum by the
// thread count it was set to (2 and 3 threads gave other bits than 1), so the 1-thread setting is
// what makes the bits fixed; it also keeps MKL serial under nested OpenMP. Without MKL (PyTorch
// builds on OpenBLAS or another BLAS), or built by a compiler without GCC's weak symbols, the scope
// does nothing and only the active region keeps the BLAS serial: verified with MKL only. The
// weak reference binds to the first MKL_Set_Num_Threads_Local in the lookup order, normally
// libtorch_cpu's; another MKL runtime preloaded ahead of it would take the call instead.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

namespace qrlora::qrcp {

// at::parallel_for whose worker threads run with the caller's thread-local state (inference mode,
// grad mode, dispatch-key exclusions such as FullPrecision's): ATen's OpenMP workers do not inherit it,
// and an in-place ATen op on an inference tensor fails outside inference mode.
template <class Fn>
void parallel_for_keeping_tls(int64_t begin, int64_t end, int64_t grain, const Fn& fn) {
  const at::ThreadLocalState state;
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    const at::ThreadLocalStateGuard guard(state);
    fn(b, e);
  });
}

// C -= F V (C r x c, F r x b, V b x c), in chunks of rows of C.
void sub_product_by_rows(at::Tensor C, const at::Tensor& F, const at::Tensor& V);

// C -= V (T (V^T C)) (C r x c, V r x b, T b x b): applies the block reflector I - V T V^T from
// the left, in chunks of columns of C. Each chunk is a whole product of its own (every column's
// sums run over all r rows in one call), so no partial sums are ever combined.
void apply_block_reflector(at::Tensor C, const at::Tensor& V, const at::Tensor& T);

// V^T V for a thin V (r x b), as one BLAS call with MKL set to one thread.
at::Tensor gram(const at::Tensor& V);

}  // namespace qrlora::qrcp
