// The two elementwise ends of an int8 x int8 GEMM (torch._int_mm, oneDNN underneath): each
// activation row quantized to int8 with its own scale before, and the int32 result scaled
// back by (row scale x channel scale) after. In PyTorch each end is 4-6 passes over the
// data with temporaries; here it is one pass, rows split over threads when there are many.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

namespace {

using sparsa_simd::grain;
using sparsa_simd::quantize_row_sym;

}  // namespace

// x [T, K] fp32 (rows contiguous) -> (q [T, Kp] int8, zero padded past K; scale [T] fp32)
// with x ~= q * scale, symmetric, round to nearest even, q in [-127, 127].
std::tuple<torch::Tensor, torch::Tensor> quantize_rows_int8(torch::Tensor x, int64_t Kp) {
  const int64_t T = x.size(0), K = x.size(1);
  TORCH_CHECK(Kp >= K, "Kp (", Kp, ") must be >= K (", K, ")");
  auto q = torch::empty({T, Kp}, x.options().dtype(torch::kInt8));
  auto s = torch::empty({T}, x.options());
  const float* xp = x.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = s.data_ptr<float>();
  const int64_t sx = x.stride(0);
  auto rows = [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) sp[t] = quantize_row_sym(xp + t * sx, K, Kp, qp + t * Kp);
  };
  const int64_t g = grain(K);
  if (T <= g) rows(0, T);
  else at::parallel_for(0, T, g, rows);
  return {q, s};
}

// acc [T, N] int32, row_scale [T], col_scale [N] fp32 -> acc * row_scale[t] * col_scale[n].
torch::Tensor scale_int32_rows(torch::Tensor acc, torch::Tensor row_scale, torch::Tensor col_scale) {
  const int64_t T = acc.size(0), N = acc.size(1);
  auto y = torch::empty({T, N}, row_scale.options());
  const int32_t* ap = acc.data_ptr<int32_t>();
  const float* rs = row_scale.data_ptr<float>();
  const float* cs = col_scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  auto rows = [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int32_t* a = ap + t * N;
      float* o = yp + t * N;
      const __m256 rv = _mm256_set1_ps(rs[t]);
      int64_t n = 0;
      for (; n + 8 <= N; n += 8) {
        const __m256 v = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + n)));
        _mm256_storeu_ps(o + n, _mm256_mul_ps(_mm256_mul_ps(v, rv), _mm256_loadu_ps(cs + n)));
      }
      for (; n < N; ++n) o[n] = static_cast<float>(a[n]) * rs[t] * cs[n];
    }
  };
  const int64_t g = grain(N);
  if (T <= g) rows(0, T);
  else at::parallel_for(0, T, g, rows);
  return y;
}

void register_w8a8(pybind11::module& m) {
  m.def("quantize_rows_int8", &quantize_rows_int8, "per-row symmetric int8 of fp32 rows");
  m.def("scale_int32_rows", &scale_int32_rows, "int32 GEMM result -> fp32 with row/col scales");
}
