#include "plan.h"

#include "penalty_math.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <mutex>

namespace catalyst_fused {

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    default: {
      std::string name = c10::toString(t);
      std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return std::tolower(c); });
      return "torch." + name;
    }
  }
}

namespace {

int64_t product(at::IntArrayRef sizes, size_t from) {
  int64_t p = 1;
  for (size_t i = from; i < sizes.size(); ++i) p *= sizes[i];
  return p;
}

void check_tensors(at::TensorList tensors, at::TensorList catalysts) {
  TORCH_CHECK_VALUE(!tensors.empty(), "catalyst_fused: weights must be a non-empty sequence of tensors");
  TORCH_CHECK_VALUE(!catalysts.empty(), "catalyst_fused: catalysts must be a non-empty sequence of tensors");
  const at::Tensor& first = tensors[0];
  TORCH_CHECK_VALUE(first.defined(), "catalyst_fused: weights[0] is undefined");
  TORCH_CHECK_TYPE(at::isFloatingType(first.scalar_type()),
                   "catalyst_fused: weights[0] must be a floating-point tensor, got ", dtype_name(first.scalar_type()));
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK_VALUE(t.defined(), "catalyst_fused: weights[", i, "] is undefined");
    TORCH_CHECK_TYPE(t.scalar_type() == first.scalar_type(), "catalyst_fused: weights[", i, "] has dtype ",
                     dtype_name(t.scalar_type()), " but weights[0] has dtype ", dtype_name(first.scalar_type()),
                     "; all weights and catalysts must share one dtype");
    TORCH_CHECK_VALUE(t.device() == first.device(), "catalyst_fused: weights[", i, "] is on ", t.device(),
                      " but weights[0] is on ", first.device());
    TORCH_CHECK_VALUE(t.dim() >= 1, "catalyst_fused: weights[", i,
                      "] must have at least one dimension (channels along dim 0), got a 0-d tensor");
    TORCH_CHECK_VALUE(t.is_contiguous(), "catalyst_fused: weights[", i,
                      "] must be contiguous (call .contiguous() first)");
  }
  for (size_t i = 0; i < catalysts.size(); ++i) {
    const at::Tensor& d = catalysts[i];
    TORCH_CHECK_VALUE(d.defined(), "catalyst_fused: catalysts[", i, "] is undefined");
    TORCH_CHECK_TYPE(d.scalar_type() == first.scalar_type(), "catalyst_fused: catalysts[", i, "] has dtype ",
                     dtype_name(d.scalar_type()), " but weights[0] has dtype ", dtype_name(first.scalar_type()),
                     "; all weights and catalysts must share one dtype");
    TORCH_CHECK_VALUE(d.device() == first.device(), "catalyst_fused: catalysts[", i, "] is on ", d.device(),
                      " but weights[0] is on ", first.device());
    TORCH_CHECK_VALUE(d.dim() == 1, "catalyst_fused: catalysts[", i, "] must be 1-D, got shape ", d.sizes());
    TORCH_CHECK_VALUE(d.is_contiguous(), "catalyst_fused: catalysts[", i, "] must be contiguous");
  }
}

MemberGeometry make_member(at::TensorList tensors, const int64_t* row, int64_t index) {
  MemberGeometry m;
  m.tensor = row[kMemberTensor];
  m.dim = row[kMemberDim];
  m.start = row[kMemberStart];
  m.count = row[kMemberCount];
  m.segment = row[kMemberSegment];
  m.width = row[kMemberWidth];
  TORCH_CHECK_VALUE(m.tensor >= 0 && m.tensor < static_cast<int64_t>(tensors.size()), "catalyst_fused: plan member ",
                    index, " refers to weights[", m.tensor, "] but only ", tensors.size(), " weights were given");
  const at::Tensor& t = tensors[m.tensor];
  TORCH_CHECK_VALUE(m.dim == 0 || m.dim == 1, "catalyst_fused: plan member ", index,
                    " has dim ", m.dim, "; only 0 (rows) and 1 (input columns) are supported");
  TORCH_CHECK_VALUE(m.dim < t.dim(), "catalyst_fused: plan member ", index, " slices weights[", m.tensor,
                    "] along dim ", m.dim, " but it has shape ", t.sizes());
  // Overflow-safe: no sum of two table entries is formed before both are known to be in range.
  const int64_t size = t.size(m.dim);
  TORCH_CHECK_VALUE(m.start >= 0 && m.count >= 0 && m.start <= size && m.count <= size - m.start,
                    "catalyst_fused: plan member ", index, " takes ", m.count, " slices from index ", m.start,
                    " of weights[", m.tensor, "] along dim ", m.dim, " but that dim has size ", size);
  TORCH_CHECK_VALUE(m.width >= 1 && m.count % m.width == 0, "catalyst_fused: plan member ", index, " has width ",
                    m.width, "; it must be >= 1 and divide its slice count ", m.count);
  const auto sizes = t.sizes();
  if (m.dim == 0) {
    m.inner = product(sizes, 1);
    m.outer = 1;
    m.outer_stride = 0;
    m.slice_stride = m.inner;
  } else {
    m.inner = product(sizes, 2);
    m.outer = sizes[0];
    m.outer_stride = sizes[1] * m.inner;
    m.slice_stride = m.inner;
  }
  m.first_offset = m.start * m.slice_stride;
  return m;
}

