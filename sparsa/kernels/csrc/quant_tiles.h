// The inner tiles of the int8 / int4 / bf16 matmul kernels: R weight rows x TT activation
// rows, one form per instruction set (AVX2; VNNI in 256 and 512 bits, chosen at run time).
// Included by quant_kernels.cpp only, inside its anonymous namespace (it uses kQB, QAct and
// hsum from there).
#pragma once

// Tuning knobs, set per machine (`set_tuning`, chosen by `python -m sparsa.kernels tune` and
// cached per CPU; see sparsa/kernels/tuning.py):
//
// g_pf_rows_by_kind: software prefetch this many rows ahead of the row being read (same
//   column), 0 = none. It mattered for tiles that read R rows side by side (too many short
//   streams for the hardware prefetchers of an AVX2 Zen); one row at a time is a single
//   sequential stream, which the hardware prefetchers mostly follow by themselves.
// g_row_block_by_kind: weight rows per tile at one activation row (1, 2 or 4). More rows share
//   each activation load, but R rows side by side are R interleaved streams 1-3 KB apart,
//   and on an AVX-512 Zen 5 a core then streams at ~70% of its plain-read rate (one row at
//   a time: ~100%). Results are identical for every choice: each row sums in the same order.
// Both are per weight form (`Kind`: int8 q8, int8 f32, int4, bf16) and per row length (short
// rows, <= kShortRowBytes, or longer: four short rows side by side lie in one or two KB and
// stream like one), indexed by `tuning_slot`, read once per row range (`rows_tt`); the tiles
// get the prefetch offset `pfo` (rows x row stride) as an argument.
enum class Kind { I8Q8 = 0, I8F32 = 1, I4 = 2, BF16 = 3, U8G = 4 };
constexpr int64_t kShortRowBytes = 512;
constexpr int kTuningSlots = 8;
int64_t g_pf_rows_by_kind[kTuningSlots] = {};
int g_row_block_by_kind[kTuningSlots] = {1, 1, 1, 1, 1, 1, 1, 1};

inline int tuning_slot(Kind kind, int64_t row_bytes) {
  // 8-bit groups share the int8 slots: the same bytes per weight, streamed the same way
  const int k = kind == Kind::U8G ? 0 : static_cast<int>(kind);
  return 2 * k + (row_bytes <= kShortRowBytes ? 1 : 0);
}

// ---- int8 tiles: R weight rows x TT activation rows -> res[t * R + r] (unscaled by row) ----

template <int R, int TT>
inline void i8q8_tile(const int8_t* w, int64_t ldw, int64_t nb, const QAct* a, float* res,
                      int64_t pfo) {
  __m256 acc[TT][R];
  for (int t = 0; t < TT; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t sb = 0; sb < nb; ++sb) {  // one activation scale per kQB = 4 x 32 weights
    __m256i ia[TT][R];
    for (int bb = 0; bb < kQB / 32; ++bb) {
      const int64_t off = sb * kQB + bb * 32;
      __m256i xv[TT];
      for (int t = 0; t < TT; ++t)
        xv[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[t].q + off));
      for (int r = 0; r < R; ++r) {
        if (pfo && (bb & 1) == 0)
          _mm_prefetch(reinterpret_cast<const char*>(w + r * ldw + off + pfo), _MM_HINT_T0);
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * ldw + off));
        // maddubs wants unsigned x signed: move w's sign onto x (llama.cpp's trick)
        const __m256i aw = _mm256_sign_epi8(wv, wv);
        for (int t = 0; t < TT; ++t) {
          const __m256i p = _mm256_madd_epi16(
              _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv[t], wv)), ones);
          ia[t][r] = bb == 0 ? p : _mm256_add_epi32(ia[t][r], p);
        }
      }
    }
    for (int t = 0; t < TT; ++t) {
      const __m256 dv = _mm256_broadcast_ss(a[t].d + sb);
      for (int r = 0; r < R; ++r)
        acc[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[t][r]), dv, acc[t][r]);
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int r = 0; r < R; ++r) res[t * R + r] = hsum(acc[t][r]);
}

