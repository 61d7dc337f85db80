// CPU kernels of the fused Catalyst penalty: one streaming pass over the weights per phase, for any layout.
//
// The work unit is a *block*: consecutive rows of one tensor (about kChunkElements elements; at least
// kMinColumnBlockRows rows when the tensor has column groups). Every element of every tensor sits in at
// most one row group and at most one column group (plan.h: slice maps), so
//
//   norm pass      reads each block once: the sum of squares of every row (-> its row group) and, for a
//                  tensor with column groups, the per-column sums of squares of the block (-> a per-block
//                  partial, one value per input column). Then, per run of groups, each group's sum is
//                  assembled from its rows and its columns (column partials summed over the tensor's blocks
//                  in block order), and n, c, the penalty and (in-place op) the catalyst gradients and the
//                  weight-gradient factors f_g = scale * |d_g| / n_g follow;
//   gradient pass  reads each block once and writes (row factor + column factor) * w into the gradient
//                  (or adds it), with the column factors expanded once per tensor to one per element of a row.
//
// Blocks are spread over the threads in parts of about equal elements (at::parallel_for; OpenMP). Which
// block a row belongs to, the order of every sum and the penalty's per-run partials (added in a fixed
// order, in double) do not depend on the thread count, so results are bitwise identical for any number of
// threads. Scratch memory comes from a pool kept between calls (buffers.h), as do the gradient buffers
// penalty_backward returns.
#include "../penalty_math.h"
#include "../plan.h"
#include "buffers.h"
#include "leaf_kernels.h"
#include "penalty_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace catalyst_fused {
namespace {

// Tests use sizes around these (tests/test_penalty_cpu.py, tests/test_layout.py).
constexpr int64_t kMinColumnBlockRows = 16;
// Below this many elements a call stays on the calling thread: an OpenMP region costs more than the work.
constexpr int64_t kParallelElements = 4 * kChunkElements;

struct TensorInfo {
  int64_t rows = 0;
  int64_t len = 0;                // elements per row
  int64_t columns = 0;            // size(1) if the tensor has column members, else 0
  int64_t inner = 0;              // elements per input column and row: len / columns
  int64_t block_begin = 0;
  int64_t block_end = 0;
  int64_t partial_offset = 0;     // column partials of its blocks: [block_end - block_begin, columns]
  int64_t col_factor_offset = 0;  // expanded column factors: [len]
};

struct Block {
  int64_t tensor;
  int64_t row_begin;
  int64_t row_end;
};

struct Schedule {
  std::vector<TensorInfo> tensors;
  std::vector<Block> blocks;
  std::vector<int64_t> column_tensors;  // tensors with column groups
  // Runs [first, end) of consecutive input columns that belong to a column group: those of tensor t are
  // runs[run_offsets[t], run_offsets[t + 1]).
  std::vector<int64_t> run_offsets;
  std::vector<std::pair<int64_t, int64_t>> runs;
  std::vector<int64_t> parts;  // [P + 1]: block ranges of about equal elements
  int64_t partial_size = 0;
  int64_t col_factor_size = 0;
  int64_t max_block_rows = 1;
  int64_t max_column_len = 1;
  int64_t elements = 0;
  int64_t num_parts() const { return static_cast<int64_t>(parts.size()) - 1; }
  bool parallel() const { return num_parts() > 1; }
};

Schedule make_schedule(const Plan& plan, at::TensorList tensors) {
  Schedule s;
  const int64_t T = static_cast<int64_t>(tensors.size());
  s.tensors.resize(T);
  std::vector<int64_t> block_elements;
  for (int64_t t = 0; t < T; ++t) {
    TensorInfo& info = s.tensors[t];
    const at::Tensor& x = tensors[t];
    info.rows = x.size(0);
    info.len = info.rows > 0 ? x.numel() / info.rows : 0;
    if (plan.has_columns(t)) {
      info.columns = x.size(1);
      info.inner = info.len / info.columns;
    }
    info.block_begin = static_cast<int64_t>(s.blocks.size());
    if (x.numel() > 0) {
      int64_t per = std::max<int64_t>(1, (kChunkElements + info.len - 1) / info.len);
      if (info.columns > 0) per = std::max(per, kMinColumnBlockRows);
      for (int64_t r = 0; r < info.rows; r += per) {
        const int64_t end = std::min(info.rows, r + per);
        s.blocks.push_back({t, r, end});
        block_elements.push_back((end - r) * info.len);
        s.max_block_rows = std::max(s.max_block_rows, end - r);
      }
    }
    info.block_end = static_cast<int64_t>(s.blocks.size());
    if (info.columns > 0) {
      s.column_tensors.push_back(t);
      info.partial_offset = s.partial_size;
      s.partial_size += (info.block_end - info.block_begin) * info.columns;
      info.col_factor_offset = s.col_factor_size;
      s.col_factor_size += info.len;
      s.max_column_len = std::max(s.max_column_len, info.len);
    }
    s.elements += x.numel();
  }
  s.run_offsets.assign(T + 1, 0);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t* groups = plan.column_group.data() + plan.tensor_column_offsets[t];
    for (int64_t c = 0; c < s.tensors[t].columns;) {
      if (groups[c] < 0) {
        ++c;
        continue;
      }
      const int64_t first = c;
      while (c < s.tensors[t].columns && groups[c] >= 0) ++c;
      s.runs.emplace_back(first, c);
    }
    s.run_offsets[t + 1] = static_cast<int64_t>(s.runs.size());
  }
  const int64_t B = static_cast<int64_t>(s.blocks.size());
  const int64_t P = s.elements >= kParallelElements ? std::min<int64_t>(at::get_num_threads(), B) : 1;
  s.parts.assign(1, 0);
  int64_t done = 0;
  int64_t b = 0;
  for (int64_t p = 1; p < P; ++p) {
    const int64_t target = s.elements * p / P;
    while (b < B && done + block_elements[b] <= target) done += block_elements[b++];
    s.parts.push_back(b);
  }
  s.parts.push_back(B);
  return s;
}

