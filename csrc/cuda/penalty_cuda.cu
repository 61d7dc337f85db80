// CUDA kernels of the fused Catalyst penalty (multi-tensor: every weight of a model per launch).
//
// Work decomposition: the tile table of tiles.h / catalyst_fused/backends/tables.py (read its docstring),
// shared with the Triton kernels. Per call:
//   norm_kernel   one block per tile. Each element of the tile is read once; its square goes into its
//                 row's sum (a team of S threads per row, S = 1..32 or the whole block, shuffle sums)
//                 and, for weights with column members, into per-thread column accumulators combined
//                 through shared memory in a fixed order. A group's contributions are finished on the
//                 spot (one contribution) or through slots and a per-group counter; the block that
//                 completes a group writes n, c, |d| n (and, in-place, adds scale * sign(d) * n into the
//                 catalyst gradient). The last block adds the groups' |d| n in fp64 into the penalty.
//   grad_kernel   one block per tile writes (or adds) scale * (row factor + column factor) * x, factor =
//                 |d| / n of the element's row and column groups; extra blocks write the catalyst
//                 gradients (autograd backward). Every element has exactly one writer.
// Launches: forward 1, backward 1, in-place 2; plus, only when they change, one upload of the data
// pointers per 496 of them (a kernel that takes them as arguments). No floating-point atomics, no host
// synchronisation in steady state; results are bitwise reproducible. The table is built on the host once
// per set of shapes and copied once (pinned memory, then a wait, the only host sync); pointer tables and
// the per-stream workspace (slots, counters, terms) are cached on the device.
//
// CUDA graphs: a capture works once the shapes were seen outside it (the table must exist); the pointer
// table and workspace of a captured call are allocated in the capture (graph pool), uploaded by kernels
// (so replays rewrite them from the graph, not from host memory) and kept alive for the process.
#include "../penalty_math.h"
#include "../plan.h"
#include "tiles.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace catalyst_fused {
namespace {

using namespace gpu;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPositions = static_cast<int>(kColE) / 32;  // column lanes per thread (team of 32, <= kColE elements)
constexpr int kCatalystBlock = kThreads;
constexpr int kUploadWords = 496;  // kernel parameters stay under 4 KB
constexpr size_t kPointerCacheSize = 8;
constexpr size_t kTableCacheSize = 16;

// Kernel argument: the sections of the table, the call's pointer table, sizes.
struct Geometry {
  const int64_t* tensors;
  const int64_t* tiles;
  const int64_t* segment_offsets;
  const int64_t* slot_begin;
  const int64_t* group_segment;
  const int64_t* lookup_group;
  const int64_t* lookup_slot;
  const int64_t* zero_groups;
  const int64_t* ptrs;  // [weights T | weight grads T | catalysts S | catalyst grads S]
  int64_t num_tiles, num_groups, num_segments, num_tensors, num_zero;
};

template <typename T>
__device__ inline T* pointer(const Geometry& geo, int64_t index) {
  return reinterpret_cast<T*>(static_cast<intptr_t>(geo.ptrs[index]));
}

template <typename scalar_t, typename acc_t>
struct CatalystEntry {
  acc_t d;
  int64_t segment;
  int64_t index;
};

template <typename scalar_t, typename acc_t>
__device__ inline CatalystEntry<scalar_t, acc_t> catalyst_of(const Geometry& geo, int64_t g) {
  const int64_t s = geo.group_segment[g];
  const int64_t j = g - geo.segment_offsets[s];
  const scalar_t* d = pointer<const scalar_t>(geo, 2 * geo.num_tensors + s);
  return {static_cast<acc_t>(d[j]), s, j};
}

template <typename scalar_t, typename acc_t>
__device__ inline acc_t factor_of(const Geometry& geo, const acc_t* norms, int64_t g) {
  const auto c = catalyst_of<scalar_t, acc_t>(geo, g);
  return weight_grad_scale(static_cast<acc_t>(fabs(c.d)), norms[g]);
}

template <typename acc_t>
struct Outputs {
  acc_t* partials;
  int* counters;  // [G + 1]: per group, then the tile counter
  acc_t* terms;
  acc_t* norms;
  acc_t* ratios;
  acc_t* penalty;
};

template <typename scalar_t, typename acc_t, bool kCatalystGrad>
__device__ void finalize(const Geometry& geo, const Outputs<acc_t>& out, int64_t g, acc_t sumsq, acc_t scale) {
  const auto c = catalyst_of<scalar_t, acc_t>(geo, g);
  const acc_t n = sqrt(sumsq);
  const acc_t abs_d = fabs(c.d);
  out.norms[g] = n;
  out.ratios[g] = catalyst_ratio(abs_d, n);
  out.terms[g] = abs_d * n;
  if (kCatalystGrad) {
    scalar_t* gd = pointer<scalar_t>(geo, 2 * geo.num_tensors + geo.num_segments + c.segment);
    gd[c.index] = static_cast<scalar_t>(static_cast<acc_t>(gd[c.index]) + scale * catalyst_grad(c.d, n));
  }
}

// One contribution (a sum of squares) to group g: the group's only one (slot < 0) finishes it here;
// otherwise it goes to its slot and the contribution that completes the group adds the slots in order.
template <typename scalar_t, typename acc_t, bool kCatalystGrad>
__device__ void contribute(const Geometry& geo, const Outputs<acc_t>& out, int64_t g, int64_t slot, acc_t value,
                           acc_t scale) {
  if (slot < 0) {
    finalize<scalar_t, acc_t, kCatalystGrad>(geo, out, g, value, scale);
    return;
  }
  out.partials[slot] = value;
  __threadfence();  // the slot is visible before the counter says so
  const int64_t begin = geo.slot_begin[g];
  const int64_t count = geo.slot_begin[g + 1] - begin;
  if (atomicAdd(out.counters + g, 1) + 1 == count) {
    __threadfence();
    // In fp64: a row of 10^9 elements has 500,000 partial sums, added here by one thread in order.
    double total = 0;
    for (int64_t k = 0; k < count; ++k) total += static_cast<double>(__ldcg(out.partials + begin + k));
    out.counters[g] = 0;  // ready for the next launch
    finalize<scalar_t, acc_t, kCatalystGrad>(geo, out, g, static_cast<acc_t>(total), scale);
  }
}

// Sum over a team of `team` threads (a power of two up to 32, or the whole block); every thread of the
// block must call it. Fixed order: bitwise reproducible.
template <typename acc_t>
__device__ inline acc_t team_sum(acc_t value, int team, acc_t* buffer) {
  if (team <= 32) {
    for (int offset = team / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset, team);
    return value;
  }
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  __syncthreads();  // the previous call's readers are done with the buffer
  if (threadIdx.x % 32 == 0) buffer[threadIdx.x / 32] = value;
  __syncthreads();
  acc_t total = 0;
  for (int w = 0; w < kWarps; ++w) total += buffer[w];
  return total;
}

__device__ inline int team_size(int64_t units, bool whole_block_allowed) {
  if (units >= kThreads && whole_block_allowed) return kThreads;
  int team = 1;
  while (team < 32 && team < units) team *= 2;
  return team;
}

// 16-byte loads of 16 / sizeof(scalar_t) elements.
template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / static_cast<int>(sizeof(scalar_t));
  scalar_t v[kSize];
};