// CSR index of members by `key`.
void group_by(const std::vector<MemberGeometry>& members, int64_t num_keys, bool by_segment,
              std::vector<int64_t>& offsets, std::vector<int64_t>& items) {
  offsets.assign(num_keys + 1, 0);
  for (const auto& m : members) offsets[(by_segment ? m.segment : m.tensor) + 1]++;
  for (int64_t k = 0; k < num_keys; ++k) offsets[k + 1] += offsets[k];
  items.assign(members.size(), 0);
  std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
  for (size_t i = 0; i < members.size(); ++i) {
    const int64_t key = by_segment ? members[i].segment : members[i].tensor;
    items[fill[key]++] = static_cast<int64_t>(i);
  }
}

void cut(std::vector<Chunk>& chunks, int64_t owner, int64_t items, int64_t elements_per_item) {
  const int64_t per_chunk = std::max<int64_t>(1, kChunkElements / std::max<int64_t>(1, elements_per_item));
  for (int64_t b = 0; b < items; b += per_chunk) chunks.push_back({owner, b, std::min(items, b + per_chunk)});
}

// Fills the slice maps; a slice taken by two members is an error (it would belong to two groups).
void build_slice_maps(at::TensorList tensors, Plan& plan) {
  const int64_t T = static_cast<int64_t>(tensors.size());
  plan.tensor_row_offsets.assign(T + 1, 0);
  plan.tensor_column_offsets.assign(T + 1, 0);
  for (int64_t t = 0; t < T; ++t) {
    bool columns = false;
    for (int64_t k = plan.tensor_member_offsets[t]; k < plan.tensor_member_offsets[t + 1]; ++k) {
      columns |= plan.members[plan.tensor_members[k]].dim == 1;
    }
    plan.tensor_row_offsets[t + 1] = plan.tensor_row_offsets[t] + tensors[t].size(0);
    plan.tensor_column_offsets[t + 1] = plan.tensor_column_offsets[t] + (columns ? tensors[t].size(1) : 0);
  }
  plan.row_group.assign(plan.tensor_row_offsets[T], -1);
  plan.column_group.assign(plan.tensor_column_offsets[T], -1);
  for (size_t i = 0; i < plan.members.size(); ++i) {
    const MemberGeometry& m = plan.members[i];
    int64_t* map = m.dim == 0 ? plan.row_group.data() + plan.tensor_row_offsets[m.tensor]
                              : plan.column_group.data() + plan.tensor_column_offsets[m.tensor];
    for (int64_t k = 0; k < m.count; ++k) {
      int64_t& g = map[m.start + k];
      TORCH_CHECK_VALUE(g < 0, "catalyst_fused: plan member ", i, " takes ", m.dim == 0 ? "row " : "input column ",
                        m.start + k, " of weights[", m.tensor, "], which an earlier member already takes; a slice "
                        "belongs to at most one group");
      g = m.group_begin + k / m.width;
    }
  }
}

}  // namespace

