// Decode attention straight over the paged KV cache (one query per sequence).
//
// The PyTorch path gathers every decode sequence's blocks into a dense [S, L, H, D] copy,
// pads them to the longest context and runs SDPA with a mask: each step copies the whole
// cache of every running sequence and pays a dozen small ops per layer. Here each
// (sequence, kv head) task walks its block table in place: scores for the whole context
// (all query heads of the GQA group share each K row read), an exact softmax, then one pass
// over V. fp32 only; the caller keeps the PyTorch path for other dtypes and devices.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

using sparsa_simd::hsum8;

// e^x for x <= 0 (softmax arguments after subtracting the max): range reduction by ln 2,
// a degree-6 polynomial on [-ln2/2, ln2/2] (relative error ~2e-7, below fp32 rounding of
// the sums that follow), and the exponent built in the integer unit. Below -87 the result
// flushes to 0, as expf does for practical purposes.
inline __m256 exp_neg(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(underflow, y);
}

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8)
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  float s = hsum8(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float a, const float* x, float* y, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

// int8 K/V rows (per-token, per-head scale applied by the caller): 8 int8 -> 8 fp32 at once
inline __m256 load_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

inline float dot(const float* a, const int8_t* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load_i8(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load_i8(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load_i8(b + i), acc0);
  float s = hsum8(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += a[i] * static_cast<float>(b[i]);
  return s;
}

inline void axpy(float a, const int8_t* x, float* y, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, load_i8(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * static_cast<float>(x[i]);
}

// x [n] -> q [n] int8 with x ~= q * scale (symmetric, round to nearest even); returns scale.
inline float quantize_row(const float* x, int8_t* q, int64_t n) {
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float scale = amax / 127.f;
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  for (int64_t i = 0; i < n; ++i)
    q[i] = static_cast<int8_t>(std::nearbyint(std::min(127.f, std::max(-127.f, x[i] * inv))));
  return scale;
}

// softmax of s[0..n) in place; returns nothing, s holds probabilities
void softmax_(float* s, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, s[i]);
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(s + i), mv));
    _mm256_storeu_ps(s + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  double sum = hsum8(acc);
  for (; i < n; ++i) {
    s[i] = std::exp(s[i] - m);
    sum += s[i];
  }
  const float inv = static_cast<float>(1.0 / sum);
  const __m256 iv = _mm256_set1_ps(inv);
  i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(s + i, _mm256_mul_ps(_mm256_loadu_ps(s + i), iv));
  for (; i < n; ++i) s[i] *= inv;
}

// The tables come from the engine's BlockManager, but a wrong one must be an error, not a
// read outside the pools: every block a task will touch is checked before any task runs.
// Returns the total context (for the threading decision).
int64_t check_tables(const int64_t* bt, const int64_t* cl, int64_t S, int64_t W, int64_t bs,
                     int64_t NB) {
  int64_t total = 0;
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(cl[s] >= 1 && cl[s] <= W * bs, "context length ", cl[s], " of row ", s,
                " outside [1, ", W * bs, "]");
    for (int64_t b = 0; b < (cl[s] + bs - 1) / bs; ++b)
      TORCH_CHECK(bt[s * W + b] >= 0 && bt[s * W + b] < NB, "block id ", bt[s * W + b],
                  " outside the pool of ", NB);
    total += cl[s];
  }
  return total;
}

// The positions one row attends to when it is a node of a token tree (speculative decoding
// verifies several candidates per position in one pass): every position before the tree's
// first node `tree[0]`, then the tree nodes [tree[0], ctx) whose bit is set in `tree[1]`
// (the node's ancestors and itself), the last `window` of them when window > 0. The
// accepted path's K/V are later moved to consecutive slots, so a node attends to exactly
// what it will attend to as a plain decode row, in the same order (bit-identical sums).
void tree_positions(const int64_t* tree, int64_t ctx, int64_t window, std::vector<int64_t>& out) {
  out.clear();
  const int64_t start = std::min(tree[0], ctx);
  const uint64_t bits = static_cast<uint64_t>(tree[1]);
  for (int64_t p = 0; p < start; ++p) out.push_back(p);
  for (int64_t p = start; p < ctx && p - start < 64; ++p)
    if ((bits >> (p - start)) & 1) out.push_back(p);
  if (window > 0 && static_cast<int64_t>(out.size()) > window)
    out.erase(out.begin(), out.end() - window);
}

// Attention of the query heads of kv heads [h0, h1) over one sequence's cached positions
// (the last `window` when window > 0; or the `n_tree` positions `tree_pos` of a tree node):
// q [(h1 - h0) * group, Dk] -> o [.., Dv]. Each position's K (then V) row piece of those
// heads is read in one go; with all heads that is the whole row, front to back through each
// block, which the hardware prefetchers follow well even when the cache is cold after a
// step's weight streaming (one head's 256-byte pieces 1 KB apart they follow badly).
template <typename T>
void attend(const float* q, int64_t h0, int64_t h1, int64_t group, const T* kp,
            const T* vp, const float* ks, const float* vs, const int64_t* table, int64_t ctx,
            int64_t window, int64_t bs, int64_t Hkv, int64_t Dk, int64_t Dv, float scale,
            std::vector<float>& scores, float* o, const int64_t* tree_pos = nullptr,
            int64_t n_tree = 0) {
  const int64_t first = window > 0 ? std::max<int64_t>(0, ctx - window) : 0;
  const int64_t n = tree_pos ? n_tree : ctx - first, nq = (h1 - h0) * group;
  scores.resize(static_cast<size_t>(nq * n));
  for (int64_t j = 0; j < n; ++j) {
    const int64_t pos = tree_pos ? tree_pos[j] : first + j;
    const int64_t slot = table[pos / bs] * bs + pos % bs;
    const T* kr = kp + slot * Hkv * Dk + h0 * Dk;
    for (int64_t i = 0; i < nq; ++i) {
      // int8 rows carry a scale per (slot, kv head); fp32 rows none
      const float sc = ks ? scale * ks[slot * Hkv + h0 + i / group] : scale;
      scores[i * n + j] = dot(q + i * Dk, kr + (i / group) * Dk, Dk) * sc;
    }
  }
  for (int64_t i = 0; i < nq; ++i) softmax_(scores.data() + i * n, n);
  std::fill(o, o + nq * Dv, 0.f);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t pos = tree_pos ? tree_pos[j] : first + j;
    const int64_t slot = table[pos / bs] * bs + pos % bs;
    const T* vr = vp + slot * Hkv * Dv + h0 * Dv;
    for (int64_t i = 0; i < nq; ++i) {
      const float p = vs ? scores[i * n + j] * vs[slot * Hkv + h0 + i / group] : scores[i * n + j];
      axpy(p, vr + (i / group) * Dv, o + i * Dv, Dv);
    }
  }
}

