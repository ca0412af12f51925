// Group tiles: the int4 tile and the 8-bit-group (GGUF Q8_0) tile, with their shared
// prologue and the AVX-512 group-32 loops. Included by quant_tiles.h after the int4 loop
// bodies (it uses bf16/f16 widening, hsum, QAct and the Vnni switch from there).
#pragma once

// sm rows are [2, ng] bf16 or fp16: the ng group scales, then the ng group mins. A vectorized
// prologue turns them into sd = scale * activation scale per group (read back by broadcast
// loads) and the whole `min * sum(x)` term, so the inner loop has no scalar work.
template <int R, int TT>
inline void group_prologue(const uint16_t* sm, bool f16, int64_t ng, const QAct* a, float* sd,
                           float (&bias)[TT][R], __m256 (&acc)[TT][R]) {
  for (int r = 0; r < R; ++r) {
    const uint16_t* sr = sm + r * 2 * ng;
    const uint16_t* mr = sr + ng;
    for (int t = 0; t < TT; ++t) {
      float* o = sd + (t * R + r) * ng;
      __m256 bacc = _mm256_setzero_ps();
      int64_t g = 0;
      for (; g + 8 <= ng; g += 8) {
        _mm256_storeu_ps(o + g,
                         _mm256_mul_ps(scales8(sr + g, f16), _mm256_loadu_ps(a[t].d + g)));
        bacc = _mm256_fmadd_ps(scales8(mr + g, f16), _mm256_loadu_ps(a[t].s + g), bacc);
      }
      float bsum = hsum(bacc);
      for (; g < ng; ++g) {
        o[g] = scale1(sr[g], f16) * a[t].d[g];
        bsum += scale1(mr[g], f16) * a[t].s[g];
      }
      bias[t][r] = bsum;
      acc[t][r] = _mm256_setzero_ps();
    }
  }
}

// AVX-512 forms of the group-32 loops (int4 and 8-bit groups): 64 weight bytes per load and
// per vpdpbusd, two or four groups at once. The 16 int32 lanes hold two groups (lanes 0-7 and
// 8-15), so the group scales come as one small load spread by a permute rather than two
// broadcasts; half the instructions of the 256-bit loops on the thin rows (a few hundred
// bytes) where those are compute bound. The 512-bit sums fold into the 256-bit
// accumulators the caller reduces.
#define SPARSA_AVX512_TARGET "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"

template <int TT, int R>
__attribute__((target(SPARSA_AVX512_TARGET))) inline void fold512(__m512 (&z)[TT][R],
                                                                  __m256 (&acc)[TT][R]) {
  for (int t = 0; t < TT; ++t)
    for (int r = 0; r < R; ++r)
      acc[t][r] = _mm256_add_ps(
          acc[t][r],
          _mm256_add_ps(_mm512_castps512_ps256(z[t][r]),
                        _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(z[t][r]), 1))));
}

// int4, group 32: chunks c and c+1 (64 bytes) hold groups 2c (low nibbles of c), 2c+1 (high
// of c), 2c+2, 2c+3; one load gives [2c | 2c+2] in its low nibbles and [2c+1 | 2c+3] in its
// high ones, against activations gathered the same way.
template <int R, int TT>
__attribute__((target(SPARSA_AVX512_TARGET), noinline)) void i4_g32_body_avx512(
    const uint8_t* w, int64_t ldw, int64_t ng, const QAct* a, const float* sd,
    __m256 (&acc)[TT][R], int64_t pfo) {
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512i zero = _mm512_setzero_si512();
  const __m512i even = _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i odd = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1);
  __m512 z[TT][R];
  for (int t = 0; t < TT; ++t)
    for (int r = 0; r < R; ++r) z[t][r] = _mm512_setzero_ps();
  const int64_t nc = ng / 2;
  int64_t c = 0;
  for (; c + 2 <= nc; c += 2) {
    __m512i xlo[TT], xhi[TT];
    for (int t = 0; t < TT; ++t) {
      const int8_t* xq = a[t].q + c * 64;
      xlo[t] = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq))),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 64)), 1);
      xhi[t] = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32))),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 96)), 1);
    }
    for (int r = 0; r < R; ++r) {
      if (pfo) _mm_prefetch(reinterpret_cast<const char*>(w + r * ldw + c * 32 + pfo), _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(w + r * ldw + c * 32);
      const __m512i lo = _mm512_and_si512(v, m4);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
      for (int t = 0; t < TT; ++t) {
        const __m512 s4 = _mm512_castps128_ps512(_mm_loadu_ps(sd + (t * R + r) * ng + 2 * c));
        z[t][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, lo, xlo[t])),
                                  _mm512_permutexvar_ps(even, s4), z[t][r]);
        z[t][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, hi, xhi[t])),
                                  _mm512_permutexvar_ps(odd, s4), z[t][r]);
      }
    }
  }
  fold512<TT, R>(z, acc);
  if (c < nc) {  // an odd last chunk: the 256-bit loop from its first group
    const int64_t g0 = 2 * c;
    __m256 tail[TT][R];
    for (int t = 0; t < TT; ++t)
      for (int r = 0; r < R; ++r) tail[t][r] = _mm256_setzero_ps();
    const __m256i m4y = _mm256_set1_epi8(0x0F);
    const __m256i zy = _mm256_setzero_si256();
    for (int t = 0; t < TT; ++t) {
      const __m256i xl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[t].q + c * 64));
      const __m256i xh =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[t].q + c * 64 + 32));
      for (int r = 0; r < R; ++r) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * ldw + c * 32));
        const float* o = sd + (t * R + r) * ng + g0;
        tail[t][r] = _mm256_fmadd_ps(
            _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(zy, _mm256_and_si256(v, m4y), xl)),
            _mm256_broadcast_ss(o), tail[t][r]);
        tail[t][r] = _mm256_fmadd_ps(
            _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(
                zy, _mm256_and_si256(_mm256_srli_epi16(v, 4), m4y), xh)),
            _mm256_broadcast_ss(o + 1), tail[t][r]);
      }
    }
    for (int t = 0; t < TT; ++t)
      for (int r = 0; r < R; ++r) acc[t][r] = _mm256_add_ps(acc[t][r], tail[t][r]);
  }
}

