#include <torch/extension.h>

#include "blockmdm.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "blockmdm native CPU kernels";

  // attention

  // denoise

  // cross_entropy

  // tasks

}