// attend() for row s, through its tree positions when `tree` ([S, 2]: first node, bits)
// marks it a tree node.
template <typename T>
void attend_row(int64_t s, const int64_t* tree, const float* q, int64_t h0, int64_t h1,
                int64_t group, const T* kp, const T* vp, const float* ks, const float* vs,
                const int64_t* table, int64_t ctx, int64_t window, int64_t bs, int64_t Hkv,
                int64_t Dk, int64_t Dv, float scale, std::vector<float>& scores, float* o) {
  if (tree == nullptr || tree[2 * s] >= ctx) {
    attend(q, h0, h1, group, kp, vp, ks, vs, table, ctx, window, bs, Hkv, Dk, Dv, scale,
           scores, o);
    return;
  }
  std::vector<int64_t> pos;
  tree_positions(tree + 2 * s, ctx, window, pos);
  attend(q, h0, h1, group, kp, vp, ks, vs, table, ctx, window, bs, Hkv, Dk, Dv, scale, scores,
         o, pos.data(), static_cast<int64_t>(pos.size()));
}

// The int8 pools' scales [NB, bs, Hkv] fp32, or nullptr for fp32 pools (checked against them).
const float* scales_ptr(const c10::optional<torch::Tensor>& sc, const torch::Tensor& pool,
                        const char* name) {
  const bool i8 = pool.scalar_type() == torch::kChar;
  TORCH_CHECK(i8 || pool.scalar_type() == torch::kFloat, name, " pool must be fp32 or int8");
  TORCH_CHECK(i8 == sc.has_value(), name, i8 ? " int8 pool needs its scales"
                                             : " fp32 pool takes no scales");
  if (!i8) return nullptr;
  TORCH_CHECK(sc->scalar_type() == torch::kFloat && sc->is_contiguous() && sc->dim() == 3 &&
                  sc->size(0) == pool.size(0) && sc->size(1) == pool.size(1) &&
                  sc->size(2) == pool.size(2),
              name, " scales must be fp32 [NB, bs, Hkv] like the pool");
  return sc->data_ptr<float>();
}

const int64_t* tree_ptr(const c10::optional<torch::Tensor>& tree, int64_t S) {
  if (!tree.has_value()) return nullptr;
  TORCH_CHECK(tree->scalar_type() == torch::kInt64 && tree->dim() == 2 && tree->size(0) == S &&
              tree->size(1) == 2 && tree->is_contiguous(), "tree must be [S, 2] int64");
  return tree->data_ptr<int64_t>();
}

