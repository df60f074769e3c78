// Masked cross-entropy on logits (the row stage of blockmdm_kernels.masked_cross_entropy): per
// selected row the max, the sum of exponentials and the target logit, then the loss
// (1 - p_y)^gamma * ce + z_loss * lse^2 and its gradient written straight into the output row.
// Rows run in parallel; a row is read from memory once and then from cache.
#include "blockmdm.h"
#include "rows.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace blockmdm {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int kW = Vec::size();

float row_sum_exp(const float* x, int64_t V, float m) {
  const Vec vm(m);
  Vec vs(0.f);
  int64_t j = 0;
  for (; j + kW <= V; j += kW) vs = vs + (Vec::loadu(x + j) - vm).exp_u20();
  float s = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, vs);
  for (; j < V; ++j) s += std::exp(x[j] - m);
  return s;
}

// out = exp(x - m) * scale, minus c1 at the target, rounded once to the output dtype
template <typename scalar_t>
void row_grad(const float* x, int64_t V, float m, float scale, int64_t target, float c1,
              scalar_t* out, float* tmp) {
  float* g = std::is_same_v<scalar_t, float> ? reinterpret_cast<float*>(out) : tmp;
  const Vec vm(m), vscale(scale);
  int64_t j = 0;
  for (; j + kW <= V; j += kW) ((Vec::loadu(x + j) - vm).exp_u20() * vscale).store(g + j);
  for (; j < V; ++j) g[j] = std::exp(x[j] - m) * scale;
  g[target] -= c1;
  if constexpr (!std::is_same_v<scalar_t, float>) at::vec::convert(tmp, out, V);
}

template <typename scalar_t>
void run(const at::Tensor& logits, const int64_t* rows, const int64_t* y, const float* coef,
         int64_t n, double gamma, double z_loss, float* loss, at::Tensor& grad) {
  const int64_t N = logits.size(0), V = logits.size(1), s0 = logits.stride(0);
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  scalar_t* g = grad.defined() ? grad.data_ptr<scalar_t>() : nullptr;
  // which selected row (if any) each logits row is: unselected gradient rows are zero-filled
  std::vector<int64_t> slot;
  if (g) {
    slot.assign(N, -1);
    for (int64_t i = 0; i < n; ++i) slot[rows[i]] = i;
  }
  const int64_t grain = std::max<int64_t>(1, 16384 / V);
  const int64_t work = g ? N : n;
  at::parallel_for(0, work, grain, [&](int64_t lo, int64_t hi) {
    std::vector<float> buf(std::is_same_v<scalar_t, float> ? 0 : 2 * V);
    for (int64_t w = lo; w < hi; ++w) {
      const int64_t i = g ? slot[w] : w;
      if (i < 0) {
        std::fill(g + w * V, g + (w + 1) * V, scalar_t(0));
        continue;
      }
      const int64_t r = rows[i];
      const scalar_t* src = base + r * s0;
      const float* x = float_row(src, buf, V);
      const float m = row_max(x, 0, V);
      const float total = row_sum_exp(x, V, m);
      const float lse = m + std::log(total);
      const float ce = lse - x[y[i]];
      float l = ce, c1 = 1.f;
      if (gamma > 0) {
        const float q = std::max(-std::expm1(-ce), 0.f);
        const float fac = std::pow(q, static_cast<float>(gamma));
        const float dfac = q > 0 ? static_cast<float>(gamma) * ce * (1 - q) *
                                       std::pow(q, static_cast<float>(gamma - 1))
                                 : 0.f;
        l = fac * ce;
        c1 = fac + dfac;
      }
      if (z_loss > 0) l += static_cast<float>(z_loss) * lse * lse;
      loss[i] = l;
      if (!g) continue;
      c1 *= coef[i];
      const float a = z_loss > 0 ? c1 + coef[i] * static_cast<float>(2 * z_loss) * lse : c1;
      scalar_t* out = g + r * V;
      row_grad<scalar_t>(x, V, m, a / total, y[i], c1, out, buf.data() + (buf.empty() ? 0 : V));
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_entropy_rows(const at::Tensor& logits,
                                                      const at::Tensor& rows,
                                                      const at::Tensor& targets,
                                                      const std::optional<at::Tensor>& coef,
                                                      double focal_gamma, double z_loss) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.stride(1) == 1,
              "logits must be a CPU tensor [N, V] with a unit last stride");
  const at::Tensor r = rows.to(at::kLong).contiguous();
  const at::Tensor y = targets.to(at::kLong).contiguous();
  const int64_t n = r.numel();
  TORCH_CHECK(y.numel() == n, "targets must have one entry per selected row");
  at::Tensor c;
  if (coef) {
    c = coef->to(at::kFloat).contiguous();
    TORCH_CHECK(c.numel() == n, "coef must have one entry per selected row");
  }
  at::Tensor loss = at::empty({n}, at::kFloat);
  at::Tensor grad = coef ? at::empty(logits.sizes(), logits.options().memory_format(
                                                          at::MemoryFormat::Contiguous))
                         : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "cross_entropy_rows", [&] {
                                    run<scalar_t>(logits, r.const_data_ptr<int64_t>(),
                                                  y.const_data_ptr<int64_t>(),
                                                  coef ? c.const_data_ptr<float>() : nullptr, n,
                                                  focal_gamma, z_loss,
                                                  loss.data_ptr<float>(), grad);
                                  });
  return {loss, grad};
}

}  // namespace blockmdm
