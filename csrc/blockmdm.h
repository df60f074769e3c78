// The native CPU core of blockmdm_kernels (module blockmdm_kernels._C).
//
// Op sources include only ATen (fast to compile) and declare their entry points here;
// module.cpp is the one file that includes the Python binding headers and binds them.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace blockmdm {

// attention.cpp
// Block-masked flash attention over a tile map (see blockmdm_kernels/attention/cpu.py).
// q [B, Tq, H, D], k/v [B, Tk, Hkv, D] (fp32 / fp16 / bf16, contiguous last dim); kv_count
// [Bm, nQ] / kv_index [Bm, nQ, nK] and q_count [Bm, nK] / q_index [Bm, nK, nQ] int32;
// tile_mask_index int32 [Bm, nQ, nK] (-1 or the partial tile's row in tile_masks bool
// [P, block_m, block_n]). Writes o (contiguous [B, Tq, H, D], q's dtype) and lse (contiguous
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
// Tile products through torch's BLAS sgemm (true, the default) or at::addmm_out (false, also the
// path when torch exports no sgemm). Returns whether the BLAS sgemm exists.
bool attention_use_blas(bool use);

// denoise.cpp

// cross_entropy.cpp

// tasks.cpp

}  // namespace blockmdm