void check_distinct(std::initializer_list<std::pair<const char*, at::TensorList>> lists) {
  struct Span {
    uintptr_t begin, end;
    const char* list;
    size_t index;
  };
  std::vector<Span> spans;
  for (const auto& [name, tensors] : lists) {
    for (size_t i = 0; i < tensors.size(); ++i) {
      const at::Tensor& t = tensors[i];
      if (!t.defined() || t.numel() == 0 || !t.has_storage() || t.data_ptr() == nullptr) continue;
      // Contiguous by the time this runs: the elements are [data, data + numel * itemsize).
      const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
      spans.push_back({begin, begin + static_cast<uintptr_t>(t.numel()) * t.element_size(), name, i});
    }
  }
  // A training step passes the same tensors on every call: the spans of the last lists that passed are
  // kept, and the same spans in the same order pass again without the sort (the outcome depends on the
  // spans only).
  static std::mutex mutex;
  static std::vector<std::pair<uintptr_t, uintptr_t>> passed;
  auto same_as_passed = [&] {
    if (passed.size() != spans.size()) return false;
    for (size_t k = 0; k < spans.size(); ++k) {
      if (passed[k].first != spans[k].begin || passed[k].second != spans[k].end) return false;
    }
    return true;
  };
  std::vector<std::pair<uintptr_t, uintptr_t>> unsorted;
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (same_as_passed()) return;
  }
  unsorted.reserve(spans.size());
  for (const Span& s : spans) unsorted.emplace_back(s.begin, s.end);
  // stable: of two spans that start together, the one listed first is named first
  std::stable_sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  for (size_t k = 1; k < spans.size(); ++k) {
    const Span& a = spans[k - 1];
    const Span& b = spans[k];
    // Sorted by start, two spans overlap only if some neighbouring pair does.
    TORCH_CHECK_VALUE(b.begin >= a.end, "catalyst_fused: ", a.list, "[", a.index, "] and ", b.list, "[", b.index,
                      "] share memory (a tied weight or a tensor listed twice?); each tensor may appear once, "
                      "or two gradient writers would race");
  }
  std::lock_guard<std::mutex> lock(mutex);
  passed = std::move(unsorted);
}

void validate_tensors(at::TensorList tensors, at::TensorList catalysts, bool check_memory) {
  check_tensors(tensors, catalysts);
  if (check_memory) check_distinct({{"weights", tensors}, {"catalysts", catalysts}});
}

Plan build_plan(at::TensorList tensors, at::TensorList catalysts, const c10::optional<at::Tensor>& plan_table) {
  validate_tensors(tensors, catalysts);
  Plan plan;
  const int64_t num_segments = static_cast<int64_t>(catalysts.size());
  plan.segment_offsets.assign(num_segments + 1, 0);
  for (int64_t s = 0; s < num_segments; ++s) plan.segment_offsets[s + 1] = plan.segment_offsets[s] + catalysts[s].numel();
  plan.num_groups = plan.segment_offsets.back();

  if (!plan_table.has_value() || !plan_table->defined()) {
    TORCH_CHECK_VALUE(catalysts.size() == tensors.size(), "catalyst_fused: got ", tensors.size(), " weights but ",
                      catalysts.size(), " catalysts; the per-row layout needs one catalyst vector per weight");
    plan.members.reserve(tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i) {
      TORCH_CHECK_VALUE(catalysts[i].numel() == tensors[i].size(0), "catalyst_fused: catalysts[", i, "] has ",
                        catalysts[i].numel(), " entries but weights[", i, "] has ", tensors[i].size(0),
                        " channels (dim 0 of shape ", tensors[i].sizes(), ")");
      const int64_t row[kMemberColumns] = {static_cast<int64_t>(i), 0, 0, tensors[i].size(0), static_cast<int64_t>(i), 0, 1};
      plan.members.push_back(make_member(tensors, row, static_cast<int64_t>(i)));
      plan.members.back().group_begin = plan.segment_offsets[i];
    }
  } else {
    const at::Tensor& table = *plan_table;
    TORCH_CHECK_VALUE(table.device().is_cpu() && table.scalar_type() == at::kLong && table.dim() == 2 &&
                          table.size(1) == kMemberColumns && table.is_contiguous(),
                      "catalyst_fused: plan must be a contiguous int64 CPU tensor of shape [members, ", kMemberColumns,
                      "] (build it with catalyst_fused.GroupLayout), got ", dtype_name(table.scalar_type()), " ", table.sizes(),
                      " on ", table.device());
    const int64_t* rows = table.data_ptr<int64_t>();
    plan.members.reserve(table.size(0));
    for (int64_t i = 0; i < table.size(0); ++i) {
      const int64_t* row = rows + i * kMemberColumns;
      MemberGeometry m = make_member(tensors, row, i);
      TORCH_CHECK_VALUE(m.segment >= 0 && m.segment < num_segments, "catalyst_fused: plan member ", i,
                        " refers to catalysts[", m.segment, "] but only ", num_segments, " catalysts were given");
      const int64_t segment_start = row[kMemberSegmentStart];
      const int64_t groups = catalysts[m.segment].numel();
      TORCH_CHECK_VALUE(segment_start >= 0 && segment_start <= groups && m.groups() <= groups - segment_start,
                        "catalyst_fused: plan member ", i, " maps to ", m.groups(), " groups from group ", segment_start,
                        " of catalysts[", m.segment, "] which has ", groups, " entries");
      m.group_begin = plan.segment_offsets[m.segment] + segment_start;
      plan.members.push_back(m);
    }
  }

  group_by(plan.members, num_segments, /*by_segment=*/true, plan.segment_member_offsets, plan.segment_members);
  group_by(plan.members, static_cast<int64_t>(tensors.size()), /*by_segment=*/false, plan.tensor_member_offsets,
           plan.tensor_members);

  // Norm pass: cut each segment into runs of groups of about kChunkElements elements.
  for (int64_t s = 0; s < num_segments; ++s) {
    const int64_t groups = plan.segment_offsets[s + 1] - plan.segment_offsets[s];
    if (groups == 0) continue;
    int64_t elements = 0;
    for (int64_t k = plan.segment_member_offsets[s]; k < plan.segment_member_offsets[s + 1]; ++k) {
      const auto& m = plan.members[plan.segment_members[k]];
      elements += m.count * m.slice_numel();
    }
    plan.total_elements += elements;
    cut(plan.norm_chunks, s, groups, elements / groups);
  }
  // Gradient pass: cut every tensor into runs of rows (tensors no member reads still get zero gradients).
  for (size_t t = 0; t < tensors.size(); ++t) {
    const int64_t rows = tensors[t].size(0);
    if (tensors[t].numel() == 0) continue;
    cut(plan.grad_chunks, static_cast<int64_t>(t), rows, tensors[t].numel() / rows);
  }
  build_slice_maps(tensors, plan);
  return plan;
}