template <int R, int TT>
inline void i4_tile(const uint8_t* w, int64_t ldw, const uint16_t* sm, bool f16, int64_t ng,
                    int64_t G, const QAct* a, float* res, float* sd, int64_t pfo) {
  __m256 acc[TT][R];
  float bias[TT][R];
  group_prologue<R, TT>(sm, f16, ng, a, sd, bias, acc);
#define SPARSA_I4_GROUPS(BODY)                               \
  switch (G) {                                               \
    case 32: BODY<R, TT, 0>(w, ldw, ng, a, sd, acc, pfo); break;  \
    case 64: BODY<R, TT, 1>(w, ldw, ng, a, sd, acc, pfo); break;  \
    case 128: BODY<R, TT, 2>(w, ldw, ng, a, sd, acc, pfo); break; \
    default: BODY<R, TT, 4>(w, ldw, ng, a, sd, acc, pfo); break;  \
  }
  // compile-time group shapes keep every accumulator in a register
  if (g_vnni == Vnni::Avx512 && G == 32) {
    i4_g32_body_avx512<R, TT>(w, ldw, ng, a, sd, acc, pfo);
  } else if (g_vnni == Vnni::Avx512) {
    SPARSA_I4_GROUPS(i4_body_avx512vnni)
  } else if (g_vnni == Vnni::Avx) {
    SPARSA_I4_GROUPS(i4_body_avxvnni)
  } else {
    SPARSA_I4_GROUPS(i4_body)
  }
#undef SPARSA_I4_GROUPS
  for (int t = 0; t < TT; ++t)
    for (int r = 0; r < R; ++r) res[t * R + r] = hsum(acc[t][r]) + bias[t][r];
}

// ---- 8-bit groups (GGUF's Q8_0) -----------------------------------------------------------
// Rows of uint8 codes u = w + 128 in groups of 32 with scale d and min -128 d (w = u * d +
// min: the int4 form's algebra, so the int4 prologue gives sd and the min term). VNNI takes
// u as it is (u8 x s8 into int32: no overflow). maddubs would saturate its int16 pair sums
// (255 * 127 * 2), so the AVX2 body multiplies the signed w = u ^ 0x80 with llama.cpp's sign
// trick and adds back the 128 * sum(x) that makes it the unsigned sum the min term expects.
template <int R, int TT>
inline void u8g_body(const uint8_t* w, int64_t ldw, int64_t ng, const QAct* a, const float* sd,
                     __m256 (&acc)[TT][R], int64_t pfo) {
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t g = 0; g < ng; ++g) {
    __m256i xv[TT], corr[TT];
    for (int t = 0; t < TT; ++t) {
      xv[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[t].q + g * 32));
      corr[t] = _mm256_setr_epi32(128 * a[t].qs[g], 0, 0, 0, 0, 0, 0, 0);
    }
    for (int r = 0; r < R; ++r) {
      if (pfo && (g & 1) == 0)
        _mm_prefetch(reinterpret_cast<const char*>(w + r * ldw + g * 32 + pfo), _MM_HINT_T0);
      const __m256i ws = _mm256_xor_si256(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * ldw + g * 32)), flip);
      const __m256i aw = _mm256_sign_epi8(ws, ws);
      for (int t = 0; t < TT; ++t) {
        const __m256i p = _mm256_madd_epi16(
            _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv[t], ws)), ones);
        acc[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(p, corr[t])),
                                    _mm256_broadcast_ss(sd + (t * R + r) * ng + g), acc[t][r]);
      }
    }
  }
}

