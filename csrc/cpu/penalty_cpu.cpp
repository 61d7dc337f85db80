// CPU kernels of the fused Catalyst penalty.
//
// Two passes over the weights, which is the memory floor of the problem:
//   norm pass     reads every weight once and writes n_i, c_i and the penalty (plus, for the in-place
//                 op, the catalyst gradients);
//   gradient pass reads every weight once and writes (or adds into) the weight gradient.
// Work is cut into chunks of about kChunkElements elements (plan.cpp) and spread with at::parallel_for
// (OpenMP). The innermost loops live in leaf_kernels.cpp (SIMD, chosen per CPU at load time). The
// penalty is summed per chunk in double and the chunks are added in a fixed order, so results do not
// depend on the thread count.
#include "../penalty_math.h"
#include "../plan.h"
#include "leaf_kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace catalyst_fused {
namespace {

// out = factor * w, or out += factor * w.
template <bool kAccumulate, typename scalar_t, typename acc_t>
inline void scaled_store(scalar_t* out, const scalar_t* w, acc_t factor, int64_t n) {
  if (kAccumulate) {
    cpu::scale_add(out, w, factor, n);
  } else {
    cpu::scale_store(out, w, factor, n);
  }
}

template <bool kAccumulate, typename scalar_t>
inline void zero_store(scalar_t* out, int64_t n) {
  if (!kAccumulate) std::fill(out, out + n, scalar_t(0));
}

template <typename F>
void for_each_chunk(const std::vector<Chunk>& chunks, int64_t elements, const F& body) {
  const int64_t n = static_cast<int64_t>(chunks.size());
  // Small models stay on the calling thread: an OpenMP region costs more than the work.
  const int64_t grain = elements >= 4 * kChunkElements ? 1 : std::max<int64_t>(n, 1);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) body(c, chunks[c]);
  });
}

template <typename scalar_t>
std::vector<const scalar_t*> data_pointers(at::TensorList tensors) {
  std::vector<const scalar_t*> ptrs(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) ptrs[i] = tensors[i].const_data_ptr<scalar_t>();
  return ptrs;
}

template <typename scalar_t>
std::vector<scalar_t*> mutable_pointers(at::TensorList tensors) {
  std::vector<scalar_t*> ptrs(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) ptrs[i] = tensors[i].mutable_data_ptr<scalar_t>();
  return ptrs;
}