// The same tile with VNNI (vpdpbusd: u8 x s8, four products summed into each int32 lane in
// one instruction). The weight's sign bit is flipped, which reads it as the unsigned w + 128,
// so each block's integer sum is exactly sum(w * x) + 128 * sum(x); the second term is known
// per activation block (QAct::qs) and subtracted before the convert. One xor + one dpbusd per
// 32 weights instead of llama.cpp's sign/sign/maddubs/madd: the AVX2 tile is compute-bound
// at ~16 GB/s per core on a Zen 5, more than that is memory bandwidth to spare.
#define SPARSA_I8Q8_VNNI_TILE(NAME, TARGET, DPBUSD)                                            \
  template <int R, int TT>                                                                     \
  __attribute__((target(TARGET), noinline)) void NAME(const int8_t* w, int64_t ldw,           \
                                                      int64_t nb, const QAct* a, float* res,   \
                                                      int64_t pfo) {                          \
    __m256 acc[TT][R];                                                                         \
    for (int t = 0; t < TT; ++t)                                                               \
      for (int r = 0; r < R; ++r) acc[t][r] = _mm256_setzero_ps();                             \
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));                            \
    for (int64_t sb = 0; sb < nb; ++sb) {                                                      \
      __m256i ia[TT][R];                                                                       \
      for (int t = 0; t < TT; ++t)                                                             \
        for (int r = 0; r < R; ++r) ia[t][r] = _mm256_setzero_si256();                         \
      for (int bb = 0; bb < kQB / 32; ++bb) {                                                  \
        const int64_t off = sb * kQB + bb * 32;                                                \
        __m256i xv[TT];                                                                        \
        for (int t = 0; t < TT; ++t)                                                           \
          xv[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[t].q + off));          \
        for (int r = 0; r < R; ++r) {                                                          \
          if (pfo && (bb & 1) == 0)                                                            \
            _mm_prefetch(reinterpret_cast<const char*>(w + r * ldw + off + pfo), _MM_HINT_T0); \
          const __m256i wu = _mm256_xor_si256(                                                 \
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * ldw + off)), flip);  \
          for (int t = 0; t < TT; ++t) ia[t][r] = DPBUSD(ia[t][r], wu, xv[t]);                 \
        }                                                                                      \
      }                                                                                        \
      for (int t = 0; t < TT; ++t) {                                                           \
        const __m256 dv = _mm256_broadcast_ss(a[t].d + sb);                                    \
        const __m256i corr = _mm256_setr_epi32(128 * a[t].qs[sb], 0, 0, 0, 0, 0, 0, 0);        \
        for (int r = 0; r < R; ++r)                                                            \
          acc[t][r] = _mm256_fmadd_ps(                                                         \
              _mm256_cvtepi32_ps(_mm256_sub_epi32(ia[t][r], corr)), dv, acc[t][r]);            \
      }                                                                                        \
    }                                                                                          \
    for (int t = 0; t < TT; ++t)                                                               \
      for (int r = 0; r < R; ++r) {                                                            \
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[t][r]),                               \
                              _mm256_extractf128_ps(acc[t][r], 1));                            \
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));                                                \
        h = _mm_add_ss(h, _mm_movehdup_ps(h));                                                 \
        res[t * R + r] = _mm_cvtss_f32(h);                                                     \
      }                                                                                        \
  }

// The AVX-512 form: 64 weights per instruction, half the instructions of the 256-bit tile.
template <int R, int TT>
__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vnni"), noinline)) void
i8q8_tile_avx512vnni(const int8_t* w, int64_t ldw, int64_t nb, const QAct* a, float* res,
                     int64_t pfo) {
  __m512 acc[TT][R];
  for (int t = 0; t < TT; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm512_setzero_ps();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t sb = 0; sb < nb; ++sb) {
    __m512i ia[TT][R];
    for (int t = 0; t < TT; ++t)
      for (int r = 0; r < R; ++r) ia[t][r] = _mm512_setzero_si512();
    for (int bb = 0; bb < kQB / 64; ++bb) {
      const int64_t off = sb * kQB + bb * 64;
      __m512i xv[TT];
      for (int t = 0; t < TT; ++t) xv[t] = _mm512_loadu_si512(a[t].q + off);
      for (int r = 0; r < R; ++r) {
        if (pfo) _mm_prefetch(reinterpret_cast<const char*>(w + r * ldw + off + pfo), _MM_HINT_T0);
        const __m512i wu = _mm512_xor_si512(_mm512_loadu_si512(w + r * ldw + off), flip);
        for (int t = 0; t < TT; ++t) ia[t][r] = _mm512_dpbusd_epi32(ia[t][r], wu, xv[t]);
      }
    }
    for (int t = 0; t < TT; ++t) {
      const __m512 dv = _mm512_set1_ps(a[t].d[sb]);
      const __m512i corr = _mm512_maskz_set1_epi32(1, 128 * a[t].qs[sb]);
      for (int r = 0; r < R; ++r)
        acc[t][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(ia[t][r], corr)), dv,
                                    acc[t][r]);
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int r = 0; r < R; ++r) res[t * R + r] = _mm512_reduce_add_ps(acc[t][r]);
}
SPARSA_I8Q8_VNNI_TILE(i8q8_tile_avxvnni, "avx2,fma,avxvnni", _mm256_dpbusd_avx_epi32)

