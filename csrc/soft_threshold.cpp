// Schema and argument checks of the soft-threshold operator (soft_threshold.h). Kernels: CPU in
// csrc/cpu/soft_threshold_cpu.cpp, CUDA in csrc/cuda/soft_threshold_cuda.cu; the fake function is
// registered in catalyst_fused/sparsity.py.
#include "soft_threshold.h"

#include "plan.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace catalyst_fused {
namespace soft_threshold {
namespace {

struct Range {
  uintptr_t begin = 0;
  uintptr_t end = 0;
  bool is_weight = false;
  size_t index = 0;
};

const char* kind(bool is_weight) { return is_weight ? "weights" : "sources"; }

// Sweep over the byte ranges sorted by start: a weight may overlap nothing, a source nothing but sources.
void check_memory(at::TensorList weights, const c10::optional<at::TensorList>& sources) {
  std::vector<Range> ranges;
  auto add = [&](const at::Tensor& t, bool is_weight, size_t i) {
    if (t.numel() == 0) return;
    const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    ranges.push_back({begin, begin + static_cast<uintptr_t>(t.numel() * t.element_size()), is_weight, i});
  };
  for (size_t i = 0; i < weights.size(); ++i) add(weights[i], true, i);
  if (sources.has_value()) {
    for (size_t i = 0; i < sources->size(); ++i) {
      const at::Tensor& s = (*sources)[i];
      if (s.const_data_ptr() == weights[i].const_data_ptr()) continue;  // in place: reads before it writes
      add(s, false, i);
    }
  }
  std::stable_sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) { return a.begin < b.begin; });
  const Range* widest_any = nullptr;     // the range reaching furthest among those seen
  const Range* widest_weight = nullptr;  // the same among the weights
  for (const Range& r : ranges) {
    const Range* other = r.is_weight ? widest_any : widest_weight;
    TORCH_CHECK_VALUE(other == nullptr || other->end <= r.begin, "catalyst_fused: soft_threshold_: ", kind(r.is_weight),
                      "[", r.index, "] shares memory with ", kind(other ? other->is_weight : true), "[",
                      other ? other->index : 0, "]; every weight must have its own memory (a source may only be "
                      "its own weight, for the in-place form)");
    if (widest_any == nullptr || r.end > widest_any->end) widest_any = &r;
    if (r.is_weight && (widest_weight == nullptr || r.end > widest_weight->end)) widest_weight = &r;
  }
}

}  // namespace

void check_args(at::TensorList weights, const c10::optional<at::TensorList>& sources, at::ArrayRef<double> thresholds) {
  TORCH_CHECK_VALUE(!weights.empty(), "catalyst_fused: soft_threshold_: weights must be a non-empty sequence of tensors");
  const at::Tensor& first = weights[0];
  TORCH_CHECK_VALUE(first.defined(), "catalyst_fused: soft_threshold_: weights[0] is undefined");
  TORCH_CHECK_TYPE(at::isFloatingType(first.scalar_type()), "catalyst_fused: soft_threshold_: weights[0] must be a "
                   "floating-point tensor, got ", dtype_name(first.scalar_type()));
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK_VALUE(w.defined(), "catalyst_fused: soft_threshold_: weights[", i, "] is undefined");
    TORCH_CHECK_TYPE(w.scalar_type() == first.scalar_type(), "catalyst_fused: soft_threshold_: weights[", i,
                     "] has dtype ", dtype_name(w.scalar_type()), " but weights[0] has dtype ",
                     dtype_name(first.scalar_type()), "; all tensors must share one dtype");
    TORCH_CHECK_VALUE(w.device() == first.device(), "catalyst_fused: soft_threshold_: weights[", i, "] is on ",
                      w.device(), " but weights[0] is on ", first.device());
    TORCH_CHECK_VALUE(w.is_contiguous(), "catalyst_fused: soft_threshold_: weights[", i, "] must be contiguous");
  }
  if (sources.has_value()) {
    TORCH_CHECK_VALUE(sources->size() == weights.size(), "catalyst_fused: soft_threshold_: got ", sources->size(),
                      " sources for ", weights.size(), " weights");
    for (size_t i = 0; i < sources->size(); ++i) {
      const at::Tensor& s = (*sources)[i];
      TORCH_CHECK_VALUE(s.defined(), "catalyst_fused: soft_threshold_: sources[", i, "] is undefined");
      TORCH_CHECK_TYPE(s.scalar_type() == first.scalar_type(), "catalyst_fused: soft_threshold_: sources[", i,
                       "] has dtype ", dtype_name(s.scalar_type()), " but weights[0] has dtype ",
                       dtype_name(first.scalar_type()), "; all tensors must share one dtype");
      TORCH_CHECK_VALUE(s.device() == first.device(), "catalyst_fused: soft_threshold_: sources[", i, "] is on ",
                        s.device(), " but weights[0] is on ", first.device());
      TORCH_CHECK_VALUE(s.sizes() == weights[i].sizes(), "catalyst_fused: soft_threshold_: sources[", i,
                        "] has shape ", s.sizes(), " but weights[", i, "] has shape ", weights[i].sizes());
      TORCH_CHECK_VALUE(s.is_contiguous(), "catalyst_fused: soft_threshold_: sources[", i, "] must be contiguous");
    }
  }
  TORCH_CHECK_VALUE(thresholds.size() == weights.size(), "catalyst_fused: soft_threshold_: got ", thresholds.size(),
                    " thresholds for ", weights.size(), " weights");
  for (size_t i = 0; i < thresholds.size(); ++i) {
    TORCH_CHECK_VALUE(std::isfinite(thresholds[i]) && thresholds[i] >= 0, "catalyst_fused: soft_threshold_: "
                      "thresholds[", i, "] must be a finite number >= 0, got ", thresholds[i]);
  }
  check_memory(weights, sources);
}

std::vector<Chunk> make_chunks(at::TensorList weights) {
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < weights.size(); ++i) {
    const int64_t n = weights[i].numel();
    for (int64_t b = 0; b < n; b += kChunkElements) chunks.push_back({static_cast<int64_t>(i), b, std::min(n, b + kChunkElements)});
  }
  return chunks;
}

}  // namespace soft_threshold
}  // namespace catalyst_fused

TORCH_LIBRARY_FRAGMENT(catalyst_fused, m) {
  // weights[i] = sign(x) * max(|x| - thresholds[i], 0), x from sources[i] (weights[i] when None); returns the
  // number of zeros written into each weight (int64 [len(weights)]).
  m.def("soft_threshold_(Tensor(a!)[] weights, Tensor[]? sources, float[] thresholds) -> Tensor");
}