// ---- Plans reused between calls -------------------------------------------------------------------------
//
// A training step calls the operators with the same shapes and member table every time: the plan (slice
// maps, chunks) and the schedule are kept for the last few (shapes, table, thread count) seen, so that a
// call only validates its tensors (validate_tensors: dtype, device, contiguity, shared memory) and compares
// the key. A plan is rebuilt (and so re-validated in full) whenever any of it differs.
struct Prepared {
  std::vector<int64_t> shape_key;  // [T, S, threads, dims and sizes of every tensor, numel of every catalyst]
  std::vector<int64_t> table;      // the member table's content (empty: per-row layout)
  bool has_table = false;
  Plan plan;
  Schedule schedule;
};

std::vector<int64_t> shape_key(at::TensorList tensors, at::TensorList catalysts) {
  std::vector<int64_t> key = {static_cast<int64_t>(tensors.size()), static_cast<int64_t>(catalysts.size()),
                              static_cast<int64_t>(at::get_num_threads())};
  for (const at::Tensor& t : tensors) {
    key.push_back(t.dim());
    key.insert(key.end(), t.sizes().begin(), t.sizes().end());
  }
  for (const at::Tensor& d : catalysts) key.push_back(d.numel());
  return key;
}

constexpr size_t kKeptPlans = 8;

// check_memory=false: the caller runs check_distinct over all its tensor lists itself.
std::shared_ptr<const Prepared> prepare(at::TensorList tensors, at::TensorList catalysts,
                                        const c10::optional<at::Tensor>& plan_table, bool check_memory = true) {
  static std::mutex mutex;
  static std::vector<std::shared_ptr<const Prepared>> kept;  // most recently used first
  validate_tensors(tensors, catalysts, check_memory);
  const bool has_table = plan_table.has_value() && plan_table->defined();
  const bool readable_table = has_table && plan_table->device().is_cpu() && plan_table->scalar_type() == at::kLong &&
                              plan_table->dim() == 2 && plan_table->is_contiguous();
  std::vector<int64_t> key = shape_key(tensors, catalysts);
  if (!has_table || readable_table) {
    const int64_t* table = readable_table ? plan_table->const_data_ptr<int64_t>() : nullptr;
    const size_t table_size = readable_table ? static_cast<size_t>(plan_table->numel()) : 0;
    std::lock_guard<std::mutex> lock(mutex);
    for (size_t i = 0; i < kept.size(); ++i) {
      const Prepared& p = *kept[i];
      if (p.has_table != has_table || p.shape_key != key || p.table.size() != table_size) continue;
      if (table_size > 0 && std::memcmp(p.table.data(), table, table_size * sizeof(int64_t)) != 0) continue;
      std::shared_ptr<const Prepared> hit = kept[i];
      std::rotate(kept.begin(), kept.begin() + static_cast<std::ptrdiff_t>(i), kept.begin() + static_cast<std::ptrdiff_t>(i) + 1);
      return hit;
    }
  }
  auto made = std::make_shared<Prepared>();
  made->plan = build_plan(tensors, catalysts, plan_table);  // full validation
  made->schedule = make_schedule(made->plan, tensors);
  made->shape_key = std::move(key);
  made->has_table = has_table;
  if (has_table) {
    const int64_t* table = plan_table->const_data_ptr<int64_t>();
    made->table.assign(table, table + plan_table->numel());
  }
  std::lock_guard<std::mutex> lock(mutex);
  kept.insert(kept.begin(), made);
  if (kept.size() > kKeptPlans) kept.pop_back();
  return made;
}

// body(part, first block, end block) for every part, in parallel when the call is large enough.
template <typename F>
void run_parts(const Schedule& s, const F& body) {
  if (!s.parallel()) {
    body(int64_t(0), s.parts.front(), s.parts.back());
    return;
  }
  at::parallel_for(0, s.num_parts(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) body(p, s.parts[p], s.parts[p + 1]);
  });
}

