#include "leaf_kernels.h"

#include <cstring>

namespace catalyst_fused {
namespace cpu {
namespace {

// Every helper is forced inline into the multi-versioned entry points below, so that it is compiled for
// each clone's instruction set (a helper left out of line is compiled once, for baseline x86-64).
#if defined(__GNUC__)
#define CF_INLINE inline __attribute__((always_inline))
#else
#define CF_INLINE inline
#endif

// Sum of `lanes` independent partial sums of squares over p[0, n - n % lanes), combined pairwise
// (which keeps the rounding error of long rows small); *done is advanced past what was summed.
template <int lanes, typename scalar_t, typename acc_t>
CF_INLINE acc_t lane_sum_of_squares(const scalar_t* p, int64_t n, int64_t* done) {
  acc_t acc[lanes] = {};
  int64_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    for (int l = 0; l < lanes; ++l) {
      const acc_t v = static_cast<acc_t>(p[i + l]);
      acc[l] += v * v;
    }
  }
  for (int width = lanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) acc[l] += acc[l + width];
  }
  *done = i;
  return acc[0];
}

template <typename scalar_t, typename acc_t>
CF_INLINE acc_t sum_of_squares(const scalar_t* p, int64_t n) {
  // Wide lanes for long rows; short rows (a 3x3 conv over 3 channels has 27) would spend more time
  // combining 32 lanes than summing, so they take 8 lanes and a scalar tail.
  acc_t total = 0;
  int64_t done = 0;
  if (n >= kLanes) {
    total += lane_sum_of_squares<kLanes, scalar_t, acc_t>(p, n, &done);
    p += done;
    n -= done;
  }
  if (n >= 8) {
    total += lane_sum_of_squares<8, scalar_t, acc_t>(p, n, &done);
    p += done;
    n -= done;
  }
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(p[i]);
    total += v * v;
  }
  return total;
}

// fp32 and fp64 rows use GCC vector types: in each multi-versioned clone they become that level's
// widest registers, and the horizontal sum at the end of a row is a few shuffles instead of a serial
// chain (which dominated rows of a few hundred elements).
typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef double f64x8 __attribute__((vector_size(64)));
typedef double f64x4 __attribute__((vector_size(32)));
typedef double f64x2 __attribute__((vector_size(16)));

CF_INLINE float horizontal_sum(f32x16 v) {
  const f32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const f32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

CF_INLINE float horizontal_sum(f32x8 v) {
  const f32x4 b = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

CF_INLINE float horizontal_sum(f32x4 b) { return (b[0] + b[2]) + (b[1] + b[3]); }

CF_INLINE double horizontal_sum(f64x4 a) { return (a[0] + a[2]) + (a[1] + a[3]); }

CF_INLINE double horizontal_sum(f64x2 b) { return b[0] + b[1]; }

CF_INLINE double horizontal_sum(f64x8 v) {
  const f64x4 a = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  const f64x2 b = __builtin_shufflevector(a, a, 0, 1) + __builtin_shufflevector(a, a, 2, 3);
  return b[0] + b[1];
}

// Squares of p[i, i + width of vec_t) added into acc; i advanced. Used with the full, half and quarter
// widths so that a row's tail costs at most three scalar steps.
template <typename vec_t, typename scalar_t>
CF_INLINE void add_block(const scalar_t* p, int64_t n, int64_t& i, vec_t& acc) {
  constexpr int width = sizeof(vec_t) / sizeof(scalar_t);
  if (i + width <= n) {
    vec_t x;
    std::memcpy(&x, p + i, sizeof(vec_t));  // an unaligned vector load
    acc += x * x;
    i += width;
  }
}

template <typename full_t, typename half_t, typename quarter_t, typename scalar_t>
CF_INLINE scalar_t vector_sum_of_squares(const scalar_t* p, int64_t n) {
  constexpr int width = sizeof(full_t) / sizeof(scalar_t);
  full_t a0 = {}, a1 = {};
  int64_t i = 0;
  for (; i + 2 * width <= n; i += 2 * width) {
    full_t x0, x1;
    std::memcpy(&x0, p + i, sizeof(full_t));
    std::memcpy(&x1, p + i + width, sizeof(full_t));
    a0 += x0 * x0;
    a1 += x1 * x1;
  }
  add_block(p, n, i, a0);
  half_t h = {};
  quarter_t q = {};
  add_block(p, n, i, h);
  add_block(p, n, i, q);
  scalar_t total = horizontal_sum(a0 + a1) + horizontal_sum(h) + horizontal_sum(q);
  for (; i < n; ++i) total += p[i] * p[i];
  return total;
}

template <>
CF_INLINE float sum_of_squares<float, float>(const float* p, int64_t n) {
  return vector_sum_of_squares<f32x16, f32x8, f32x4>(p, n);
}

template <>
CF_INLINE double sum_of_squares<double, double>(const double* p, int64_t n) {
  return vector_sum_of_squares<f64x8, f64x4, f64x2>(p, n);
}

// ---- Squares of a row added into per-element accumulators, and the row's own sum, in one read ----------

// Generic (fp16/bf16 rows, fp32 accumulation): kLanes independent row sums the compiler keeps in vector
// registers; elem[j] += x_j^2 is an elementwise vector update.
template <typename scalar_t, typename acc_t>
CF_INLINE acc_t squares_into(const scalar_t* __restrict__ p, int64_t n, acc_t* __restrict__ elem) {
  acc_t acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const acc_t v = static_cast<acc_t>(p[i + l]);
      const acc_t q = v * v;
      elem[i + l] += q;
      acc[l] += q;
    }
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) acc[l] += acc[l + width];
  }
  acc_t total = acc[0];
  for (; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(p[i]);
    const acc_t q = v * v;
    elem[i] += q;
    total += q;
  }
  return total;
}

