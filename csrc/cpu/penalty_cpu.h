// Entry point of the CPU kernels for cf.penalty_'s lean path (csrc/module.cpp), which bypasses the
// dispatcher: converting hundreds of tensor arguments to and from IValues cost more per call than the
// kernels of a small network. It runs the same checks and the same kernels as penalty_accumulate_selected_.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <functional>
#include <memory>
#include <tuple>
#include <vector>

namespace catalyst_fused {
namespace cpu {

// penalty_accumulate_selected_ where some gradient buffers do not exist yet (undefined entries of
// weight_grads / catalyst_grads): every check runs on the arguments and the buffers that exist, then
// create_missing() must fill every undefined entry (it runs only if all checks pass, so a failing call
// creates nothing), then the kernels run. The indices list every selected tensor, strictly increasing.
std::tuple<at::Tensor, at::Tensor, at::Tensor> accumulate_creating_grads(
    at::TensorList tensors, at::TensorList catalysts, std::vector<at::Tensor>& weight_grads,
    const std::vector<int64_t>& weight_index, std::vector<at::Tensor>& catalyst_grads,
    const std::vector<int64_t>& catalyst_index, double scale, const c10::optional<at::Tensor>& plan_table,
    const std::function<void()>& create_missing, std::shared_ptr<const void>* prepared_out = nullptr);

// The kernels alone, with the plan and schedule a passing accumulate_creating_grads call returned in
// *prepared_out. No check runs: the caller must know that the arguments are the ones that call validated
// (the same tensors with the same shapes, dtype, memory and table, and the same thread count), with
// every selected gradient buffer present. Empty indices: every tensor is selected.
std::tuple<at::Tensor, at::Tensor, at::Tensor> accumulate_prepared(
    const std::shared_ptr<const void>& prepared, at::TensorList tensors, at::TensorList catalysts,
    at::TensorList weight_grads, at::IntArrayRef weight_index, at::TensorList catalyst_grads,
    at::IntArrayRef catalyst_index, double scale);

}  // namespace cpu
}  // namespace catalyst_fused
