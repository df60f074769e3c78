// RMSNorm forward of blockmdm_kernels.rms_norm on CPU: one pass per row for the sum of squares
// (fp32, vectorised), one for the scaled output, in torch's order of roundings: (x * r) in fp32,
// rounded to x's dtype, times the weight. A decoding step normalises a few rows per call, where
// torch's composite (seven ops) costs more than the model's matrix products.
#include "blockmdm.h"
#include "rows.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <type_traits>
#include <vector>

namespace blockmdm {
namespace {

using Vec = at::vec::Vectorized<float>;

float sum_squares(const float* x, int64_t n) {
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec v = Vec::loadu(x + j);
    acc = at::vec::fmadd(v, v, acc);
  }
  float s = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, acc);
  for (; j < n; ++j) s += x[j] * x[j];
  return s;
}

template <typename scalar_t>
void rows(const scalar_t* x, const scalar_t* w, scalar_t* y, int64_t N, int64_t D, float eps) {
  const int64_t grain = std::max<int64_t>(1, 16384 / D);
  at::parallel_for(0, N, grain, [&](int64_t lo, int64_t hi) {
    std::vector<float> buf(std::is_same_v<scalar_t, float> ? 0 : D);
    for (int64_t r = lo; r < hi; ++r) {
      const float* xr = float_row(x + r * D, buf, D);
      const float inv = 1.f / std::sqrt(sum_squares(xr, D) / static_cast<float>(D) + eps);
      scalar_t* yr = y + r * D;
      if constexpr (std::is_same_v<scalar_t, float>) {
        int64_t j = 0;
        const Vec vi(inv);
        for (; j + Vec::size() <= D; j += Vec::size())
          (Vec::loadu(xr + j) * vi * Vec::loadu(w + j)).store(yr + j);
        for (; j < D; ++j) yr[j] = xr[j] * inv * w[j];
      } else {
        for (int64_t j = 0; j < D; ++j)
          yr[j] = static_cast<scalar_t>(static_cast<float>(static_cast<scalar_t>(xr[j] * inv)) *
                                        static_cast<float>(w[j]));
      }
    }
  });
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "rms_norm: CPU tensors only");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1) &&
                  weight.scalar_type() == x.scalar_type(),
              "rms_norm: weight must be [D] of x's dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              "rms_norm: float32, float16 or bfloat16 (float64 stays with torch)");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t D = x.size(-1), N = D == 0 ? 0 : xc.numel() / D;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    rows<scalar_t>(xc.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(),
                   y.data_ptr<scalar_t>(), N, D, static_cast<float>(eps));
  });
  return y;
}

}  // namespace blockmdm
