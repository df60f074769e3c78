#include <torch/extension.h>

#include "blockmdm.h"

namespace py = pybind11;
using namespace pybind11::literals;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "blockmdm native CPU kernels";

  // attention
  m.def("attention_fwd", &blockmdm::attention_fwd,
        "block-masked attention forward, written into (o, lse)");
  m.def("attention_bwd", &blockmdm::attention_bwd,
        "block-masked attention backward, written into (dq, dk, dv)");


  // denoise
  m.def("denoise_step", &blockmdm::denoise_step, "logits"_a, "tokens"_a, "active"_a, "k_rows"_a,
        "k"_a, "threshold"_a, "mask_id"_a, "temperature"_a, "confidence"_a, "seed"_a,
        py::call_guard<py::gil_scoped_release>());

  // rms_norm
  m.def("rms_norm", &blockmdm::rms_norm, "x"_a, "weight"_a, "eps"_a);
  m.def("rms_norm_fwd", &blockmdm::rms_norm_fwd, "x"_a, "weight"_a, "eps"_a,
        py::call_guard<py::gil_scoped_release>());
  m.def("rms_norm_bwd", &blockmdm::rms_norm_bwd, "dy"_a, "x"_a, "weight"_a, "rstd"_a,
        py::call_guard<py::gil_scoped_release>());

  // swiglu, rope
  m.def("swiglu_fwd", &blockmdm::swiglu_fwd, "a"_a, "b"_a,
        py::call_guard<py::gil_scoped_release>());
  m.def("swiglu_bwd", &blockmdm::swiglu_bwd, "g"_a, "a"_a, "b"_a,
        py::call_guard<py::gil_scoped_release>());
  m.def("rope", &blockmdm::rope, "x"_a, "cos"_a, "sin"_a, "heads"_a, "inverse"_a,
        py::call_guard<py::gil_scoped_release>());

  // cross_entropy
  m.def("cross_entropy_rows", &blockmdm::cross_entropy_rows, "logits"_a, "rows"_a, "targets"_a,
        "coef"_a, "focal_gamma"_a, "z_loss"_a, py::call_guard<py::gil_scoped_release>());

  // tasks
  m.def("sudoku_generate", &blockmdm::sudoku_generate, "seed"_a, "holes"_a, "first"_a, "n"_a,
        "attempt"_a, py::call_guard<py::gil_scoped_release>());
  m.def("sudoku_count", &blockmdm::sudoku_count, "grids"_a, "limit"_a,
        py::call_guard<py::gil_scoped_release>());
  m.def("sudoku_valid", &blockmdm::sudoku_valid, "grids"_a,
        py::call_guard<py::gil_scoped_release>());
  m.def("star_graphs", &blockmdm::star_graphs, "seed"_a, "first"_a, "n"_a, "n_nodes"_a,
        "degree"_a, "path_len"_a, py::call_guard<py::gil_scoped_release>());

}
