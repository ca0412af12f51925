// Small AVX2 helpers shared by the kernel sources.
#pragma once

#include <immintrin.h>

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

}  // namespace sparsa_simd
