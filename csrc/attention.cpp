// Block-masked flash attention on CPU: only the key tiles a tile map marks non-empty are visited.
//
// Tensors are [B, T, heads, D] with a contiguous last dim (any other strides); fp16 / bf16
// inputs are converted once to fp32 copies, every product and sum is fp32. A partial tile
// carries a precomputed additive fp32 element mask [BM, BN], 0 where visible and -inf where
// hidden (tile_mask_index >= 0 points at it), added to its scores with vector adds; a full tile
// is used as is. The forward scores each run of adjacent non-empty key tiles of a query tile
// (up to kRunScores scores) before one online-softmax update. The products are tile_gemm's
// register-blocked kernels on operands packed once: K^T and V of every key tile per forward
// call (per item when a tile has one user), a key tile's K^T, V^T and K per backward item,
// whose Q and dO are read in place from head-major copies made once per call; a BLAS call packs
// its operands on every call, which at head-dim sizes costs as much as the multiply. A decoding step's few query rows read K and V in place instead
// (kDirectRows). Work items are claimed from an atomic counter, heaviest first, so uneven rows
// (causal) balance across threads.

#include "blockmdm.h"
#include "rows.h"
#include "tile_gemm.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>

namespace blockmdm {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kInf = std::numeric_limits<float>::infinity();
// Per-thread fp32 dQ accumulators of the backward are capped at this many bytes in total.
constexpr int64_t kDqBufferBudget = int64_t(1) << 30;

// x[j] = exp(x[j] - sub) in place; returns the sum.
float exp_sub_sum(float* x, int64_t n, float sub) {
  int64_t j = 0;
  float s = 0.f;
  const Vec vsub(sub);
  if (n >= Vec::size()) {
    Vec acc(0.f);
    for (; j + Vec::size() <= n; j += Vec::size()) {
      Vec e = (Vec::loadu(x + j) - vsub).exp_u20();
      e.store(x + j);
      acc = acc + e;
    }
    s = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
  }
  for (; j < n; ++j) {
    x[j] = std::exp(x[j] - sub);
    s += x[j];
  }
  return s;
}

// x[j] = exp(x[j] - sub) in place (sub may be +inf: every x[j] becomes 0).
void exp_sub(float* x, int64_t n, float sub) {
  int64_t j = 0;
  const Vec vsub(sub);
  for (; j + Vec::size() <= n; j += Vec::size()) (Vec::loadu(x + j) - vsub).exp_u20().store(x + j);
  for (; j < n; ++j) x[j] = std::exp(x[j] - sub);
}

// x[j] += mask[j]: an additive mask, 0 (visible) or -inf (hidden).
void add_mask(float* x, const float* mask, int64_t n) {
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size())
    (Vec::loadu(x + j) + Vec::loadu(mask + j)).store(x + j);
  for (; j < n; ++j) x[j] += mask[j];
}

void scale_row(float* x, int64_t n, float a) {
  int64_t j = 0;
  const Vec va(a);
  for (; j + Vec::size() <= n; j += Vec::size()) (Vec::loadu(x + j) * va).store(x + j);
  for (; j < n; ++j) x[j] *= a;
}

// s[j] = scale * q . k_j for the n keys k_j = k + j * ld, D floats each: eight keys at a time
// whose products are summed across lanes together (AVX2), else one dot product each.
void dot_keys(const float* q, const float* k, int64_t ld, int64_t n, int64_t D, float scale,
              float* s) {
  int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if (D % 8 == 0) {
    for (; j + 8 <= n; j += 8) {
      const float* kj = k + j * ld;
      __m256 a[8];
      for (int u = 0; u < 8; ++u) a[u] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + d);
        for (int u = 0; u < 8; ++u)
          a[u] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kj + u * ld + d), a[u]);
      }
      // Pairwise sums: lanes 0-3 of h0 and h1 hold partial sums of keys 0-3 and 4-7, lanes 4-7
      // the rest; the two 128-bit halves added give the eight totals in key order.
      const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
      const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
      const __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20),
                                       _mm256_permute2f128_ps(h0, h1, 0x31));
      _mm256_storeu_ps(s + j, _mm256_mul_ps(sum, _mm256_set1_ps(scale)));
    }
  }
