// Batched int8 MoE (prefill, large decode batches) as W8A8 GEMMs in one native call.
//
// The grouped path in Python runs ~10 small ops per active expert (gather, quantize, GEMM,
// scale, split, silu, multiply, quantize, GEMM, scale): with 64 experts per layer that is
// hundreds of dispatches and fp32 copies per layer. Here: every token is quantized to int8
// once, each active expert gathers its tokens' int8 rows, runs two int8 x int8 GEMMs
// (at::_int_mm, oneDNN) with the SwiGLU and the re-quantization fused into the epilogue of
// the first, and writes its rows into per-slot outputs; tokens then sum their k slots in
// slot order, as GroupedExperts.forward does.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "moe_common.h"
#include "simd.h"

using sparsa_simd::quantize_row_sym;

torch::Tensor moe_w8a8(torch::Tensor x, torch::Tensor w13q, torch::Tensor w13s,
                       torch::Tensor w2q, torch::Tensor w2s, torch::Tensor ids,
                       torch::Tensor tw) {
  const int64_t T = x.size(0), H = x.size(1), k = ids.size(1);
  const int64_t E = w13q.size(0), N13 = w13q.size(1), Hp = w13q.size(2);
  const int64_t I = N13 / 2, Ip = w2q.size(2);
  TORCH_CHECK(w2q.size(1) == H && Hp >= H && Ip >= I, "inconsistent expert shapes");
  const int64_t S = T * k;
  const int64_t* idp = ids.data_ptr<int64_t>();
  const float* twp = tw.data_ptr<float>();
  const float* xp = x.data_ptr<float>();

  const auto slots = sparsa_moe::group_slots(idp, S, E);

  auto i8 = x.options().dtype(torch::kInt8);
  auto xq = torch::empty({T, Hp}, i8);
  std::vector<float> xs(T);
  int8_t* xqp = xq.data_ptr<int8_t>();
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) xs[t] = quantize_row_sym(xp + t * H, H, Hp, xqp + t * Hp);
  });

  std::vector<float> y(S * H);
  const float* s13 = w13s.data_ptr<float>();
  const float* s2 = w2s.data_ptr<float>();
  for (int64_t e = 0; e < E; ++e) {
    const auto& sl = slots[e];
    const int64_t n = static_cast<int64_t>(sl.size());
    if (!n) continue;
    auto a = torch::empty({n, Hp}, i8);
    int8_t* ap = a.data_ptr<int8_t>();
    for (int64_t r = 0; r < n; ++r)
      std::copy(xqp + (sl[r] / k) * Hp, xqp + (sl[r] / k + 1) * Hp, ap + r * Hp);
    const auto acc1 = at::_int_mm(a, w13q[e].t());  // [n, 2I] int32
    const int32_t* g = acc1.data_ptr<int32_t>();
    const float* se = s13 + e * N13;
    auto b = torch::empty({n, Ip}, i8);
    int8_t* bp = b.data_ptr<int8_t>();
    std::vector<float> bs(n);
    at::parallel_for(0, n, 4, [&](int64_t r0, int64_t r1) {
      std::vector<float> act(I);
      for (int64_t r = r0; r < r1; ++r) {
        const float xsc = xs[sl[r] / k];
        const int32_t* gr = g + r * N13;
        for (int64_t i = 0; i < I; ++i) {
          const float gate = static_cast<float>(gr[i]) * xsc * se[i];
          const float up = static_cast<float>(gr[I + i]) * xsc * se[I + i];
          act[i] = gate / (1.f + std::exp(-gate)) * up;
        }
        bs[r] = quantize_row_sym(act.data(), I, Ip, bp + r * Ip);
      }
    });
    const auto acc2 = at::_int_mm(b, w2q[e].t());  // [n, H] int32
    const int32_t* o = acc2.data_ptr<int32_t>();
    const float* s2e = s2 + e * H;
    at::parallel_for(0, n, 8, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float* dst = y.data() + sl[r] * H;
        const int32_t* src = o + r * H;
        for (int64_t c = 0; c < H; ++c) dst[c] = static_cast<float>(src[c]) * bs[r] * s2e[c];
      }
    });
  }

  auto out = torch::empty({T, H}, x.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    sparsa_moe::sum_slots(y.data(), twp, t0, t1, k, H, op);
  });
  return out;
}

void register_moe_w8a8(pybind11::module& m) {
  m.def("moe_w8a8", &moe_w8a8, "batched SwiGLU MoE over int8 experts as W8A8 int8 GEMMs");
}
