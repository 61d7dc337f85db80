// Host-side description of one penalty call: which memory each group reads and how the work is cut.
//
// Built per call from the tensors' shapes and the (optional) member table. It is O(#tensors + #members
// + #chunks) small host vectors; the weights themselves are never copied.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <initializer_list>
#include <utility>
#include <string>
#include <vector>

namespace catalyst_fused {

// Where slice k of one member lives: `outer` runs of `inner` contiguous elements, `outer_stride` apart,
// starting at data + first_offset + k * slice_stride. A row (dim 0) is one run; an input column (dim 1)
// of a [A, B, ...] tensor is A runs of prod(...) elements.
struct MemberGeometry {
  int64_t tensor = 0;
  int64_t dim = 0;
  int64_t start = 0;          // first slice index along `dim`
  int64_t count = 0;          // number of slices
  int64_t segment = 0;
  int64_t group_begin = 0;    // global group index of the member's first slice
  int64_t width = 1;          // consecutive slices per group: slice start + k is group group_begin + k / width
  int64_t first_offset = 0;   // element offset of slice `start`
  int64_t slice_stride = 0;   // elements between consecutive slices
  int64_t outer = 0;
  int64_t outer_stride = 0;
  int64_t inner = 0;
  int64_t slice_numel() const { return outer * inner; }
  int64_t groups() const { return count / width; }  // the member covers groups [group_begin, group_begin + groups())
};

// A run of consecutive groups of one segment (norm pass) or rows of one tensor (gradient pass).
struct Chunk {
  int64_t owner = 0;  // segment (norm pass) or tensor (gradient pass)
  int64_t begin = 0;
  int64_t end = 0;
};

struct Plan {
  int64_t num_groups = 0;
  int64_t total_elements = 0;              // elements read by one norm pass
  std::vector<int64_t> segment_offsets;    // [S + 1] global group offset of each segment
  std::vector<MemberGeometry> members;
  std::vector<int64_t> segment_member_offsets;  // CSR: members of segment s
  std::vector<int64_t> segment_members;
  std::vector<int64_t> tensor_member_offsets;   // CSR: members that read tensor t
  std::vector<int64_t> tensor_members;
  std::vector<Chunk> norm_chunks;  // runs of groups of one segment, about kChunkElements elements each
  std::vector<Chunk> grad_chunks;  // runs of rows of one tensor, about kChunkElements elements each

  // Slice maps: the global group of every row and every input column, -1 where no member covers it.
  // A slice belongs to at most one member (build_plan rejects plans where two members take the same
  // slice), so each element of a tensor is in at most one row group and at most one column group.
  std::vector<int64_t> tensor_row_offsets;     // [T + 1]: rows of tensor t are row_group[tensor_row_offsets[t] + r]
  std::vector<int64_t> row_group;              // [sum of size(0)]
  std::vector<int64_t> tensor_column_offsets;  // [T + 1]: only tensors with column members have entries
  std::vector<int64_t> column_group;           // [sum of size(1) over tensors with column members]
  bool has_columns(int64_t t) const { return tensor_column_offsets[t + 1] > tensor_column_offsets[t]; }
};

// fp32 for fp16/bf16, the dtype itself otherwise: what the kernels accumulate and return statistics in.
at::ScalarType accumulation_dtype(at::ScalarType t);

// Checks that `grads` (named `name`) match `like` (named `like_name`) in count, shape, dtype and device
// and are contiguous: the gradient buffers of the in-place operator.
// With check_memory, also that no two of `grads` and `like` share memory (check_distinct); a caller that
// checks all its lists at once passes false.
void check_grads(at::TensorList grads, at::TensorList like, const char* name, const char* like_name,
                 bool check_memory = true);

// Rejects tensors that share memory (a tied weight or a catalyst listed twice, a gradient buffer aliasing
// another): two writers would race on one gradient element. `lists` names each list ("weights", ...).
// Tensors without elements or storage are ignored.
void check_distinct(std::initializer_list<std::pair<const char*, at::TensorList>> lists);

// `grads[k]` is the gradient buffer of `like[index[k]]`: index strictly increasing and in range, one
// entry per buffer; each buffer checked as check_grads does.
void check_selection(at::TensorList grads, at::IntArrayRef index, at::TensorList like, const char* name,
                     const char* index_name, const char* like_name, bool check_memory = true);

// dtype as Python spells it ("torch.float32"), so that C++ and Python errors read the same.
std::string dtype_name(at::ScalarType t);

// Elements per unit of parallel work. Tests use sizes around it (see tests/test_penalty_cpu.py).
constexpr int64_t kChunkElements = int64_t(1) << 15;

// The checks of build_plan that depend on the tensors themselves rather than on their shapes and the member
// table (dtype, device, rank, contiguity, shared memory): what a caller that reuses a plan built for the
// same shapes and table must still run on every call.
void validate_tensors(at::TensorList tensors, at::TensorList catalysts, bool check_memory = true);

// Validates every argument (messages name `weights[i]`, `catalysts[i]`, `plan`; duplicates among weights
// and catalysts included) and builds the plan.
// `plan` undefined means the per-row layout: tensor i's rows are the groups of catalyst segment i.
Plan build_plan(at::TensorList tensors, at::TensorList catalysts, const c10::optional<at::Tensor>& plan);

}  // namespace catalyst_fused
