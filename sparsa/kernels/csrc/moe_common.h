// Token bookkeeping shared by the fused MoE kernels (decode: quant_kernels.cpp; batched W8A8:
// moe_w8a8.cpp).
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

namespace sparsa_moe {

// slots[e] = the slots s = t * k + j routed to expert e, in token order; ids are checked.
inline std::vector<std::vector<int64_t>> group_slots(const int64_t* ids, int64_t S, int64_t E) {
  std::vector<std::vector<int64_t>> slots(E);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t e = ids[s];
    TORCH_CHECK(e >= 0 && e < E, "expert id ", e, " out of range [0, ", E, ")");
    slots[e].push_back(s);
  }
  return slots;
}

// out[t] = sum_j w[t, j] * y[t * k + j] for tokens [t0, t1), summed in slot order so a token's
// result never depends on the other tokens of the batch.
inline void sum_slots(const float* y, const float* w, int64_t t0, int64_t t1, int64_t k,
                      int64_t H, float* out) {
  for (int64_t t = t0; t < t1; ++t) {
    float* dst = out + t * H;
    const float* y0 = y + (t * k) * H;
    for (int64_t c = 0; c < H; ++c) dst[c] = w[t * k] * y0[c];
    for (int64_t j = 1; j < k; ++j) {
      const float* yj = y + (t * k + j) * H;
      const float wj = w[t * k + j];
      for (int64_t c = 0; c < H; ++c) dst[c] += wj * yj[c];
    }
  }
}

}  // namespace sparsa_moe
