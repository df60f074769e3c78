// Register-blocked fp32 products of the attention kernels' tiles: C = alpha * A B + beta * C.
//
// The attention tiles multiply small operands (the head dim, a run of keys or of query rows),
// where a BLAS call spends about as long packing its operands as multiplying them. Nothing is
// packed here: A's elements are broadcast from where they lie, through a row and a column
// stride (so A^T costs nothing), and B's rows (row-major) are loaded as vectors. Each micro-tile
// keeps kMR rows x kNV vectors of C in registers for the whole k loop; the columns of C are
// walked in panels, so a panel of B (k rows of kNV vectors) stays in L1 / L2 while every block
// of rows uses it.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>

namespace blockmdm {
namespace tile_gemm_detail {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kMR = 6;  // rows of C per micro-tile
constexpr int kNV = 2;      // vectors of C per row of a micro-tile (AVX2: 12 accumulators)

// C[MR, NV vectors] = alpha * A[MR, k] B[k, NV vectors] + beta * C; Partial: the one vector
// is `last` lanes wide (NV == 1).
template <int MR, int NV, bool Partial>
inline void micro(int64_t k, float alpha, const float* a, int64_t a_rs, int64_t a_cs,
                  const float* b, int64_t ldb, float beta, float* c, int64_t ldc, int64_t last) {
  Vec acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = Vec(0.f);
  for (int64_t p = 0; p < k; ++p) {
    const float* bp = b + p * ldb;
    Vec bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      bv[v] = Partial ? Vec::loadu(bp, last) : Vec::loadu(bp + v * Vec::size());
    const float* ap = a + p * a_cs;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const Vec av(ap[r * a_rs]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(av, bv[v], acc[r][v]);
    }
  }
  const Vec va(alpha), vb(beta);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* cp = c + r * ldc + v * Vec::size();
      Vec out = acc[r][v] * va;
      if (beta != 0.f) out = at::vec::fmadd(vb, Partial ? Vec::loadu(cp, last) : Vec::loadu(cp), out);
      if (Partial) {
        out.store(cp, last);
      } else {
        out.store(cp);
      }
    }
  }
}

// Every row block of one column panel.
template <int NV, bool Partial>
inline void panel(int64_t m, int64_t k, float alpha, const float* a, int64_t a_rs, int64_t a_cs,
                  const float* b, int64_t ldb, float beta, float* c, int64_t ldc, int64_t last) {
  int64_t i = 0;
  for (; i + kMR <= m; i += kMR)
    micro<kMR, NV, Partial>(k, alpha, a + i * a_rs, a_rs, a_cs, b, ldb, beta, c + i * ldc, ldc,
                            last);
  const float* ai = a + i * a_rs;
  float* ci = c + i * ldc;
  switch (m - i) {
    case 1: micro<1, NV, Partial>(k, alpha, ai, a_rs, a_cs, b, ldb, beta, ci, ldc, last); break;
    case 2: micro<2, NV, Partial>(k, alpha, ai, a_rs, a_cs, b, ldb, beta, ci, ldc, last); break;
    case 3: micro<3, NV, Partial>(k, alpha, ai, a_rs, a_cs, b, ldb, beta, ci, ldc, last); break;
    case 4: micro<4, NV, Partial>(k, alpha, ai, a_rs, a_cs, b, ldb, beta, ci, ldc, last); break;
    case 5: micro<5, NV, Partial>(k, alpha, ai, a_rs, a_cs, b, ldb, beta, ci, ldc, last); break;
    default: break;
  }
}

}  // namespace tile_gemm_detail

// Columns of C per panel of B (two vectors).
constexpr int64_t kTilePanel = tile_gemm_detail::kNV * tile_gemm_detail::Vec::size();

// C[m, n] = alpha * sum_p A(i, p) B(p, j) + beta * C[i, j], where A(i, p) = a[i * a_rs + p * a_cs],
// C[i, j] = c[i * ldc + j] and B(p, j) = b[(j / kTilePanel) * bps + p * ldb + j % kTilePanel]:
// a row-major B has ldb = its row stride and bps = kTilePanel; a B packed by pack_panels or
// pack_rows has ldb = kTilePanel and bps = k * kTilePanel. beta == 0 never reads C.
inline void tile_gemm(int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                      int64_t a_rs, int64_t a_cs, const float* b, int64_t ldb, int64_t bps,
                      float beta, float* c, int64_t ldc) {
  using namespace tile_gemm_detail;
  constexpr int64_t V = Vec::size();
  int64_t j = 0;
  for (; j + kTilePanel <= n; j += kTilePanel)
    panel<kNV, false>(m, k, alpha, a, a_rs, a_cs, b + (j / kTilePanel) * bps, ldb, beta, c + j,
                      ldc, V);
  const float* bt = b + (j / kTilePanel) * bps;  // the last, partial panel
  for (int64_t jj = 0; j + V <= n; j += V, jj += V)
    panel<1, false>(m, k, alpha, a, a_rs, a_cs, bt + jj, ldb, beta, c + j, ldc, V);
  if (j < n)
    panel<1, true>(m, k, alpha, a, a_rs, a_cs, bt + (j % kTilePanel), ldb, beta, c + j, ldc,
                   n - j);
}

