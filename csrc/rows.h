// Row helpers shared by the op sources: vectorised max of a float row and a float view of a row
// of any floating dtype.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

namespace blockmdm {

// max of x[lo, hi) (-inf when empty; NaN when the range holds one)
inline float row_max(const float* x, int64_t lo, int64_t hi) {
  using Vec = at::vec::Vectorized<float>;
  Vec vm(-std::numeric_limits<float>::infinity());
  int64_t j = lo;
  for (; j + Vec::size() <= hi; j += Vec::size()) vm = at::vec::maximum(vm, Vec::loadu(x + j));
  float m = at::vec::vec_reduce_all<float>(
      [](Vec a, Vec b) { return at::vec::maximum(a, b); }, vm);
  for (; j < hi; ++j) m = (x[j] > m || x[j] != x[j]) ? x[j] : m;  // keeps a NaN
  return m;
}

// The n values at src as floats: src itself for float, else converted into buf.
template <typename scalar_t>
inline const float* float_row(const scalar_t* src, std::vector<float>& buf, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
    at::vec::convert(src, buf.data(), n);
    return buf.data();
  }
}

}  // namespace blockmdm