struct Tile {
  int64_t t, r0, r1, e0, e1, i, j;
  int64_t L, K, row_base, col_base, pieces;
};

__device__ inline Tile load_tile(const Geometry& geo, int64_t index) {
  const int64_t* tile = geo.tiles + index * kTileFields;
  const int64_t* info = geo.tensors + tile[kFT] * kTensorFields;
  return {tile[kFT], tile[kFR0], tile[kFR1], tile[kFE0], tile[kFE1], tile[kFI], tile[kFJ],
          info[kTL], info[kTK], info[kTRowBase], info[kTColBase], info[kTPieces]};
}

// Whether the rows of a row tile can be read in 16-byte packs.
template <typename scalar_t>
__device__ inline bool packed_rows(const Tile& tile, const void* base) {
  constexpr int kPack = Pack<scalar_t>::kSize;
  return tile.col_base < 0 && reinterpret_cast<uintptr_t>(base) % 16 == 0 && tile.L % kPack == 0 &&
         tile.e0 % kPack == 0 && (tile.e1 - tile.e0) % kPack == 0;
}

template <typename scalar_t, typename acc_t, bool kCatalystGrad>
__device__ void norm_tile(const Geometry& geo, const Outputs<acc_t>& out, int64_t index, acc_t scale, acc_t* columns,
                          acc_t* buffer) {
  const Tile tile = load_tile(geo, index);
  const int64_t E = tile.e1 - tile.e0;
  const bool has_columns = tile.col_base >= 0;
  const scalar_t* x = pointer<const scalar_t>(geo, tile.t);
  constexpr int kPack = Pack<scalar_t>::kSize;
  const bool packed = packed_rows<scalar_t>(tile, x);
  const int64_t units = packed ? E / kPack : E;
  const int team = team_size(units, !has_columns);
  const int teams = kThreads / team, member = threadIdx.x / team, lane = threadIdx.x % team;
  acc_t column_sums[kPositions];
#pragma unroll
  for (int m = 0; m < kPositions; ++m) column_sums[m] = 0;
  const int64_t iterations = (tile.r1 - tile.r0 + teams - 1) / teams;
  for (int64_t it = 0; it < iterations; ++it) {  // the same trip count for every thread (team_sum syncs)
    const int64_t r = tile.r0 + it * teams + member;
    const bool active = r < tile.r1;
    acc_t sum = 0;
    if (active) {
      const scalar_t* row = x + r * tile.L + tile.e0;
      if (has_columns) {  // E <= kColE = kPositions * 32 and team == 32 (or E <= team)
#pragma unroll
        for (int m = 0; m < kPositions; ++m) {
          const int64_t e = lane + m * team;
          if (e < E) {
            const acc_t v = static_cast<acc_t>(row[e]);
            sum += v * v;
            column_sums[m] += v * v;
          }
        }
      } else if (packed) {
        const Pack<scalar_t>* packs = reinterpret_cast<const Pack<scalar_t>*>(row);
        for (int64_t u = lane; u < units; u += team) {
          const Pack<scalar_t> p = packs[u];
#pragma unroll
          for (int k = 0; k < kPack; ++k) {
            const acc_t v = static_cast<acc_t>(p.v[k]);
            sum += v * v;
          }
        }
      } else {
        for (int64_t e = lane; e < E; e += team) {
          const acc_t v = static_cast<acc_t>(row[e]);
          sum += v * v;
        }
      }
    }
    sum = team_sum(sum, team, buffer);
    if (active && lane == 0) {
      const int64_t g = geo.lookup_group[tile.row_base + r];
      if (g >= 0) {
        const int64_t slot = geo.lookup_slot[tile.row_base + r];
        contribute<scalar_t, acc_t, kCatalystGrad>(geo, out, g, slot >= 0 ? slot + tile.j : slot, sum, scale);
      }
    }
  }
  if (!has_columns) return;
  // Column sums: per element position over the teams (columns[member * E + e]), then over the K
  // positions of each column, in a fixed order.
  __syncthreads();
#pragma unroll
  for (int m = 0; m < kPositions; ++m) {
    const int64_t e = lane + m * team;
    if (e < E) columns[member * E + e] = column_sums[m];
  }
  __syncthreads();
  acc_t* positions = columns + kThreads * kPositions;
  for (int64_t e = threadIdx.x; e < E; e += kThreads) {
    acc_t s = 0;
    for (int q = 0; q < teams; ++q) s += columns[q * E + e];
    positions[e] = s;
  }
  __syncthreads();
  if (tile.pieces == 1) {
    const int64_t first = tile.e0 / tile.K;
    for (int64_t c = threadIdx.x; c < E / tile.K; c += kThreads) {
      acc_t s = 0;
      for (int64_t k = 0; k < tile.K; ++k) s += positions[c * tile.K + k];
      const int64_t g = geo.lookup_group[tile.col_base + first + c];
      if (g >= 0) {
        const int64_t slot = geo.lookup_slot[tile.col_base + first + c];
        contribute<scalar_t, acc_t, kCatalystGrad>(geo, out, g, slot >= 0 ? slot + tile.i : slot, s, scale);
      }
    }
  } else if (threadIdx.x == 0) {  // piece j % pieces of column j / pieces
    acc_t s = 0;
    for (int64_t e = 0; e < E; ++e) s += positions[e];
    const int64_t column = tile.j / tile.pieces;
    const int64_t g = geo.lookup_group[tile.col_base + column];
    if (g >= 0) {
      const int64_t slot = geo.lookup_slot[tile.col_base + column];
      contribute<scalar_t, acc_t, kCatalystGrad>(
          geo, out, g, slot >= 0 ? slot + tile.i * tile.pieces + tile.j % tile.pieces : slot, s, scale);
    }
  }
}