// Floats pack_panels / pack_rows write for a src of `rows` rows of `cols` values.
inline int64_t pack_panels_size(int64_t rows, int64_t cols) {
  return (rows + kTilePanel - 1) / kTilePanel * kTilePanel * cols;
}
inline int64_t pack_rows_size(int64_t rows, int64_t cols) {
  return (cols + kTilePanel - 1) / kTilePanel * kTilePanel * rows;
}

namespace tile_gemm_detail {

#if defined(__AVX2__) && defined(__FMA__)
// dst[d * ldd + i] = src[i * ld + d] for an 8 x 8 block: eight row loads, three rounds of
// shuffles, eight row stores.
inline void transpose8x8(const float* src, int64_t ld, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ld);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#endif

}  // namespace tile_gemm_detail

// The transpose of src [rows, cols] (row stride ld) as tile_gemm's B [cols, rows], packed: panel
// q holds rows q * kTilePanel .. of src as a contiguous [cols, kTilePanel] block (zeros past the
// last row), so a micro-tile's loads of B walk one small contiguous block. Whole 8 x 8 blocks
// go through vector transposes, the rest element by element.
inline void pack_panels(const float* src, int64_t ld, int64_t rows, int64_t cols, float* dst) {
  for (int64_t q = 0; q * kTilePanel < rows; ++q) {
    float* panel = dst + q * kTilePanel * cols;
    const int64_t n = std::min<int64_t>(kTilePanel, rows - q * kTilePanel);
    int64_t jj = 0;
#if defined(__AVX2__) && defined(__FMA__)
    const int64_t cols8 = cols / 8 * 8;
    for (; jj + 8 <= n; jj += 8) {
      const float* s = src + (q * kTilePanel + jj) * ld;
      for (int64_t d = 0; d < cols8; d += 8)
        tile_gemm_detail::transpose8x8(s + d, ld, panel + d * kTilePanel + jj, kTilePanel);
      for (int64_t i = 0; i < 8; ++i)
        for (int64_t d = cols8; d < cols; ++d) panel[d * kTilePanel + jj + i] = s[i * ld + d];
    }
#endif
    for (; jj < n; ++jj) {
      const float* s = src + (q * kTilePanel + jj) * ld;
      for (int64_t d = 0; d < cols; ++d) panel[d * kTilePanel + jj] = s[d];
    }
    for (jj = n; jj < kTilePanel; ++jj)
      for (int64_t d = 0; d < cols; ++d) panel[d * kTilePanel + jj] = 0.f;
  }
}

// src [rows, cols] (row stride ld) as tile_gemm's B [rows, cols], packed: panel q holds columns
// q * kTilePanel .. of src as a contiguous [rows, kTilePanel] block (zeros past the last column);
// tile_gemm's ldb = kTilePanel, bps = rows * kTilePanel.
inline void pack_rows(const float* src, int64_t ld, int64_t rows, int64_t cols, float* dst) {
  for (int64_t q = 0; q * kTilePanel < cols; ++q) {
    float* panel = dst + q * kTilePanel * rows;
    const int64_t d0 = q * kTilePanel, n = std::min<int64_t>(kTilePanel, cols - d0);
    for (int64_t p = 0; p < rows; ++p) {
      const float* s = src + p * ld + d0;
      float* out = panel + p * kTilePanel;
      if (n == kTilePanel) {  // vector copies: a library copy call per 64 bytes cost more
        for (int64_t v = 0; v < kTilePanel; v += tile_gemm_detail::Vec::size())
          tile_gemm_detail::Vec::loadu(s + v).store(out + v);
        continue;
      }
      std::copy(s, s + n, out);
      std::fill(out + n, out + kTilePanel, 0.f);
    }
  }
}

}  // namespace blockmdm