at::ScalarType accumulation_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

namespace {

void check_grad(const at::Tensor& grad, const at::Tensor& like, const char* name, size_t i, const char* like_name,
                size_t j) {
  TORCH_CHECK_VALUE(grad.defined(), "catalyst_fused: ", name, "[", i, "] is undefined");
  TORCH_CHECK_VALUE(grad.sizes() == like.sizes(), "catalyst_fused: ", name, "[", i, "] has shape ", grad.sizes(),
                    " but ", like_name, "[", j, "] has shape ", like.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == like.scalar_type(), "catalyst_fused: ", name, "[", i, "] has dtype ",
                   dtype_name(grad.scalar_type()), " but ", like_name, "[", j, "] has dtype ",
                   dtype_name(like.scalar_type()));
  TORCH_CHECK_VALUE(grad.device() == like.device(), "catalyst_fused: ", name, "[", i, "] is on ", grad.device(),
                    " but ", like_name, "[", j, "] is on ", like.device());
  TORCH_CHECK_VALUE(grad.is_contiguous(), "catalyst_fused: ", name, "[", i, "] must be contiguous");
}

}  // namespace

void check_grads(at::TensorList grads, at::TensorList like, const char* name, const char* like_name,
                 bool check_memory) {
  TORCH_CHECK_VALUE(grads.size() == like.size(), "catalyst_fused: got ", grads.size(), " ", name, " for ",
                    like.size(), " ", like_name);
  for (size_t i = 0; i < grads.size(); ++i) check_grad(grads[i], like[i], name, i, like_name, i);
  if (check_memory) check_distinct({{like_name, like}, {name, grads}});
}

void check_selection(at::TensorList grads, at::IntArrayRef index, at::TensorList like, const char* name,
                     const char* index_name, const char* like_name, bool check_memory) {
  TORCH_CHECK_VALUE(grads.size() == index.size(), "catalyst_fused: got ", grads.size(), " ", name, " but ",
                    index.size(), " entries in ", index_name);
  for (size_t k = 0; k < index.size(); ++k) {
    const int64_t j = index[k];
    TORCH_CHECK_VALUE(j >= 0 && j < static_cast<int64_t>(like.size()) && (k == 0 || j > index[k - 1]),
                      "catalyst_fused: ", index_name, "[", k, "] = ", j, " must be an index into ", like_name,
                      " (0 to ", like.size(), " - 1) greater than the entry before it");
  }
  for (size_t k = 0; k < index.size(); ++k) {
    check_grad(grads[k], like[index[k]], name, k, like_name, static_cast<size_t>(index[k]));
  }
  if (check_memory) check_distinct({{like_name, like}, {name, grads}});
}

}  // namespace catalyst_fused
