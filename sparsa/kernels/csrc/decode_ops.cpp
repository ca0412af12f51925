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
#include <omp.h>

#include <atomic>
#include <chrono>

#include "simd.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

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

// residual [T, H] += x [T, H] in place, then returns RMSNorm(residual) * w: the residual add
// that ends one sublayer and the norm that starts the next, in one pass (vLLM's
// fused_add_rms_norm). The add is the same fp32 add as torch's, the norm rms_norm's.
torch::Tensor add_rms_norm_(torch::Tensor residual, torch::Tensor x, torch::Tensor w,
                            double eps) {
  TORCH_CHECK(residual.is_cpu() && x.is_cpu() && w.is_cpu() && w.is_contiguous() &&
                  residual.sizes() == x.sizes() && residual.dim() == 2 &&
                  residual.is_contiguous() &&
                  x.is_contiguous() && residual.scalar_type() == torch::kFloat &&
                  x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat &&
                  w.numel() == residual.size(1),
              "add_rms_norm_: residual and x must be contiguous fp32 [T, H], w fp32 [H]");
  const int64_t T = residual.size(0), H = residual.size(1);
  auto y = torch::empty({T, H}, residual.options());
  float* rp = residual.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float e = static_cast<float>(eps);
  auto rows = [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* r = rp + t * H;
      const float* a = xp + t * H;
      int64_t i = 0;
      for (; i + 8 <= H; i += 8)
        _mm256_storeu_ps(r + i, _mm256_add_ps(_mm256_loadu_ps(r + i), _mm256_loadu_ps(a + i)));
      for (; i < H; ++i) r[i] += a[i];
      rms_row(r, wp, yp + t * H, H, e);
    }
  };
  const int64_t g = grain(H);
  if (T <= g) rows(0, T);
  else at::parallel_for(0, T, g, rows);
  return y;
}

// MoE routing of x [T, H] by a router weight w [H, E] (the transposed Linear layout):
// logits = x @ w, softmax over the E experts, the top k (highest first; ties to the lower
// expert id), optionally renormalised to sum to 1. Returns (weights [T, k] fp32,
// ids [T, k] int64), what softmax_topk returns, without its five small torch ops.
std::tuple<torch::Tensor, torch::Tensor> moe_route(torch::Tensor x, torch::Tensor w,
                                                   int64_t k, bool renormalize) {
  TORCH_CHECK(x.is_cpu() && w.is_cpu() && x.dim() == 2 && w.dim() == 2 &&
                  x.size(1) == w.size(0) && x.is_contiguous() &&
                  w.is_contiguous() && x.scalar_type() == torch::kFloat &&
                  w.scalar_type() == torch::kFloat,
              "moe_route: x must be contiguous fp32 [T, H] and w fp32 [H, E]");
  const int64_t T = x.size(0), H = x.size(1), E = w.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "moe_route: k must be in [1, ", E, "]");
  auto weights = torch::empty({T, k}, x.options());
  auto ids = torch::empty({T, k}, x.options().dtype(torch::kLong));
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = weights.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  auto rows = [&](int64_t t0, int64_t t1) {
    std::vector<float> p(E);
    std::vector<char> taken(E);
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(p.begin(), p.end(), 0.f);
      const float* xr = xp + t * H;
      for (int64_t h = 0; h < H; ++h) {  // rows of w are contiguous: vectorised over e
        const float xv = xr[h];
        const float* wr = wp + h * E;
        for (int64_t e = 0; e < E; ++e) p[e] += xv * wr[e];
      }
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t e = 0; e < E; ++e) mx = std::max(mx, p[e]);
      float sum = 0.f;
      for (int64_t e = 0; e < E; ++e) {
        p[e] = std::exp(p[e] - mx);
        sum += p[e];
      }
      std::fill(taken.begin(), taken.end(), 0);
      float chosen = 0.f;
      for (int64_t j = 0; j < k; ++j) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; ++e)
          if (!taken[e] && (best < 0 || p[e] > p[best])) best = e;
        taken[best] = 1;
        op[t * k + j] = p[best] / sum;
        ip[t * k + j] = best;
        chosen += op[t * k + j];
      }
      if (renormalize)
        for (int64_t j = 0; j < k; ++j) op[t * k + j] /= chosen;
    }
  };
  // rows are independent: threads only pay off for prefill-sized batches
  const int64_t g = std::max<int64_t>(16, grain(H * E));
  if (T <= g) rows(0, T);
  else at::parallel_for(0, T, g, rows);
  return {weights, ids};
}

