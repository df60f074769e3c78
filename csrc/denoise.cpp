// The denoising step of blockmdm_kernels.denoise_step on CPU: per active row, one pass for the
// max, first argmax and runner-up, one pass (over the row, now in cache) for the sum of
// exponentials and the entropy term; the Gumbel-max sample from the reference's splitmix64
// counters; then the per-row selection. Inactive rows are never read. Rows run in parallel.
#include "blockmdm.h"
#include "rows.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

namespace blockmdm {
namespace {

using Vec = at::vec::Vectorized<float>;
using VecD = at::vec::Vectorized<double>;
constexpr int kW = Vec::size();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// splitmix64 constants and the "random" confidence key of blockmdm_kernels/denoise/reference.py
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kMix1 = 0xBF58476D1CE4E5B9ULL;
constexpr uint64_t kMix2 = 0x94D049BB133111EBULL;
constexpr uint64_t kRandomKey = 0x5851F42D4C957F2DULL;

enum Confidence { kProb = 0, kMargin = 1, kEntropy = 2, kRandom = 3 };

// reference.uniform: splitmix64(seed + (index + 1) * golden), top 53 bits, in (0, 1)
inline double uniform(uint64_t seed, uint64_t index) {
  uint64_t z = (index + 1) * kGolden + seed;
  z = (z ^ (z >> 30)) * kMix1;
  z = (z ^ (z >> 27)) * kMix2;
  z ^= z >> 31;
  return (static_cast<double>(z >> 11) + 0.5) * 0x1p-53;
}

// Max, first argmax and the runner-up (the second largest value, equal to the max on a tie);
// `nan` when a NaN was seen (the row then has no meaningful choice).
struct Top {
  float m = kNegInf, m2 = kNegInf;
  int64_t arg = std::numeric_limits<int64_t>::max();
  bool nan = false;
  void push(float v, int64_t i) {
    if (v != v) {
      nan = true;
    } else if (v > m || (v == m && i < arg)) {
      m2 = std::max(m2, m);
      m = v;
      arg = i;
    } else {
      m2 = std::max(m2, v);
    }
  }
};

// Max and its first index over [lo, hi), merged into `top` (whose segment comes first): per block
// only a vector max, then the block that first reached the maximum is rescanned for the index.
// Half the work per element of scan_top, which also tracks the runner-up.
void scan_max(const float* x, int64_t lo, int64_t hi, Top& top) {
  constexpr int64_t kBlock = 1024;
  float m = top.m;
  int64_t best = -1;
  for (int64_t b = lo; b < hi; b += kBlock) {
    const int64_t e = std::min(b + kBlock, hi);
    const float bm = row_max(x, b, e);
    if (bm != bm) {  // row_max propagates NaN
      top.nan = true;
      return;
    }
    if (bm > m) {
      m = bm;
      best = b;
    }
  }
  if (best < 0) return;
  for (int64_t j = best;; ++j) {
    if (x[j] == m) {
      top.m = m;
      top.arg = j;
      return;
    }
  }
}

// One pass over [lo, hi) for the max, its first index and the sum of exp(x - max) (and with
// `ent` the sum of exp(x - max) * (x - max)), block by block: a block's max is taken first, the
// sums so far are rescaled when it raises the running max, then the block (now in L1) is
// exponentiated. Reading the row once keeps the exponentials overlapped with the memory stream.
struct Online {
  Top top;
  int64_t best = -1, best_end = -1;  // the block that first reached the max
  float s = 0.f, w = 0.f;
};

// sum of exp(x - m) over [lo, hi); with `ent` also the sum of exp(x - m) * (x - m) into w
float scan_exp(const float* x, int64_t lo, int64_t hi, float m, bool ent, float& w) {
  const Vec vm(m), low(std::numeric_limits<float>::lowest());
  Vec vs(0.f), vw(0.f);
  int64_t j = lo;
  if (ent) {
    for (; j + kW <= hi; j += kW) {
      // clamped so that exp(-inf) * (x - m) is 0 * finite, not NaN
      const Vec d = at::vec::maximum(Vec::loadu(x + j) - vm, low);
      const Vec e = d.exp_u20();
      vs = vs + e;
      vw = at::vec::fmadd(e, d, vw);
    }
  } else {
    for (; j + kW <= hi; j += kW) vs = vs + (Vec::loadu(x + j) - vm).exp_u20();
  }
  float s = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, vs);
  if (ent) w += at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, vw);
  for (; j < hi; ++j) {
    const float d = std::max(x[j] - m, std::numeric_limits<float>::lowest());
    const float e = std::exp(d);
    s += e;
    if (ent) w += e * d;
  }
  return s;
}