// Adds x^2 of p[i, i + width of vec_t) into elem and acc; i advanced.
template <typename vec_t, typename scalar_t>
CF_INLINE void add_block_into(const scalar_t* p, scalar_t* elem, int64_t n, int64_t& i, vec_t& acc) {
  constexpr int width = sizeof(vec_t) / sizeof(scalar_t);
  if (i + width <= n) {
    vec_t x, e;
    std::memcpy(&x, p + i, sizeof(vec_t));
    std::memcpy(&e, elem + i, sizeof(vec_t));
    const vec_t q = x * x;
    e += q;
    std::memcpy(elem + i, &e, sizeof(vec_t));
    acc += q;
    i += width;
  }
}

// fp32/fp64 rows: GCC vector types (the widest registers of each multi-versioned clone).
template <typename full_t, typename half_t, typename quarter_t, typename scalar_t>
CF_INLINE scalar_t vector_squares_into(const scalar_t* p, int64_t n, scalar_t* elem) {
  constexpr int width = sizeof(full_t) / sizeof(scalar_t);
  full_t a0 = {}, a1 = {};
  int64_t i = 0;
  for (; i + 2 * width <= n; i += 2 * width) {
    full_t x0, x1, e0, e1;
    std::memcpy(&x0, p + i, sizeof(full_t));
    std::memcpy(&x1, p + i + width, sizeof(full_t));
    std::memcpy(&e0, elem + i, sizeof(full_t));
    std::memcpy(&e1, elem + i + width, sizeof(full_t));
    const full_t q0 = x0 * x0;
    const full_t q1 = x1 * x1;
    e0 += q0;
    e1 += q1;
    std::memcpy(elem + i, &e0, sizeof(full_t));
    std::memcpy(elem + i + width, &e1, sizeof(full_t));
    a0 += q0;
    a1 += q1;
  }
  add_block_into(p, elem, n, i, a0);
  half_t h = {};
  quarter_t q = {};
  add_block_into(p, elem, n, i, h);
  add_block_into(p, elem, n, i, q);
  scalar_t total = horizontal_sum(a0 + a1) + horizontal_sum(h) + horizontal_sum(q);
  for (; i < n; ++i) {
    const scalar_t sq = p[i] * p[i];
    elem[i] += sq;
    total += sq;
  }
  return total;
}

template <>
CF_INLINE float squares_into<float, float>(const float* __restrict__ p, int64_t n, float* __restrict__ elem) {
  return vector_squares_into<f32x16, f32x8, f32x4>(p, n, elem);
}

template <>
CF_INLINE double squares_into<double, double>(const double* __restrict__ p, int64_t n, double* __restrict__ elem) {
  return vector_squares_into<f64x8, f64x4, f64x2>(p, n, elem);
}