// Runs body(s, h0, h1, scores) over every sequence s. Threads only pay off once a step holds
// real work: at batch 1 with a short context the whole call is a few microseconds, less
// than waking the pool, so small steps take each sequence's kv heads together on one
// thread and large ones split them into (sequence, kv head) tasks.
template <typename F>
void for_each_sequence(int64_t S, int64_t Hkv, int64_t work, const F& body) {
  if (work < (int64_t(1) << 20)) {
    std::vector<float> scores;
    for (int64_t s = 0; s < S; ++s) body(s, 0, Hkv, scores);
    return;
  }
  at::parallel_for(0, S * Hkv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores;
    for (int64_t t = t0; t < t1; ++t) body(t / Hkv, t % Hkv, t % Hkv + 1, scores);
  });
}

}  // namespace

// q [S, Hq, Dk]; kc [NB, bs, Hkv, Dk], vc [NB, bs, Hkv, Dv] (the pools, K/V of this step
// already written); block_tables [S, W] int64; context_lens [S] int64 (tokens to attend,
// this step's included); window > 0 keeps only the last `window` positions.
// Returns [S, Hq, Dv].
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor kc, torch::Tensor vc,
                                     torch::Tensor block_tables, torch::Tensor context_lens,
                                     double scale, int64_t window,
                                     c10::optional<torch::Tensor> tree,
                                     c10::optional<torch::Tensor> k_scales,
                                     c10::optional<torch::Tensor> v_scales) {
  const int64_t S = q.size(0), Hq = q.size(1), Dk = q.size(2);
  const int64_t bs = kc.size(1), Hkv = kc.size(2), Dv = vc.size(3);
  const int64_t W = block_tables.size(1);
  const int64_t group = Hq / Hkv;
  const float* ks = scales_ptr(k_scales, kc, "k");
  const float* vs = scales_ptr(v_scales, vc, "v");
  TORCH_CHECK(kc.scalar_type() == vc.scalar_type(), "k and v pools differ in dtype");
  auto out = torch::empty({S, Hq, Dv}, q.options());
  const float* qp = q.data_ptr<float>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* cl = context_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const int64_t total = check_tables(bt, cl, S, W, bs, kc.size(0));
  const int64_t* tr = tree_ptr(tree, S);
  auto run = [&](auto* kp, auto* vp) {
    for_each_sequence(S, Hkv, total * Hq * (Dk + Dv),
                      [&](int64_t s, int64_t h0, int64_t h1, std::vector<float>& scores) {
      const int64_t q0 = s * Hq + h0 * group;
      attend_row(s, tr, qp + q0 * Dk, h0, h1, group, kp, vp, ks, vs, bt + s * W, cl[s], window,
                 bs, Hkv, Dk, Dv, sc, scores, op + q0 * Dv);
    });
  };
  if (ks)
    run(static_cast<const int8_t*>(kc.data_ptr<int8_t>()),
        static_cast<const int8_t*>(vc.data_ptr<int8_t>()));
  else
    run(static_cast<const float*>(kc.data_ptr<float>()),
        static_cast<const float*>(vc.data_ptr<float>()));
  return out;
}

