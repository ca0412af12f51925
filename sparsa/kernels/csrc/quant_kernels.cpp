// Weight-only int8 / int4 matmul kernels for CPU decode (AVX2 + FMA).
//
// Activations are fp32 in and out. On the "q8" paths each activation row is first quantized
// to int8 in blocks (one fp32 scale per block, as llama.cpp's Q8_0), so a block of 32 weights
// costs a handful of integer SIMD ops (maddubs/madd) instead of 4x (widen + convert + FMA):
// on this class of CPU (256-bit ops split in two) that is what lets one core keep up with its
// share of memory bandwidth. The "f32" int8 path converts weights to fp32 instead (exact in
// the activations, slower), kept for comparison and for callers that want no activation error.
//
// Layouts (see sparsa/kernels/ops.py for the Python side):
//   int8: q [N, Kp] int8 (Kp % 128 == 0, zero padded), scale [N] fp32: w = q * scale.
//   int4: q [N, Kp/2] uint8 (Kp % 64 == 0 and Kp % G == 0). Each 32-byte chunk c of a row
//         holds weights 64c..64c+31 in its low nibbles and 64c+32..64c+63 in its high ones,
//         so one 256-bit load + and/shift yields two 32-weight vectors in activation order.
//         sm [N, 2, Kp/G] bf16 or fp16: per row the group scales, then the group mins;
//         w = q * scale + min, q in [0, 15].
// Work is split over output rows with at::parallel_for, so torch.set_num_threads applies.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "moe_common.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

// Activation quantization block of the int8 path: int32 sums of 4 x 32 products share one
// scale, so the float convert + FMA runs once per 128 weights (~20% faster than per 32, as
// llama.cpp's Q8_K uses blocks of 256). Int8 weights are padded to a multiple of it.
constexpr int kQB = 128;

inline float hsum(__m256 v) { return sparsa_simd::hsum8(v); }

