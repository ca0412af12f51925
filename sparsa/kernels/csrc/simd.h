// Small AVX2 helpers shared by the kernel sources.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace sparsa_simd {

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// Rows per task so a task holds at least ~32K elements (below that, one thread does it all).
inline int64_t grain(int64_t row_elems) {
  return row_elems >= (int64_t(1) << 15) ? 1 : (int64_t(1) << 15) / (row_elems > 0 ? row_elems : 1);
}

// NeoX rotary of one head: (x1, x2) halves of the first 2 * half dims,
//   x1' = x1 * cos - x2 * sin,  x2' = x2 * cos + x1 * sin   (cos/sin: `half` values used).
// src may equal dst (each element is read before its slot is written).
inline void rope_neox_head(const float* src, float* dst, const float* c, const float* s,
                           int64_t half) {
  const float* b = src + half;
  float* ob = dst + half;
  int64_t i = 0;
  for (; i + 8 <= half; i += 8) {
    const __m256 x1 = _mm256_loadu_ps(src + i), x2 = _mm256_loadu_ps(b + i);
    const __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
    _mm256_storeu_ps(dst + i, _mm256_fmsub_ps(x1, cv, _mm256_mul_ps(x2, sv)));
    _mm256_storeu_ps(ob + i, _mm256_fmadd_ps(x2, cv, _mm256_mul_ps(x1, sv)));
  }
  for (; i < half; ++i) {
    const float x1 = src[i], x2 = b[i];
    dst[i] = x1 * c[i] - x2 * s[i];
    ob[i] = x2 * c[i] + x1 * s[i];
  }
}

// x [K] -> q [Kp] int8 (zero padded past K), symmetric per row, round half to even, q in
// [-127, 127]; returns the scale d (x ~= q * d). The W8A8 paths' activation quantizer.
inline float quantize_row_sym(const float* x, int64_t K, int64_t Kp, int8_t* q) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
  float amax = hmax8(m);
  for (; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float d = amax / 127.f;
  const float id = d > 0.f ? 1.f / d : 0.f;
  const __m256 iv = _mm256_set1_ps(id);
  k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), iv));
    // |v| <= 127 by construction: the packs never saturate
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(w, w));
  }
  for (; k < K; ++k)
    q[k] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, std::nearbyint(x[k] * id))));
  std::fill(q + K, q + Kp, int8_t(0));
  return d;
}

}  // namespace sparsa_simd
