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

// x [K] fp32 -> q [Kp] int8 (zero padded past K) in blocks of `block` (Kp a multiple of it):
// per block d = amax / 127 (x ~= q * d), symmetric, round to nearest even, q in [-127, 127]
// (never -128: keeps maddubs pair sums inside int16). Optional per block: qs the integer sum
// of q, s = d * that sum (the int4 paths' `min` term: the sum of the *quantized* block, so
// `q * scale + min` sees one consistent x and the activation error scales with w rather than
// with w - min, 3x smaller for int4). Vectorized, with the same arithmetic in the scalar
// tail, so results do not depend on where a block ends. Runs once per GEMV call.
inline void quantize_blocks(const float* x, int64_t K, int64_t Kp, int64_t block, int8_t* q,
                            float* d, float* s, int32_t* qs) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  for (int64_t b0 = 0, bi = 0; b0 < Kp; b0 += block, ++bi) {
    const int64_t b1 = std::max(b0, std::min(b0 + block, K));
    __m256 m = _mm256_setzero_ps();
    int64_t k = b0;
    for (; k + 8 <= b1; k += 8)
      m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
    float amax = hmax8(m);
    for (; k < b1; ++k) amax = std::max(amax, std::fabs(x[k]));
    const float dd = amax / 127.f;
    const float id = dd > 0.f ? 1.f / dd : 0.f;
    const __m256 iv = _mm256_set1_ps(id);
    __m256i acc = _mm256_setzero_si256();
    k = b0;
    for (; k + 8 <= b1; k += 8) {
      __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), iv));  // nearest even
      v = _mm256_max_epi32(_mm256_min_epi32(v, hi), lo);
      acc = _mm256_add_epi32(acc, v);
      const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(w, w));
    }
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc);
    int32_t qsum = lanes[0] + lanes[1] + lanes[2] + lanes[3] + lanes[4] + lanes[5] + lanes[6] +
                   lanes[7];
    for (; k < b1; ++k) {
      q[k] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, std::nearbyint(x[k] * id))));
      qsum += q[k];
    }
    std::fill(q + b1, q + b0 + block, int8_t(0));
    d[bi] = dd;
    if (qs) qs[bi] = qsum;
    if (s) s[bi] = dd * static_cast<float>(qsum);
  }
}

// One block over the whole row: the W8A8 paths' activation quantizer; returns the scale.
inline float quantize_row_sym(const float* x, int64_t K, int64_t Kp, int8_t* q) {
  float d;
  quantize_blocks(x, K, Kp, Kp, q, &d, nullptr, nullptr);
  return d;
}

}  // namespace sparsa_simd
