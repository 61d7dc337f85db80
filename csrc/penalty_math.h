// Per-group math of the Catalyst penalty R = sum_i |d_i| * n_i, shared by every backend.
//
// Kept free of ATen so that the CPU build compiles exactly the functions a CUDA build would call
// (the CPU tests then exercise them). Conventions (docs: README "Math and conventions"):
//   * n_i == 0       -> weight-gradient scale 0 and ratio c_i = +inf (a zero filter is always prunable);
//   * d_i == 0       -> sign(d_i) = 0;
//   * NaN in d or n  -> propagates: the penalty, c_i, dR/dd_i and the group's weight gradients are NaN
//                       (never turned into a finite value; note that torch.sign(NaN) is 0, so the
//                       reference does not use it for the catalyst gradient either). An Inf catalyst on
//                       an all-zero group likewise gives a NaN weight-gradient scale (Inf * 0).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CF_HOST_DEVICE __host__ __device__
#else
#define CF_HOST_DEVICE
#endif

namespace catalyst_fused {

// Columns of the member table (an int64 [num_members, kMemberColumns] tensor built by GroupLayout).
// A member takes slices [start, start + count) of `tensor` along `dim` (0: rows, 1: input columns);
// `width` >= 1 consecutive slices form one group (count % width == 0): slice start + k belongs to group
// segment_start + k / width of catalyst segment `segment`, so the member covers groups
// [segment_start, segment_start + count / width). width = 1 is one slice per group.
enum MemberColumn : int64_t {
  kMemberTensor = 0,
  kMemberDim = 1,
  kMemberStart = 2,
  kMemberCount = 3,
  kMemberSegment = 4,
  kMemberSegmentStart = 5,
  kMemberWidth = 6,
  kMemberColumns = 7,
};

// c_i = |d_i| / n_i, +inf for an all-zero group (NaN if d_i is NaN).
template <typename acc_t>
CF_HOST_DEVICE inline acc_t catalyst_ratio(acc_t abs_d, acc_t norm) {
  return norm == acc_t(0) ? (abs_d != abs_d ? abs_d : std::numeric_limits<acc_t>::infinity()) : abs_d / norm;
}

// dR/dF_i = (|d_i| / n_i) * F_i; the scale is 0 for an all-zero group (subgradient convention), computed
// as |d_i| * 0 so that a NaN or Inf catalyst still gives NaN. Written as `norm == 0 ? ... : ...` rather
// than `norm > 0 ? ... : ...` so that a NaN norm stays NaN.
template <typename acc_t>
CF_HOST_DEVICE inline acc_t weight_grad_scale(acc_t abs_d, acc_t norm) {
  return norm == acc_t(0) ? abs_d * acc_t(0) : abs_d / norm;
}

// sign with sign(0) = 0 and sign(NaN) = NaN. (Unlike torch.sign, which maps NaN to 0: the reference
// builds its own NaN-preserving sign to agree with this.)
template <typename acc_t>
CF_HOST_DEVICE inline acc_t signum(acc_t x) {
  return x > acc_t(0) ? acc_t(1) : (x < acc_t(0) ? acc_t(-1) : x * acc_t(0));
}

// dR/dd_i = sign(d_i) * n_i.
template <typename acc_t>
CF_HOST_DEVICE inline acc_t catalyst_grad(acc_t d, acc_t norm) {
  return signum(d) * norm;
}

}  // namespace catalyst_fused
