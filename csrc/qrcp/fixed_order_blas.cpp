// CPU BLAS-3 calls whose rounding does not depend on the thread count (see fixed_order_blas.h).
#include "fixed_order_blas.h"

#include <algorithm>

// MKL's C entry point for its thread-local thread count (mkl_service.h maps mkl_set_num_threads_local
// to it; the lower-case symbol PyTorch's libtorch_cpu exports is the Fortran one, which takes a
// pointer). Weak: it resolves against libtorch_cpu where PyTorch was built with MKL, and is null
// otherwise, so the extension loads on any build.
#if defined(__GNUC__)
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
#endif

namespace qrlora::qrcp {
namespace {

// MKL's thread count for the calling thread set to 1 for the scope, then given back (0, MKL's
// "use the global setting", is given back as itself). A no-op without MKL.
class SerialBlasScope {
 public:
  SerialBlasScope() : previous_(set_local(1)) {}
  ~SerialBlasScope() { set_local(previous_); }
  SerialBlasScope(const SerialBlasScope&) = delete;
  SerialBlasScope& operator=(const SerialBlasScope&) = delete;

 private:
  static int set_local(int threads) {
#if defined(__GNUC__)
    if (MKL_Set_Num_Threads_Local != nullptr) return MKL_Set_Num_Threads_Local(threads);
#endif
    return 0;
  }
  int previous_;
};

// Chunk sizes: fixed, never derived from the thread count. Rows: 256 cost ~7% at 4096^2 on 2
// threads against one threaded MKL call in the QRCP's trailing update. Columns: 64 kept forming
// Q within ~1.1x of LAPACK's threaded orgqr at 4096 x 1024 and 4096^2 on 2 threads (128 and 256
// leave the narrow last blocks on one thread; 32 makes the GEMMs too thin); benchmarks/qr_notes.md.
constexpr int64_t kRowChunk = 256;
constexpr int64_t kColumnChunk = 64;

// fn(begin, end) for each fixed chunk of [0, total), spread over ATen's threads from inside one
// parallel region, each call with MKL set to one thread (SerialBlasScope). The region always opens
// (at least two iterations; a spare one does nothing), so that a BLAS without that setting but
// serial inside an active region (OpenBLAS built with OpenMP) stays serial too. With one thread it
// runs inline, and nested inside another parallel region (qrcp_batched) too.
template <class Fn>
void for_each_chunk(int64_t total, int64_t chunk, const Fn& fn) {
  const int64_t chunks = (total + chunk - 1) / chunk;
  parallel_for_keeping_tls(0, std::max<int64_t>(chunks, 2), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < std::min(end, chunks); ++c) {
      const SerialBlasScope serial;
      fn(c * chunk, std::min(total, (c + 1) * chunk));
    }
  });
}

}  // namespace

void sub_product_by_rows(at::Tensor C, const at::Tensor& F, const at::Tensor& V) {
  if (!C.is_cpu()) {
    C.addmm_(F, V, /*beta=*/1, /*alpha=*/-1);
    return;
  }
  for_each_chunk(C.size(0), kRowChunk, [&](int64_t r0, int64_t r1) {
    C.slice(0, r0, r1).addmm_(F.slice(0, r0, r1), V, /*beta=*/1, /*alpha=*/-1);
  });
}

void apply_block_reflector(at::Tensor C, const at::Tensor& V, const at::Tensor& T) {
  if (!C.is_cpu()) {
    C.addmm_(V, T.mm(V.t().mm(C)), /*beta=*/1, /*alpha=*/-1);
    return;
  }
  for_each_chunk(C.size(1), kColumnChunk, [&](int64_t c0, int64_t c1) {
    at::Tensor part = C.slice(1, c0, c1);
    part.addmm_(V, T.mm(V.t().mm(part)), /*beta=*/1, /*alpha=*/-1);
  });
}

at::Tensor gram(const at::Tensor& V) {
  if (!V.is_cpu()) return V.t().mm(V);
  at::Tensor out;
  for_each_chunk(1, 1, [&](int64_t, int64_t) { out = V.t().mm(V); });
  return out;
}

}  // namespace qrlora::qrcp
