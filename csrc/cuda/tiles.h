// The work decomposition of the GPU kernels: one int64 table per set of shapes (host code only).
//
// This is the C++ twin of catalyst_fused/backends/tables.py (read its docstring for the layout and the
// reasoning); the two must produce the same words, which tests/test_gpu_tables.py checks through the
// catalyst_fused::_gpu_tile_table operator. Used by penalty_cuda.cu; kept free of CUDA so that it also
// documents the table for the Triton kernels.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace catalyst_fused {
namespace gpu {

constexpr int64_t kTileMin = 1024;
constexpr int64_t kTileMax = 16384;
constexpr int64_t kTargetTiles = 2048;
constexpr int64_t kColE = 128;  // longest element range of a tile of a weight with column members
constexpr int64_t kRowPieces = 8;  // rows are cut into pieces of at most tile / 8 elements

enum Header : int64_t {
  kHNumTiles = 0,
  kHGroups,
  kHSegments,
  kHTensors,
  kHZero,
  kHSlots,
  kHTensorsOff,
  kHTilesOff,
  kHSegOffOff,
  kHSlotBeginOff,
  kHGroupSegOff,
  kHLookupGroupOff,
  kHLookupSlotOff,
  kHZeroOff,
  kHTile,
  kHWords,
  kHeader,
};
static_assert(kHeader == 16, "the header has 16 words (tables.HEADER)");

enum TensorField : int64_t { kTR = 0, kTL, kTK, kTRowBase, kTColBase, kTNR, kTPieces, kTC, kTensorFields };
enum TileField : int64_t { kFT = 0, kFR0, kFR1, kFE0, kFE1, kFI, kFJ, kFPad, kTileFields };

struct Member {
  int64_t tensor, dim, start, count, segment, segment_start, width;
};

struct TableInfo {
  std::vector<int64_t> words;
  int64_t num_tiles = 0, num_groups = 0, num_segments = 0, num_tensors = 0, num_slots = 0, num_zero = 0, tile = 0;
};

inline int64_t product(const std::vector<int64_t>& shape, size_t from) {
  int64_t p = 1;
  for (size_t i = from; i < shape.size(); ++i) p *= shape[i];
  return p;
}

inline int64_t tile_elements(int64_t total) {
  int64_t tile = kTileMin;
  while (tile < kTileMax && tile * kTargetTiles < total) tile *= 2;
  return tile;
}

// Members of the per-row layout (table == nullptr), or of an int64 [rows, columns] member table with 6
// (width 1) or 7 columns, checked against the shapes and segment sizes.
inline std::vector<Member> member_rows(const std::vector<std::vector<int64_t>>& shapes,
                                       const std::vector<int64_t>& segment_sizes, const int64_t* table, int64_t rows,
                                       int64_t columns) {
  std::vector<Member> members;
  const int64_t T = static_cast<int64_t>(shapes.size());
  if (table == nullptr) {
    for (int64_t t = 0; t < T; ++t) members.push_back({t, 0, 0, shapes[t][0], t, 0, 1});
    return members;
  }
  TORCH_CHECK_VALUE(columns == 6 || columns == 7,
                    "catalyst_fused: plan must be an int64 CPU tensor of shape [members, 7] (build it with "
                    "catalyst_fused.GroupLayout), got ", columns, " columns");
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t* r = table + i * columns;
    const Member m{r[0], r[1], r[2], r[3], r[4], r[5], columns == 7 ? r[6] : 1};
    TORCH_CHECK_VALUE(m.tensor >= 0 && m.tensor < T, "catalyst_fused: plan member ", i, " refers to weights[", m.tensor,
                      "] but only ", T, " weights were given");
    const auto& shape = shapes[m.tensor];
    TORCH_CHECK_VALUE((m.dim == 0 || m.dim == 1) && m.dim < static_cast<int64_t>(shape.size()),
                      "catalyst_fused: plan member ", i, " slices weights[", m.tensor, "] along dim ", m.dim);
    TORCH_CHECK_VALUE(m.start >= 0 && m.count >= 0 && m.start <= shape[m.dim] && m.count <= shape[m.dim] - m.start,
                      "catalyst_fused: plan member ", i, " takes slices [", m.start, ", ", m.start + m.count,
                      ") of weights[", m.tensor, "] along dim ", m.dim);
    TORCH_CHECK_VALUE(m.width >= 1 && m.count % m.width == 0, "catalyst_fused: plan member ", i, " has width ", m.width,
                      "; it must be >= 1 and divide its slice count ", m.count);
    TORCH_CHECK_VALUE(m.segment >= 0 && m.segment < static_cast<int64_t>(segment_sizes.size()) && m.segment_start >= 0 &&
                          m.segment_start <= segment_sizes[m.segment] &&
                          m.count / m.width <= segment_sizes[m.segment] - m.segment_start,
                      "catalyst_fused: plan member ", i, " maps outside catalysts[", m.segment, "]");
    members.push_back(m);
  }
  return members;
}