// Which int8 dot-product instructions the CPU has (checked once; `set_vnni` can turn the
// VNNI tiles off, for tests and comparisons).
enum class Vnni { None = 0, Avx512 = 1, Avx = 2 };

Vnni detect_vnni() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl"))
    return Vnni::Avx512;
  if (__builtin_cpu_supports("avxvnni")) return Vnni::Avx;
  return Vnni::None;
}

const Vnni g_vnni_hw = detect_vnni();
Vnni g_vnni = g_vnni_hw;


// ---- int4 tile ------------------------------------------------------------------------------

inline __m256 bf16x8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

inline __m256 f16x8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// 16-bit scale tables are bf16 (Sparsa's own int4) or fp16 (GGUF's Q4_0/Q4_1 blocks, kept
// exact); one widening per 8 groups, in the prologue, so the choice costs nothing per weight.
inline __m256 scales8(const uint16_t* p, bool f16) { return f16 ? f16x8(p) : bf16x8(p); }
inline float scale1(uint16_t v, bool f16) { return f16 ? _cvtsh_ss(v) : bf16_to_f32(v); }

// Main loop of the int4 tile. CPG = 64-weight chunks per group (0: group 32, two groups per
// chunk). For G >= 64 the activation block is the group, so the int16 maddubs sums of a whole
// group add up before one madd/convert/FMA (<= 8 * 2*15*127 = 30480: no int16 overflow).
template <int R, int TT, int CPG>
inline void i4_body(const uint8_t* w, int64_t ldw, int64_t ng, const QAct* a, const float* sd,
                    __m256 (&acc)[TT][R], int64_t pfo) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  constexpr int64_t GPC = CPG == 0 ? 2 : 1;  // groups per step
  constexpr int64_t CPS = CPG == 0 ? 1 : CPG;  // chunks per step
  for (int64_t g = 0; g < ng; g += GPC) {
    const int64_t c0 = CPG == 0 ? g / 2 : g * CPG;
    __m256i is[TT][R];
    for (int64_t cc = 0; cc < CPS; ++cc) {
      const int64_t c = c0 + cc;
      __m256i xlo[TT], xhi[TT];
      for (int t = 0; t < TT; ++t) {
        xlo[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[t].q + c * 64));
        xhi[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[t].q + c * 64 + 32));
      }
      for (int r = 0; r < R; ++r) {
        if (pfo && (c & 1) == 0)
          _mm_prefetch(reinterpret_cast<const char*>(w + r * ldw + c * 32 + pfo), _MM_HINT_T0);
        const __m256i v =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * ldw + c * 32));
        const __m256i lo = _mm256_and_si256(v, m4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        for (int t = 0; t < TT; ++t) {
          const __m256i p0 = _mm256_maddubs_epi16(lo, xlo[t]);
          const __m256i p1 = _mm256_maddubs_epi16(hi, xhi[t]);
          if (CPG == 0) {  // group 32: finish both groups here (fewer live registers)
            const float* o = sd + (t * R + r) * ng + g;
            acc[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p0, ones)),
                                        _mm256_broadcast_ss(o), acc[t][r]);
            acc[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p1, ones)),
                                        _mm256_broadcast_ss(o + 1), acc[t][r]);
          } else {
            const __m256i p = _mm256_add_epi16(p0, p1);
            is[t][r] = cc == 0 ? p : _mm256_add_epi16(is[t][r], p);
          }
        }
      }
    }
    if (CPG > 0)
      for (int t = 0; t < TT; ++t)
        for (int r = 0; r < R; ++r) {
          const __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(is[t][r], ones));
          acc[t][r] =
              _mm256_fmadd_ps(f, _mm256_broadcast_ss(sd + (t * R + r) * ng + g), acc[t][r]);
        }
  }
}

