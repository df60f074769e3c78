// RMSNorm of blockmdm_kernels.rms_norm on CPU. The forward takes one pass per row for the sum of
// squares (fp32, vectorised) and one for the scaled output, in torch's order of roundings:
// (x * r) in fp32, rounded to x's dtype, times the weight. A decoding step normalises a few rows
// per call, where torch's composite (seven ops) costs more than the model's matrix products.
// Training (fp32) keeps each row's r = rsqrt(mean(x^2) + eps) and takes the backward in two
// passes per row, where torch's autograd runs a dozen full-tensor ops:
//   dx = r * (g - x * r^2 * sum(g * x) / D),  g = dy * w;   dw = sum over rows of dy * x * r.
#include "blockmdm.h"
#include "rows.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <tuple>
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
void rows(const scalar_t* x, const scalar_t* w, scalar_t* y, float* rstd, int64_t N, int64_t D,
          float eps) {
  const int64_t grain = std::max<int64_t>(1, 16384 / D);
  at::parallel_for(0, N, grain, [&](int64_t lo, int64_t hi) {
    std::vector<float> buf(std::is_same_v<scalar_t, float> ? 0 : D);
    for (int64_t r = lo; r < hi; ++r) {
      const float* xr = float_row(x + r * D, buf, D);
      const float inv = 1.f / std::sqrt(sum_squares(xr, D) / static_cast<float>(D) + eps);
      if (rstd != nullptr) rstd[r] = inv;
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

// sum_j dy[j] * w[j] * x[j]
float dot3(const float* dy, const float* w, const float* x, int64_t n) {
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size())
    acc = at::vec::fmadd(Vec::loadu(dy + j) * Vec::loadu(w + j), Vec::loadu(x + j), acc);
  float s = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, acc);
  for (; j < n; ++j) s += dy[j] * w[j] * x[j];
  return s;
}

void check_fp32_rows(const at::Tensor& t, const char* name, int64_t D) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                  t.dim() >= 1 && t.size(-1) == D,
              "rms_norm: ", name, " must be a contiguous float32 CPU tensor [..., ", D, "]");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                double eps) {
  const int64_t D = x.size(-1);
  check_fp32_rows(x, "x", D);
  check_fp32_rows(weight, "weight", D);
  TORCH_CHECK(weight.dim() == 1, "rms_norm: weight must be [D]");
  at::Tensor y = at::empty_like(x);
  const int64_t N = D == 0 ? 0 : x.numel() / D;
  at::Tensor rstd = at::empty({N}, x.options());
  rows<float>(x.const_data_ptr<float>(), weight.const_data_ptr<float>(), y.data_ptr<float>(),
              rstd.data_ptr<float>(), N, D, static_cast<float>(eps));
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                const at::Tensor& weight,
                                                const at::Tensor& rstd) {
  const int64_t D = x.size(-1), N = D == 0 ? 0 : x.numel() / D;
  check_fp32_rows(x, "x", D);
  check_fp32_rows(dy, "dy", D);
  check_fp32_rows(weight, "weight", D);
  TORCH_CHECK(dy.numel() == x.numel() && rstd.is_contiguous() && rstd.numel() == N &&
                  rstd.scalar_type() == at::kFloat,
              "rms_norm: dy must match x and rstd be float32 [rows]");
  at::Tensor dx = at::empty_like(x);
  // dw: one fp32 partial sum per thread, added up at the end. Called inside an enclosing
  // parallel region, at::parallel_for runs inline on a thread whose id need not be below
  // get_num_threads(): one partial sum then, rows in order.
  const bool nested = at::in_parallel_region();
  const int64_t n_threads = nested ? 1 : at::get_num_threads();
  at::Tensor partial = at::zeros({n_threads, D}, x.options());
  const float *xp = x.const_data_ptr<float>(), *gp = dy.const_data_ptr<float>(),
              *wp = weight.const_data_ptr<float>(), *rp = rstd.const_data_ptr<float>();
  float *dxp = dx.data_ptr<float>(), *pp = partial.data_ptr<float>();
  const float inv_d = D == 0 ? 0.f : 1.f / static_cast<float>(D);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  at::parallel_for(0, N, grain, [&](int64_t lo, int64_t hi) {
    float* dw = pp + (nested ? 0 : at::get_thread_num()) * D;
    for (int64_t r = lo; r < hi; ++r) {
      const float *xr = xp + r * D, *gr = gp + r * D;
      float* dxr = dxp + r * D;
      const float inv = rp[r];
      const float c = inv * inv * dot3(gr, wp, xr, D) * inv_d;
      const Vec vinv(inv), vc(c);
      int64_t j = 0;
      for (; j + Vec::size() <= D; j += Vec::size()) {
        const Vec xv = Vec::loadu(xr + j), gv = Vec::loadu(gr + j);
        (vinv * (gv * Vec::loadu(wp + j) - xv * vc)).store(dxr + j);
        at::vec::fmadd(gv * xv, vinv, Vec::loadu(dw + j)).store(dw + j);
      }
      for (; j < D; ++j) {
        dxr[j] = inv * (gr[j] * wp[j] - xr[j] * c);
        dw[j] += gr[j] * xr[j] * inv;
      }
    }
  });
  return {dx, partial.sum(0)};
}

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
                   y.data_ptr<scalar_t>(), nullptr, N, D, static_cast<float>(eps));
  });
  return y;
}

}  // namespace blockmdm
