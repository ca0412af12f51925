// Small per-token ops of a decode step (RMSNorm, rotary embedding) as single native calls.
//
// At batch 1 the weights stream in a few hundred microseconds per layer, so the dozen tiny
// torch ops around them (each ~5-40 us of dispatch, allocation and OpenMP wake-up on this
// class of CPU) cost as much as the matmuls. These do the same arithmetic in one call each,
// single-threaded for small inputs (threads would cost more than the work), over rows in
// parallel for large ones (prefill).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "simd.h"

#include <cmath>
#include <cstdint>

namespace {

using sparsa_simd::grain;
using sparsa_simd::hsum8;
using sparsa_simd::rope_neox_head;


void rms_row(const float* x, const float* w, float* y, int64_t H, float eps) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= H; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  // double for the tail sum and the mean: matches torch's fp32 result to rounding
  double ss = hsum8(acc);
  for (; i < H; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float r = 1.f / std::sqrt(static_cast<float>(ss / H) + eps);
  const __m256 rv = _mm256_set1_ps(r);
  i = 0;
  for (; i + 8 <= H; i += 8)
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), rv),
                                          _mm256_loadu_ps(w + i)));
  for (; i < H; ++i) y[i] = x[i] * r * w[i];
}

}  // namespace

// y [T, H] = x / sqrt(mean(x^2) + eps) * w, fp32, x rows contiguous.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  const int64_t T = x.size(0), H = x.size(1);
  auto y = torch::empty({T, H}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t sx = x.stride(0);
  const float e = static_cast<float>(eps);
  auto rows = [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) rms_row(xp + t * sx, wp, yp + t * H, H, e);
  };
  const int64_t g = grain(H);
  if (T <= g) rows(0, T);
  else at::parallel_for(0, T, g, rows);
  return y;
}

// NeoX-style rotary embedding in place on x [T, Hn, D] (last dim contiguous, any other
// strides): the first `rd` dims of each head, as (x1, x2) halves:
//   x1' = x1 * cos - x2 * sin,  x2' = x2 * cos + x1 * sin, with cos/sin [T, rd] (halves equal).
void rope_neox_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, int64_t rd) {
  const int64_t T = x.size(0), Hn = x.size(1);
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t half = rd / 2, cs = cos.stride(0);
  auto rows = [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* c = cp + t * cs;
      const float* s = sp + t * cs;
      for (int64_t h = 0; h < Hn; ++h) {
        float* a = xp + t * s0 + h * s1;
        rope_neox_head(a, a, c, s, half);
      }
    }
  };
  const int64_t g = grain(Hn * rd);
  if (T <= g) rows(0, T);
  else at::parallel_for(0, T, g, rows);
}

void register_decode_ops(pybind11::module& m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of fp32 rows");
  m.def("rope_neox_", &rope_neox_, "NeoX rotary embedding in place");
}
