// CUDA kernel of the soft-threshold operator (csrc/soft_threshold.h): every tensor of a model in one launch.
//
// The host cuts every tensor into chunks of soft_threshold::kChunkElements and packs one int64 row per chunk
// (source and weight data pointers, element range, tensor index, threshold as fp64 bits) into a table that
// goes to the device in one asynchronous copy on the current stream. One block per chunk writes
// sign(x) * max(|x| - t, 0) (accumulation dtype, rounded once), counts the zeros it wrote, reduces the count
// over the block and adds it to its tensor's count with one 64-bit integer atomic (integer sums: the result
// does not depend on the order). Same checks as the CPU kernel; no host synchronisation.
#include "../soft_threshold.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

namespace catalyst_fused {
namespace {

constexpr int kThreads = 256;
enum : int64_t { kSource = 0, kWeight, kBegin, kEnd, kTensor, kThresholdBits, kFields };

template <typename scalar_t, typename acc_t>
__global__ void soft_threshold_kernel(const int64_t* __restrict__ table, unsigned long long* __restrict__ counts) {
  const int64_t* row = table + static_cast<int64_t>(blockIdx.x) * kFields;
  const scalar_t* src = reinterpret_cast<const scalar_t*>(row[kSource]);
  scalar_t* dst = reinterpret_cast<scalar_t*>(row[kWeight]);
  const int64_t begin = row[kBegin];
  const int64_t end = row[kEnd];
  const acc_t t = static_cast<acc_t>(__longlong_as_double(row[kThresholdBits]));
  unsigned int zeros = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const acc_t x = static_cast<acc_t>(src[i]);
    const acc_t a = x < acc_t(0) ? -x : x;
    // NaN fails the comparison and stays NaN (copysign keeps it)
    const scalar_t out = static_cast<scalar_t>(a <= t ? acc_t(0) : copysign(a - t, x));
    dst[i] = out;
    zeros += static_cast<acc_t>(out) == acc_t(0);
  }
  for (int offset = 16; offset > 0; offset /= 2) zeros += __shfl_down_sync(0xffffffffu, zeros, offset);
  __shared__ unsigned int warp_zeros[kThreads / 32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) warp_zeros[warp] = zeros;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long total = 0;
    for (int w = 0; w < kThreads / 32; ++w) total += warp_zeros[w];
    atomicAdd(counts + row[kTensor], total);
  }
}

at::Tensor soft_threshold_cuda(at::TensorList weights, c10::optional<at::TensorList> sources, at::ArrayRef<double> thresholds) {
  soft_threshold::check_args(weights, sources, thresholds);
  const c10::cuda::CUDAGuard guard(weights[0].device());
  at::Tensor counts = at::zeros({static_cast<int64_t>(weights.size())}, weights[0].options().dtype(at::kLong));
  const std::vector<soft_threshold::Chunk> chunks = soft_threshold::make_chunks(weights);
  if (chunks.empty()) return counts;
  at::Tensor host = at::empty({static_cast<int64_t>(chunks.size()), kFields}, at::TensorOptions().dtype(at::kLong));
  int64_t* h = host.data_ptr<int64_t>();
  for (size_t c = 0; c < chunks.size(); ++c) {
    const soft_threshold::Chunk& k = chunks[c];
    const at::Tensor& w = weights[k.tensor];
    const at::Tensor& s = sources.has_value() ? (*sources)[k.tensor] : w;
    int64_t* r = h + c * kFields;
    r[kSource] = reinterpret_cast<int64_t>(s.const_data_ptr());
    r[kWeight] = reinterpret_cast<int64_t>(w.data_ptr());
    r[kBegin] = k.begin;
    r[kEnd] = k.end;
    r[kTensor] = k.tensor;
    std::memcpy(&r[kThresholdBits], &thresholds[k.tensor], sizeof(double));
  }
  const at::Tensor table = host.to(weights[0].device(), /*non_blocking=*/true);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "soft_threshold_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    soft_threshold_kernel<scalar_t, acc_t><<<static_cast<unsigned>(chunks.size()), kThreads, 0, stream>>>(
        table.const_data_ptr<int64_t>(), reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return counts;
}

}  // namespace
}  // namespace catalyst_fused

TORCH_LIBRARY_IMPL(catalyst_fused, CUDA, m) {
  m.impl("soft_threshold_", &catalyst_fused::soft_threshold_cuda);
}