// body(chunk index, chunk) for every run of groups (plan.norm_chunks).
template <typename F>
void run_group_chunks(const Plan& plan, const Schedule& s, const F& body) {
  const int64_t n = static_cast<int64_t>(plan.norm_chunks.size());
  const int64_t grain = s.parallel() ? 1 : std::max<int64_t>(n, 1);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) body(c, plan.norm_chunks[c]);
  });
}

template <typename scalar_t>
std::vector<const scalar_t*> data_pointers(at::TensorList tensors) {
  std::vector<const scalar_t*> ptrs(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) ptrs[i] = tensors[i].const_data_ptr<scalar_t>();
  return ptrs;
}

// Pointers to the gradient buffers of `count` tensors; index[k] says which tensor grads[k] belongs to
// (empty index: grads[k] is tensor k's). Tensors without a buffer get nullptr.
template <typename scalar_t>
std::vector<scalar_t*> gradient_pointers(at::TensorList grads, at::IntArrayRef index, size_t count) {
  std::vector<scalar_t*> ptrs(count, nullptr);
  for (size_t k = 0; k < grads.size(); ++k) {
    ptrs[index.empty() ? k : static_cast<size_t>(index[k])] = grads[k].mutable_data_ptr<scalar_t>();
  }
  return ptrs;
}

// Scratch of one norm pass (row sums and column partials) and one gradient pass (factors).
template <typename acc_t>
struct Scratch {
  acc_t* row_sq = nullptr;      // [total rows]
  acc_t* partials = nullptr;    // [schedule.partial_size]
  acc_t* elem = nullptr;        // [parts, max_column_len]
  acc_t* factor = nullptr;      // [num_groups] weight-gradient factor of each group
  acc_t* col_factor = nullptr;  // [schedule.col_factor_size]
  acc_t* row_factor = nullptr;  // [parts, max_block_rows]
  double* penalty = nullptr;    // [norm_chunks]
};

template <typename acc_t>
size_t scratch_bytes(const Plan& plan, const Schedule& s, bool norm, bool gradient) {
  const size_t P = static_cast<size_t>(s.num_parts());
  size_t bytes = 0;
  auto add = [&](size_t count, size_t size) { bytes += cpu::Workspace::round_up(count * size); };
  if (norm) {
    add(plan.tensor_row_offsets.back(), sizeof(acc_t));
    add(s.partial_size, sizeof(acc_t));
    add(P * s.max_column_len, sizeof(acc_t));
    add(plan.norm_chunks.size(), sizeof(double));
  }
  if (gradient) {
    add(plan.num_groups, sizeof(acc_t));
    add(s.col_factor_size, sizeof(acc_t));
    add(P * s.max_block_rows, sizeof(acc_t));
  }
  return bytes;
}

template <typename acc_t>
Scratch<acc_t> carve(cpu::Workspace& ws, const Plan& plan, const Schedule& s, bool norm, bool gradient) {
  const size_t P = static_cast<size_t>(s.num_parts());
  Scratch<acc_t> x;
  if (norm) {
    x.row_sq = ws.take<acc_t>(plan.tensor_row_offsets.back());
    x.partials = ws.take<acc_t>(s.partial_size);
    x.elem = ws.take<acc_t>(P * s.max_column_len);
    x.penalty = ws.take<double>(plan.norm_chunks.size());
  }
  if (gradient) {
    x.factor = ws.take<acc_t>(plan.num_groups);
    x.col_factor = ws.take<acc_t>(s.col_factor_size);
    x.row_factor = ws.take<acc_t>(P * s.max_block_rows);
  }
  return x;
}

