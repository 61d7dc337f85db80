// CPU kernel of the soft-threshold operator (csrc/soft_threshold.h): one pass over every element of every
// tensor (read the source, write the weight, count the zeros written), cut into chunks of
// soft_threshold::kChunkElements and spread with at::parallel_for. Counts are integers, so they do not
// depend on the thread count. The fp32/fp64 loops are compiled for AVX-512, AVX2 and baseline x86-64
// (chosen at load time), like the penalty's leaf kernels.
#include "../soft_threshold.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace catalyst_fused {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CF_ST_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CF_ST_MULTIVERSION
#endif

// dst[i] = |x| <= t ? 0 : copysign(|x| - t, x) for x = src[i] in acc_t, rounded to scalar_t; returns the
// number of zeros written. src may equal dst (in place). A NaN fails the comparison and stays NaN.
template <typename scalar_t, typename acc_t>
inline int64_t threshold_range(const scalar_t* src, scalar_t* dst, int64_t n, acc_t t) {
  int64_t zeros = 0;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t x = static_cast<acc_t>(src[i]);
    const acc_t a = std::abs(x);
    const scalar_t out = static_cast<scalar_t>(a <= t ? acc_t(0) : std::copysign(a - t, x));
    dst[i] = out;
    zeros += static_cast<acc_t>(out) == acc_t(0);
  }
  return zeros;
}

// Chunks are at most 2^14 elements, so an int32 count per chunk cannot overflow (and vectorises better).
CF_ST_MULTIVERSION int64_t threshold_f32(const float* src, float* dst, int64_t n, float t) {
  int32_t zeros = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float x = src[i];
    const float a = std::fabs(x);
    const float out = a <= t ? 0.0f : std::copysign(a - t, x);
    dst[i] = out;
    zeros += out == 0.0f;
  }
  return zeros;
}

CF_ST_MULTIVERSION int64_t threshold_f64(const double* src, double* dst, int64_t n, double t) {
  int32_t zeros = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = src[i];
    const double a = std::fabs(x);
    const double out = a <= t ? 0.0 : std::copysign(a - t, x);
    dst[i] = out;
    zeros += out == 0.0;
  }
  return zeros;
}

template <typename scalar_t, typename acc_t>
inline int64_t threshold_chunk(const scalar_t* src, scalar_t* dst, int64_t n, acc_t t) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return threshold_f32(src, dst, n, t);
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    return threshold_f64(src, dst, n, t);
  } else {
    return threshold_range<scalar_t, acc_t>(src, dst, n, t);
  }
}

at::Tensor soft_threshold_cpu(at::TensorList weights, c10::optional<at::TensorList> sources, at::ArrayRef<double> thresholds) {
  soft_threshold::check_args(weights, sources, thresholds);
  const std::vector<soft_threshold::Chunk> chunks = soft_threshold::make_chunks(weights);
  std::vector<int64_t> chunk_zeros(chunks.size(), 0);
  int64_t total = 0;
  for (const at::Tensor& w : weights) total += w.numel();
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  // Small models stay on the calling thread: an OpenMP region costs more than the work.
  const int64_t grain = total >= 4 * soft_threshold::kChunkElements ? 1 : std::max<int64_t>(n_chunks, 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "soft_threshold_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<scalar_t*> dst(weights.size());
    std::vector<const scalar_t*> src(weights.size());
    std::vector<acc_t> t(weights.size());
    for (size_t i = 0; i < weights.size(); ++i) {
      dst[i] = weights[i].numel() ? weights[i].data_ptr<scalar_t>() : nullptr;
      src[i] = sources.has_value() ? ((*sources)[i].numel() ? (*sources)[i].const_data_ptr<scalar_t>() : nullptr) : dst[i];
      t[i] = static_cast<acc_t>(thresholds[i]);  // rounded once, as the reference does
    }
    at::parallel_for(0, n_chunks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const soft_threshold::Chunk& k = chunks[c];
        chunk_zeros[c] = threshold_chunk<scalar_t, acc_t>(src[k.tensor] + k.begin, dst[k.tensor] + k.begin,
                                                           k.end - k.begin, t[k.tensor]);
      }
    });
  });
  at::Tensor counts = at::empty({static_cast<int64_t>(weights.size())}, at::TensorOptions().dtype(at::kLong));
  int64_t* out = counts.data_ptr<int64_t>();
  std::fill(out, out + weights.size(), 0);
  for (size_t c = 0; c < chunks.size(); ++c) out[chunks[c].tensor] += chunk_zeros[c];
  return counts;
}

}  // namespace
}  // namespace catalyst_fused

TORCH_LIBRARY_IMPL(catalyst_fused, CPU, m) {
  m.impl("soft_threshold_", &catalyst_fused::soft_threshold_cpu);
}