// The int4 main loop with VNNI: nibbles are already unsigned, so vpdpbusd takes them as they
// are and sums 4 products per int32 lane, the lane layout of maddubs + madd: the integer
// sums, and so the results, are those of i4_body.
#define SPARSA_I4_VNNI_BODY(NAME, TARGET, DPBUSD)                                              \
  template <int R, int TT, int CPG>                                                            \
  __attribute__((target(TARGET), noinline)) void NAME(const uint8_t* w, int64_t ldw,          \
                                                      int64_t ng, const QAct* a,              \
                                                      const float* sd, __m256 (&acc)[TT][R],  \
                                                      int64_t pfo) {                          \
    const __m256i m4 = _mm256_set1_epi8(0x0F);                                                 \
    const __m256i zero = _mm256_setzero_si256();                                               \
    constexpr int64_t GPC = CPG == 0 ? 2 : 1;                                                  \
    constexpr int64_t CPS = CPG == 0 ? 1 : CPG;                                                \
    for (int64_t g = 0; g < ng; g += GPC) {                                                    \
      const int64_t c0 = CPG == 0 ? g / 2 : g * CPG;                                           \
      __m256i is[TT][R];                                                                       \
      for (int t = 0; t < TT; ++t)                                                             \
        for (int r = 0; r < R; ++r) is[t][r] = zero;                                           \
      for (int64_t cc = 0; cc < CPS; ++cc) {                                                   \
        const int64_t c = c0 + cc;                                                             \
        __m256i xlo[TT], xhi[TT];                                                              \
        for (int t = 0; t < TT; ++t) {                                                         \
          xlo[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[t].q + c * 64));      \
          xhi[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[t].q + c * 64 + 32)); \
        }                                                                                      \
        for (int r = 0; r < R; ++r) {                                                          \
          if (pfo && (c & 1) == 0)                                                             \
            _mm_prefetch(reinterpret_cast<const char*>(w + r * ldw + c * 32 + pfo),           \
                         _MM_HINT_T0);                                                         \
          const __m256i v =                                                                    \
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * ldw + c * 32));      \
          const __m256i lo = _mm256_and_si256(v, m4);                                          \
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);                    \
          for (int t = 0; t < TT; ++t) {                                                       \
            if (CPG == 0) {                                                                    \
              const float* o = sd + (t * R + r) * ng + g;                                      \
              acc[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DPBUSD(zero, lo, xlo[t])),        \
                                          _mm256_broadcast_ss(o), acc[t][r]);                  \
              acc[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DPBUSD(zero, hi, xhi[t])),        \
                                          _mm256_broadcast_ss(o + 1), acc[t][r]);              \
            } else {                                                                           \
              is[t][r] = DPBUSD(DPBUSD(is[t][r], lo, xlo[t]), hi, xhi[t]);                     \
            }                                                                                  \
          }                                                                                    \
        }                                                                                      \
      }                                                                                        \
      if (CPG > 0)                                                                             \
        for (int t = 0; t < TT; ++t)                                                           \
          for (int r = 0; r < R; ++r)                                                          \
            acc[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[t][r]),                          \
                                        _mm256_broadcast_ss(sd + (t * R + r) * ng + g),        \
                                        acc[t][r]);                                            \
    }                                                                                          \
  }

SPARSA_I4_VNNI_BODY(i4_body_avx512vnni, "avx2,fma,avx512f,avx512vl,avx512vnni",
                    _mm256_dpbusd_epi32)
SPARSA_I4_VNNI_BODY(i4_body_avxvnni, "avx2,fma,avxvnni", _mm256_dpbusd_avx_epi32)

#include "group_tiles.h"

// ---- fp32-math tiles: weights widened to fp32 (int8: exact convert; bf16: a shift), FMA
// against fp32 x. `widen(p)` turns 8 weights at p into a __m256.

template <int R, int TT, typename Wt, typename Widen>
inline void widened_tile(const Wt* w, int64_t ldw, int64_t K, const float* const* x,
                         float* res, int64_t pfo, Widen widen) {
  __m256 acc[TT][R];
  for (int t = 0; t < TT; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm256_setzero_ps();
  // one prefetch per 64-byte line of weights (k advances 8 elements of sizeof(Wt) bytes)
  constexpr int64_t kLine = 64 / (8 * sizeof(Wt));
  for (int64_t k = 0; k < K; k += 8) {
    __m256 xv[TT];
    for (int t = 0; t < TT; ++t) xv[t] = _mm256_loadu_ps(x[t] + k);
    for (int r = 0; r < R; ++r) {
      if (pfo && (k / 8) % kLine == 0)
        _mm_prefetch(reinterpret_cast<const char*>(w + r * ldw + k + pfo), _MM_HINT_T0);
      const __m256 wf = widen(w + r * ldw + k);
      for (int t = 0; t < TT; ++t) acc[t][r] = _mm256_fmadd_ps(wf, xv[t], acc[t][r]);
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int r = 0; r < R; ++r) res[t * R + r] = hsum(acc[t][r]);
}

template <int R, int TT>
inline void i8f32_tile(const int8_t* w, int64_t ldw, int64_t K, const float* const* x,
                       float* res, int64_t pfo) {
  widened_tile<R, TT>(w, ldw, K, x, res, pfo, [](const int8_t* p) {
    return _mm256_cvtepi32_ps(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  });
}

template <int R, int TT>
inline void bf16_tile(const uint16_t* w, int64_t ldw, int64_t K, const float* const* x,
                      float* res, int64_t pfo) {
  widened_tile<R, TT>(w, ldw, K, x, res, pfo, [](const uint16_t* p) { return bf16x8(p); });
}
