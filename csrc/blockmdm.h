// The native CPU core of blockmdm_kernels (module blockmdm_kernels._C).
//
// Op sources include only ATen (fast to compile) and declare their entry points here;
// module.cpp is the one file that includes the Python binding headers and binds them.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace blockmdm {

// attention.cpp
// Block-masked flash attention over a tile map (see blockmdm_kernels/attention/cpu.py).
// q [B, Tq, H, D], k/v [B, Tk, Hkv, D] (fp32 / fp16 / bf16, contiguous last dim); kv_count
// [Bm, nQ] / kv_index [Bm, nQ, nK] and q_count [Bm, nK] / q_index [Bm, nK, nQ] int32;
// tile_mask_index int32 [Bm, nQ, nK] (-1 or the partial tile's row in tile_masks, fp32
// [P, block_m, block_n], 0 where visible and -inf where hidden). Writes o (contiguous [B, Tq, H, D], q's dtype) and lse (contiguous
// fp32 [B, H, Tq], natural log, +inf where no key is seen).
void attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& kv_count, const at::Tensor& kv_index,
                   const at::Tensor& tile_mask_index, const at::Tensor& tile_masks,
                   int64_t block_m, int64_t block_n, double scale, const at::Tensor& o,
                   const at::Tensor& lse);
// Writes the gradients dq, dk, dv (contiguous, the inputs' shapes and dtype).
void attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse,
                   const at::Tensor& q_count, const at::Tensor& q_index,
                   const at::Tensor& tile_mask_index, const at::Tensor& tile_masks,
                   int64_t block_m, int64_t block_n, double scale, const at::Tensor& dq,
                   const at::Tensor& dk, const at::Tensor& dv);

// norm.cpp
// RMSNorm forward over the last dimension: x [..., D] (fp32 / fp16 / bf16), weight [D] of x's
// dtype; y = (x * rsqrt(mean(x^2) + eps)) (fp32, rounded to x's dtype) * weight.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
// Training (contiguous fp32 rows): the forward also returns rstd float32 [rows], each row's
// rsqrt(mean(x^2) + eps); the backward takes it and returns (dx, dweight).
std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                double eps);
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                const at::Tensor& weight, const at::Tensor& rstd);

// swiglu.cpp
// silu(a) * b and its backward (da, db), contiguous float32 tensors of one shape.
at::Tensor swiglu_fwd(const at::Tensor& a, const at::Tensor& b);
std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& g, const at::Tensor& a,
                                              const at::Tensor& b);

// rope.cpp
// x float32 [B, t, n, D] (last dim contiguous), cos/sin contiguous float32 [1 or B, t, D/2]:
// the first `heads` heads turned by the angles (by their negatives when inverse, the backward),
// the rest copied, into a new contiguous [B, t, n, D].
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                int64_t heads, bool inverse);

// denoise.cpp
// The whole denoising step of blockmdm_kernels.denoise_step on CPU tensors: logits [B, T, V]
// float32/bfloat16/float16, tokens integer [B, T], active bool [B, T], k_rows int64 [B] or k, or
// a threshold; confidence 0 prob, 1 margin, 2 entropy, 3 random; seed read only when sampling or
// random. Returns (tokens, committed bool [B, T], confidence float32 [B, T]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> denoise_step(
    const at::Tensor& logits, const at::Tensor& tokens, const at::Tensor& active,
    const std::optional<at::Tensor>& k_rows, int64_t k, std::optional<double> threshold,
    int64_t mask_id, double temperature, int64_t confidence, int64_t seed);

// cross_entropy.cpp
// Row losses of logits[rows] (float32 [n]) and, with coef (float32 [n], d loss / d row loss),
// the logits gradient [N, V] in the logits dtype (zero outside rows), in one pass per row.
std::tuple<at::Tensor, at::Tensor> cross_entropy_rows(const at::Tensor& logits,
                                                      const at::Tensor& rows,
                                                      const at::Tensor& targets,
                                                      const std::optional<at::Tensor>& coef,
                                                      double focal_gamma, double z_loss);

// tasks.cpp
// uint8 [n, 2, 81] (puzzle, solution; 0 = blank): puzzles first .. first + n - 1 of (seed, holes)
at::Tensor sudoku_generate(uint64_t seed, int64_t holes, int64_t first, int64_t n,
                           int64_t attempt);
// grids uint8 [n, 81] -> (solution count capped at limit int64 [n], first solution uint8 [n, 81])
std::tuple<at::Tensor, at::Tensor> sudoku_count(const at::Tensor& grids, int64_t limit);
// complete grids uint8 [n, 81] (digits 1-9) -> bool [n], a valid Sudoku
at::Tensor sudoku_valid(const at::Tensor& grids);
// lines first .. first + n - 1 of the path-star task (blockmdm/tasks/pathfind.py)
std::vector<std::string> star_graphs(uint64_t seed, int64_t first, int64_t n, int64_t n_nodes,
                                     int64_t degree, int64_t path_len);

}  // namespace blockmdm