void scan_online(const float* x, int64_t lo, int64_t hi, bool ent, Online& o) {
  constexpr int64_t kBlock = 1024;
  for (int64_t b = lo; b < hi; b += kBlock) {
    const int64_t e = std::min(b + kBlock, hi);
    const float bm = row_max(x, b, e);
    if (bm != bm) {  // row_max propagates NaN
      o.top.nan = true;
      return;
    }
    float& m = o.top.m;
    if (bm > m) {
      if (m != kNegInf) {
        const float scale = std::exp(m - bm);
        o.w = scale * (o.w + (m - bm) * o.s);
        o.s *= scale;
      }
      m = bm;
      o.best = b;
      o.best_end = e;
    }
    if (m == kNegInf) continue;  // nothing but -inf so far: no mass
    o.s += scan_exp(x, b, e, m, ent, o.w);
  }
}

void finish_online(const float* x, Online& o) {
  for (int64_t j = o.best; j >= 0 && j < o.best_end; ++j) {
    if (x[j] == o.top.m) {
      o.top.arg = j;
      return;
    }
  }
}

void scan_top(const float* x, int64_t lo, int64_t hi, Top& top) {
  int64_t j = lo;
  if (hi - lo >= kW) {
    // per lane: max, its first index (exact in float below 2^24), runner-up
    Vec vmax(kNegInf), vsec(kNegInf), vidx(0.f), idx = Vec::arange(static_cast<float>(lo), 1.f);
    const Vec step(static_cast<float>(kW));
    for (; j + kW <= hi; j += kW) {
      const Vec v = Vec::loadu(x + j);
      const Vec gt = v > vmax;
      vsec = at::vec::maximum(vsec, at::vec::minimum(v, vmax));
      vmax = at::vec::maximum(vmax, v);
      vidx = Vec::blendv(vidx, idx, gt);
      idx = idx + step;
    }
    float m[kW], s[kW], i[kW];
    vmax.store(m);
    vsec.store(s);
    vidx.store(i);
    for (int l = 0; l < kW; ++l) {
      if (m[l] != kNegInf) top.push(m[l], static_cast<int64_t>(i[l]));  // NaN propagates to m
      top.m2 = std::max(top.m2, s[l]);
    }
  }
  for (; j < hi; ++j) top.push(x[j], j);
}


// argmax over v of float64(x[v]) / temperature + gumbel(seed, base + v), v in [lo, hi)
void scan_gumbel(const float* x, int64_t lo, int64_t hi, double temperature, uint64_t seed,
                 uint64_t base, double& best, int64_t& arg) {
  constexpr int kChunk = 256;
  alignas(64) double u[kChunk];
  const VecD vt(temperature);
  for (int64_t c = lo; c < hi; c += kChunk) {
    const int n = static_cast<int>(std::min<int64_t>(kChunk, hi - c));
    for (int j = 0; j < n; ++j) u[j] = uniform(seed, base + c + j);
    int j = 0;
    for (; j + VecD::size() <= n; j += VecD::size()) {
      // -log(-log u) in the reference's order of operations
      const VecD g = VecD::loadu(u + j).log().neg().log().neg();
      VecD xd;
      alignas(64) double tmp[VecD::size()];
      for (int l = 0; l < VecD::size(); ++l) tmp[l] = static_cast<double>(x[c + j + l]);
      xd = VecD::loadu(tmp);
      (xd / vt + g).store(u + j);
    }
    for (; j < n; ++j) u[j] = static_cast<double>(x[c + j]) / temperature - std::log(-std::log(u[j]));
    for (j = 0; j < n; ++j) {
      if (u[j] > best) {
        best = u[j];
        arg = c + j;
      }
    }
  }
}

struct Params {
  int64_t V, mask_id;
  double temperature;
  int confidence;
  uint64_t seed;
};

template <typename scalar_t>
void token_and_confidence(const at::Tensor& logits, const std::vector<int64_t>& rows,
                          const Params& p, int64_t* tok, float* conf) {
  const int64_t T = logits.size(1), V = p.V;
  const int64_t s0 = logits.stride(0), s1 = logits.stride(1);
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  const bool sampled = p.temperature > 0;
  const int64_t grain = std::max<int64_t>(1, 32768 / V);
  at::parallel_for(0, static_cast<int64_t>(rows.size()), grain, [&](int64_t lo, int64_t hi) {
    std::vector<float> buf(std::is_same_v<scalar_t, float> ? 0 : V);
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t flat = rows[r];
      const scalar_t* src = base + (flat / T) * s0 + (flat % T) * s1;
      const float* x = float_row(src, buf, V);
      // the mask token is never chosen and takes no probability: the row is two segments
      const bool ent = p.confidence == kEntropy;
      Top top;
      float s = 0.f, w = 0.f;
      if (p.confidence == kMargin) {
        scan_top(x, 0, p.mask_id, top);
        scan_top(x, p.mask_id + 1, V, top);
        s = scan_exp(x, 0, p.mask_id, top.m, false, w) +
            scan_exp(x, p.mask_id + 1, V, top.m, false, w);
      } else if (p.confidence == kRandom) {
        // the max also when sampling: it tells a row without a finite maximum
        scan_max(x, 0, p.mask_id, top);
        scan_max(x, p.mask_id + 1, V, top);
      } else {
        Online o;
        scan_online(x, 0, p.mask_id, ent, o);
        scan_online(x, p.mask_id + 1, V, ent, o);
        finish_online(x, o);
        top = o.top;
        s = o.s;
        w = o.w;
      }
      if (top.nan || !std::isfinite(top.m)) {
        // no finite maximum besides the mask token (a NaN, +inf, or -inf everywhere): NaN
        // confidence, which the caller reports, and no commit
        tok[flat] = p.mask_id;
        conf[flat] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      int64_t t = top.arg;
      if (sampled) {
        double best = -std::numeric_limits<double>::infinity();
        t = 0;
        const uint64_t first = static_cast<uint64_t>(flat) * static_cast<uint64_t>(V);
        scan_gumbel(x, 0, p.mask_id, p.temperature, p.seed, first, best, t);
        scan_gumbel(x, p.mask_id + 1, V, p.temperature, p.seed, first, best, t);
      }
      tok[flat] = t;
      const float m = top.m;
      if (p.confidence == kRandom) {
        conf[flat] = static_cast<float>(uniform(p.seed ^ kRandomKey, static_cast<uint64_t>(flat)));
      } else if (p.confidence == kProb) {
        conf[flat] = sampled ? std::exp(x[t] - m) / s : 1.f / s;
      } else if (p.confidence == kMargin) {
        conf[flat] = (1.f - std::exp(top.m2 - m)) / s;
      } else {
        conf[flat] = w / s - std::log(s);
      }
    }
  });
}

