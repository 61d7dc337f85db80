// Schemas of the catalyst_fused operators. Backends register implementations in csrc/cpu and csrc/cuda;
// catalyst_fused/operators.py registers the fake (meta) functions; csrc/autograd.cpp the autograd.
#include "cpu/buffers.h"
#include "plan.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

TORCH_LIBRARY(catalyst_fused, m) {
  // Returns (penalty, norms, ratios): penalty = sum_i |d_i| n_i, norms[i] = n_i, ratios[i] = |d_i| / n_i,
  // all in the accumulation dtype (fp32 for fp16/bf16 inputs). `plan` is a GroupLayout member table;
  // None means "rows of weights[i] are the groups of catalysts[i]".
  m.def("penalty_forward(Tensor[] weights, Tensor[] catalysts, Tensor? plan) -> (Tensor, Tensor, Tensor)");
  // Gradients of grad_penalty * penalty with respect to every weight and every catalyst.
  m.def(
      "penalty_backward(Tensor grad_penalty, Tensor[] weights, Tensor[] catalysts, Tensor norms, Tensor? plan)"
      " -> (Tensor[], Tensor[])");
  // One call: like penalty_forward, and adds scale * dR/dW into weight_grads and scale * dR/dd into
  // catalyst_grads, in place.
  m.def(
      "penalty_accumulate_(Tensor[] weights, Tensor[] catalysts, Tensor(a!)[] weight_grads, "
      "Tensor(b!)[] catalyst_grads, float scale, Tensor? plan) -> (Tensor, Tensor, Tensor)");
  // penalty_accumulate_ for some of the tensors only: weight_grads[k] is the gradient buffer of
  // weights[weight_index[k]] (indices strictly increasing), likewise for catalysts; tensors without a buffer
  // are read (they are part of the groups) but get no gradient. cf.penalty_ uses it for tensors that do not
  // require grad.
  m.def(
      "penalty_accumulate_selected_(Tensor[] weights, Tensor[] catalysts, Tensor(a!)[] weight_grads, "
      "int[] weight_index, Tensor(b!)[] catalyst_grads, int[] catalyst_index, float scale, Tensor? plan) "
      "-> (Tensor, Tensor, Tensor)");
  // Sharded weights (DTensor / FSDP2): every group's sum of squares over the slices these (local) tensors
  // hold, in the accumulation dtype. The caller all-reduces the flat vector across processes.
  m.def("penalty_partial_sums(Tensor[] weights, Tensor[] catalysts, Tensor? plan) -> Tensor");
  // ... and finishes from the reduced sums: like penalty_accumulate_selected_ (gradient buffers for the
  // tensors the indices list), with n = sqrt(sums) instead of the norms of these tensors. Returns
  // (penalty, norms, ratios).
  m.def(
      "penalty_finish_(Tensor[] weights, Tensor[] catalysts, Tensor(a!)[] weight_grads, int[] weight_index, "
      "Tensor(b!)[] catalyst_grads, int[] catalyst_index, float scale, Tensor? plan, Tensor sums) "
      "-> (Tensor, Tensor, Tensor)");
  // Frees the memory the CPU kernels keep between calls (scratch buffers, recycled gradient buffers).
  m.def("release_cached_memory() -> ()", &catalyst_fused::cpu::release_cached_memory);
}

namespace catalyst_fused {
namespace {

// Any backend: the selected op through penalty_accumulate_, with zero-filled scratch gradients for the
// tensors that have none (the CPU kernel skips them instead; see csrc/cpu/penalty_cpu.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> penalty_accumulate_selected_composite(
    at::TensorList weights, at::TensorList catalysts, at::TensorList weight_grads, at::IntArrayRef weight_index,
    at::TensorList catalyst_grads, at::IntArrayRef catalyst_index, double scale, const c10::optional<at::Tensor>& plan) {
  check_selection(weight_grads, weight_index, weights, "weight_grads", "weight_index", "weights");
  check_selection(catalyst_grads, catalyst_index, catalysts, "catalyst_grads", "catalyst_index", "catalysts");
  auto fill = [](at::TensorList grads, at::IntArrayRef index, at::TensorList like) {
    std::vector<at::Tensor> all(like.size());
    for (size_t k = 0; k < grads.size(); ++k) all[index[k]] = grads[k];
    for (size_t i = 0; i < like.size(); ++i) {
      if (!all[i].defined()) all[i] = at::zeros_like(like[i], at::MemoryFormat::Contiguous);
    }
    return all;
  };
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("catalyst_fused::penalty_accumulate_", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           at::TensorList, at::TensorList, at::TensorList, at::TensorList, double,
                           const c10::optional<at::Tensor>&)>();
  return op.call(weights, catalysts, fill(weight_grads, weight_index, weights),
                 fill(catalyst_grads, catalyst_index, catalysts), scale, plan);
}

}  // namespace
}  // namespace catalyst_fused

TORCH_LIBRARY_IMPL(catalyst_fused, CompositeExplicitAutograd, m) {
  m.impl("penalty_accumulate_selected_", &catalyst_fused::penalty_accumulate_selected_composite);
}
