// CUDA kernels of the fused Catalyst penalty (multi-tensor: every weight of a model per launch).
//
// The host builds the same Plan as the CPU path (plan.cpp: validation, slice geometry) and packs it,
// with the tensors' data pointers, into one int64 table that goes to the device in one asynchronous
// copy on the current stream. Then:
//   norm_kernel      one block per group: sums the squares of the group's slices (fp32 accumulation for
//                    fp16/bf16, fp64 for fp64), block-reduces, writes n, c, |d| n (and, for the in-place
//                    op, adds scale * sign(d) * n into the catalyst gradient);
//   gradient_kernel  one block per row of every weight: writes (or adds) scale * |d| / n * x, the row's
//                    group and its input-column groups summed; every element has exactly one writer;
//   catalyst_grad_kernel  grad * sign(d) * n per group.
// No floating-point atomics anywhere; the penalty is the fp64 sum of the per-group terms, so results are
// deterministic. grad_penalty is read on the device: no host synchronisation.
#include "../penalty_math.h"
#include "../plan.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

namespace catalyst_fused {
namespace {

constexpr int kThreads = 256;

// Fields of one member in the packed table.
enum : int64_t {
  kTensor = 0,
  kDim,
  kStart,
  kCount,
  kSegment,
  kGroupBegin,
  kSliceStride,
  kOuter,
  kOuterStride,
  kInner,
  kFields
};

// Offsets of the sections of the packed table.
struct Sections {
  int64_t members, weight_ptrs, catalyst_ptrs, grad_ptrs, catalyst_grad_ptrs, segment_offsets,
      segment_member_offsets, segment_members, row_offsets, row_lengths, column_block, tensor_member_offsets,
      tensor_members, total;
};

struct DeviceTable {
  const int64_t* base;
  Sections at;
  int64_t num_segments;
  int64_t num_tensors;
  __device__ const int64_t* member(int64_t i) const { return base + at.members + i * kFields; }
};

// Largest k with offsets[k] <= x (offsets ascending, offsets[0] = 0).
__device__ inline int64_t find_owner(const int64_t* offsets, int64_t count, int64_t x) {
  int64_t lo = 0, hi = count - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= x) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <typename acc_t>
__device__ inline acc_t block_sum(acc_t value) {
  __shared__ acc_t partial[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) partial[warp] = value;
  __syncthreads();
  value = threadIdx.x < kThreads / 32 ? partial[threadIdx.x] : acc_t(0);
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  return value;  // valid in thread 0
}

template <typename scalar_t, typename acc_t, bool kCatalystGrad>
__global__ void norm_kernel(DeviceTable table, acc_t* norms, acc_t* ratios, acc_t* terms, acc_t scale) {
  const int64_t g = blockIdx.x;
  const int64_t* seg_offsets = table.base + table.at.segment_offsets;
  const int64_t s = find_owner(seg_offsets, table.num_segments + 1, g);
  const int64_t* seg_member_offsets = table.base + table.at.segment_member_offsets;
  acc_t acc = 0;
  for (int64_t k = seg_member_offsets[s]; k < seg_member_offsets[s + 1]; ++k) {
    const int64_t* m = table.member(table.base[table.at.segment_members + k]);
    const int64_t local = g - m[kGroupBegin];
    if (local < 0 || local >= m[kCount]) continue;
    const scalar_t* x = reinterpret_cast<const scalar_t*>(table.base[table.at.weight_ptrs + m[kTensor]]) +
                        (m[kStart] + local) * m[kSliceStride];
    const int64_t inner = m[kInner], outer_stride = m[kOuterStride], numel = m[kOuter] * inner;
    if (m[kOuter] == 1) {
      for (int64_t e = threadIdx.x; e < numel; e += kThreads) {
        const acc_t v = static_cast<acc_t>(x[e]);
        acc += v * v;
      }
    } else {
      for (int64_t e = threadIdx.x; e < numel; e += kThreads) {
        const acc_t v = static_cast<acc_t>(x[(e / inner) * outer_stride + e % inner]);
        acc += v * v;
      }
    }
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    const acc_t n = sqrt(acc);
    const int64_t j = g - seg_offsets[s];
    const scalar_t* d = reinterpret_cast<const scalar_t*>(table.base[table.at.catalyst_ptrs + s]);
    const acc_t dj = static_cast<acc_t>(d[j]);
    norms[g] = n;
    ratios[g] = catalyst_ratio(abs(dj), n);
    terms[g] = abs(dj) * n;
    if (kCatalystGrad) {
      scalar_t* gd = reinterpret_cast<scalar_t*>(table.base[table.at.catalyst_grad_ptrs + s]);
      gd[j] = static_cast<scalar_t>(static_cast<acc_t>(gd[j]) + scale * catalyst_grad(dj, n));
    }
  }
}

// |d| / n for slice `index` of member m (0 where n == 0).
template <typename scalar_t, typename acc_t>
__device__ inline acc_t member_factor(const DeviceTable& table, const int64_t* m, int64_t index, const acc_t* norms) {
  const int64_t group = m[kGroupBegin] + (index - m[kStart]);
  const int64_t s = m[kSegment];
  const scalar_t* d = reinterpret_cast<const scalar_t*>(table.base[table.at.catalyst_ptrs + s]);
  const int64_t j = group - table.base[table.at.segment_offsets + s];
  return weight_grad_scale(abs(static_cast<acc_t>(d[j])), norms[group]);
}

template <typename scalar_t, typename acc_t, bool kAccumulate>
__global__ void gradient_kernel(DeviceTable table, const acc_t* norms, const acc_t* grad_penalty, acc_t scale) {
  const int64_t row = blockIdx.x;
  const int64_t* row_offsets = table.base + table.at.row_offsets;
  const int64_t t = find_owner(row_offsets, table.num_tensors + 1, row);
  const int64_t r = row - row_offsets[t];
  const int64_t length = table.base[table.at.row_lengths + t];
  const int64_t column_block = table.base[table.at.column_block + t];
  const int64_t k_begin = table.base[table.at.tensor_member_offsets + t];
  const int64_t k_end = table.base[table.at.tensor_member_offsets + t + 1];
  const acc_t factor_scale = scale * (grad_penalty != nullptr ? *grad_penalty : acc_t(1));
  acc_t row_factor = 0;
  bool row_covered = false;
  for (int64_t k = k_begin; k < k_end; ++k) {
    const int64_t* m = table.member(table.base[table.at.tensor_members + k]);
    if (m[kDim] != 0 || r < m[kStart] || r >= m[kStart] + m[kCount]) continue;
    row_factor += member_factor<scalar_t, acc_t>(table, m, r, norms);
    row_covered = true;
  }
  const scalar_t* w = reinterpret_cast<const scalar_t*>(table.base[table.at.weight_ptrs + t]) + r * length;
  scalar_t* out = reinterpret_cast<scalar_t*>(table.base[table.at.grad_ptrs + t]) + r * length;
  for (int64_t e = threadIdx.x; e < length; e += kThreads) {
    acc_t factor = row_factor;
    bool covered = row_covered;
    if (column_block > 0) {
      const int64_t column = e / column_block;
      for (int64_t k = k_begin; k < k_end; ++k) {
        const int64_t* m = table.member(table.base[table.at.tensor_members + k]);
        if (m[kDim] != 1 || column < m[kStart] || column >= m[kStart] + m[kCount]) continue;
        factor += member_factor<scalar_t, acc_t>(table, m, column, norms);
        covered = true;
      }
    }
    if (kAccumulate) {
      if (covered) out[e] = static_cast<scalar_t>(static_cast<acc_t>(out[e]) + factor_scale * factor * static_cast<acc_t>(w[e]));
    } else {
      out[e] = covered ? static_cast<scalar_t>(factor_scale * factor * static_cast<acc_t>(w[e])) : scalar_t(0);
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void catalyst_grad_kernel(DeviceTable table, const acc_t* norms, const acc_t* grad_penalty, int64_t num_groups) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (g >= num_groups) return;
  const int64_t* seg_offsets = table.base + table.at.segment_offsets;
  const int64_t s = find_owner(seg_offsets, table.num_segments + 1, g);
  const int64_t j = g - seg_offsets[s];
  const scalar_t* d = reinterpret_cast<const scalar_t*>(table.base[table.at.catalyst_ptrs + s]);
  scalar_t* gd = reinterpret_cast<scalar_t*>(table.base[table.at.catalyst_grad_ptrs + s]);
  gd[j] = static_cast<scalar_t>(*grad_penalty * catalyst_grad(static_cast<acc_t>(d[j]), norms[g]));
}

// Packs plan + pointers into one host int64 buffer and copies it to the device (async, current stream).
struct PackedTable {
  at::Tensor device;
  DeviceTable view;
};

PackedTable pack(const Plan& plan, at::TensorList weights, at::TensorList catalysts, at::TensorList grads,
                 at::TensorList catalyst_grads) {
  const int64_t T = static_cast<int64_t>(weights.size()), S = static_cast<int64_t>(catalysts.size());
  const int64_t M = static_cast<int64_t>(plan.members.size());
  Sections sec{};
  int64_t cursor = 0;
  auto take = [&](int64_t n) { const int64_t here = cursor; cursor += n; return here; };
  sec.members = take(M * kFields);
  sec.weight_ptrs = take(T);
  sec.catalyst_ptrs = take(S);
  sec.grad_ptrs = take(T);
  sec.catalyst_grad_ptrs = take(S);
  sec.segment_offsets = take(S + 1);
  sec.segment_member_offsets = take(S + 1);
  sec.segment_members = take(M);
  sec.row_offsets = take(T + 1);
  sec.row_lengths = take(T);
  sec.column_block = take(T);
  sec.tensor_member_offsets = take(T + 1);
  sec.tensor_members = take(M);
  sec.total = cursor;

  at::Tensor host = at::empty({sec.total}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < M; ++i) {
    const MemberGeometry& m = plan.members[i];
    int64_t* row = h + sec.members + i * kFields;
    row[kTensor] = m.tensor;
    row[kDim] = m.dim;
    row[kStart] = m.start;
    row[kCount] = m.count;
    row[kSegment] = m.segment;
    row[kGroupBegin] = m.group_begin;
    row[kSliceStride] = m.slice_stride;
    row[kOuter] = m.outer;
    row[kOuterStride] = m.outer_stride;
    row[kInner] = m.inner;
  }
  auto address = [](const at::Tensor& t) { return static_cast<int64_t>(reinterpret_cast<intptr_t>(t.data_ptr())); };
  for (int64_t t = 0; t < T; ++t) {
    h[sec.weight_ptrs + t] = address(weights[t]);
    h[sec.grad_ptrs + t] = grads.empty() ? 0 : address(grads[t]);
  }
  for (int64_t s = 0; s < S; ++s) {
    h[sec.catalyst_ptrs + s] = address(catalysts[s]);
    h[sec.catalyst_grad_ptrs + s] = catalyst_grads.empty() ? 0 : address(catalyst_grads[s]);
  }
  std::copy(plan.segment_offsets.begin(), plan.segment_offsets.end(), h + sec.segment_offsets);
  std::copy(plan.segment_member_offsets.begin(), plan.segment_member_offsets.end(), h + sec.segment_member_offsets);
  std::copy(plan.segment_members.begin(), plan.segment_members.end(), h + sec.segment_members);
  std::copy(plan.tensor_member_offsets.begin(), plan.tensor_member_offsets.end(), h + sec.tensor_member_offsets);
  std::copy(plan.tensor_members.begin(), plan.tensor_members.end(), h + sec.tensor_members);
  h[sec.row_offsets] = 0;
  for (int64_t t = 0; t < T; ++t) {
    const at::Tensor& w = weights[t];
    const int64_t rows = w.size(0);
    const int64_t length = rows > 0 ? w.numel() / rows : 0;
    h[sec.row_offsets + t + 1] = h[sec.row_offsets + t] + rows;
    h[sec.row_lengths + t] = length;
    bool has_columns = false;
    for (int64_t k = plan.tensor_member_offsets[t]; k < plan.tensor_member_offsets[t + 1]; ++k) {
      has_columns |= plan.members[plan.tensor_members[k]].dim == 1;
    }
    h[sec.column_block + t] = (has_columns && w.size(1) > 0) ? length / w.size(1) : 0;
  }
  at::Tensor device = at::empty({sec.total}, weights[0].options().dtype(at::kLong));
  device.copy_(host, /*non_blocking=*/true);
  return {device, DeviceTable{device.const_data_ptr<int64_t>(), sec, S, T}};
}

int64_t total_rows(at::TensorList weights) {
  int64_t rows = 0;
  for (const auto& w : weights) rows += w.size(0);
  return rows;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> run_norms(const Plan& plan, at::TensorList weights,
                                                         at::TensorList catalysts, at::TensorList catalyst_grads,
                                                         double scale, const PackedTable& packed) {
  const auto acc_type = accumulation_dtype(weights[0].scalar_type());
  const auto options = weights[0].options().dtype(acc_type);
  at::Tensor norms = at::empty({plan.num_groups}, options);
  at::Tensor ratios = at::empty({plan.num_groups}, options);
  at::Tensor terms = at::empty({plan.num_groups}, options);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (plan.num_groups > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "catalyst_norms_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const dim3 grid(static_cast<unsigned>(plan.num_groups));
      if (catalyst_grads.empty()) {
        norm_kernel<scalar_t, acc_t, false><<<grid, kThreads, 0, stream>>>(
            packed.view, norms.mutable_data_ptr<acc_t>(), ratios.mutable_data_ptr<acc_t>(),
            terms.mutable_data_ptr<acc_t>(), static_cast<acc_t>(scale));
      } else {
        norm_kernel<scalar_t, acc_t, true><<<grid, kThreads, 0, stream>>>(
            packed.view, norms.mutable_data_ptr<acc_t>(), ratios.mutable_data_ptr<acc_t>(),
            terms.mutable_data_ptr<acc_t>(), static_cast<acc_t>(scale));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor penalty = at::sum(terms, at::kDouble).to(acc_type);
  return {penalty, norms, ratios};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> penalty_forward_cuda(at::TensorList weights, at::TensorList catalysts,
                                                                      const c10::optional<at::Tensor>& plan_table) {
  const Plan plan = build_plan(weights, catalysts, plan_table);
  const c10::cuda::CUDAGuard guard(weights[0].device());
  const PackedTable packed = pack(plan, weights, catalysts, {}, {});
  return run_norms(plan, weights, catalysts, {}, 1.0, packed);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> penalty_backward_cuda(
    const at::Tensor& grad_penalty, at::TensorList weights, at::TensorList catalysts, const at::Tensor& norms,
    const c10::optional<at::Tensor>& plan_table) {
  const Plan plan = build_plan(weights, catalysts, plan_table);
  const auto acc_type = accumulation_dtype(weights[0].scalar_type());
  TORCH_CHECK_VALUE(norms.dim() == 1 && norms.numel() == plan.num_groups && norms.scalar_type() == acc_type &&
                        norms.is_contiguous() && norms.device() == weights[0].device(),
                    "catalyst_fused: norms must be the contiguous ", dtype_name(acc_type), " [", plan.num_groups,
                    "] tensor returned by penalty_forward, on ", weights[0].device());
  TORCH_CHECK_VALUE(grad_penalty.numel() == 1, "catalyst_fused: grad_penalty must have one element, got shape ",
                    grad_penalty.sizes());
  const c10::cuda::CUDAGuard guard(weights[0].device());
  std::vector<at::Tensor> weight_grads, catalyst_grads;
  for (const auto& w : weights) weight_grads.push_back(at::empty_like(w, at::MemoryFormat::Contiguous));
  for (const auto& d : catalysts) catalyst_grads.push_back(at::empty_like(d, at::MemoryFormat::Contiguous));
  const PackedTable packed = pack(plan, weights, catalysts, weight_grads, catalyst_grads);
  const at::Tensor grad = grad_penalty.reshape({1}).to(norms.options()).contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "catalyst_grads_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t rows = total_rows(weights);
    if (rows > 0) {
      gradient_kernel<scalar_t, acc_t, false><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
          packed.view, norms.const_data_ptr<acc_t>(), grad.const_data_ptr<acc_t>(), acc_t(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (plan.num_groups > 0) {
      const unsigned blocks = static_cast<unsigned>((plan.num_groups + kThreads - 1) / kThreads);
      catalyst_grad_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
          packed.view, norms.const_data_ptr<acc_t>(), grad.const_data_ptr<acc_t>(), plan.num_groups);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {weight_grads, catalyst_grads};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> penalty_accumulate_cuda(at::TensorList weights, at::TensorList catalysts,
                                                                         at::TensorList weight_grads,
                                                                         at::TensorList catalyst_grads, double scale,
                                                                         const c10::optional<at::Tensor>& plan_table) {
  const Plan plan = build_plan(weights, catalysts, plan_table);
  check_grads(weight_grads, weights, "weight_grads", "weights");
  check_grads(catalyst_grads, catalysts, "catalyst_grads", "catalysts");
  const c10::cuda::CUDAGuard guard(weights[0].device());
  const PackedTable packed = pack(plan, weights, catalysts, weight_grads, catalyst_grads);
  auto result = run_norms(plan, weights, catalysts, catalyst_grads, scale, packed);
  auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor& norms = std::get<1>(result);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "catalyst_accumulate_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t rows = total_rows(weights);
    if (rows > 0) {
      gradient_kernel<scalar_t, acc_t, true><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
          packed.view, norms.const_data_ptr<acc_t>(), nullptr, static_cast<acc_t>(scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(catalyst_fused, CUDA, m) {
  m.impl("penalty_forward", &penalty_forward_cuda);
  m.impl("penalty_backward", &penalty_backward_cuda);
  m.impl("penalty_accumulate_", &penalty_accumulate_cuda);
}

}  // namespace catalyst_fused