template <typename scalar_t, typename acc_t>
CF_INLINE void rows_sum_squares_impl(const scalar_t* w, int64_t rows, int64_t len, acc_t* row_out) {
  if (len == 1) {  // BN scales and biases: one element per group
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t v = static_cast<acc_t>(w[r]);
      row_out[r] = v * v;
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r) row_out[r] = sum_of_squares<scalar_t, acc_t>(w + r * len, len);
}

// Four rows at a time: out[r] = sum of squares of row r, elem[j] += sum over the four rows of x_rj^2, so the
// per-element accumulators are loaded and stored once per four rows read.
template <typename scalar_t, typename acc_t>
CF_INLINE void four_rows_into(const scalar_t* __restrict__ p, int64_t len, int64_t n, acc_t* __restrict__ elem,
                              acc_t* out) {
  acc_t acc[4][kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      acc_t sum = 0;
      for (int r = 0; r < 4; ++r) {
        const acc_t v = static_cast<acc_t>(p[r * len + i + l]);
        const acc_t q = v * v;
        acc[r][l] += q;
        sum += q;
      }
      elem[i + l] += sum;
    }
  }
  acc_t tail[4] = {};
  for (; i < n; ++i) {
    acc_t sum = 0;
    for (int r = 0; r < 4; ++r) {
      const acc_t v = static_cast<acc_t>(p[r * len + i]);
      const acc_t q = v * v;
      tail[r] += q;
      sum += q;
    }
    elem[i] += sum;
  }
  for (int r = 0; r < 4; ++r) {
    for (int width = kLanes / 2; width > 0; width /= 2) {
      for (int l = 0; l < width; ++l) acc[r][l] += acc[r][l + width];
    }
    out[r] = acc[r][0] + tail[r];
  }
}

// fp32/fp64: the same with GCC vector types.
template <typename vec_t, typename scalar_t>
CF_INLINE void vector_four_rows_into(const scalar_t* p, int64_t len, int64_t n, scalar_t* elem, scalar_t* out) {
  constexpr int width = sizeof(vec_t) / sizeof(scalar_t);
  vec_t a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t i = 0;
  for (; i + width <= n; i += width) {
    vec_t x0, x1, x2, x3, e;
    std::memcpy(&x0, p + i, sizeof(vec_t));
    std::memcpy(&x1, p + len + i, sizeof(vec_t));
    std::memcpy(&x2, p + 2 * len + i, sizeof(vec_t));
    std::memcpy(&x3, p + 3 * len + i, sizeof(vec_t));
    std::memcpy(&e, elem + i, sizeof(vec_t));
    const vec_t q0 = x0 * x0, q1 = x1 * x1, q2 = x2 * x2, q3 = x3 * x3;
    a0 += q0;
    a1 += q1;
    a2 += q2;
    a3 += q3;
    e += (q0 + q1) + (q2 + q3);
    std::memcpy(elem + i, &e, sizeof(vec_t));
  }
  scalar_t t0 = 0, t1 = 0, t2 = 0, t3 = 0;
  for (; i < n; ++i) {
    const scalar_t q0 = p[i] * p[i], q1 = p[len + i] * p[len + i];
    const scalar_t q2 = p[2 * len + i] * p[2 * len + i], q3 = p[3 * len + i] * p[3 * len + i];
    t0 += q0;
    t1 += q1;
    t2 += q2;
    t3 += q3;
    elem[i] += (q0 + q1) + (q2 + q3);
  }
  out[0] = horizontal_sum(a0) + t0;
  out[1] = horizontal_sum(a1) + t1;
  out[2] = horizontal_sum(a2) + t2;
  out[3] = horizontal_sum(a3) + t3;
}

template <>
CF_INLINE void four_rows_into<float, float>(const float* __restrict__ p, int64_t len, int64_t n,
                                            float* __restrict__ elem, float* out) {
  vector_four_rows_into<f32x16>(p, len, n, elem, out);
}

template <>
CF_INLINE void four_rows_into<double, double>(const double* __restrict__ p, int64_t len, int64_t n,
                                              double* __restrict__ elem, double* out) {
  vector_four_rows_into<f64x8>(p, len, n, elem, out);
}

template <typename scalar_t, typename acc_t>
CF_INLINE void rows_cols_sum_squares_impl(const scalar_t* w, int64_t rows, int64_t len, acc_t* row_out,
                                          acc_t* elem_acc) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) four_rows_into<scalar_t, acc_t>(w + r * len, len, len, elem_acc, row_out + r);
  for (; r < rows; ++r) row_out[r] = squares_into<scalar_t, acc_t>(w + r * len, len, elem_acc);
}