template <typename scalar_t, typename acc_t, bool kCatalystGrad>
__global__ void __launch_bounds__(kThreads)
    norm_kernel(Geometry geo, Outputs<acc_t> out, double scale_arg) {
  __shared__ acc_t columns[kThreads * kPositions + kColE];
  __shared__ acc_t buffer[kWarps];
  __shared__ int last_block;
  const acc_t scale = static_cast<acc_t>(scale_arg);
  if (static_cast<int64_t>(blockIdx.x) < geo.num_tiles) {
    norm_tile<scalar_t, acc_t, kCatalystGrad>(geo, out, blockIdx.x, scale, columns, buffer);
  }
  // The last block to finish adds up the penalty (every group is finished by then). Every thread fences
  // its own writes (terms, norms) before thread 0 signals the block's end.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    last_block = atomicAdd(out.counters + geo.num_groups, 1) == static_cast<int>(gridDim.x) - 1;
  }
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  for (int64_t z = threadIdx.x; z < geo.num_zero; z += kThreads) {
    finalize<scalar_t, acc_t, kCatalystGrad>(geo, out, geo.zero_groups[z], acc_t(0), scale);
  }
  __syncthreads();
  double total = 0;
  for (int64_t g = threadIdx.x; g < geo.num_groups; g += kThreads) total += static_cast<double>(__ldcg(out.terms + g));
  __shared__ double totals[kWarps];
  for (int offset = 16; offset > 0; offset /= 2) total += __shfl_xor_sync(0xffffffffu, total, offset);
  if (threadIdx.x % 32 == 0) totals[threadIdx.x / 32] = total;
  __syncthreads();
  if (threadIdx.x == 0) {
    double sum = 0;
    for (int w = 0; w < kWarps; ++w) sum += totals[w];
    *out.penalty = static_cast<acc_t>(sum);
    out.counters[geo.num_groups] = 0;
  }
}