// reference.select: rank active positions by confidence (ties to the lower position), commit the
// first k[b], or those at or above the threshold plus the first.
void select(const float* conf, const bool* active, int64_t B, int64_t T, const int64_t* k_rows,
            int64_t k, const std::optional<double>& threshold, bool* committed) {
  const float thr = threshold ? static_cast<float>(*threshold) : 0.f;
  at::parallel_for(0, B, 16, [&](int64_t lo, int64_t hi) {
    std::vector<int64_t> order;
    for (int64_t b = lo; b < hi; ++b) {
      const float* c = conf + b * T;
      const bool* a = active + b * T;
      bool* out = committed + b * T;
      order.clear();
      for (int64_t t = 0; t < T; ++t) {
        out[t] = false;
        if (a[t] && c[t] == c[t]) order.push_back(t);  // NaN: a row without a choice
      }
      if (order.empty()) continue;
      if (threshold) {
        int64_t first = order[0];
        for (int64_t t : order) {
          if (c[t] > c[first]) first = t;
          out[t] = c[t] >= thr;
        }
        out[first] = true;
        continue;
      }
      const int64_t kb = std::clamp<int64_t>(k_rows ? k_rows[b] : k, 0, order.size());
      std::stable_sort(order.begin(), order.end(),
                       [c](int64_t i, int64_t j) { return c[i] > c[j]; });
      for (int64_t i = 0; i < kb; ++i) out[order[i]] = true;
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> denoise_step(
    const at::Tensor& logits, const at::Tensor& tokens, const at::Tensor& active,
    const std::optional<at::Tensor>& k_rows, int64_t k, std::optional<double> threshold,
    int64_t mask_id, double temperature, int64_t confidence, int64_t seed) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 3 && logits.stride(2) == 1,
              "logits must be a CPU tensor [B, T, V] with a unit last stride");
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  TORCH_CHECK(V >= 2 && V < (int64_t{1} << 24) && mask_id >= 0 && mask_id < V,
              "denoise_step: V must be in [2, 2^24) and mask_id in [0, V)");
  TORCH_CHECK(confidence >= kProb && confidence <= kRandom, "denoise_step: bad confidence code");
  const at::Tensor act = active.contiguous();
  TORCH_CHECK(act.scalar_type() == at::kBool && act.numel() == B * T, "active must be bool [B, T]");
  const bool* a = act.const_data_ptr<bool>();
  std::vector<int64_t> rows;
  for (int64_t i = 0; i < B * T; ++i)
    if (a[i]) rows.push_back(i);

  at::Tensor tok = at::zeros({B, T}, at::kLong);
  at::Tensor conf = at::full({B, T}, kNegInf, at::kFloat);
  const Params p{V, mask_id, temperature, static_cast<int>(confidence),
                 static_cast<uint64_t>(seed)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "denoise_step",
                                  [&] {
                                    token_and_confidence<scalar_t>(logits, rows, p,
                                                                   tok.data_ptr<int64_t>(),
                                                                   conf.data_ptr<float>());
                                  });

  at::Tensor committed = at::empty({B, T}, at::kBool);
  at::Tensor kr;
  if (k_rows) {
    kr = k_rows->to(at::kLong).contiguous();
    TORCH_CHECK(kr.numel() == B, "k must have B entries");
  }
  select(conf.const_data_ptr<float>(), a, B, T, k_rows ? kr.const_data_ptr<int64_t>() : nullptr,
         k, threshold, committed.data_ptr<bool>());
  at::Tensor out = at::where(committed, tok.to(tokens.scalar_type()), tokens);
  return {out, committed, conf};
}

}  // namespace blockmdm