// A whole decode step of standard attention in one call, for a batch that is all decodes:
// qkv [S, (Hq + 2 Hkv) D] straight from the fused projection; NeoX rotary on the first rd
// dims of each q/k head (cos/sin [S, rd]); this step's K/V written to `slots` (int8 pools:
// quantized per token and head, the scale beside it); then the attention above. Returns
// [S, Hq * D].
torch::Tensor decode_attention_step(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin,
                                    int64_t rd, torch::Tensor kc, torch::Tensor vc,
                                    torch::Tensor slots, torch::Tensor block_tables,
                                    torch::Tensor context_lens, double scale, int64_t window,
                                    int64_t Hq, c10::optional<torch::Tensor> q_norm,
                                    c10::optional<torch::Tensor> k_norm, double eps,
                                    c10::optional<torch::Tensor> tree,
                                    c10::optional<torch::Tensor> k_scales,
                                    c10::optional<torch::Tensor> v_scales) {
  const int64_t S = qkv.size(0);
  const int64_t bs = kc.size(1), Hkv = kc.size(2), D = kc.size(3);
  const int64_t W = block_tables.size(1), NB = kc.size(0);
  const int64_t group = Hq / Hkv, half = rd / 2, ld = qkv.size(1);
  TORCH_CHECK(ld == (Hq + 2 * Hkv) * D, "qkv row of ", ld, " floats, expected ", (Hq + 2 * Hkv) * D);
  float* ks = const_cast<float*>(scales_ptr(k_scales, kc, "k"));
  float* vs = const_cast<float*>(scales_ptr(v_scales, vc, "v"));
  TORCH_CHECK(kc.scalar_type() == vc.scalar_type(), "k and v pools differ in dtype");
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* cl = context_lens.data_ptr<int64_t>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  const int64_t total = check_tables(bt, cl, S, W, bs, NB);
  const int64_t* tr = tree_ptr(tree, S);
  for (int64_t s = 0; s < S; ++s)
    TORCH_CHECK(sl[s] >= 0 && sl[s] < NB * bs, "slot ", sl[s], " outside the pool");
  auto out = torch::empty({S, Hq * D}, qkv.options());
  const float* xp = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t tok = Hkv * D;
  const float sc = static_cast<float>(scale);
  // Qwen3-style per-head RMSNorm of q and k (weights [D]) before the rotation
  const float* qn = q_norm.has_value() ? q_norm->data_ptr<float>() : nullptr;
  const float* kn = k_norm.has_value() ? k_norm->data_ptr<float>() : nullptr;
  const float e = static_cast<float>(eps);
  auto rope = [&](const float* src, float* dst, const float* c, const float* sn,
                  const float* nw, float* tmp) {
    if (nw) {
      double ss = 0;
      for (int64_t i = 0; i < D; ++i) ss += static_cast<double>(src[i]) * src[i];
      const float r = 1.f / std::sqrt(static_cast<float>(ss / D) + e);
      for (int64_t i = 0; i < D; ++i) tmp[i] = src[i] * r * nw[i];
      src = tmp;
    }
    sparsa_simd::rope_neox_head(src, dst, c, sn, half);
    for (int64_t i = rd; i < D; ++i) dst[i] = src[i];
  };
  // Every row's K/V is written before any row attends: rows of one sequence (a token and
  // the proposals it verifies) read each other's K/V, and the attention below runs rows in
  // parallel. The writes are S * Hkv small rotations: serial is cheap.
  {
    std::vector<float> tmp(D), k(D);
    for (int64_t s = 0; s < S; ++s)
      for (int64_t h = 0; h < Hkv; ++h) {
        const float* row = xp + s * ld;
        const float* v = row + (Hq + Hkv + h) * D;
        const int64_t at = sl[s] * tok + h * D;
        if (ks) {
          rope(row + (Hq + h) * D, k.data(), cp + s * rd, sp + s * rd, kn, tmp.data());
          ks[sl[s] * Hkv + h] = quantize_row(k.data(), kc.data_ptr<int8_t>() + at, D);
          vs[sl[s] * Hkv + h] = quantize_row(v, vc.data_ptr<int8_t>() + at, D);
        } else {
          rope(row + (Hq + h) * D, kc.data_ptr<float>() + at, cp + s * rd, sp + s * rd, kn,
               tmp.data());
          std::copy(v, v + D, vc.data_ptr<float>() + at);
        }
      }
  }
  auto run = [&](auto* kp, auto* vp) {
    for_each_sequence(S, Hkv, total * Hq * 2 * D,
                      [&](int64_t s, int64_t h0, int64_t h1, std::vector<float>& scores) {
      std::vector<float> q((h1 - h0) * group * D), tmp(D);
      const float* row = xp + s * ld;
      const float* c = cp + s * rd;
      const float* sn = sp + s * rd;
      for (int64_t i = 0; i < (h1 - h0) * group; ++i)
        rope(row + (h0 * group + i) * D, q.data() + i * D, c, sn, qn, tmp.data());
      attend_row(s, tr, q.data(), h0, h1, group, kp, vp, ks, vs, bt + s * W, cl[s], window, bs,
                 Hkv, D, D, sc, scores, op + s * Hq * D + h0 * group * D);
    });
  };
  if (ks)
    run(static_cast<const int8_t*>(kc.data_ptr<int8_t>()),
        static_cast<const int8_t*>(vc.data_ptr<int8_t>()));
  else
    run(static_cast<const float*>(kc.data_ptr<float>()),
        static_cast<const float*>(vc.data_ptr<float>()));
  return out;
}

void register_paged_attention(pybind11::module& m) {
  m.def("decode_attention_step", &decode_attention_step,
        "rotary + KV write + decode attention for an all-decode batch (fp32 or int8 pools)");
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention over a paged fp32 or int8 KV cache");
}
