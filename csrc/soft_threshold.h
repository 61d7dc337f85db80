// The soft-threshold operator, shared by its CPU and CUDA kernels: argument checks and how the work is cut.
//
//   soft_threshold_(Tensor(a!)[] weights, Tensor[]? sources, float[] thresholds) -> Tensor counts
//
// For every tensor i: weights[i] = sign(x) * max(|x| - t_i, 0) with x from sources[i] (from weights[i]
// itself when sources is None: the proximal L1 step), computed in the accumulation dtype and rounded once;
// counts[i] = number of zeros written into weights[i] (int64, on the weights' device). One call covers every
// tensor of a model: LATS's per-step reparameterisation w = S_t(theta) and its sparsity count.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <vector>

namespace catalyst_fused {
namespace soft_threshold {

// Elements per unit of parallel work (CPU) / per CUDA block. Tests use sizes around it.
constexpr int64_t kChunkElements = int64_t(1) << 14;

// A contiguous range [begin, end) of the elements of tensor `tensor`.
struct Chunk {
  int64_t tensor = 0;
  int64_t begin = 0;
  int64_t end = 0;
};

// Checks every argument; messages name weights[i], sources[i], thresholds[i] (the Python fake function
// says the same). Sources may be the weights themselves (in place) but no weight may share memory with
// another weight or another tensor's source: the result would depend on the order of the writes.
void check_args(at::TensorList weights, const c10::optional<at::TensorList>& sources, at::ArrayRef<double> thresholds);

// The tensors' elements cut into chunks of at most kChunkElements (empty tensors have none).
std::vector<Chunk> make_chunks(at::TensorList weights);

}  // namespace soft_threshold
}  // namespace catalyst_fused
