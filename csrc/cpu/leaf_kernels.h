// The innermost loops of the CPU kernels, one set per dtype. Their bodies (leaf_kernels.cpp) are compiled
// several times for different x86-64 levels (AVX-512, AVX2+FMA, baseline) and picked at load time, so
// one binary is both portable and vectorised for the machine it runs on.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace catalyst_fused {
namespace cpu {

// Accumulator lanes per sum of squares: independent partial sums that the compiler maps onto SIMD
// registers (two AVX-512 or four AVX2 vectors of fp32). Tests use row lengths around it.
constexpr int kLanes = 16;

// The loops of the two streaming passes (penalty_cpu.cpp). A "block" is `rows` consecutive rows of `len`
// elements each, starting at `w` (a contiguous run of a tensor viewed as [rows, len]).
#define CF_DECLARE_LEAF_KERNELS(scalar_t, acc_t)                                                                  \
  /* row_out[r] = sum_j w[r, j]^2 */                                                                            \
  void rows_sum_squares(const scalar_t* w, int64_t rows, int64_t len, acc_t* row_out);                         \
  /* row_out[r] = sum_j w[r, j]^2 and elem_acc[j] += sum_r w[r, j]^2, in one read of the block */             \
  void rows_cols_sum_squares(const scalar_t* w, int64_t rows, int64_t len, acc_t* row_out, acc_t* elem_acc);   \
  /* out[r, j] = row_factor[r] * w[r, j]   (accumulate: out[r, j] += ...) */                                   \
  void rows_scale(scalar_t* out, const scalar_t* w, int64_t rows, int64_t len, const acc_t* row_factor,        \
                  bool accumulate);                                                                             \
  /* out[r, j] = (row_factor[r] + col_factor[j]) * w[r, j]   (accumulate: out[r, j] += ...) */                 \
  void rows_cols_scale(scalar_t* out, const scalar_t* w, int64_t rows, int64_t len, const acc_t* row_factor,   \
                       const acc_t* col_factor, bool accumulate);                                               \
  /* out[i] = factor * w[i] */                                                                                  \
  void scale_store(scalar_t* out, const scalar_t* w, acc_t factor, int64_t n);                                  \
  /* out[i] += factor * w[i] */                                                                                 \
  void scale_add(scalar_t* out, const scalar_t* w, acc_t factor, int64_t n);

CF_DECLARE_LEAF_KERNELS(float, float)
CF_DECLARE_LEAF_KERNELS(double, double)
CF_DECLARE_LEAF_KERNELS(c10::Half, float)
CF_DECLARE_LEAF_KERNELS(c10::BFloat16, float)

}  // namespace cpu
}  // namespace catalyst_fused