inline float bf16_to_f32(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// One activation row, quantized: q [Kp] int8, d [Kp/block] scales, s [Kp/block] block sums
// d * sum(q) (int4 only: the `min` term of a group is min * sum(x)).
struct QAct {
  const int8_t* q;
  const float* d;
  const float* s;
  const int32_t* qs;  // [Kp/block] integer sums of q per block (the VNNI path's offset term)
};

using sparsa_simd::quantize_blocks;

#include "quant_tiles.h"

// ---- row drivers: rows [n0, n1) of one weight matrix for T activation rows ----------------
// Rows go in blocks of 4 (2 when TT >= 3, to stay inside 16 ymm registers); for T > 4 the
// activation rows go in chunks of 4 over the same row block, whose weights are then still in
// L1/L2, so batched decode reads each weight from memory once.

struct Mat {
  Kind kind;
  const void* w;       // int8 [N, Kp], uint8 [N, Kp/2] (int4), uint8 [N, Kp] (U8G), bf16
  int64_t ldw;         // bytes per row (elements for bf16)
  int64_t Kp;          // padded reduction length
  const float* scale;  // int8: [N]; null for int4 / bf16
  const uint16_t* sm;  // int4, U8G: [N, 2, ng] bf16 or fp16
  int64_t ng, G;       // int4, U8G: groups per row, group size
  bool f16 = false;    // sm holds fp16 (GGUF blocks) rather than bf16
};

// Per row range: the prefetch offset (in units of the weight pointer) and the int4 prologue's
// scratch (a caller's buffer: a thread_local one costs a TLS lookup per tile in a shared
// library, as much as a row's work at one row per tile).
struct TileCtx {
  int64_t pfo;
  float* sd;
};

template <int R, int TT>
inline void tile(const Mat& m, int64_t n, const QAct* a, const float* const* xf, float* res,
                 const TileCtx& c) {
  switch (m.kind) {
    case Kind::I8Q8:
      if (g_vnni == Vnni::Avx512)
        i8q8_tile_avx512vnni<R, TT>(static_cast<const int8_t*>(m.w) + n * m.ldw, m.ldw,
                                    m.Kp / kQB, a, res, c.pfo);
      else if (g_vnni == Vnni::Avx)
        i8q8_tile_avxvnni<R, TT>(static_cast<const int8_t*>(m.w) + n * m.ldw, m.ldw,
                                 m.Kp / kQB, a, res, c.pfo);
      else
        i8q8_tile<R, TT>(static_cast<const int8_t*>(m.w) + n * m.ldw, m.ldw, m.Kp / kQB, a,
                         res, c.pfo);
      break;
    case Kind::I8F32:
      i8f32_tile<R, TT>(static_cast<const int8_t*>(m.w) + n * m.ldw, m.ldw, m.Kp, xf, res,
                        c.pfo);
      break;
    case Kind::BF16:
      bf16_tile<R, TT>(static_cast<const uint16_t*>(m.w) + n * m.ldw, m.ldw, m.Kp, xf, res,
                       c.pfo);
      break;
    case Kind::U8G:
      u8g_tile<R, TT>(static_cast<const uint8_t*>(m.w) + n * m.ldw, m.ldw, m.sm + n * m.ng * 2,
                      m.f16, m.ng, a, res, c.sd, c.pfo);
      break;
    case Kind::I4:
      i4_tile<R, TT>(static_cast<const uint8_t*>(m.w) + n * m.ldw, m.ldw, m.sm + n * m.ng * 2,
                     m.f16, m.ng, m.G, a, res, c.sd, c.pfo);
      break;
  }
}

template <int R, int TT>
inline void store(const Mat& m, int64_t n, const float* res, float* const* out) {
  for (int t = 0; t < TT; ++t)
    for (int r = 0; r < R; ++r)
      out[t][n + r] = m.scale ? res[t * R + r] * m.scale[n + r] : res[t * R + r];
}

template <int TT, int RB>
void rows_rb(const Mat& m, int64_t n0, int64_t n1, const QAct* a, const float* const* xf,
             float* const* out, const TileCtx& c) {
  float res[TT * RB];
  int64_t n = n0;
  for (; n + RB <= n1; n += RB) {
    tile<RB, TT>(m, n, a, xf, res, c);
    store<RB, TT>(m, n, res, out);
  }
  for (; n < n1; ++n) {
    tile<1, TT>(m, n, a, xf, res, c);
    store<1, TT>(m, n, res, out);
  }
}

// Rows per tile: the tuned row block of the weight form, capped so that 2 * RB * TT
// accumulators <= 8 (16 ymm registers).
template <int TT>
void rows_tt(const Mat& m, int64_t n0, int64_t n1, const QAct* a, const float* const* xf,
             float* const* out) {
  const int slot = tuning_slot(m.kind, m.kind == Kind::BF16 ? 2 * m.ldw : m.ldw);
  const int rb = std::min(g_row_block_by_kind[slot], 4 / TT);
  constexpr int64_t kStack = 2048;  // int4 prologue floats on the stack (ng <= 128 at 4x4)
  float sd_stack[kStack];
  std::vector<float> sd_heap;
  float* sd = sd_stack;
  if ((m.kind == Kind::I4 || m.kind == Kind::U8G) && 16 * m.ng > kStack) {
    sd_heap.resize(16 * m.ng);
    sd = sd_heap.data();
  }
  const TileCtx c{g_pf_rows_by_kind[slot] * m.ldw, sd};
  if (rb >= 4) rows_rb<TT, TT == 1 ? 4 : 1>(m, n0, n1, a, xf, out, c);
  else if (rb >= 2) rows_rb<TT, TT <= 2 ? 2 : 1>(m, n0, n1, a, xf, out, c);
  else rows_rb<TT, 1>(m, n0, n1, a, xf, out, c);
}

// Rows [n0, n1) for T activation rows; out[t] points at token t's output row (indexed by n).
void run_rows(const Mat& m, int64_t n0, int64_t n1, const QAct* a, const float* const* xf,
              float* const* out, int64_t T) {
  constexpr int64_t RCH = 16;  // rows per pass over the T chunks: 16 * 4 KB stays in L2
  for (int64_t r0 = n0; r0 < n1; r0 += RCH) {
    const int64_t r1 = std::min(n1, r0 + RCH);
    for (int64_t t0 = 0; t0 < T; t0 += 4) {
      const int64_t tt = std::min<int64_t>(4, T - t0);
      const QAct* at = a ? a + t0 : nullptr;
      const float* const* xt = xf ? xf + t0 : nullptr;
      switch (tt) {
        case 1: rows_tt<1>(m, r0, r1, at, xt, out + t0); break;
        case 2: rows_tt<2>(m, r0, r1, at, xt, out + t0); break;
        case 3: rows_tt<3>(m, r0, r1, at, xt, out + t0); break;
        default: rows_tt<4>(m, r0, r1, at, xt, out + t0); break;
      }
    }
  }
}

// Quantized copies of T activation rows (one buffer each for q / d / s).
struct QActs {
  std::vector<int8_t> q;
  std::vector<float> d, s;
  std::vector<int32_t> qs;
  std::vector<QAct> rows;
  int64_t Kp = 0, block = 0;
  void init(int64_t T, int64_t Kp_, int64_t block_) {
    Kp = Kp_;
    block = block_;
    const int64_t nb = Kp / block;
    q.assign(T * Kp, 0);
    d.assign(T * nb, 0.f);
    s.assign(T * nb, 0.f);
    qs.assign(T * nb, 0);
    rows.resize(T);
    for (int64_t t = 0; t < T; ++t)
      rows[t] = {q.data() + t * Kp, d.data() + t * nb, s.data() + t * nb, qs.data() + t * nb};
  }
  void quantize(int64_t t, const float* x, int64_t K) {
    const int64_t nb = Kp / block;
    quantize_blocks(x, K, Kp, block, q.data() + t * Kp, d.data() + t * nb, s.data() + t * nb,
                 qs.data() + t * nb);
  }
};

int64_t row_grain(int64_t Kp) {
  // at least ~64K weights per task, so thread wake-up stays small next to the work
  return std::max<int64_t>(8, (int64_t(1) << 16) / std::max<int64_t>(Kp, 1));
}

Mat int8_mat(const torch::Tensor& q, const torch::Tensor& scale, bool f32) {
  return {f32 ? Kind::I8F32 : Kind::I8Q8, q.data_ptr(), q.size(-1), q.size(-1),
          scale.data_ptr<float>(), nullptr, 0, 0};
}

bool sm_is_f16(const torch::Tensor& sm) {
  TORCH_CHECK(sm.scalar_type() == torch::kBFloat16 || sm.scalar_type() == torch::kHalf,
              "int4 scale/min table must be bfloat16 or float16, got ", sm.scalar_type());
  return sm.scalar_type() == torch::kHalf;
}

Mat int4_mat(const torch::Tensor& q, const torch::Tensor& sm, int64_t G) {
  const int64_t Kp = q.size(-1) * 2;
  return {Kind::I4, q.data_ptr(), q.size(-1), Kp, nullptr,
          reinterpret_cast<const uint16_t*>(sm.data_ptr()), Kp / G, G, sm_is_f16(sm)};
}

// y [T, N] = x [T, K] @ W^T for one weight matrix.
torch::Tensor gemm(const torch::Tensor& x, const Mat& m, int64_t N) {
  const int64_t T = x.size(0), K = x.size(1);
  auto y = torch::empty({T, N}, x.options());
  const float* xp = x.data_ptr<float>();
  std::vector<float*> out(T);
  for (int64_t t = 0; t < T; ++t) out[t] = y.data_ptr<float>() + t * N;
  QActs qa;
  std::vector<float> xpad;
  std::vector<const float*> xf(T);
  const bool fp32_x = m.kind == Kind::I8F32 || m.kind == Kind::BF16;
  if (fp32_x && K == m.Kp) {
    for (int64_t t = 0; t < T; ++t) xf[t] = xp + t * K;
  } else if (fp32_x) {
    xpad.assign(T * m.Kp, 0.f);
    for (int64_t t = 0; t < T; ++t) {
      std::memcpy(xpad.data() + t * m.Kp, xp + t * K, K * sizeof(float));
      xf[t] = xpad.data() + t * m.Kp;
    }
  } else {
    qa.init(T, m.Kp, m.kind == Kind::I4 || m.kind == Kind::U8G ? m.G : kQB);
    for (int64_t t = 0; t < T; ++t) qa.quantize(t, xp + t * K, K);
  }
  const QAct* a = fp32_x ? nullptr : qa.rows.data();
  at::parallel_for(0, N, row_grain(m.Kp), [&](int64_t n0, int64_t n1) {
    run_rows(m, n0, n1, a, xf.data(), out.data(), T);
  });
  return y;
}

torch::Tensor int8_gemm(torch::Tensor x, torch::Tensor q, torch::Tensor scale, bool f32) {
  return gemm(x, int8_mat(q, scale, f32), q.size(0));
}

torch::Tensor int4_gemm(torch::Tensor x, torch::Tensor q, torch::Tensor sm, int64_t G) {
  return gemm(x, int4_mat(q, sm, G), q.size(0));
}

// 8-bit groups of 32: q [N, Kp] uint8 codes, sm [N, 2, Kp/32] scales then mins
torch::Tensor u8g_gemm(torch::Tensor x, torch::Tensor q, torch::Tensor sm) {
  const int64_t Kp = q.size(1);
  const Mat m{Kind::U8G, q.data_ptr(), Kp, Kp, nullptr,
              reinterpret_cast<const uint16_t*>(sm.data_ptr()), Kp / 32, 32, sm_is_f16(sm)};
  return gemm(x, m, q.size(0));
}

torch::Tensor bf16_gemm(torch::Tensor x, torch::Tensor w) {
  const Mat m{Kind::BF16, w.data_ptr(), w.size(1), w.size(1), nullptr, nullptr, 0, 0};
  return gemm(x, m, w.size(0));
}

// ---- fused MoE (decode) -------------------------------------------------------------------
// y[t] = sum_j w[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = ids[t, j], in one call:
// stage 1 runs every (expert, block of w13 rows) work item over that expert's tokens in one
// parallel_for, stage 2 forms silu(gate)*up and quantizes it, stage 3 does the same for w2,
// and the k partial outputs of each token are summed in slot order (batch invariant).

torch::Tensor moe(const torch::Tensor& x, const std::vector<Mat>& w13, const std::vector<Mat>& w2,
                  int64_t I, const torch::Tensor& ids, const torch::Tensor& tw) {
  const int64_t T = x.size(0), H = x.size(1), k = ids.size(1);
  const int64_t E = static_cast<int64_t>(w13.size());
  const int64_t S = T * k;
  const int64_t* idp = ids.data_ptr<int64_t>();
  const float* twp = tw.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const bool i4 = w13[0].kind == Kind::I4;

  const auto slots = sparsa_moe::group_slots(idp, S, E);
  std::vector<int64_t> active;
  for (int64_t e = 0; e < E; ++e)
    if (!slots[e].empty()) active.push_back(e);

  QActs xa;
  xa.init(T, w13[0].Kp, i4 ? w13[0].G : kQB);
  for (int64_t t = 0; t < T; ++t) xa.quantize(t, xp + t * H, H);
  std::vector<float> h(S * 2 * I), o(S * H);

  // (expert, first row) work items over the active experts; equal sizes balance the threads
  auto run_stage = [&](const std::vector<Mat>& mats, int64_t N, int64_t chunk,
                       const QAct* acts_by_slot, bool by_token, float* dst, int64_t ld) {
    std::vector<std::pair<int64_t, int64_t>> items;
    for (int64_t e : active)
      for (int64_t n = 0; n < N; n += chunk) items.emplace_back(e, n);
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
      std::vector<QAct> a;
      std::vector<float*> out;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t e = items[i].first, n = items[i].second;
        a.clear();
        out.clear();
        for (int64_t s : slots[e]) {
          a.push_back(acts_by_slot[by_token ? s / k : s]);
          out.push_back(dst + s * ld);
        }
        run_rows(mats[e], n, std::min(N, n + chunk), a.data(), nullptr, out.data(),
                 static_cast<int64_t>(a.size()));
      }
    });
  };
  run_stage(w13, 2 * I, 32, xa.rows.data(), true, h.data(), 2 * I);

  QActs ha;
  ha.init(S, w2[0].Kp, i4 ? w2[0].G : kQB);
  at::parallel_for(0, S, 1, [&](int64_t s0, int64_t s1) {
    std::vector<float> act(I);
    for (int64_t s = s0; s < s1; ++s) {
      const float* g = h.data() + s * 2 * I;
      for (int64_t i = 0; i < I; ++i) act[i] = g[i] / (1.f + std::exp(-g[i])) * g[I + i];
      ha.quantize(s, act.data(), I);
    }
  });
  run_stage(w2, H, 16, ha.rows.data(), false, o.data(), H);

  auto y = torch::empty({T, H}, x.options());
  sparsa_moe::sum_slots(o.data(), twp, 0, T, k, H, y.data_ptr<float>());
  return y;
}

