// Rotary position embedding of blockmdm_kernels.rope on CPU (float32). Each head's pairs
// (x_i, x_{i+D/2}) turn by the position's angles:
//   out_i = x_i cos - x_{i+D/2} sin,   out_{i+D/2} = x_i sin + x_{i+D/2} cos,
// the first `heads` heads of each position; the others are copied (a fused qkv projection's v).
// The backward is the inverse turn (sin negated) of the output's gradient. One pass each way,
// where torch's composite writes eight temporaries forward and more backward.
#include "blockmdm.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>

namespace blockmdm {

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                int64_t heads, bool inverse) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4 &&
                  x.stride(3) == 1 && x.size(3) % 2 == 0,
              "rope: x must be a float32 CPU tensor [B, t, n, D] with even D, last dim "
              "contiguous");
  const int64_t B = x.size(0), T = x.size(1), N = x.size(2), D = x.size(3), half = D / 2;
  for (const at::Tensor* c : {&cos, &sin})
    TORCH_CHECK(c->device().is_cpu() && c->scalar_type() == at::kFloat && c->is_contiguous() &&
                    c->dim() == 3 && (c->size(0) == 1 || c->size(0) == B) && c->size(1) == T &&
                    c->size(2) == half,
                "rope: cos and sin must be contiguous float32 [1 or B, t, D/2]");
  TORCH_CHECK(cos.size(0) == sin.size(0), "rope: cos and sin must have the same shape");
  TORCH_CHECK(0 <= heads && heads <= N, "rope: heads must be in [0, n]");
  at::Tensor out = at::empty({B, T, N, D}, x.options());
  const float* xp = x.const_data_ptr<float>();
  const float *cp = cos.const_data_ptr<float>(), *sp = sin.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t sb = x.stride(0), st = x.stride(1), sh = x.stride(2);
  const int64_t cos_b = cos.size(0) == 1 ? 0 : T * half;
  using Vec = at::vec::Vectorized<float>;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(N * D, 1));
  at::parallel_for(0, B * T, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t b = r / T, t = r % T;
      const float* xr = xp + b * sb + t * st;
      const float *cr = cp + b * cos_b + t * half, *sr = sp + b * cos_b + t * half;
      float* orow = op + r * N * D;
      for (int64_t h = 0; h < N; ++h) {
        const float* xh = xr + h * sh;
        float* oh = orow + h * D;
        if (h >= heads) {
          std::memcpy(oh, xh, D * sizeof(float));
          continue;
        }
        int64_t j = 0;
        for (; j + Vec::size() <= half; j += Vec::size()) {
          const Vec x1 = Vec::loadu(xh + j), x2 = Vec::loadu(xh + half + j);
          const Vec c = Vec::loadu(cr + j), s = inverse ? Vec::loadu(sr + j).neg()
                                                        : Vec::loadu(sr + j);
          (x1 * c - x2 * s).store(oh + j);
          (x1 * s + x2 * c).store(oh + half + j);
        }
        for (; j < half; ++j) {
          const float x1 = xh[j], x2 = xh[half + j], c = cr[j], s = inverse ? -sr[j] : sr[j];
          oh[j] = x1 * c - x2 * s;
          oh[half + j] = x1 * s + x2 * c;
        }
      }
    }
  });
  return out;
}

}  // namespace blockmdm