#endif
  for (; j < n; ++j) {
    const float* kj = k + j * ld;
    int64_t d = 0;
    float t = 0.f;
    if (D >= Vec::size()) {
      Vec acc(0.f);
      for (; d + Vec::size() <= D; d += Vec::size())
        acc = at::vec::fmadd(Vec::loadu(q + d), Vec::loadu(kj + d), acc);
      t = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
    }
    for (; d < D; ++d) t += q[d] * kj[d];
    s[j] = scale * t;
  }
}

// acc[0..D) += sum_j p[j] v_j over the n values v_j = v + j * ld, skipping zero weights (hidden
// keys); the accumulator stays in NV registers.
template <int NV>
void weighted_sum_n(float* acc, const float* p, const float* v, int64_t ld, int64_t n) {
  constexpr int64_t V = Vec::size();
  Vec a[NV];
  for (int u = 0; u < NV; ++u) a[u] = Vec::loadu(acc + u * V);
  for (int64_t j = 0; j < n; ++j) {
    if (p[j] == 0.f) continue;
    const Vec pj(p[j]);
    const float* vj = v + j * ld;
    for (int u = 0; u < NV; ++u) a[u] = at::vec::fmadd(pj, Vec::loadu(vj + u * V), a[u]);
  }
  for (int u = 0; u < NV; ++u) a[u].store(acc + u * V);
}

void weighted_sum(float* acc, const float* p, const float* v, int64_t ld, int64_t n, int64_t D) {
  if (D % Vec::size() == 0) {
    switch (D / Vec::size()) {
      case 1: return weighted_sum_n<1>(acc, p, v, ld, n);
      case 2: return weighted_sum_n<2>(acc, p, v, ld, n);
      case 4: return weighted_sum_n<4>(acc, p, v, ld, n);
      case 8: return weighted_sum_n<8>(acc, p, v, ld, n);
      case 16: return weighted_sum_n<16>(acc, p, v, ld, n);
      default: break;
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    const Vec pj(p[j]);
    const float* vj = v + j * ld;
    int64_t d = 0;
    for (; d + Vec::size() <= D; d += Vec::size())
      at::vec::fmadd(pj, Vec::loadu(vj + d), Vec::loadu(acc + d)).store(acc + d);
    for (; d < D; ++d) acc[d] += p[j] * vj[d];
  }
}

// A forward with at most this many query rows (a decoding step: ar's one row, a Sudoku block of
// 9) reads K and V in place (dot_keys, weighted_sum): packing a tile for tile_gemm would move
// as many floats as these few rows multiply. From about 16 rows the packed tiles were faster.
constexpr int64_t kDirectRows = 12;
// Keys such a step takes at a time for all its rows: their K (or V) rows, every head, in L1.
constexpr int64_t kKeyChunk = 32;

// Score elements of one run's [rows, keys] block: 256 KiB of fp32, kept in L2.
constexpr int64_t kRunScores = int64_t(1) << 16;

// Keys per run of adjacent tiles: a whole number of tiles, at least one, at most nK of them.
int64_t run_width(int64_t rows, int64_t cols, int64_t n_tiles) {
  const int64_t tiles = std::max<int64_t>(1, kRunScores / (rows * cols));
  return std::min(tiles, std::max<int64_t>(n_tiles, 1)) * cols;
}

// The run of tiles starting at list[t] (count entries): the most consecutive tile indices, at
// most max_len, each with its partial-tile element mask (nullptr for a full tile) in masks, whose
// mask index mask_index(j) gives for the run's j-th tile (-1: full). Returns the run's length;
// any_mask says whether one of its tiles has a mask.
template <typename F>
int64_t next_run(const int32_t* list, int64_t t, int64_t count, int64_t max_len,
                 const F& mask_index, const float* tile_masks, int64_t tile_elems,
                 std::vector<const float*>& masks, bool& any_mask) {
  const int64_t first = list[t];
  int64_t len = 1;
  while (t + len < count && list[t + len] == first + len && len < max_len) ++len;
  any_mask = false;
  for (int64_t j = 0; j < len; ++j) {
    const int32_t pm = mask_index(j);
    masks[j] = pm >= 0 ? tile_masks + pm * tile_elems : nullptr;
    any_mask |= pm >= 0;
  }
  return len;
}

// Item indices 0..n-1 sorted by descending cost (stable).
std::vector<int64_t> heaviest_first(const std::vector<int64_t>& cost) {
  std::vector<int64_t> order(cost.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  return order;
}

// Runs body(worker, item) for every item, workers claiming items in `order`; worker ids are
// 0..workers-1 (at most one thread each).
template <typename F>
void run_items(const std::vector<int64_t>& order, int64_t workers, const F& body) {
  std::atomic<int64_t> next{0};
  const int64_t n = order.size();
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      for (int64_t i = next++; i < n; i = next++) body(w, order[i]);
    }
  });
}