// Per-expert matrices from the stacked [E, ...] tensors, by pointer arithmetic (slicing E
// tensors per call would cost microseconds each).
std::vector<Mat> expert_mats(const torch::Tensor& q, const torch::Tensor* scale,
                             const torch::Tensor* sm, int64_t G) {
  const int64_t E = q.size(0), N = q.size(1), ldw = q.size(2);
  std::vector<Mat> mats;
  for (int64_t e = 0; e < E; ++e) {
    const uint8_t* w = static_cast<const uint8_t*>(q.data_ptr()) + e * N * ldw;
    if (scale) {
      mats.push_back({Kind::I8Q8, w, ldw, ldw, scale->data_ptr<float>() + e * N, nullptr, 0, 0});
    } else {
      const int64_t Kp = ldw * 2;
      const uint16_t* s =
          reinterpret_cast<const uint16_t*>(sm->data_ptr()) + e * N * (Kp / G) * 2;
      mats.push_back({Kind::I4, w, ldw, Kp, nullptr, s, Kp / G, G, sm_is_f16(*sm)});
    }
  }
  return mats;
}

torch::Tensor moe_int8(torch::Tensor x, torch::Tensor w13q, torch::Tensor w13s,
                       torch::Tensor w2q, torch::Tensor w2s, torch::Tensor ids, torch::Tensor tw) {
  return moe(x, expert_mats(w13q, &w13s, nullptr, 0), expert_mats(w2q, &w2s, nullptr, 0),
             w13q.size(1) / 2, ids, tw);
}