template <typename scalar_t, typename acc_t>
CF_INLINE void rows_scale_impl(scalar_t* __restrict__ out, const scalar_t* __restrict__ w, int64_t rows, int64_t len,
                            const acc_t* __restrict__ row_factor, bool accumulate) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t f = row_factor[r];
    scalar_t* __restrict__ o = out + r * len;
    const scalar_t* __restrict__ x = w + r * len;
    if (accumulate) {
      for (int64_t j = 0; j < len; ++j) o[j] = static_cast<scalar_t>(static_cast<acc_t>(o[j]) + f * static_cast<acc_t>(x[j]));
    } else {
      for (int64_t j = 0; j < len; ++j) o[j] = static_cast<scalar_t>(f * static_cast<acc_t>(x[j]));
    }
  }
}

template <typename scalar_t, typename acc_t>
CF_INLINE void rows_cols_scale_impl(scalar_t* __restrict__ out, const scalar_t* __restrict__ w, int64_t rows,
                                 int64_t len, const acc_t* __restrict__ row_factor,
                                 const acc_t* __restrict__ col_factor, bool accumulate) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t f = row_factor[r];
    scalar_t* __restrict__ o = out + r * len;
    const scalar_t* __restrict__ x = w + r * len;
    if (accumulate) {
      for (int64_t j = 0; j < len; ++j) {
        o[j] = static_cast<scalar_t>(static_cast<acc_t>(o[j]) + (f + col_factor[j]) * static_cast<acc_t>(x[j]));
      }
    } else {
      for (int64_t j = 0; j < len; ++j) o[j] = static_cast<scalar_t>((f + col_factor[j]) * static_cast<acc_t>(x[j]));
    }
  }
}

}  // namespace

// GCC function multi-versioning: one clone per level, chosen by an ifunc resolver at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CF_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CF_MULTIVERSION
#endif

#define CF_DEFINE_LEAF_KERNELS(scalar_t, acc_t)                                                                   \
  CF_MULTIVERSION void rows_sum_squares(const scalar_t* w, int64_t rows, int64_t len, acc_t* row_out) {         \
    rows_sum_squares_impl<scalar_t, acc_t>(w, rows, len, row_out);                                              \
  }                                                                                                             \
  CF_MULTIVERSION void rows_cols_sum_squares(const scalar_t* w, int64_t rows, int64_t len, acc_t* row_out,      \
                                             acc_t* elem_acc) {                                                 \
    rows_cols_sum_squares_impl<scalar_t, acc_t>(w, rows, len, row_out, elem_acc);                               \
  }                                                                                                             \
  CF_MULTIVERSION void rows_scale(scalar_t* out, const scalar_t* w, int64_t rows, int64_t len,                  \
                                  const acc_t* row_factor, bool accumulate) {                                   \
    rows_scale_impl<scalar_t, acc_t>(out, w, rows, len, row_factor, accumulate);                                \
  }                                                                                                             \
  CF_MULTIVERSION void rows_cols_scale(scalar_t* out, const scalar_t* w, int64_t rows, int64_t len,             \
                                       const acc_t* row_factor, const acc_t* col_factor, bool accumulate) {     \
    rows_cols_scale_impl<scalar_t, acc_t>(out, w, rows, len, row_factor, col_factor, accumulate);               \
  }                                                                                                             \
  CF_MULTIVERSION void scale_store(scalar_t* out, const scalar_t* w, acc_t factor, int64_t n) {                  \
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(factor * static_cast<acc_t>(w[i]));           \
  }                                                                                                             \
  CF_MULTIVERSION void scale_add(scalar_t* out, const scalar_t* w, acc_t factor, int64_t n) {                    \
    for (int64_t i = 0; i < n; ++i) {                                                                           \
      out[i] = static_cast<scalar_t>(static_cast<acc_t>(out[i]) + factor * static_cast<acc_t>(w[i]));           \
    }                                                                                                           \
  }

CF_DEFINE_LEAF_KERNELS(float, float)
CF_DEFINE_LEAF_KERNELS(double, double)
CF_DEFINE_LEAF_KERNELS(c10::Half, float)
CF_DEFINE_LEAF_KERNELS(c10::BFloat16, float)

}  // namespace cpu
}  // namespace catalyst_fused