// dst[d] = src[d] * mul in the output's dtype; chosen once per call by store_fn.
using StoreFn = void (*)(void* dst, int64_t offset, const float* src, int64_t n, float mul);

template <typename T>
void store(void* dst, int64_t offset, const float* src, int64_t n, float mul) {
  T* out = static_cast<T*>(dst) + offset;
  for (int64_t d = 0; d < n; ++d) out[d] = static_cast<T>(src[d] * mul);
}

StoreFn store_fn(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return store<at::Half>;
    case at::kBFloat16: return store<at::BFloat16>;
    default: return store<float>;
  }
}

at::Tensor as_float(const at::Tensor& x) {
  return x.scalar_type() == at::kFloat ? x
                                       : x.to(at::kFloat, /*non_blocking=*/false, /*copy=*/false,
                                              at::MemoryFormat::Contiguous);
}

}  // namespace

void attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                   const at::Tensor& kv_count, const at::Tensor& kv_index,
                   const at::Tensor& tile_mask_index, const at::Tensor& tile_masks,
                   int64_t block_m, int64_t block_n, double scale_d, const at::Tensor& o,
                   const at::Tensor& lse) {
  TORCH_CHECK(q_in.stride(3) == 1 && k_in.stride(3) == 1 && v_in.stride(3) == 1,
              "attention_fwd: q, k, v need a contiguous last dim");
  const at::Tensor q = as_float(q_in), k = as_float(k_in), v = as_float(v_in);
  const int64_t B = q.size(0), Tq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Tk = k.size(1), G = H / k.size(2);
  const int64_t Bm = kv_count.size(0), nQ = kv_count.size(1), nK = kv_index.size(2);
  const int64_t BM = block_m, BN = block_n;
  const float scale = static_cast<float>(scale_d);


  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const int64_t qB = q.stride(0), qT = q.stride(1), qH = q.stride(2);
  const int64_t kB = k.stride(0), kT = k.stride(1), kH = k.stride(2);
  const int64_t vB = v.stride(0), vT = v.stride(1), vH = v.stride(2);
  void* op = o.data_ptr();
  float* lp = lse.data_ptr<float>();
  const StoreFn store_o = store_fn(o.scalar_type());
  const int32_t* cnt = kv_count.data_ptr<int32_t>();
  const int32_t* idx = kv_index.data_ptr<int32_t>();
  const int32_t* tmi = tile_mask_index.data_ptr<int32_t>();
  const float* tms = tile_masks.data_ptr<float>();

  const bool direct = Tq <= kDirectRows;
  const int64_t threads = at::get_num_threads();
  // Item (b, m, a group of hg heads), heads fastest so neighbouring items share K/V of a batch
  // row. A decoding step with enough batch rows to go round takes every head in one item, so
  // each key row's heads are read together while in L1.
  const int64_t hg = direct && B * nQ >= 4 * threads ? H : 1, n_groups = H / hg;
  const int64_t n_items = B * nQ * n_groups;
  std::vector<int64_t> cost(n_items);
  for (int64_t i = 0; i < n_items; ++i) {
    const int64_t b = i / (nQ * n_groups), m = (i / n_groups) % nQ;
    cost[i] = cnt[(Bm == 1 ? 0 : b) * nQ + m];
  }
  const auto order = heaviest_first(cost);

  // Adjacent non-empty key tiles of a query tile are multiplied as one run of up to W keys:
  // fewer, wider gemm calls and one softmax rescale per run.
  const int64_t W = run_width(BM, BN, nK);
  const int64_t SW = W + kTilePanel;  // the scores' row stride, off a power of two

  // K^T and V of each key tile, packed for tile_gemm: once per call into [B, Hkv, nKt, tile]
  // when a tile has several users (query tiles, or heads sharing a kv head); otherwise (one
  // query tile) by the item that uses it, into its own scratch, which costs the same packing
  // without a call-sized buffer. A decoding step packs nothing.
  const int64_t Hkv = k.size(2), nKt = (Tk + BN - 1) / BN;
  const int64_t kt_pack = pack_panels_size(BN, D), v_pack = pack_rows_size(BN, D);
  const bool prepack = !direct && (nQ > 1 || G > 1);
  auto pack_tile = [&](int64_t i, float* kt_dst, float* v_dst) {  // tile i of [B, Hkv, nKt]
    const int64_t b = i / (Hkv * nKt), hk = (i / nKt) % Hkv, n = i % nKt;
    const int64_t rows = std::min(BN, Tk - n * BN);
    pack_panels(kp + b * kB + n * BN * kT + hk * kH, kT, rows, D, kt_dst);
    pack_rows(vp + b * vB + n * BN * vT + hk * vH, vT, rows, D, v_dst);
  };
  at::Tensor packed;  // not zeroed: packing writes every float a product reads
  if (prepack) {
    packed = at::empty({B * Hkv * nKt * (kt_pack + v_pack)}, q.options());
    float* base = packed.data_ptr<float>();
    at::parallel_for(0, B * Hkv * nKt, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        pack_tile(i, base + i * kt_pack, base + B * Hkv * nKt * kt_pack + i * v_pack);
    });
  }
  const float* kt_all = prepack ? packed.data_ptr<float>() : nullptr;
  const float* v_all = prepack ? kt_all + B * Hkv * nKt * kt_pack : nullptr;

  run_items(order, threads, [&](int64_t, int64_t item) {
    thread_local std::vector<float> scratch, own_pack;
    thread_local std::vector<const float*> masks;
    const int64_t b = item / (nQ * n_groups), m = (item / n_groups) % nQ;
    const int64_t h0 = (item % n_groups) * hg;
    const int64_t bm = Bm == 1 ? 0 : b;
    const int64_t r0 = m * BM, rm = std::min(BM, Tq - r0);
    const int64_t R = hg * rm;  // score rows, r = hh * rm + i: head h0 + hh, query row r0 + i
    scratch.resize(R * SW + R * D + 2 * R);
    if (!prepack && !direct) own_pack.resize(W / BN * (kt_pack + v_pack));
    masks.resize(W / BN);
    float* s = scratch.data();  // [R, SW] scores, then probabilities
    float* acc = s + R * SW;    // [R, D] unnormalised output
    float* mx = acc + R * D;    // [R] running max
    float* sum = mx + R;        // [R] running sum of exp
    std::fill(acc, acc + R * D, 0.f);
    std::fill(mx, mx + R, kNegInf);
    std::fill(sum, sum + R, 0.f);
    auto q_row = [&](int64_t r) { return qp + b * qB + (r0 + r % rm) * qT + (h0 + r / rm) * qH; };
    const int32_t* tiles = idx + (bm * nQ + m) * nK;
    const int32_t* tile_mask = tmi + (bm * nQ + m) * nK;
    const int64_t nk = cnt[bm * nQ + m];
    for (int64_t t = 0; t < nk;) {
      // The run: key tiles n0 .. n0 + len - 1, listed one after another.
      const int64_t n0 = tiles[t];
      bool any_mask;
      const int64_t len = next_run(
          tiles, t, nk, W / BN, [&](int64_t j) { return tile_mask[n0 + j]; }, tms, BM * BN, masks,
          any_mask);
      t += len;
      const int64_t c0 = n0 * BN, c = std::min(len * BN, Tk - c0);
      const float *kt_run = nullptr, *v_run = nullptr;  // the run's packed K^T and V tiles
      if (direct) {  // s = scale Q K^T [R, c], kKeyChunk keys at a time for every row
        for (int64_t j = 0; j < c; j += kKeyChunk)
          for (int64_t r = 0; r < R; ++r)
            dot_keys(q_row(r), kp + b * kB + (c0 + j) * kT + ((h0 + r / rm) / G) * kH, kT,
                     std::min(kKeyChunk, c - j), D, scale, s + r * SW + j);
      } else {  // one head (hg == 1): s = scale Q K^T [rm, c], tile by tile
        const int64_t tile0 = (b * Hkv + h0 / G) * nKt + n0;  // the run's first tile
        if (prepack) {
          kt_run = kt_all + tile0 * kt_pack;
          v_run = v_all + tile0 * v_pack;
        } else {
          float* own = own_pack.data();
          for (int64_t j = 0; j < len; ++j)
            pack_tile(tile0 + j, own + j * kt_pack, own + len * kt_pack + j * v_pack);
          kt_run = own;
          v_run = own + len * kt_pack;
        }
        for (int64_t j = 0; j < len; ++j)
          tile_gemm(rm, std::min(BN, c - j * BN), D, scale, q_row(0), qT, 1,
                    kt_run + j * kt_pack, kTilePanel, D * kTilePanel, 0.f, s + j * BN, SW);
      }
      for (int64_t r = 0; r < R; ++r) {
        float* si = s + r * SW;
        if (any_mask) {
          for (int64_t j = 0; j < len; ++j) {
            if (masks[j] == nullptr) continue;
            add_mask(si + j * BN, masks[j] + (r % rm) * BN, std::min(BN, c - j * BN));
          }
        }
        const float m_new = std::max(mx[r], row_max(si, 0, c));
        if (m_new == kNegInf) {  // nothing visible to this row yet
          std::fill(si, si + c, 0.f);
          continue;
        }
        const float alpha = std::exp(mx[r] - m_new);
        sum[r] = sum[r] * alpha + exp_sub_sum(si, c, m_new);
        mx[r] = m_new;
        if (alpha != 1.f) scale_row(acc + r * D, D, alpha);
      }
      if (direct) {  // acc += P V [R, D], kKeyChunk keys at a time for every row
        for (int64_t j = 0; j < c; j += kKeyChunk)
          for (int64_t r = 0; r < R; ++r)
            weighted_sum(acc + r * D, s + r * SW + j,
                         vp + b * vB + (c0 + j) * vT + ((h0 + r / rm) / G) * vH, vT,
                         std::min(kKeyChunk, c - j), D);
        continue;
      }
      for (int64_t j = 0; j < len; ++j) {  // acc += P V [rm, D]
        const int64_t cj = std::min(BN, c - j * BN);
        tile_gemm(rm, D, cj, 1.f, s + j * BN, SW, 1, v_run + j * v_pack, kTilePanel,
                  cj * kTilePanel, 1.f, acc, D);
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      const int64_t h = h0 + r / rm, i = r0 + r % rm;
      const bool seen = sum[r] > 0.f;
      store_o(op, ((b * Tq + i) * H + h) * D, acc + r * D, D, seen ? 1.f / sum[r] : 0.f);
      lp[(b * H + h) * Tq + i] = seen ? mx[r] + std::log(sum[r]) : kInf;
    }
  });
}