torch::Tensor moe_int4(torch::Tensor x, torch::Tensor w13q, torch::Tensor w13sm,
                       torch::Tensor w2q, torch::Tensor w2sm, int64_t G, torch::Tensor ids,
                       torch::Tensor tw) {
  return moe(x, expert_mats(w13q, nullptr, &w13sm, G), expert_mats(w2q, nullptr, &w2sm, G),
             w13q.size(1) / 2, ids, tw);
}

// ---- dequantization to fp32 (prefill: dequantize a tile, then fp32 GEMM) ------------------

torch::Tensor int8_dequant(torch::Tensor q, torch::Tensor scale) {
  const int64_t N = q.size(0), Kp = q.size(1);
  auto w = torch::empty({N, Kp}, scale.options());
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, N, row_grain(Kp), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const __m256 s = _mm256_set1_ps(sp[n]);
      for (int64_t k = 0; k < Kp; k += 8) {
        const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qp + n * Kp + k))));
        _mm256_storeu_ps(wp + n * Kp + k, _mm256_mul_ps(f, s));
      }
    }
  });
  return w;
}

torch::Tensor int4_dequant(torch::Tensor q, torch::Tensor sm, int64_t G) {
  const int64_t N = q.size(0), Kp = q.size(1) * 2, ng = Kp / G;
  auto w = torch::empty({N, Kp}, torch::dtype(torch::kFloat32));
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const uint16_t* smp = reinterpret_cast<const uint16_t*>(sm.data_ptr());
  const bool f16 = sm_is_f16(sm);
  float* wp = w.data_ptr<float>();
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  at::parallel_for(0, N, row_grain(Kp), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* qr = qp + n * (Kp / 2);
      const uint16_t* sr = smp + n * 2 * ng;
      float* wr = wp + n * Kp;
      for (int64_t c = 0; c < Kp / 64; ++c) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qr + c * 32));
        alignas(32) uint8_t nib[64];
        _mm256_store_si256(reinterpret_cast<__m256i*>(nib), _mm256_and_si256(v, m4));
        _mm256_store_si256(reinterpret_cast<__m256i*>(nib + 32),
                           _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
        for (int64_t i = 0; i < 64; i += 8) {  // 8 weights share a group (G >= 32)
          const int64_t g = (c * 64 + i) / G;
          const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(nib + i))));
          _mm256_storeu_ps(wr + c * 64 + i,
                           _mm256_fmadd_ps(f, _mm256_set1_ps(scale1(sr[g], f16)),
                                           _mm256_set1_ps(scale1(sr[ng + g], f16))));
        }
      }
    }
  });
  return w;
}

}  // namespace