template <typename scalar_t, typename acc_t, bool kAccumulate>
__device__ inline void store(scalar_t* out, const scalar_t* x, int64_t e, acc_t factor, bool covered) {
  const acc_t value = factor * static_cast<acc_t>(x[e]);
  if (kAccumulate) {
    if (covered) out[e] = static_cast<scalar_t>(static_cast<acc_t>(out[e]) + value);
  } else {
    out[e] = covered ? static_cast<scalar_t>(value) : scalar_t(0);
  }
}

template <typename scalar_t, typename acc_t, bool kAccumulate>
__device__ void grad_tile(const Geometry& geo, const acc_t* norms, int64_t index, acc_t factor_scale) {
  const Tile tile = load_tile(geo, index);
  const int64_t E = tile.e1 - tile.e0;
  const bool has_columns = tile.col_base >= 0;
  const scalar_t* x = pointer<const scalar_t>(geo, tile.t);
  scalar_t* grad = pointer<scalar_t>(geo, geo.num_tensors + tile.t);
  constexpr int kPack = Pack<scalar_t>::kSize;
  const bool packed = packed_rows<scalar_t>(tile, x) && reinterpret_cast<uintptr_t>(grad) % 16 == 0;
  const int64_t units = packed ? E / kPack : E;
  const int team = team_size(units, !has_columns);
  const int teams = kThreads / team, member = threadIdx.x / team, lane = threadIdx.x % team;
  acc_t column_factor[kPositions];
  bool column_covered[kPositions];
#pragma unroll
  for (int m = 0; m < kPositions; ++m) {
    column_factor[m] = 0;
    column_covered[m] = false;
    const int64_t e = lane + m * team;
    if (has_columns && e < E) {  // one division per lane and tile
      const int64_t column = tile.pieces == 1 ? (tile.e0 + e) / tile.K : tile.j / tile.pieces;
      const int64_t g = geo.lookup_group[tile.col_base + column];
      column_covered[m] = g >= 0;
      if (g >= 0) column_factor[m] = factor_of<scalar_t, acc_t>(geo, norms, g);
    }
  }
  for (int64_t r = tile.r0 + member; r < tile.r1; r += teams) {
    const int64_t g = geo.lookup_group[tile.row_base + r];
    const bool row_covered = g >= 0;
    const acc_t row_factor = row_covered ? factor_of<scalar_t, acc_t>(geo, norms, g) : acc_t(0);
    const scalar_t* xr = x + r * tile.L + tile.e0;
    scalar_t* gr = grad + r * tile.L + tile.e0;
    if (has_columns) {
#pragma unroll
      for (int m = 0; m < kPositions; ++m) {
        const int64_t e = lane + m * team;
        if (e < E) {
          store<scalar_t, acc_t, kAccumulate>(gr, xr, e, factor_scale * (row_factor + column_factor[m]),
                                              row_covered || column_covered[m]);
        }
      }
    } else if (packed) {
      if (kAccumulate && !row_covered) continue;
      const acc_t factor = factor_scale * row_factor;
      const Pack<scalar_t>* xp = reinterpret_cast<const Pack<scalar_t>*>(xr);
      Pack<scalar_t>* gp = reinterpret_cast<Pack<scalar_t>*>(gr);
      for (int64_t u = lane; u < units; u += team) {
        const Pack<scalar_t> in = xp[u];
        Pack<scalar_t> result;
        if (kAccumulate) result = gp[u];
#pragma unroll
        for (int k = 0; k < kPack; ++k) {
          const acc_t value = factor * static_cast<acc_t>(in.v[k]);
          if (kAccumulate) {
            result.v[k] = static_cast<scalar_t>(static_cast<acc_t>(result.v[k]) + value);
          } else {
            result.v[k] = row_covered ? static_cast<scalar_t>(value) : scalar_t(0);
          }
        }
        gp[u] = result;
      }
    } else {
      if (kAccumulate && !row_covered) continue;
      const acc_t factor = factor_scale * row_factor;
      for (int64_t e = lane; e < E; e += team) store<scalar_t, acc_t, kAccumulate>(gr, xr, e, factor, row_covered);
    }
  }
}