// Row-wise argmax of fp32 logits [T, V] (the first index of the maximum, as torch.argmax;
// NaN is not expected here). Single-threaded: torch's threaded reduction costs ~18 us on
// one 32k-vocab row here, this ~3 us.
torch::Tensor argmax_rows(torch::Tensor logits) {
  TORCH_CHECK(logits.is_cpu() && logits.dim() == 2 && logits.scalar_type() == torch::kFloat &&
                  logits.stride(1) == 1,
              "argmax_rows: logits must be fp32 [T, V] with contiguous rows");
  const int64_t T = logits.size(0), V = logits.size(1), s = logits.stride(0);
  TORCH_CHECK(V >= 1, "argmax_rows: empty vocabulary");
  auto out = torch::empty({T}, logits.options().dtype(torch::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  const float* lp = logits.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    const float* r = lp + t * s;
    // running max in 4 x 8 lanes (independent chains), then the first index that holds it
    const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    __m256 m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;
    int64_t i = 0;
    for (; i + 32 <= V; i += 32) {
      m0 = _mm256_max_ps(m0, _mm256_loadu_ps(r + i));
      m1 = _mm256_max_ps(m1, _mm256_loadu_ps(r + i + 8));
      m2 = _mm256_max_ps(m2, _mm256_loadu_ps(r + i + 16));
      m3 = _mm256_max_ps(m3, _mm256_loadu_ps(r + i + 24));
    }
    float best = sparsa_simd::hmax8(_mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
    for (; i < V; ++i) best = std::max(best, r[i]);
    const __m256 bv = _mm256_set1_ps(best);
    int64_t idx = 0;
    for (; idx + 8 <= V; idx += 8) {
      const int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(r + idx), bv, _CMP_EQ_OQ));
      if (mask) {
        idx += __builtin_ctz(mask);
        break;
      }
    }
    while (idx < V && r[idx] != best) ++idx;  // the tail (a no-op when the loop found it)
    o[t] = idx < V ? idx : 0;
  }
  return out;
}

// One streaming read of buf with `threads` OpenMP threads (contiguous chunks), the roofline
// probe of the benchmarks: 64-byte loads (AVX-512 where the CPU has it, two AVX2 loads
// elsewhere) folded into a sink, no stores. Returns the seconds of the parallel region.
__attribute__((target("avx512f"))) static int64_t read_chunk_avx512(const uint8_t* p, int64_t n) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 256 <= n; i += 256) {
    a0 = _mm512_xor_si512(a0, _mm512_loadu_si512(p + i));
    a1 = _mm512_xor_si512(a1, _mm512_loadu_si512(p + i + 64));
    a2 = _mm512_xor_si512(a2, _mm512_loadu_si512(p + i + 128));
    a3 = _mm512_xor_si512(a3, _mm512_loadu_si512(p + i + 192));
  }
  int64_t s = _mm512_reduce_add_epi64(_mm512_xor_si512(_mm512_xor_si512(a0, a1),
                                                       _mm512_xor_si512(a2, a3)));
  for (; i < n; ++i) s += p[i];
  return s;
}

static int64_t read_chunk_avx2(const uint8_t* p, int64_t n) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 128 <= n; i += 128) {
    a0 = _mm256_xor_si256(a0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
    a1 = _mm256_xor_si256(a1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
    a2 = _mm256_xor_si256(a2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
    a3 = _mm256_xor_si256(a3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
  }
  alignas(32) int64_t v[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(v),
                     _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3)));
  int64_t s = v[0] + v[1] + v[2] + v[3];
  for (; i < n; ++i) s += p[i];
  return s;
}

double read_bandwidth(torch::Tensor buf, int64_t threads) {
  TORCH_CHECK(buf.device().is_cpu() && buf.scalar_type() == torch::kUInt8 && buf.is_contiguous(),
              "buf must be a contiguous CPU uint8 tensor");
  TORCH_CHECK(threads >= 1, "threads must be >= 1");
  const uint8_t* p = buf.data_ptr<uint8_t>();
  const int64_t n = buf.numel();
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  std::atomic<int64_t> sink{0};
  const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(threads)
  {
    const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t per = (n / nt) / 64 * 64;
    const int64_t a = id * per, b = id == nt - 1 ? n : a + per;
    sink += avx512 ? read_chunk_avx512(p + a, b - a) : read_chunk_avx2(p + a, b - a);
  }
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  static volatile int64_t keep;
  keep = sink.load();
  return dt;
}

void register_decode_ops(pybind11::module& m) {
  m.def("read_bandwidth", &read_bandwidth,
        "seconds of one streaming read of a uint8 buffer with `threads` threads");
  m.def("rms_norm", &rms_norm, "RMSNorm of fp32 rows");
  m.def("rope_neox_", &rope_neox_, "NeoX rotary embedding in place");
  m.def("add_rms_norm_", &add_rms_norm_, "residual += x in place, then RMSNorm(residual)");
  m.def("moe_route", &moe_route, "router GEMV + softmax + top-k (+ renormalise)");
  m.def("argmax_rows", &argmax_rows, "row-wise argmax of fp32 logits");
}
