// Autograd for catalyst_fused::penalty_forward, in C++.
//
// A Python autograd registration costs tens of microseconds per call (and more per tensor) before any
// kernel runs, which is more than the whole fused kernel for a ResNet-56. Here the autograd node is a
// C++ torch::autograd::Function, as in torchvision's operators; torch.compile traces through it.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace catalyst_fused {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_forward(at::TensorList weights, at::TensorList catalysts,
                                                            const c10::optional<at::Tensor>& plan) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("catalyst_fused::penalty_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           at::TensorList, at::TensorList, const c10::optional<at::Tensor>&)>();
  return op.call(weights, catalysts, plan);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> call_backward(const at::Tensor& grad,
                                                                           at::TensorList weights,
                                                                           at::TensorList catalysts,
                                                                           const at::Tensor& norms,
                                                                           const c10::optional<at::Tensor>& plan) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("catalyst_fused::penalty_backward", "")
                       .typed<std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>>(
                           const at::Tensor&, at::TensorList, at::TensorList, const at::Tensor&,
                           const c10::optional<at::Tensor>&)>();
  return op.call(grad, weights, catalysts, norms, plan);
}

class PenaltyFunction : public torch::autograd::Function<PenaltyFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList weights, at::TensorList catalysts,
                               const c10::optional<at::Tensor>& plan) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [penalty, norms, ratios] = call_forward(weights, catalysts, plan);
    std::vector<at::Tensor> saved(weights.begin(), weights.end());
    saved.insert(saved.end(), catalysts.begin(), catalysts.end());
    saved.push_back(norms);
    ctx->save_for_backward(saved);
    ctx->saved_data["num_weights"] = static_cast<int64_t>(weights.size());
    ctx->saved_data["plan"] = plan.has_value() ? c10::IValue(*plan) : c10::IValue();
    // n and c are statistics of the call, not differentiable outputs.
    ctx->mark_non_differentiable({norms, ratios});
    return {penalty, norms, ratios};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const int64_t num_weights = ctx->saved_data["num_weights"].toInt();
    const auto plan_value = ctx->saved_data["plan"];
    const c10::optional<at::Tensor> plan =
        plan_value.isNone() ? c10::nullopt : c10::optional<at::Tensor>(plan_value.toTensor());
    const std::vector<at::Tensor> weights(saved.begin(), saved.begin() + num_weights);
    const std::vector<at::Tensor> catalysts(saved.begin() + num_weights, saved.end() - 1);
    const at::Tensor& norms = saved.back();
    at::Tensor grad = grad_outputs[0];
    if (!grad.defined()) grad = at::zeros({}, norms.options());
    auto [weight_grads, catalyst_grads] = call_backward(grad, weights, catalysts, norms, plan);
    // One entry per forward input: every weight, every catalyst, then the plan (never differentiable).
    variable_list grads;
    grads.reserve(weight_grads.size() + catalyst_grads.size() + 1);
    grads.insert(grads.end(), weight_grads.begin(), weight_grads.end());
    grads.insert(grads.end(), catalyst_grads.begin(), catalyst_grads.end());
    grads.emplace_back();
    return grads;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> penalty_forward_autograd(at::TensorList weights,
                                                                          at::TensorList catalysts,
                                                                          const c10::optional<at::Tensor>& plan) {
  auto out = PenaltyFunction::apply(weights, catalysts, plan);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(catalyst_fused, Autograd, m) {
  m.impl("penalty_forward", &penalty_forward_autograd);
}

}  // namespace catalyst_fused