template <typename scalar_t, typename acc_t, bool kAccumulate>
__global__ void __launch_bounds__(kThreads)
    grad_kernel(Geometry geo, const acc_t* norms, const acc_t* grad_penalty, double scale_arg) {
  const acc_t scale = static_cast<acc_t>(scale_arg);
  const acc_t factor_scale = kAccumulate ? scale : static_cast<acc_t>(*grad_penalty) * scale;
  const int64_t block = blockIdx.x;
  if (block < geo.num_tiles) {
    grad_tile<scalar_t, acc_t, kAccumulate>(geo, norms, block, factor_scale);
  } else if (!kAccumulate) {  // catalyst gradients of the autograd backward: grad * sign(d) * n
    const int64_t g = (block - geo.num_tiles) * kCatalystBlock + threadIdx.x;
    if (g < geo.num_groups) {
      const auto c = catalyst_of<scalar_t, acc_t>(geo, g);
      scalar_t* gd = pointer<scalar_t>(geo, 2 * geo.num_tensors + geo.num_segments + c.segment);
      gd[c.index] = static_cast<scalar_t>(factor_scale * catalyst_grad(c.d, norms[g]));
    }
  }
}

struct UploadWords {
  int64_t v[kUploadWords];
};

__global__ void upload_kernel(int64_t* destination, UploadWords words, int count) {
  for (int k = threadIdx.x; k < count; k += blockDim.x) destination[k] = words.v[k];
}

// ------------------------------------------------------------------------------------------------------
// Host side: cached device tables
// ------------------------------------------------------------------------------------------------------

