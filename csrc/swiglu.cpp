// SwiGLU of blockmdm_kernels.swiglu on CPU (float32): out = silu(a) * b, silu(a) = a * sigmoid(a).
// Torch's composite takes three passes over the activations forward (silu, the product, and the
// saved silu(a)) and five backward (silu_backward and the product's two gradients, each reading
// and writing a full tensor); here the forward is one pass and the backward one, recomputing
// sigmoid(a) instead of storing silu(a):
//   db = g * silu(a),  da = g * b * s * (1 + a * (1 - s)),  s = sigmoid(a).
#include "blockmdm.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>

namespace blockmdm {
namespace {

using Vec = at::vec::Vectorized<float>;

// elements per parallel_for task: a few tens of KB of each operand
constexpr int64_t kGrain = 8192;

void check_same(const at::Tensor& t, const at::Tensor& a, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                  t.sizes() == a.sizes(),
              "swiglu: ", name, " must be a contiguous float32 CPU tensor of a's shape");
}

// exp_u20 (at most 20 ulp, the attention kernels' exp): sigmoid within a few ulp of float32, with
// fewer instructions than the 1-ulp exp
inline Vec sigmoid(const Vec& a) { return Vec(1.f) / (Vec(1.f) + a.neg().exp_u20()); }

inline float sigmoid(float a) { return 1.f / (1.f + std::exp(-a)); }

}  // namespace

at::Tensor swiglu_fwd(const at::Tensor& a, const at::Tensor& b) {
  check_same(a, a, "a");
  check_same(b, a, "b");
  at::Tensor out = at::empty_like(a);
  const float *ap = a.const_data_ptr<float>(), *bp = b.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, a.numel(), kGrain, [&](int64_t lo, int64_t hi) {
    int64_t j = lo;
    for (; j + Vec::size() <= hi; j += Vec::size()) {
      const Vec av = Vec::loadu(ap + j);
      (av * sigmoid(av) * Vec::loadu(bp + j)).store(op + j);
    }
    for (; j < hi; ++j) op[j] = ap[j] * sigmoid(ap[j]) * bp[j];
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& g, const at::Tensor& a,
                                              const at::Tensor& b) {
  check_same(a, a, "a");
  check_same(b, a, "b");
  check_same(g, a, "g");
  at::Tensor da = at::empty_like(a), db = at::empty_like(a);
  const float *gp = g.const_data_ptr<float>(), *ap = a.const_data_ptr<float>(),
              *bp = b.const_data_ptr<float>();
  float *dap = da.data_ptr<float>(), *dbp = db.data_ptr<float>();
  at::parallel_for(0, a.numel(), kGrain, [&](int64_t lo, int64_t hi) {
    int64_t j = lo;
    const Vec one(1.f);
    for (; j + Vec::size() <= hi; j += Vec::size()) {
      const Vec av = Vec::loadu(ap + j), gv = Vec::loadu(gp + j), s = sigmoid(av);
      (gv * (av * s)).store(dbp + j);
      (gv * Vec::loadu(bp + j) * s * (one + av * (one - s))).store(dap + j);
    }
    for (; j < hi; ++j) {
      const float s = sigmoid(ap[j]);
      dbp[j] = gp[j] * (ap[j] * s);
      dap[j] = gp[j] * bp[j] * s * (1.f + ap[j] * (1.f - s));
    }
  });
  return {da, db};
}

}  // namespace blockmdm