// Norm pass: writes norms and ratios, returns the penalty. With `catalyst_grads`, also adds
// `scale * sign(d) * n` into them (the in-place op).
template <typename scalar_t, typename acc_t>
acc_t norm_pass(const Plan& plan, at::TensorList tensors, at::TensorList catalysts, acc_t* norms, acc_t* ratios,
                scalar_t* const* catalyst_grads, acc_t scale) {
  const auto weights = data_pointers<scalar_t>(tensors);
  const auto cats = data_pointers<scalar_t>(catalysts);
  std::vector<double> partial(plan.norm_chunks.size(), 0.0);
  for_each_chunk(plan.norm_chunks, plan.total_elements, [&](int64_t c, const Chunk& chunk) {
    const int64_t s = chunk.owner;
    const int64_t seg0 = plan.segment_offsets[s];
    acc_t* sq = norms + seg0;  // sums of squares first, norms after
    std::fill(sq + chunk.begin, sq + chunk.end, acc_t(0));
    for (int64_t k = plan.segment_member_offsets[s]; k < plan.segment_member_offsets[s + 1]; ++k) {
      const MemberGeometry& m = plan.members[plan.segment_members[k]];
      const int64_t first = m.group_begin - seg0;  // member covers local groups [first, first + groups)
      const int64_t lo = std::max(chunk.begin, first);
      const int64_t hi = std::min(chunk.end, first + m.groups());
      if (lo >= hi) continue;
      if (m.width == 1) {
        cpu::add_sums_of_squares(weights[m.tensor] + m.first_offset + (lo - first) * m.slice_stride, hi - lo,
                                 m.slice_stride, m.outer, m.outer_stride, m.inner, sq + lo);
        continue;
      }
      for (int64_t k = (lo - first) * m.width; k < (hi - first) * m.width; ++k) {
        cpu::add_sums_of_squares(weights[m.tensor] + m.first_offset + k * m.slice_stride, 1, m.slice_stride, m.outer,
                                 m.outer_stride, m.inner, sq + first + k / m.width);
      }
    }
    const scalar_t* d = cats[s];
    double penalty = 0.0;
    for (int64_t j = chunk.begin; j < chunk.end; ++j) {
      const acc_t n = std::sqrt(sq[j]);
      const acc_t dj = static_cast<acc_t>(d[j]);
      sq[j] = n;
      ratios[seg0 + j] = catalyst_ratio(std::abs(dj), n);
      penalty += static_cast<double>(std::abs(dj)) * static_cast<double>(n);
      if (catalyst_grads != nullptr) {
        scalar_t* gd = catalyst_grads[s];
        gd[j] = static_cast<scalar_t>(static_cast<acc_t>(gd[j]) + scale * catalyst_grad(dj, n));
      }
    }
    partial[c] = penalty;
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return static_cast<acc_t>(total);
}

// Gradient pass: out[t] = scale * dR/dW[t] (kAccumulate: out[t] += ...). Elements no member covers get
// an exact zero (or are left alone), even where the weight is Inf or NaN.
template <bool kAccumulate, typename scalar_t, typename acc_t>
void gradient_pass(const Plan& plan, at::TensorList tensors, at::TensorList catalysts, const acc_t* norms,
                   acc_t scale, scalar_t* const* out) {
  const auto weights = data_pointers<scalar_t>(tensors);
  const auto cats = data_pointers<scalar_t>(catalysts);
  // Catalyst entry of each member's first slice.
  std::vector<const scalar_t*> member_d(plan.members.size());
  for (size_t i = 0; i < plan.members.size(); ++i) {
    const MemberGeometry& m = plan.members[i];
    member_d[i] = cats[m.segment] + (m.group_begin - plan.segment_offsets[m.segment]);
  }
  // scale * |d| / n for slice k of member i.
  auto slice_factor = [&](int64_t i, int64_t k) {
    const MemberGeometry& m = plan.members[i];
    const int64_t j = k / m.width;
    return scale * weight_grad_scale(std::abs(static_cast<acc_t>(member_d[i][j])), norms[m.group_begin + j]);
  };
  for_each_chunk(plan.grad_chunks, plan.total_elements, [&](int64_t, const Chunk& chunk) {
    const int64_t t = chunk.owner;
    const at::Tensor& tensor = tensors[t];
    const int64_t row_len = tensor.numel() / tensor.size(0);
    const int64_t m_begin = plan.tensor_member_offsets[t];
    const int64_t m_end = plan.tensor_member_offsets[t + 1];
    bool has_columns = false;
    for (int64_t k = m_begin; k < m_end; ++k) has_columns |= plan.members[plan.tensor_members[k]].dim == 1;
    const int64_t blocks = has_columns ? tensor.size(1) : 1;
    const int64_t block_len = row_len / std::max<int64_t>(blocks, 1);
    for (int64_t r = chunk.begin; r < chunk.end; ++r) {
      acc_t row_factor = 0;
      bool row_covered = false;
      for (int64_t k = m_begin; k < m_end; ++k) {
        const int64_t i = plan.tensor_members[k];
        const MemberGeometry& m = plan.members[i];
        if (m.dim != 0 || r < m.start || r >= m.start + m.count) continue;
        row_factor += slice_factor(i, r - m.start);
        row_covered = true;
      }
      const scalar_t* w = weights[t] + r * row_len;
      scalar_t* g = out[t] + r * row_len;
      if (!has_columns) {
        if (row_covered) {
          scaled_store<kAccumulate>(g, w, row_factor, row_len);
        } else {
          zero_store<kAccumulate>(g, row_len);
        }
        continue;
      }
      for (int64_t b = 0; b < blocks; ++b) {
        acc_t factor = row_factor;
        bool covered = row_covered;
        for (int64_t k = m_begin; k < m_end; ++k) {
          const int64_t i = plan.tensor_members[k];
          const MemberGeometry& m = plan.members[i];
          if (m.dim != 1 || b < m.start || b >= m.start + m.count) continue;
          factor += slice_factor(i, b - m.start);
          covered = true;
        }
        if (covered) {
          scaled_store<kAccumulate>(g + b * block_len, w + b * block_len, factor, block_len);
        } else {
          zero_store<kAccumulate>(g + b * block_len, block_len);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> penalty_forward_cpu(at::TensorList tensors, at::TensorList catalysts,
                                                                     const c10::optional<at::Tensor>& plan_table) {
  const Plan plan = build_plan(tensors, catalysts, plan_table);
  const auto acc_type = accumulation_dtype(tensors[0].scalar_type());
  const auto options = tensors[0].options().dtype(acc_type);
  at::Tensor norms = at::empty({plan.num_groups}, options);
  at::Tensor ratios = at::empty({plan.num_groups}, options);
  at::Tensor penalty;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "penalty_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t value = norm_pass<scalar_t, acc_t>(plan, tensors, catalysts, norms.mutable_data_ptr<acc_t>(),
                                                   ratios.mutable_data_ptr<acc_t>(), nullptr, acc_t(1));
    penalty = at::scalar_tensor(value, options);
  });
  return {penalty, norms, ratios};
}

void check_norms(const at::Tensor& norms, const Plan& plan, at::ScalarType acc_type) {
  TORCH_CHECK_VALUE(norms.dim() == 1 && norms.numel() == plan.num_groups && norms.scalar_type() == acc_type &&
                        norms.is_contiguous(),
                    "catalyst_fused: norms must be the contiguous ", dtype_name(acc_type), " [", plan.num_groups,
                    "] tensor returned by penalty_forward, got ", dtype_name(norms.scalar_type()), " ", norms.sizes());
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> penalty_backward_cpu(
    const at::Tensor& grad_penalty, at::TensorList tensors, at::TensorList catalysts, const at::Tensor& norms,
    const c10::optional<at::Tensor>& plan_table) {
  const Plan plan = build_plan(tensors, catalysts, plan_table);
  const auto acc_type = accumulation_dtype(tensors[0].scalar_type());
  check_norms(norms, plan, acc_type);
  TORCH_CHECK_VALUE(grad_penalty.numel() == 1, "catalyst_fused: grad_penalty must have one element, got shape ",
                    grad_penalty.sizes());
  std::vector<at::Tensor> weight_grads;
  std::vector<at::Tensor> catalyst_grads;
  weight_grads.reserve(tensors.size());
  catalyst_grads.reserve(catalysts.size());
  for (const auto& t : tensors) weight_grads.push_back(at::empty_like(t, at::MemoryFormat::Contiguous));
  for (const auto& d : catalysts) catalyst_grads.push_back(at::empty_like(d, at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "penalty_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t g = grad_penalty.item<acc_t>();
    const acc_t* n = norms.const_data_ptr<acc_t>();
    auto out = mutable_pointers<scalar_t>(weight_grads);
    gradient_pass</*kAccumulate=*/false, scalar_t, acc_t>(plan, tensors, catalysts, n, g, out.data());
    for (size_t s = 0; s < catalysts.size(); ++s) {
      const scalar_t* d = catalysts[s].const_data_ptr<scalar_t>();
      scalar_t* gd = catalyst_grads[s].mutable_data_ptr<scalar_t>();
      const acc_t* ns = n + plan.segment_offsets[s];
      for (int64_t j = 0; j < catalysts[s].numel(); ++j) {
        gd[j] = static_cast<scalar_t>(g * catalyst_grad(static_cast<acc_t>(d[j]), ns[j]));
      }
    }
  });
  return {weight_grads, catalyst_grads};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> penalty_accumulate_cpu(at::TensorList tensors, at::TensorList catalysts,
                                                                        at::TensorList weight_grads,
                                                                        at::TensorList catalyst_grads, double scale,
                                                                        const c10::optional<at::Tensor>& plan_table) {
  const Plan plan = build_plan(tensors, catalysts, plan_table);
  check_grads(weight_grads, tensors, "weight_grads", "weights");
  check_grads(catalyst_grads, catalysts, "catalyst_grads", "catalysts");
  const auto acc_type = accumulation_dtype(tensors[0].scalar_type());
  const auto options = tensors[0].options().dtype(acc_type);
  at::Tensor norms = at::empty({plan.num_groups}, options);
  at::Tensor ratios = at::empty({plan.num_groups}, options);
  at::Tensor penalty;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "penalty_accumulate_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t s = static_cast<acc_t>(scale);
    auto gd = mutable_pointers<scalar_t>(catalyst_grads);
    const acc_t value = norm_pass<scalar_t, acc_t>(plan, tensors, catalysts, norms.mutable_data_ptr<acc_t>(),
                                                   ratios.mutable_data_ptr<acc_t>(), gd.data(), s);
    auto gw = mutable_pointers<scalar_t>(weight_grads);
    gradient_pass</*kAccumulate=*/true, scalar_t, acc_t>(plan, tensors, catalysts, norms.const_data_ptr<acc_t>(), s,
                                                         gw.data());
    penalty = at::scalar_tensor(value, options);
  });
  return {penalty, norms, ratios};
}

}  // namespace

TORCH_LIBRARY_IMPL(catalyst_fused, CPU, m) {
  m.impl("penalty_forward", &penalty_forward_cpu);
  m.impl("penalty_backward", &penalty_backward_cpu);
  m.impl("penalty_accumulate_", &penalty_accumulate_cpu);
}

}  // namespace catalyst_fused