// Norm pass: writes norms and ratios and returns the penalty. With `catalyst_grads` (entries may be null:
// no gradient for that catalyst) adds scale * sign(d) * n into them; with x.factor, writes every group's
// weight-gradient factor scale * |d| / n for the gradient pass.
template <typename scalar_t, typename acc_t>
acc_t norm_pass(const Plan& plan, const Schedule& s, const Scratch<acc_t>& x, at::TensorList tensors,
                at::TensorList catalysts, acc_t* norms, acc_t* ratios, scalar_t* const* catalyst_grads, acc_t scale,
                bool sums_only = false) {
  const auto weights = data_pointers<scalar_t>(tensors);
  const auto cats = data_pointers<scalar_t>(catalysts);
  // Rows of empty tensors (shape [N, 0, ...]) have no block: their sums are 0.
  for (size_t t = 0; t < s.tensors.size(); ++t) {
    if (s.tensors[t].block_begin == s.tensors[t].block_end) {
      std::fill(x.row_sq + plan.tensor_row_offsets[t], x.row_sq + plan.tensor_row_offsets[t + 1], acc_t(0));
    }
  }
  // Phase 1: one read of every block.
  run_parts(s, [&](int64_t part, int64_t block_begin, int64_t block_end) {
    for (int64_t b = block_begin; b < block_end; ++b) {
      const Block& block = s.blocks[b];
      const TensorInfo& info = s.tensors[block.tensor];
      const int64_t rows = block.row_end - block.row_begin;
      const scalar_t* w = weights[block.tensor] + block.row_begin * info.len;
      acc_t* row_sq = x.row_sq + plan.tensor_row_offsets[block.tensor] + block.row_begin;
      if (info.columns == 0) {
        cpu::rows_sum_squares(w, rows, info.len, row_sq);
        continue;
      }
      acc_t* cols = x.partials + info.partial_offset + (b - info.block_begin) * info.columns;
      if (info.inner == 1) {
        std::fill(cols, cols + info.len, acc_t(0));
        cpu::rows_cols_sum_squares(w, rows, info.len, row_sq, cols);
        continue;
      }
      acc_t* elem = x.elem + part * s.max_column_len;
      std::fill(elem, elem + info.len, acc_t(0));
      cpu::rows_cols_sum_squares(w, rows, info.len, row_sq, elem);
      for (int64_t c = 0; c < info.columns; ++c) {
        const acc_t* e = elem + c * info.inner;
        acc_t sum = 0;
        for (int64_t k = 0; k < info.inner; ++k) sum += e[k];
        cols[c] = sum;
      }
    }
  });
  // Column sums of squares: every column tensor's block partials added into its first block's row, blocks
  // in order. One sequential pass per tensor (vectorised), instead of a strided walk over the blocks for
  // every column slice below; the same additions in the same order as that walk.
  const int64_t column_tensors = static_cast<int64_t>(s.column_tensors.size());
  at::parallel_for(0, column_tensors, s.parallel() ? 1 : std::max<int64_t>(column_tensors, 1),
                   [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const TensorInfo& info = s.tensors[s.column_tensors[k]];
      acc_t* total = x.partials + info.partial_offset;
      for (int64_t b = 1; b < info.block_end - info.block_begin; ++b) {
        const acc_t* partial = total + b * info.columns;
        for (int64_t j = 0; j < info.columns; ++j) total[j] += partial[j];
      }
    }
  });
  // Phase 2: group sums from rows and column sums (members in table order, slices in order), then the
  // per-group statistics.
  run_group_chunks(plan, s, [&](int64_t c, const Chunk& chunk) {
    const int64_t seg = chunk.owner;
    const int64_t seg0 = plan.segment_offsets[seg];
    acc_t* sq = norms + seg0;  // sums of squares first, norms after
    std::fill(sq + chunk.begin, sq + chunk.end, acc_t(0));
    for (int64_t k = plan.segment_member_offsets[seg]; k < plan.segment_member_offsets[seg + 1]; ++k) {
      const MemberGeometry& m = plan.members[plan.segment_members[k]];
      const int64_t first = m.group_begin - seg0;  // the member covers local groups [first, first + groups)
      const int64_t lo = std::max(chunk.begin, first);
      const int64_t hi = std::min(chunk.end, first + m.groups());
      if (lo >= hi) continue;
      const int64_t slice_begin = (lo - first) * m.width;
      const int64_t slice_end = (hi - first) * m.width;
      // Slices in order, `width` consecutive ones per group (no division per slice: DenseNet's layouts have
      // tens of thousands of column slices per call).
      if (m.dim == 0) {
        const acc_t* rows = x.row_sq + plan.tensor_row_offsets[m.tensor] + m.start;
        if (m.width == 1) {
          for (int64_t j = slice_begin; j < slice_end; ++j) sq[first + j] += rows[j];
        } else {
          for (int64_t g = lo, j = slice_begin; g < hi; ++g) {
            for (int64_t k = 0; k < m.width; ++k, ++j) sq[g] += rows[j];
          }
        }
        continue;
      }
      const TensorInfo& info = s.tensors[m.tensor];
      if (info.block_end == info.block_begin) continue;  // no elements (shape [0, C, ...]): its columns add 0
      const acc_t* total = x.partials + info.partial_offset + m.start;  // the column sums (above)
      if (m.width == 1) {
        for (int64_t j = slice_begin; j < slice_end; ++j) sq[first + j] += total[j];
      } else {
        for (int64_t g = lo, j = slice_begin; g < hi; ++g) {
          for (int64_t k = 0; k < m.width; ++k, ++j) sq[g] += total[j];
        }
      }
    }
    if (sums_only) {  // penalty_partial_sums: the sums of squares are the result (sharded weights)
      x.penalty[c] = 0.0;
      return;
    }
    const scalar_t* d = cats[seg];
    scalar_t* gd = catalyst_grads != nullptr ? catalyst_grads[seg] : nullptr;
    double penalty = 0.0;
    for (int64_t j = chunk.begin; j < chunk.end; ++j) {
      const acc_t n = std::sqrt(sq[j]);
      const acc_t dj = static_cast<acc_t>(d[j]);
      const acc_t abs_d = std::abs(dj);
      sq[j] = n;
      ratios[seg0 + j] = catalyst_ratio(abs_d, n);
      penalty += static_cast<double>(abs_d) * static_cast<double>(n);
      if (gd != nullptr) gd[j] = static_cast<scalar_t>(static_cast<acc_t>(gd[j]) + scale * catalyst_grad(dj, n));
      if (x.factor != nullptr) x.factor[seg0 + j] = scale * weight_grad_scale(abs_d, n);
    }
    x.penalty[c] = penalty;
  });
  double total = 0.0;
  for (size_t c = 0; c < plan.norm_chunks.size(); ++c) total += x.penalty[c];
  return static_cast<acc_t>(total);
}