#define SPARSA_U8G_VNNI_BODY(NAME, TARGET, DPBUSD)                                            \
  template <int R, int TT>                                                                    \
  __attribute__((target(TARGET), noinline)) void NAME(const uint8_t* w, int64_t ldw,         \
                                                      int64_t ng, const QAct* a,             \
                                                      const float* sd, __m256 (&acc)[TT][R], \
                                                      int64_t pfo) {                         \
    const __m256i zero = _mm256_setzero_si256();                                              \
    for (int64_t g = 0; g < ng; ++g) {                                                        \
      __m256i xv[TT];                                                                         \
      for (int t = 0; t < TT; ++t)                                                            \
        xv[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[t].q + g * 32));        \
      for (int r = 0; r < R; ++r) {                                                           \
        if (pfo && (g & 1) == 0)                                                              \
          _mm_prefetch(reinterpret_cast<const char*>(w + r * ldw + g * 32 + pfo),            \
                       _MM_HINT_T0);                                                          \
        const __m256i wu =                                                                    \
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * ldw + g * 32));       \
        for (int t = 0; t < TT; ++t)                                                          \
          acc[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DPBUSD(zero, wu, xv[t])),            \
                                      _mm256_broadcast_ss(sd + (t * R + r) * ng + g),         \
                                      acc[t][r]);                                             \
      }                                                                                       \
    }                                                                                         \
  }

SPARSA_U8G_VNNI_BODY(u8g_body_avxvnni, "avx2,fma,avxvnni", _mm256_dpbusd_avx_epi32)

// 8-bit groups, AVX-512: two groups (64 bytes) per load and vpdpbusd.
template <int R, int TT>
__attribute__((target(SPARSA_AVX512_TARGET), noinline)) void u8g_body_avx512(
    const uint8_t* w, int64_t ldw, int64_t ng, const QAct* a, const float* sd,
    __m256 (&acc)[TT][R], int64_t pfo) {
  const __m512i zero = _mm512_setzero_si512();
  const __m512i pair = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  __m512 z[TT][R];
  for (int t = 0; t < TT; ++t)
    for (int r = 0; r < R; ++r) z[t][r] = _mm512_setzero_ps();
  int64_t g = 0;
  for (; g + 2 <= ng; g += 2) {
    __m512i xv[TT];
    for (int t = 0; t < TT; ++t) xv[t] = _mm512_loadu_si512(a[t].q + g * 32);
    for (int r = 0; r < R; ++r) {
      if (pfo) _mm_prefetch(reinterpret_cast<const char*>(w + r * ldw + g * 32 + pfo), _MM_HINT_T0);
      const __m512i wu = _mm512_loadu_si512(w + r * ldw + g * 32);
      for (int t = 0; t < TT; ++t) {
        const __m512 s2 = _mm512_castps128_ps512(_mm_castsi128_ps(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sd + (t * R + r) * ng + g))));
        z[t][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, wu, xv[t])),
                                  _mm512_permutexvar_ps(pair, s2), z[t][r]);
      }
    }
  }
  fold512<TT, R>(z, acc);
  if (g < ng) {  // an odd last group
    const __m256i zy = _mm256_setzero_si256();
    for (int t = 0; t < TT; ++t) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[t].q + g * 32));
      for (int r = 0; r < R; ++r) {
        const __m256i wu =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * ldw + g * 32));
        acc[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_dpbusd_epi32(zy, wu, x)),
                                    _mm256_broadcast_ss(sd + (t * R + r) * ng + g), acc[t][r]);
      }
    }
  }
}

template <int R, int TT>
inline void u8g_tile(const uint8_t* w, int64_t ldw, const uint16_t* sm, bool f16, int64_t ng,
                     const QAct* a, float* res, float* sd, int64_t pfo) {
  __m256 acc[TT][R];
  float bias[TT][R];
  group_prologue<R, TT>(sm, f16, ng, a, sd, bias, acc);
  if (g_vnni == Vnni::Avx512) u8g_body_avx512<R, TT>(w, ldw, ng, a, sd, acc, pfo);
  else if (g_vnni == Vnni::Avx) u8g_body_avxvnni<R, TT>(w, ldw, ng, a, sd, acc, pfo);
  else u8g_body<R, TT>(w, ldw, ng, a, sd, acc, pfo);
  for (int t = 0; t < TT; ++t)
    for (int r = 0; r < R; ++r) res[t * R + r] = hsum(acc[t][r]) + bias[t][r];
}

