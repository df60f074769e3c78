#include <torch/extension.h>

#include "blockmdm.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "blockmdm native CPU kernels";

  // attention
  m.def("attention_fwd", &blockmdm::attention_fwd, "block-masked attention forward -> (o, lse)");
  m.def("attention_bwd", &blockmdm::attention_bwd, "block-masked attention backward -> (dq, dk, dv)");

  // denoise

  // cross_entropy

  // tasks

}