// x.factor[g] = scale * |d_g| / n_g from given norms (the backward op).
template <typename scalar_t, typename acc_t>
void factors_from_norms(const Plan& plan, const Scratch<acc_t>& x, at::TensorList catalysts, const acc_t* norms,
                        acc_t scale) {
  for (size_t seg = 0; seg < catalysts.size(); ++seg) {
    const scalar_t* d = catalysts[seg].const_data_ptr<scalar_t>();
    const int64_t seg0 = plan.segment_offsets[seg];
    const int64_t groups = plan.segment_offsets[seg + 1] - seg0;
    for (int64_t j = 0; j < groups; ++j) {
      x.factor[seg0 + j] = scale * weight_grad_scale(std::abs(static_cast<acc_t>(d[j])), norms[seg0 + j]);
    }
  }
}

// Gradient pass: out[t] = dR/dW[t] scaled (x.factor holds the per-group factors), or out[t] += ... with
// kAccumulate. Elements no member covers get an exact zero (or are left alone), even where the weight is
// Inf or NaN. Tensors whose out pointer is null are skipped.
template <bool kAccumulate, typename scalar_t, typename acc_t>
void gradient_pass(const Plan& plan, const Schedule& s, const Scratch<acc_t>& x, at::TensorList tensors,
                   scalar_t* const* out) {
  const auto weights = data_pointers<scalar_t>(tensors);
  const acc_t* factor = x.factor;
  // Column factors, one per element of a row: factor of column c for elements [c * inner, (c + 1) * inner).
  const int64_t C = static_cast<int64_t>(s.column_tensors.size());
  at::parallel_for(0, C, s.parallel() ? 1 : std::max<int64_t>(C, 1), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t t = s.column_tensors[k];
      const TensorInfo& info = s.tensors[t];
      if (out[t] == nullptr) continue;
      acc_t* cf = x.col_factor + info.col_factor_offset;
      const int64_t* groups = plan.column_group.data() + plan.tensor_column_offsets[t];
      for (int64_t c = 0; c < info.columns; ++c) {
        const acc_t f = groups[c] >= 0 ? factor[groups[c]] : acc_t(0);
        std::fill(cf + c * info.inner, cf + (c + 1) * info.inner, f);
      }
    }
  });
  run_parts(s, [&](int64_t part, int64_t block_begin, int64_t block_end) {
    acc_t* rf = x.row_factor + part * s.max_block_rows;
    for (int64_t b = block_begin; b < block_end; ++b) {
      const Block& block = s.blocks[b];
      const int64_t t = block.tensor;
      if (out[t] == nullptr) continue;
      const TensorInfo& info = s.tensors[t];
      const int64_t rows = block.row_end - block.row_begin;
      const int64_t len = info.len;
      const int64_t* row_groups = plan.row_group.data() + plan.tensor_row_offsets[t] + block.row_begin;
      bool all_rows = true;
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t g = row_groups[i];
        all_rows &= g >= 0;
        rf[i] = g >= 0 ? factor[g] : acc_t(0);
      }
      const scalar_t* w = weights[t] + block.row_begin * len;
      scalar_t* o = out[t] + block.row_begin * len;
      const acc_t* cf = info.columns > 0 ? x.col_factor + info.col_factor_offset : nullptr;
      if (all_rows) {
        if (cf == nullptr) {
          cpu::rows_scale(o, w, rows, len, rf, kAccumulate);
        } else {
          cpu::rows_cols_scale(o, w, rows, len, rf, cf, kAccumulate);
        }
        continue;
      }
      // Some rows belong to no row group (a layer whose outputs are not pruned but whose inputs are, or a
      // partial member): their elements get only column factors, over runs of covered columns; elements
      // in neither a row nor a column group get nothing.
      for (int64_t i = 0; i < rows; ++i) {
        const scalar_t* wi = w + i * len;
        scalar_t* oi = o + i * len;
        if (row_groups[i] >= 0) {
          if (cf == nullptr) {
            cpu::rows_scale(oi, wi, 1, len, rf + i, kAccumulate);
          } else {
            cpu::rows_cols_scale(oi, wi, 1, len, rf + i, cf, kAccumulate);
          }
          continue;
        }
        const acc_t zero = 0;
        int64_t done = 0;  // elements of the row handled so far
        if (cf != nullptr) {
          for (int64_t r = s.run_offsets[t]; r < s.run_offsets[t + 1]; ++r) {
            const int64_t begin = s.runs[r].first * info.inner;
            const int64_t end = s.runs[r].second * info.inner;
            if (!kAccumulate) std::fill(oi + done, oi + begin, scalar_t(0));
            cpu::rows_cols_scale(oi + begin, wi + begin, 1, end - begin, &zero, cf + begin, kAccumulate);
            done = end;
          }
        }
        if (!kAccumulate) std::fill(oi + done, oi + len, scalar_t(0));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> penalty_forward_cpu(at::TensorList tensors, at::TensorList catalysts,
                                                                     const c10::optional<at::Tensor>& plan_table) {
  const auto prepared = prepare(tensors, catalysts, plan_table);
  const Plan& plan = prepared->plan;
  const Schedule& schedule = prepared->schedule;
  const auto acc_type = accumulation_dtype(tensors[0].scalar_type());
  const auto options = tensors[0].options().dtype(acc_type);
  at::Tensor norms = at::empty({plan.num_groups}, options);
  at::Tensor ratios = at::empty({plan.num_groups}, options);
  at::Tensor penalty;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "penalty_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cpu::Workspace ws(scratch_bytes<acc_t>(plan, schedule, true, false));
    const auto x = carve<acc_t>(ws, plan, schedule, true, false);
    const acc_t value = norm_pass<scalar_t, acc_t>(plan, schedule, x, tensors, catalysts,
                                                   norms.mutable_data_ptr<acc_t>(), ratios.mutable_data_ptr<acc_t>(),
                                                   nullptr, acc_t(1));
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
  const auto prepared = prepare(tensors, catalysts, plan_table);
  const Plan& plan = prepared->plan;
  const Schedule& schedule = prepared->schedule;
  const auto acc_type = accumulation_dtype(tensors[0].scalar_type());
  check_norms(norms, plan, acc_type);
  TORCH_CHECK_VALUE(grad_penalty.numel() == 1, "catalyst_fused: grad_penalty must have one element, got shape ",
                    grad_penalty.sizes());
  std::vector<at::Tensor> weight_grads = cpu::recycled_gradients(tensors);
  std::vector<at::Tensor> catalyst_grads;
  catalyst_grads.reserve(catalysts.size());
  for (const auto& d : catalysts) catalyst_grads.push_back(at::empty(d.sizes(), d.options()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "penalty_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t g = grad_penalty.item<acc_t>();
    const acc_t* n = norms.const_data_ptr<acc_t>();
    cpu::Workspace ws(scratch_bytes<acc_t>(plan, schedule, false, true));
    const auto x = carve<acc_t>(ws, plan, schedule, false, true);
    factors_from_norms<scalar_t, acc_t>(plan, x, catalysts, n, g);
    auto out = gradient_pointers<scalar_t>(weight_grads, {}, tensors.size());
    gradient_pass</*kAccumulate=*/false, scalar_t, acc_t>(plan, schedule, x, tensors, out.data());
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

// The in-place op; weight_grads[k] belongs to weights[weight_index[k]] (all weights in order when the
// index is empty), likewise for catalysts. Tensors without a gradient buffer are read but get nothing.
std::tuple<at::Tensor, at::Tensor, at::Tensor> accumulate(at::TensorList tensors, at::TensorList catalysts,
                                                          at::TensorList weight_grads, at::TensorList catalyst_grads,
                                                          at::IntArrayRef weight_index, at::IntArrayRef catalyst_index,
                                                          double scale, const Plan& plan, const Schedule& schedule) {
  const auto acc_type = accumulation_dtype(tensors[0].scalar_type());
  const auto options = tensors[0].options().dtype(acc_type);
  at::Tensor norms = at::empty({plan.num_groups}, options);
  at::Tensor ratios = at::empty({plan.num_groups}, options);
  at::Tensor penalty;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "penalty_accumulate_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t s = static_cast<acc_t>(scale);
    cpu::Workspace ws(scratch_bytes<acc_t>(plan, schedule, true, true));
    const auto x = carve<acc_t>(ws, plan, schedule, true, true);
    auto gd = gradient_pointers<scalar_t>(catalyst_grads, catalyst_index, catalysts.size());
    const acc_t value = norm_pass<scalar_t, acc_t>(plan, schedule, x, tensors, catalysts,
                                                   norms.mutable_data_ptr<acc_t>(), ratios.mutable_data_ptr<acc_t>(),
                                                   gd.data(), s);
    auto gw = gradient_pointers<scalar_t>(weight_grads, weight_index, tensors.size());
    gradient_pass</*kAccumulate=*/true, scalar_t, acc_t>(plan, schedule, x, tensors, gw.data());
    penalty = at::scalar_tensor(value, options);
  });
  return {penalty, norms, ratios};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> penalty_accumulate_cpu(at::TensorList tensors, at::TensorList catalysts,
                                                                        at::TensorList weight_grads,
                                                                        at::TensorList catalyst_grads, double scale,
                                                                        const c10::optional<at::Tensor>& plan_table) {
  const auto prepared = prepare(tensors, catalysts, plan_table, /*check_memory=*/false);
  check_grads(weight_grads, tensors, "weight_grads", "weights", false);
  check_grads(catalyst_grads, catalysts, "catalyst_grads", "catalysts", false);
  check_distinct({{"weights", tensors}, {"catalysts", catalysts}, {"weight_grads", weight_grads},
                  {"catalyst_grads", catalyst_grads}});
  return accumulate(tensors, catalysts, weight_grads, catalyst_grads, {}, {}, scale, prepared->plan, prepared->schedule);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> penalty_accumulate_selected_cpu(
    at::TensorList tensors, at::TensorList catalysts, at::TensorList weight_grads, at::IntArrayRef weight_index,
    at::TensorList catalyst_grads, at::IntArrayRef catalyst_index, double scale,
    const c10::optional<at::Tensor>& plan_table) {
  const auto prepared = prepare(tensors, catalysts, plan_table, /*check_memory=*/false);
  check_selection(weight_grads, weight_index, tensors, "weight_grads", "weight_index", "weights", false);
  check_selection(catalyst_grads, catalyst_index, catalysts, "catalyst_grads", "catalyst_index", "catalysts", false);
  check_distinct({{"weights", tensors}, {"catalysts", catalysts}, {"weight_grads", weight_grads},
                  {"catalyst_grads", catalyst_grads}});
  return accumulate(tensors, catalysts, weight_grads, catalyst_grads, weight_index, catalyst_index, scale,
                    prepared->plan, prepared->schedule);
}

}  // namespace

namespace cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> accumulate_creating_grads(
    at::TensorList tensors, at::TensorList catalysts, std::vector<at::Tensor>& weight_grads,
    const std::vector<int64_t>& weight_index, std::vector<at::Tensor>& catalyst_grads,
    const std::vector<int64_t>& catalyst_index, double scale, const c10::optional<at::Tensor>& plan_table,
    const std::function<void()>& create_missing, std::shared_ptr<const void>* prepared_out) {
  const auto prepared = prepare(tensors, catalysts, plan_table, /*check_memory=*/false);
  // The checks of penalty_accumulate_selected_ on the buffers that exist; the missing ones will be fresh
  // contiguous zeros of the right shape, dtype and device, which pass them.
  auto present = [](const std::vector<at::Tensor>& grads, const std::vector<int64_t>& index,
                    std::vector<at::Tensor>& kept, std::vector<int64_t>& kept_index) {
    for (size_t k = 0; k < grads.size(); ++k) {
      if (!grads[k].defined()) continue;
      kept.push_back(grads[k]);
      kept_index.push_back(index[k]);
    }
  };
  std::vector<at::Tensor> wg, dg;
  std::vector<int64_t> wi, di;
  present(weight_grads, weight_index, wg, wi);
  present(catalyst_grads, catalyst_index, dg, di);
  check_selection(wg, wi, tensors, "weight_grads", "weight_index", "weights", false);
  check_selection(dg, di, catalysts, "catalyst_grads", "catalyst_index", "catalysts", false);
  check_distinct({{"weights", tensors}, {"catalysts", catalysts}, {"weight_grads", wg}, {"catalyst_grads", dg}});
  create_missing();
  // All tensors selected: the index-free form, as cf.penalty_'s operator path calls it.
  const bool all_w = weight_index.size() == tensors.size();
  const bool all_d = catalyst_index.size() == catalysts.size();
  auto stats = accumulate(tensors, catalysts, weight_grads, catalyst_grads,
                          all_w && all_d ? at::IntArrayRef() : at::IntArrayRef(weight_index),
                          all_w && all_d ? at::IntArrayRef() : at::IntArrayRef(catalyst_index), scale, prepared->plan,
                          prepared->schedule);
  if (prepared_out != nullptr) *prepared_out = prepared;
  return stats;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> accumulate_prepared(
    const std::shared_ptr<const void>& prepared, at::TensorList tensors, at::TensorList catalysts,
    at::TensorList weight_grads, at::IntArrayRef weight_index, at::TensorList catalyst_grads,
    at::IntArrayRef catalyst_index, double scale) {
  const auto& p = *static_cast<const Prepared*>(prepared.get());
  return accumulate(tensors, catalysts, weight_grads, catalyst_grads, weight_index, catalyst_index, scale, p.plan,
                    p.schedule);
}

}  // namespace cpu

namespace {

// Sharded weights (DTensor / FSDP2), step 1: every group's sum of squares over the slices this process
// holds; the caller all-reduces them (one flat vector) and calls penalty_finish_.
at::Tensor penalty_partial_sums_cpu(at::TensorList tensors, at::TensorList catalysts,
                                    const c10::optional<at::Tensor>& plan_table) {
  const auto prepared = prepare(tensors, catalysts, plan_table);
  const Plan& plan = prepared->plan;
  const Schedule& schedule = prepared->schedule;
  const auto options = tensors[0].options().dtype(accumulation_dtype(tensors[0].scalar_type()));
  at::Tensor sums = at::empty({plan.num_groups}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "penalty_partial_sums_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cpu::Workspace ws(scratch_bytes<acc_t>(plan, schedule, true, false));
    const auto x = carve<acc_t>(ws, plan, schedule, true, false);
    norm_pass<scalar_t, acc_t>(plan, schedule, x, tensors, catalysts, sums.mutable_data_ptr<acc_t>(), nullptr, nullptr,
                               acc_t(1), /*sums_only=*/true);
  });
  return sums;
}

// Step 2: n = sqrt(sums) from the reduced sums, then what penalty_accumulate_ does from there: norms,
// ratios, the penalty (the same on every process: catalysts and reduced sums are), scale * dR/dd into the
// catalyst buffers and scale * dR/dW into the buffers of the slices this process holds.
std::tuple<at::Tensor, at::Tensor, at::Tensor> penalty_finish_cpu(
    at::TensorList tensors, at::TensorList catalysts, at::TensorList weight_grads, at::IntArrayRef weight_index,
    at::TensorList catalyst_grads, at::IntArrayRef catalyst_index, double scale, const c10::optional<at::Tensor>& plan_table,
    const at::Tensor& sums) {
  const auto prepared = prepare(tensors, catalysts, plan_table, /*check_memory=*/false);
  const Plan& plan = prepared->plan;
  const Schedule& schedule = prepared->schedule;
  check_selection(weight_grads, weight_index, tensors, "weight_grads", "weight_index", "weights", false);
  check_selection(catalyst_grads, catalyst_index, catalysts, "catalyst_grads", "catalyst_index", "catalysts", false);
  check_distinct({{"weights", tensors}, {"catalysts", catalysts}, {"weight_grads", weight_grads},
                  {"catalyst_grads", catalyst_grads}});
  const auto acc_type = accumulation_dtype(tensors[0].scalar_type());
  TORCH_CHECK_VALUE(sums.dim() == 1 && sums.numel() == plan.num_groups && sums.scalar_type() == acc_type &&
                        sums.is_contiguous() && sums.device() == tensors[0].device(),
                    "catalyst_fused: sums must be the contiguous ", dtype_name(acc_type), " [", plan.num_groups,
                    "] tensor of reduced penalty_partial_sums, got ", dtype_name(sums.scalar_type()), " ", sums.sizes());
  const auto options = tensors[0].options().dtype(acc_type);
  at::Tensor norms = at::empty({plan.num_groups}, options);
  at::Tensor ratios = at::empty({plan.num_groups}, options);
  at::Tensor penalty;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "penalty_finish_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t sc = static_cast<acc_t>(scale);
    cpu::Workspace ws(scratch_bytes<acc_t>(plan, schedule, false, true));
    const auto x = carve<acc_t>(ws, plan, schedule, false, true);
    auto gd = gradient_pointers<scalar_t>(catalyst_grads, catalyst_index, catalysts.size());
    const acc_t* sq = sums.const_data_ptr<acc_t>();
    acc_t* n_out = norms.mutable_data_ptr<acc_t>();
    acc_t* r_out = ratios.mutable_data_ptr<acc_t>();
    double total = 0.0;  // segments and groups in order: the same value on every process
    for (size_t seg = 0; seg < catalysts.size(); ++seg) {
      const scalar_t* d = catalysts[seg].const_data_ptr<scalar_t>();
      scalar_t* g = gd[seg];
      const int64_t seg0 = plan.segment_offsets[seg];
      for (int64_t j = 0; j < plan.segment_offsets[seg + 1] - seg0; ++j) {
        const acc_t n = std::sqrt(sq[seg0 + j]);
        const acc_t dj = static_cast<acc_t>(d[j]);
        const acc_t abs_d = std::abs(dj);
        n_out[seg0 + j] = n;
        r_out[seg0 + j] = catalyst_ratio(abs_d, n);
        total += static_cast<double>(abs_d) * static_cast<double>(n);
        if (g != nullptr) g[j] = static_cast<scalar_t>(static_cast<acc_t>(g[j]) + sc * catalyst_grad(dj, n));
        x.factor[seg0 + j] = sc * weight_grad_scale(abs_d, n);
      }
    }
    auto gw = gradient_pointers<scalar_t>(weight_grads, weight_index, tensors.size());
    gradient_pass</*kAccumulate=*/true, scalar_t, acc_t>(plan, schedule, x, tensors, gw.data());
    penalty = at::scalar_tensor(static_cast<acc_t>(total), options);
  });
  return {penalty, norms, ratios};
}

}  // namespace

TORCH_LIBRARY_IMPL(catalyst_fused, CPU, m) {
  m.impl("penalty_partial_sums", &penalty_partial_sums_cpu);
  m.impl("penalty_finish_", &penalty_finish_cpu);
  m.impl("penalty_forward", &penalty_forward_cpu);
  m.impl("penalty_backward", &penalty_backward_cpu);
  m.impl("penalty_accumulate_", &penalty_accumulate_cpu);
  m.impl("penalty_accumulate_selected_", &penalty_accumulate_selected_cpu);
}

}  // namespace catalyst_fused
