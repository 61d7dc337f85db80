// Schemas of the catalyst_fused operators. Backends register implementations in csrc/cpu and csrc/cuda;
// catalyst_fused/ops.py registers the fake (meta) functions and autograd.
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
}