void attention_bwd(const at::Tensor& do_in, const at::Tensor& q_in, const at::Tensor& k_in,
                   const at::Tensor& v_in, const at::Tensor& o_in, const at::Tensor& lse_in,
                   const at::Tensor& q_count, const at::Tensor& q_index,
                   const at::Tensor& tile_mask_index, const at::Tensor& tile_masks,
                   int64_t block_m, int64_t block_n, double scale_d, const at::Tensor& dq,
                   const at::Tensor& dk, const at::Tensor& dv) {
  TORCH_CHECK(do_in.stride(3) == 1 && q_in.stride(3) == 1 && k_in.stride(3) == 1 &&
                  v_in.stride(3) == 1,
              "attention_bwd: do, q, k, v need a contiguous last dim");
  const at::Tensor dO = as_float(do_in), q = as_float(q_in), k = as_float(k_in),
                   v = as_float(v_in);
  const at::Tensor lse = lse_in.to(at::kFloat).contiguous();
  const int64_t B = q.size(0), Tq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Tk = k.size(1), Hkv = k.size(2), G = H / Hkv;
  const int64_t Bm = q_count.size(0), nK = q_count.size(1), nQ = q_index.size(2);
  const int64_t BM = block_m, BN = block_n;
  const float scale = static_cast<float>(scale_d);

  // delta = rowsum(dO * O): [B, Tq, H]
  const at::Tensor delta = at::mul(dO, o_in.to(at::kFloat)).sum(-1).contiguous();
  // Q and dO head-major, [B, H, Tq, D] contiguous: a run of one head's rows is one contiguous
  // block that the products read in place. Read through the [B, Tq, H, D] strides, a run's rows
  // lie H * D floats apart, and packing them for every key tile that sees them missed the
  // cache on most loads (a quarter of the backward's own time at T = 512, H = 8, D = 32).
  const at::Tensor qh = q.transpose(1, 2).contiguous(), doh = dO.transpose(1, 2).contiguous();

  // Each worker adds its dQ share into its own head-major buffer [B, H, Tq, D] (no two threads
  // write one element); the buffers are summed at the end. Their count is capped by memory, not
  // below one.
  const int64_t dq_bytes = B * Tq * H * D * int64_t(sizeof(float));
  const int64_t workers = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), kDqBufferBudget / std::max<int64_t>(dq_bytes, 1)));
  at::Tensor dq_buf = at::zeros({workers, B, H, Tq, D}, q.options());

  const float *dop = doh.data_ptr<float>(), *qp = qh.data_ptr<float>(), *kp = k.data_ptr<float>(),
              *vp = v.data_ptr<float>(), *lp = lse.data_ptr<float>(),
              *dlt = delta.data_ptr<float>();
  const int64_t kB = k.stride(0), kT = k.stride(1), kH = k.stride(2);
  const int64_t vB = v.stride(0), vT = v.stride(1), vH = v.stride(2);
  void *dkp = dk.data_ptr(), *dvp = dv.data_ptr();
  float* dqb = dq_buf.data_ptr<float>();
  const StoreFn store_kv = store_fn(dk.scalar_type());
  const int32_t* cnt = q_count.data_ptr<int32_t>();
  const int32_t* idx = q_index.data_ptr<int32_t>();
  const int32_t* tmi = tile_mask_index.data_ptr<int32_t>();
  const float* tms = tile_masks.data_ptr<float>();

  // Item (b, kv head, key tile n): owns dK/dV of its tile, summing its GQA group.
  const int64_t n_items = B * nK * Hkv;
  std::vector<int64_t> cost(n_items);
  for (int64_t i = 0; i < n_items; ++i) {
    const int64_t b = i / (nK * Hkv), n = (i / Hkv) % nK;
    cost[i] = cnt[(Bm == 1 ? 0 : b) * nK + n];
  }
  const auto order = heaviest_first(cost);

  // Adjacent query tiles of a key tile are multiplied as one run of up to R rows: fewer, longer
  // products, one pass of the softmax recompute, as the forward's runs of key tiles.
  const int64_t R = std::max<int64_t>(1, kRunScores / (BM * BN)) * BM;

  run_items(order, workers, [&](int64_t w, int64_t item) {
    thread_local std::vector<float> scratch;
    thread_local std::vector<const float*> masks;
    const int64_t b = item / (nK * Hkv), n = (item / Hkv) % nK, hk = item % Hkv;
    const int64_t bm = Bm == 1 ? 0 : b;
    const int64_t c0 = n * BN, c = std::min(BN, Tk - c0);
    scratch.resize(2 * R * BN + 2 * BN * D + 2 * pack_panels_size(BN, D) + pack_rows_size(BN, D));
    masks.resize(R / BM);
    float* p = scratch.data();    // [R, BN] probabilities
    float* ds = p + R * BN;       // [R, BN] dP, then dS
    float* dk_acc = ds + R * BN;  // [BN, D]
    float* dv_acc = dk_acc + BN * D;
    // The tile's K^T, V^T and K, packed for tile_gemm (Q and dO are read in place).
    float* kt_pk = dv_acc + BN * D;
    float* vt_pk = kt_pk + pack_panels_size(BN, D);
    float* k_pk = vt_pk + pack_panels_size(BN, D);
    std::fill(dk_acc, dk_acc + 2 * BN * D, 0.f);
    const float* kt = kp + b * kB + c0 * kT + hk * kH;
    const float* vt = vp + b * vB + c0 * vT + hk * vH;
    pack_panels(kt, kT, c, D, kt_pk);
    pack_panels(vt, vT, c, D, vt_pk);
    pack_rows(kt, kT, c, D, k_pk);
    float* dq_w = dqb + w * B * Tq * H * D;
    const int32_t* tiles = idx + (bm * nK + n) * nQ;
    const int64_t nq = cnt[bm * nK + n];
    for (int64_t t = 0; t < nq;) {
      // The run: query tiles m0 .. m0 + len - 1, listed one after another.
      const int64_t m0 = tiles[t];
      bool any_mask;
      const int64_t len = next_run(
          tiles, t, nq, R / BM, [&](int64_t j) { return tmi[(bm * nQ + m0 + j) * nK + n]; }, tms,
          BM * BN, masks, any_mask);
      t += len;
      const int64_t r0 = m0 * BM, rm = std::min(len * BM, Tq - r0);
      for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
        const int64_t row0 = (b * H + h) * Tq + r0;  // the run's first row, head-major
        const float* qt = qp + row0 * D;   // [rm, D], contiguous
        const float* dot = dop + row0 * D;
        tile_gemm(rm, c, D, scale, qt, D, 1, kt_pk, kTilePanel, D * kTilePanel, 0.f, p,
                  BN);  // p = scale Q K^T [rm, c]
        for (int64_t i = 0; i < rm; ++i) {
          float* pi = p + i * BN;
          const float* mask = any_mask ? masks[i / BM] : nullptr;
          if (mask) add_mask(pi, mask + (i % BM) * BN, c);  // hidden scores -> -inf -> p = 0
          exp_sub(pi, c, lp[(b * H + h) * Tq + r0 + i]);  // +inf lse (blind row) gives 0
        }
        tile_gemm(c, D, rm, 1.f, p, 1, BN, dot, D, kTilePanel, 1.f, dv_acc,
                  D);  // dV += P^T dO
        tile_gemm(rm, c, D, 1.f, dot, D, 1, vt_pk, kTilePanel, D * kTilePanel, 0.f, ds,
                  BN);  // dP = dO V^T
        for (int64_t i = 0; i < rm; ++i) {
          float* dsi = ds + i * BN;
          const float* pi = p + i * BN;
          const Vec dl(dlt[(b * Tq + r0 + i) * H + h]);
          int64_t j = 0;
          for (; j + Vec::size() <= c; j += Vec::size())
            (Vec::loadu(pi + j) * (Vec::loadu(dsi + j) - dl)).store(dsi + j);
          for (; j < c; ++j) dsi[j] = pi[j] * (dsi[j] - dlt[(b * Tq + r0 + i) * H + h]);
        }
        tile_gemm(c, D, rm, scale, ds, 1, BN, qt, D, kTilePanel, 1.f, dk_acc,
                  D);  // dK += dS^T Q
        tile_gemm(rm, D, c, scale, ds, BN, 1, k_pk, kTilePanel, c * kTilePanel, 1.f,
                  dq_w + row0 * D, D);  // dQ += dS K
      }
    }
    for (int64_t j = 0; j < c; ++j) {
      const int64_t off = ((b * Tk + c0 + j) * Hkv + hk) * D;
      store_kv(dkp, off, dk_acc + j * D, D, 1.f);
      store_kv(dvp, off, dv_acc + j * D, D, 1.f);
    }
  });
  // dq = the sum of the workers' buffers, row by row (row r = (b, t, h) of dq is row
  // (b, h, t) of a buffer).
  const StoreFn store_q = store_fn(dq.scalar_type());
  void* dqp = dq.data_ptr();
  const int64_t rows = B * Tq * H, buf_stride = rows * D;
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> row(D);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (Tq * H), t = (r / H) % Tq, h = r % H;
      const float* first = dqb + ((b * H + h) * Tq + t) * D;
      std::copy(first, first + D, row.begin());
      for (int64_t w = 1; w < workers; ++w) {
        const float* src = first + w * buf_stride;
        for (int64_t d = 0; d < D; ++d) row[d] += src[d];
      }
      store_q(dqp, r * D, row.data(), D, 1.f);
    }
  });
}

}  // namespace blockmdm