inline TableInfo build_table(const std::vector<std::vector<int64_t>>& shapes, const std::vector<int64_t>& segment_sizes,
                             const std::vector<Member>& members) {
  const int64_t T = static_cast<int64_t>(shapes.size());
  const int64_t S = static_cast<int64_t>(segment_sizes.size());
  int64_t total = 0;
  for (const auto& shape : shapes) total += product(shape, 0);
  const int64_t tile = tile_elements(total);
  const int64_t row_e = std::max<int64_t>(1, tile / kRowPieces);

  std::vector<char> has_cols(T, 0);
  for (const auto& m : members) {
    if (m.dim == 1 && m.count > 0) has_cols[m.tensor] = 1;
  }
  std::vector<int64_t> tensors, tiles;
  std::vector<int64_t> n_e(T, 0), n_r(T, 0), pieces_of(T, 1), row_base(T, 0), col_base(T, -1);
  int64_t lookup_size = 0;
  for (int64_t t = 0; t < T; ++t) {
    const auto& shape = shapes[t];
    const int64_t R = shape[0];
    const int64_t L = product(shape, 1);
    const int64_t C = shape.size() >= 2 ? shape[1] : 1;
    const int64_t K = product(shape, 2);
    std::vector<std::pair<int64_t, int64_t>> ranges;
    int64_t pieces = 1;
    if (R * L > 0) {
      if (has_cols[t]) {
        if (K <= kColE) {
          const int64_t per = kColE / K;
          for (int64_t c = 0; c < C; c += per) ranges.emplace_back(c * K, std::min(c + per, C) * K);
        } else {
          pieces = (K + kColE - 1) / kColE;
          for (int64_t c = 0; c < C; ++c) {
            for (int64_t p = 0; p < pieces; ++p) ranges.emplace_back(c * K + p * kColE, c * K + std::min((p + 1) * kColE, K));
          }
        }
      } else {
        for (int64_t e = 0; e < L; e += row_e) ranges.emplace_back(e, std::min(e + row_e, L));
      }
      int64_t longest = 0;
      for (const auto& r : ranges) longest = std::max(longest, r.second - r.first);
      const int64_t rows_per_tile = std::max<int64_t>(1, tile / longest);
      n_r[t] = (R + rows_per_tile - 1) / rows_per_tile;
      for (int64_t i = 0; i < n_r[t]; ++i) {
        const int64_t r0 = i * rows_per_tile, r1 = std::min(R, (i + 1) * rows_per_tile);
        for (size_t j = 0; j < ranges.size(); ++j) {
          tiles.insert(tiles.end(), {t, r0, r1, ranges[j].first, ranges[j].second, i, static_cast<int64_t>(j), 0});
        }
      }
    }
    n_e[t] = static_cast<int64_t>(ranges.size());
    pieces_of[t] = pieces;
    row_base[t] = lookup_size;
    lookup_size += R;
    if (has_cols[t]) {
      col_base[t] = lookup_size;
      lookup_size += C;
    }
    tensors.insert(tensors.end(), {R, L, K, row_base[t], col_base[t], n_r[t], pieces, C});
  }

  std::vector<int64_t> segment_offsets(S + 1, 0);
  for (int64_t s = 0; s < S; ++s) segment_offsets[s + 1] = segment_offsets[s] + segment_sizes[s];
  const int64_t G = segment_offsets[S];
  std::vector<int64_t> group_segment(G, 0);
  for (int64_t s = 0; s < S; ++s) std::fill(group_segment.begin() + segment_offsets[s], group_segment.begin() + segment_offsets[s + 1], s);
  auto contributions = [&](int64_t t, int64_t dim) { return dim == 0 ? n_e[t] : n_r[t] * pieces_of[t]; };

  std::vector<int64_t> group_count(G, 0);
  for (const auto& m : members) {
    const int64_t c = contributions(m.tensor, m.dim);
    const int64_t g0 = segment_offsets[m.segment] + m.segment_start;
    for (int64_t k = 0; k < m.count; ++k) group_count[g0 + k / m.width] += c;
  }
  std::vector<int64_t> slot_begin(G + 1, 0);
  for (int64_t g = 0; g < G; ++g) slot_begin[g + 1] = slot_begin[g] + (group_count[g] >= 2 ? group_count[g] : 0);
  std::vector<int64_t> fill(slot_begin.begin(), slot_begin.end() - 1);
  std::vector<int64_t> lookup_group(lookup_size, -1), lookup_slot(lookup_size, -1);
  for (const auto& m : members) {
    const int64_t c = contributions(m.tensor, m.dim);
    const int64_t base = m.dim == 0 ? row_base[m.tensor] : col_base[m.tensor];
    const int64_t g0 = segment_offsets[m.segment] + m.segment_start;
    for (int64_t k = 0; k < m.count; ++k) {
      const int64_t g = g0 + k / m.width;
      TORCH_CHECK_VALUE(lookup_group[base + m.start + k] == -1, "catalyst_fused: slice ", m.start + k, " of weights[",
                        m.tensor, "] along dim ", m.dim, " is used by more than one plan member");
      lookup_group[base + m.start + k] = g;
      if (group_count[g] >= 2) {
        lookup_slot[base + m.start + k] = fill[g];
        fill[g] += c;
      }
    }
  }
  std::vector<int64_t> zero_groups;
  for (int64_t g = 0; g < G; ++g) {
    if (group_count[g] == 0) zero_groups.push_back(g);
  }

  TableInfo info;
  std::vector<int64_t>& words = info.words;
  words.assign(kHeader, 0);
  auto append = [&](const std::vector<int64_t>& section) {
    const int64_t offset = static_cast<int64_t>(words.size());
    words.insert(words.end(), section.begin(), section.end());
    return offset;
  };
  words[kHTensorsOff] = append(tensors);
  words[kHTilesOff] = append(tiles);
  words[kHSegOffOff] = append(segment_offsets);
  words[kHSlotBeginOff] = append(slot_begin);
  words[kHGroupSegOff] = append(group_segment);
  words[kHLookupGroupOff] = append(lookup_group);
  words[kHLookupSlotOff] = append(lookup_slot);
  words[kHZeroOff] = append(zero_groups);
  info.num_tiles = static_cast<int64_t>(tiles.size()) / kTileFields;
  info.num_groups = G;
  info.num_segments = S;
  info.num_tensors = T;
  info.num_slots = slot_begin[G];
  info.num_zero = static_cast<int64_t>(zero_groups.size());
  info.tile = tile;
  words[kHNumTiles] = info.num_tiles;
  words[kHGroups] = G;
  words[kHSegments] = S;
  words[kHTensors] = T;
  words[kHZero] = info.num_zero;
  words[kHSlots] = info.num_slots;
  words[kHTile] = tile;
  words[kHWords] = static_cast<int64_t>(words.size());
  return info;
}

}  // namespace gpu
}  // namespace catalyst_fused