void register_decode_ops(pybind11::module& m);  // decode_ops.cpp
void register_paged_attention(pybind11::module& m);  // paged_attention.cpp
void register_w8a8(pybind11::module& m);  // w8a8.cpp
void register_moe_w8a8(pybind11::module& m);  // moe_w8a8.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_decode_ops(m);
  register_paged_attention(m);
  register_w8a8(m);
  register_moe_w8a8(m);
  m.def("vnni", []() { return static_cast<int>(g_vnni); },
        "int8 dot products in use: 0 AVX2, 1 AVX-512 VNNI, 2 AVX-VNNI");
  m.def("set_vnni", [](bool on) { g_vnni = on ? g_vnni_hw : Vnni::None; },
        "use the CPU's VNNI int8 tiles (default where present) or the AVX2 ones");
  m.def("set_vnni_mode", [](int mode) {
          TORCH_CHECK(mode == 0 || (mode == 1 && g_vnni_hw == Vnni::Avx512) ||
                      (mode == 2 && __builtin_cpu_supports("avxvnni")),
                      "VNNI mode ", mode, " is not available on this CPU");
          g_vnni = static_cast<Vnni>(mode);
        }, "0 AVX2, 1 AVX-512 VNNI, 2 AVX-VNNI (256-bit)");
  m.def("set_tuning", [](int64_t slot, int64_t row_block, int64_t pf_rows) {
          TORCH_CHECK(slot >= 0 && slot < kTuningSlots,
                      "tuning slot must be in [0, 8): 2 * kind + short rows");
          TORCH_CHECK(row_block == 1 || row_block == 2 || row_block == 4,
                      "row_block must be 1, 2 or 4, got ", row_block);
          TORCH_CHECK(pf_rows >= 0 && pf_rows <= 64, "pf_rows must be in [0, 64], got ", pf_rows);
          g_row_block_by_kind[slot] = static_cast<int>(row_block);
          g_pf_rows_by_kind[slot] = pf_rows;
        }, "weight rows per tile at one activation row and software prefetch distance (rows) "
           "of one tuning slot: 2 * kind (0 int8, 1 int8 exact, 2 int4, 3 bf16) + 1 for rows "
           "of at most 512 bytes");
  m.def("tuning", [](int64_t slot) {
          TORCH_CHECK(slot >= 0 && slot < kTuningSlots, "tuning slot must be in [0, 8)");
          return std::make_tuple(static_cast<int64_t>(g_row_block_by_kind[slot]),
                                 g_pf_rows_by_kind[slot]);
        }, "(row_block, pf_rows) of one tuning slot");
  m.def("int8_gemm", &int8_gemm, "x [T,K] f32 @ (q [N,Kp] int8 * scale [N])^T");
  m.def("int4_gemm", &int4_gemm, "x [T,K] f32 @ int4 W^T (q [N,Kp/2], sm [N,2,Kp/G] bf16 or fp16)");
  m.def("u8g_gemm", &u8g_gemm,
        "x [T,K] f32 @ 8-bit-group W^T (q [N,Kp] uint8, sm [N,2,Kp/32] fp16 or bf16)");
  m.def("bf16_gemm", &bf16_gemm, "x [T,K] f32 @ (w [N,Kp] bf16)^T, fp32 math");
  m.def("moe_int8", &moe_int8, "fused SwiGLU MoE over int8 experts");
  m.def("moe_int4", &moe_int4, "fused SwiGLU MoE over int4 experts");
  m.def("int8_dequant", &int8_dequant, "int8 rows -> fp32");
  m.def("int4_dequant", &int4_dequant, "int4 rows -> fp32");
}
