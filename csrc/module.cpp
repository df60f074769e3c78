#include <torch/extension.h>

#include "blockmdm.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "blockmdm native CPU kernels";

  // attention
  m.def("attention_fwd", &blockmdm::attention_fwd,
        "block-masked attention forward, written into (o, lse)");
  m.def("attention_bwd", &blockmdm::attention_bwd,
        "block-masked attention backward, written into (dq, dk, dv)");
  m.def("attention_use_blas", &blockmdm::attention_use_blas,
        "tile products via torch's BLAS sgemm (True) or at::addmm_out; returns whether it exists");

  // denoise

  // cross_entropy

  // tasks

}
