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

// For j in [0, count): sq[j] += sum over o < outer, e < inner of x^2, x = base[o * outer_stride + j * slice_stride + e].
#define CF_DECLARE_LEAF_KERNELS(scalar_t, acc_t)                                                                  \
  void add_sums_of_squares(const scalar_t* base, int64_t count, int64_t slice_stride, int64_t outer,             \
                           int64_t outer_stride, int64_t inner, acc_t* sq);                                     \
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
