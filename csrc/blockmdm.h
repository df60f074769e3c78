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

// denoise.cpp

// cross_entropy.cpp

// tasks.cpp

}  // namespace blockmdm