// Writes `words` into `destination` with kernels that carry them as arguments: no host memory is read
// when the work runs, so it is safe to capture in a CUDA graph and replay.
void upload(int64_t* destination, const std::vector<int64_t>& words, cudaStream_t stream) {
  for (size_t begin = 0; begin < words.size(); begin += kUploadWords) {
    UploadWords chunk{};
    const int count = static_cast<int>(std::min<size_t>(kUploadWords, words.size() - begin));
    std::copy(words.begin() + begin, words.begin() + begin + count, chunk.v);
    upload_kernel<<<1, 128, 0, stream>>>(destination + begin, chunk, count);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

struct Workspace {
  at::Tensor partials, counters, terms;
};

struct DeviceTables {
  TableInfo info;
  at::Tensor table;  // device copy of info.words
  bool captured = false;  // read by a captured graph: never evicted
  std::list<std::pair<std::vector<int64_t>, at::Tensor>> pointers;  // key: stream, then the pointers
  std::map<std::pair<int64_t, int>, Workspace> workspaces;  // (stream, accumulation dtype)
};

std::mutex cache_mutex;
std::list<std::pair<std::vector<int64_t>, std::shared_ptr<DeviceTables>>> table_cache;  // most recent first
std::vector<at::Tensor> graph_owned;  // pointer tables and workspaces of captured calls (see file comment)

bool capturing() { return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None; }

std::vector<std::vector<int64_t>> shapes_of(at::TensorList weights) {
  std::vector<std::vector<int64_t>> shapes;
  for (const auto& w : weights) shapes.emplace_back(w.sizes().begin(), w.sizes().end());
  return shapes;
}

std::vector<int64_t> sizes_of(at::TensorList catalysts) {
  std::vector<int64_t> sizes;
  for (const auto& d : catalysts) sizes.push_back(d.size(0));
  return sizes;
}

std::shared_ptr<DeviceTables> device_tables(at::TensorList weights, at::TensorList catalysts,
                                            const c10::optional<at::Tensor>& plan) {
  std::vector<int64_t> key{weights[0].device().index(), static_cast<int64_t>(weights.size()),
                           static_cast<int64_t>(catalysts.size())};
  for (const auto& w : weights) {
    key.push_back(w.dim());
    key.insert(key.end(), w.sizes().begin(), w.sizes().end());
  }
  for (const auto& d : catalysts) key.push_back(d.size(0));
  const bool has_plan = plan.has_value() && plan->defined();
  if (has_plan) {
    key.push_back(plan->size(0));
    key.push_back(plan->size(1));
    key.insert(key.end(), plan->const_data_ptr<int64_t>(), plan->const_data_ptr<int64_t>() + plan->numel());
  }
  for (auto it = table_cache.begin(); it != table_cache.end(); ++it) {
    if (it->first == key) {
      table_cache.splice(table_cache.begin(), table_cache, it);
      return it->second;
    }
  }
  TORCH_CHECK(!capturing(), "catalyst_fused: the CUDA kernels were first called with these shapes inside a CUDA graph "
              "capture; call the penalty once outside the capture (a warm-up step) first");
  auto shapes = shapes_of(weights);
  auto sizes = sizes_of(catalysts);
  const auto members = has_plan ? member_rows(shapes, sizes, plan->const_data_ptr<int64_t>(), plan->size(0), plan->size(1))
                                : member_rows(shapes, sizes, nullptr, 0, 0);
  auto tables = std::make_shared<DeviceTables>();
  tables->info = build_table(shapes, sizes, members);
  const auto& words = tables->info.words;
  at::Tensor host = at::empty({static_cast<int64_t>(words.size())}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(words.begin(), words.end(), host.mutable_data_ptr<int64_t>());
  tables->table = at::empty({static_cast<int64_t>(words.size())}, weights[0].options().dtype(at::kLong));
  tables->table.copy_(host, /*non_blocking=*/true);
  // Once per set of shapes: wait for the copy, so that any stream (or a later capture) may read it.
  at::cuda::getCurrentCUDAStream().synchronize();
  table_cache.emplace_front(std::move(key), tables);
  while (table_cache.size() > kTableCacheSize) {
    auto victim = std::find_if(table_cache.rbegin(), table_cache.rend(), [](const auto& e) { return !e.second->captured; });
    if (victim == table_cache.rend()) break;
    // Its tables may still be read by work queued on another stream.
    C10_CUDA_CHECK(cudaDeviceSynchronize());
    table_cache.erase(std::next(victim).base());
  }
  return tables;
}

// The data pointers on the device: cached per stream (a steady training loop copies nothing); inside a
// capture, a fresh table owned by the graph.
at::Tensor pointer_table(DeviceTables& tables, const std::vector<int64_t>& pointers, const at::TensorOptions& options) {
  auto stream = at::cuda::getCurrentCUDAStream();
  if (capturing()) {
    tables.captured = true;
    at::Tensor table = at::empty({static_cast<int64_t>(pointers.size())}, options.dtype(at::kLong));
    upload(table.mutable_data_ptr<int64_t>(), pointers, stream);
    graph_owned.push_back(table);
    return table;
  }
  std::vector<int64_t> key{static_cast<int64_t>(stream.id())};
  key.insert(key.end(), pointers.begin(), pointers.end());
  for (auto it = tables.pointers.begin(); it != tables.pointers.end(); ++it) {
    if (it->first == key) {
      tables.pointers.splice(tables.pointers.begin(), tables.pointers, it);
      return it->second;
    }
  }
  at::Tensor table = at::empty({static_cast<int64_t>(pointers.size())}, options.dtype(at::kLong));
  upload(table.mutable_data_ptr<int64_t>(), pointers, stream);
  tables.pointers.emplace_front(std::move(key), table);
  // Used on this stream only, so freeing the oldest is stream-ordered.
  if (tables.pointers.size() > kPointerCacheSize) tables.pointers.pop_back();
  return table;
}

Workspace workspace(DeviceTables& tables, at::ScalarType acc, const at::TensorOptions& options) {
  const auto& info = tables.info;
  auto make = [&] {
    return Workspace{at::empty({std::max<int64_t>(info.num_slots, 1)}, options.dtype(acc)),
                     at::zeros({info.num_groups + 1}, options.dtype(at::kInt)),
                     at::empty({std::max<int64_t>(info.num_groups, 1)}, options.dtype(acc))};
  };
  if (capturing()) {
    Workspace space = make();
    graph_owned.insert(graph_owned.end(), {space.partials, space.counters, space.terms});
    return space;
  }
  const std::pair<int64_t, int> key{static_cast<int64_t>(at::cuda::getCurrentCUDAStream().id()), static_cast<int>(acc)};
  auto it = tables.workspaces.find(key);
  if (it == tables.workspaces.end()) it = tables.workspaces.emplace(key, make()).first;
  return it->second;
}

std::vector<int64_t> pointers_of(at::TensorList weights, at::TensorList weight_grads, at::TensorList catalysts,
                                 at::TensorList catalyst_grads) {
  std::vector<int64_t> out;
  auto add = [&](at::TensorList list, size_t n) {
    for (size_t k = 0; k < n; ++k) {
      out.push_back(list.empty() ? 0 : static_cast<int64_t>(reinterpret_cast<intptr_t>(list[k].data_ptr())));
    }
  };
  add(weights, weights.size());
  add(weight_grads, weights.size());
  add(catalysts, catalysts.size());
  add(catalyst_grads, catalysts.size());
  return out;
}

Geometry geometry(const DeviceTables& tables, const at::Tensor& pointers) {
  const int64_t* base = tables.table.const_data_ptr<int64_t>();
  const auto& w = tables.info.words;
  const auto& info = tables.info;
  return Geometry{base + w[kHTensorsOff], base + w[kHTilesOff], base + w[kHSegOffOff], base + w[kHSlotBeginOff],
                  base + w[kHGroupSegOff], base + w[kHLookupGroupOff], base + w[kHLookupSlotOff], base + w[kHZeroOff],
                  pointers.const_data_ptr<int64_t>(), info.num_tiles, info.num_groups, info.num_segments,
                  info.num_tensors, info.num_zero};
}

// Everything a launch needs, prepared under the cache lock. Holds the tables it points into, so that
// another thread evicting them from the caches cannot free them before the launch.
struct Prepared {
  Geometry geo;
  Workspace space;
  int64_t num_tiles, num_groups;
  std::shared_ptr<DeviceTables> tables;
  at::Tensor pointers;
};

Prepared prepare(at::TensorList weights, at::TensorList catalysts, const c10::optional<at::Tensor>& plan,
                 at::TensorList weight_grads, at::TensorList catalyst_grads) {
  const std::lock_guard<std::mutex> lock(cache_mutex);
  auto tables = device_tables(weights, catalysts, plan);
  const auto options = weights[0].options();
  at::Tensor ptrs = pointer_table(*tables, pointers_of(weights, weight_grads, catalysts, catalyst_grads), options);
  Workspace space = workspace(*tables, accumulation_dtype(weights[0].scalar_type()), options);
  // The returned Geometry points into tensors the caches (or graph_owned) keep alive.
  return {geometry(*tables, ptrs), space, tables->info.num_tiles, tables->info.num_groups, tables, ptrs};
}

template <typename scalar_t, typename acc_t, bool kCatalystGrad>
void launch_norms(const Prepared& p, const at::Tensor& norms, const at::Tensor& ratios, const at::Tensor& penalty,
                  double scale) {
  const Outputs<acc_t> out{p.space.partials.mutable_data_ptr<acc_t>(), p.space.counters.mutable_data_ptr<int>(),
                           p.space.terms.mutable_data_ptr<acc_t>(), norms.mutable_data_ptr<acc_t>(),
                           ratios.mutable_data_ptr<acc_t>(), penalty.mutable_data_ptr<acc_t>()};
  const unsigned blocks = static_cast<unsigned>(std::max<int64_t>(p.num_tiles, 1));
  norm_kernel<scalar_t, acc_t, kCatalystGrad><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(p.geo, out, scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> run_norms(const Prepared& p, at::TensorList weights, bool catalyst_grad,
                                                         double scale) {
  const auto acc_type = accumulation_dtype(weights[0].scalar_type());
  const auto options = weights[0].options().dtype(acc_type);
  at::Tensor norms = at::empty({p.num_groups}, options);
  at::Tensor ratios = at::empty({p.num_groups}, options);
  at::Tensor penalty = at::empty({}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "catalyst_norms_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (catalyst_grad) {
      launch_norms<scalar_t, acc_t, true>(p, norms, ratios, penalty, scale);
    } else {
      launch_norms<scalar_t, acc_t, false>(p, norms, ratios, penalty, scale);
    }
  });
  return {penalty, norms, ratios};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> penalty_forward_cuda(at::TensorList weights, at::TensorList catalysts,
                                                                      const c10::optional<at::Tensor>& plan_table) {
  build_plan(weights, catalysts, plan_table);  // validation shared with the CPU path
  const c10::cuda::CUDAGuard guard(weights[0].device());
  const Prepared p = prepare(weights, catalysts, plan_table, {}, {});
  return run_norms(p, weights, false, 1.0);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> penalty_backward_cuda(
    const at::Tensor& grad_penalty, at::TensorList weights, at::TensorList catalysts, const at::Tensor& norms,
    const c10::optional<at::Tensor>& plan_table) {
  const Plan plan = build_plan(weights, catalysts, plan_table);
  const auto acc_type = accumulation_dtype(weights[0].scalar_type());
  TORCH_CHECK_VALUE(norms.dim() == 1 && norms.numel() == plan.num_groups && norms.scalar_type() == acc_type &&
                        norms.is_contiguous() && norms.device() == weights[0].device(),
                    "catalyst_fused: norms must be the contiguous ", dtype_name(acc_type), " [", plan.num_groups,
                    "] tensor returned by penalty_forward, on ", weights[0].device());
  TORCH_CHECK_VALUE(grad_penalty.numel() == 1 && grad_penalty.device() == weights[0].device(),
                    "catalyst_fused: grad_penalty must have one element on ", weights[0].device(), ", got shape ",
                    grad_penalty.sizes(), " on ", grad_penalty.device());
  const c10::cuda::CUDAGuard guard(weights[0].device());
  std::vector<at::Tensor> weight_grads, catalyst_grads;
  for (const auto& w : weights) weight_grads.push_back(at::empty_like(w, at::MemoryFormat::Contiguous));
  for (const auto& d : catalysts) catalyst_grads.push_back(at::empty_like(d, at::MemoryFormat::Contiguous));
  const Prepared p = prepare(weights, catalysts, plan_table, weight_grads, catalyst_grads);
  at::Tensor grad = grad_penalty.reshape({1});
  if (grad.scalar_type() != acc_type) grad = grad.to(acc_type);
  const int64_t blocks = p.num_tiles + (p.num_groups + kCatalystBlock - 1) / kCatalystBlock;
  if (blocks == 0) return {weight_grads, catalyst_grads};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "catalyst_grads_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    grad_kernel<scalar_t, acc_t, false><<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        p.geo, norms.const_data_ptr<acc_t>(), grad.const_data_ptr<acc_t>(), 1.0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {weight_grads, catalyst_grads};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> penalty_accumulate_cuda(at::TensorList weights, at::TensorList catalysts,
                                                                         at::TensorList weight_grads,
                                                                         at::TensorList catalyst_grads, double scale,
                                                                         const c10::optional<at::Tensor>& plan_table) {
  build_plan(weights, catalysts, plan_table);
  check_grads(weight_grads, weights, "weight_grads", "weights");
  check_grads(catalyst_grads, catalysts, "catalyst_grads", "catalysts");
  const c10::cuda::CUDAGuard guard(weights[0].device());
  const Prepared p = prepare(weights, catalysts, plan_table, weight_grads, catalyst_grads);
  auto result = run_norms(p, weights, true, scale);
  if (p.num_tiles == 0) return result;
  const at::Tensor& norms = std::get<1>(result);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "catalyst_accumulate_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    grad_kernel<scalar_t, acc_t, true><<<static_cast<unsigned>(p.num_tiles), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        p.geo, norms.const_data_ptr<acc_t>(), nullptr, scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return result;
}

// The tile table as the CUDA kernels would get it (CPU int64 tensor), for tests/test_gpu_tables.py: any
// device, meta tensors included (only shapes are read).
at::Tensor gpu_tile_table(at::TensorList weights, at::TensorList catalysts, const c10::optional<at::Tensor>& plan) {
  TORCH_CHECK_VALUE(!weights.empty() && !catalysts.empty(), "catalyst_fused: weights and catalysts must be non-empty");
  const auto shapes = shapes_of(weights);
  for (size_t t = 0; t < shapes.size(); ++t) {
    TORCH_CHECK_VALUE(!shapes[t].empty(), "catalyst_fused: weights[", t, "] must have at least one dimension");
  }
  const auto sizes = sizes_of(catalysts);
  std::vector<Member> members;
  if (plan.has_value() && plan->defined()) {
    TORCH_CHECK_VALUE(plan->scalar_type() == at::kLong && plan->dim() == 2 && plan->device().is_cpu() && plan->is_contiguous(),
                      "catalyst_fused: plan must be a contiguous int64 CPU tensor [members, 7]");
    members = member_rows(shapes, sizes, plan->const_data_ptr<int64_t>(), plan->size(0), plan->size(1));
  } else {
    TORCH_CHECK_VALUE(weights.size() == catalysts.size(), "catalyst_fused: the per-row layout needs one catalyst per weight");
    members = member_rows(shapes, sizes, nullptr, 0, 0);
  }
  const TableInfo info = build_table(shapes, sizes, members);
  at::Tensor out = at::empty({static_cast<int64_t>(info.words.size())}, at::TensorOptions().dtype(at::kLong));
  std::copy(info.words.begin(), info.words.end(), out.mutable_data_ptr<int64_t>());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(catalyst_fused, m) {
  m.def("_gpu_tile_table(Tensor[] weights, Tensor[] catalysts, Tensor? plan) -> Tensor");
}

TORCH_LIBRARY_IMPL(catalyst_fused, CompositeExplicitAutograd, m) {
  m.impl("_gpu_tile_table", &gpu_tile_table);
}

TORCH_LIBRARY_IMPL(catalyst_fused, CUDA, m) {
  m.impl("penalty_forward", &penalty_forward_cuda);
  m.impl("penalty_backward", &penalty_backward_cuda);
  m.impl("penalty_accumulate_", &penalty_accumulate_cuda);
}

}  // namespace catalyst_fused
