#include "buffers.h"

#include <ATen/ops/empty.h>
#include <c10/core/TensorImpl.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <utility>

namespace catalyst_fused {
namespace cpu {
namespace {

struct Buffer {
  char* data = nullptr;
  size_t capacity = 0;
};

std::mutex& pool_mutex() {
  static std::mutex m;
  return m;
}

std::vector<Buffer>& pool() {
  static std::vector<Buffer> p;
  return p;
}

struct CachedStorage {
  c10::Storage storage;
  uint64_t last_call = 0;
};

std::mutex& gradient_mutex() {
  static std::mutex m;
  return m;
}

std::vector<CachedStorage>& gradient_cache() {
  static std::vector<CachedStorage> c;
  return c;
}

uint64_t& call_counter() {
  static uint64_t n = 0;
  return n;
}

// A cached storage is dropped once it went unused for this many calls (two or three penalties per step
// on different weight sets keep theirs; one that a caller holds on to is let go).
constexpr uint64_t kKeepCalls = 4;

// Only our cache references the storage: no tensor, view, Python storage object or weak reference.
bool unreferenced(const c10::Storage& s) {
  if (s.use_count() != 1) return false;
  // weak count = external weak references + 1 for the strong owners; +1 for the probe itself.
  return s.getWeakStorageImpl().weak_use_count() == 2;
}

}  // namespace

Workspace::Workspace(size_t bytes) {
  bytes = std::max<size_t>(round_up(bytes), 64);
  {
    std::lock_guard<std::mutex> lock(pool_mutex());
    auto& free_buffers = pool();
    if (!free_buffers.empty()) {
      // the largest free buffer
      size_t best = 0;
      for (size_t i = 1; i < free_buffers.size(); ++i) {
        if (free_buffers[i].capacity > free_buffers[best].capacity) best = i;
      }
      data_ = free_buffers[best].data;
      capacity_ = free_buffers[best].capacity;
      free_buffers.erase(free_buffers.begin() + static_cast<std::ptrdiff_t>(best));
    }
  }
  if (capacity_ < bytes) {
    std::free(data_);
    data_ = static_cast<char*>(std::aligned_alloc(64, bytes));
    TORCH_CHECK(data_ != nullptr, "catalyst_fused: could not allocate ", bytes, " bytes of scratch memory");
    capacity_ = bytes;
  }
}

Workspace::~Workspace() {
  std::lock_guard<std::mutex> lock(pool_mutex());
  pool().push_back({data_, capacity_});
}

std::vector<at::Tensor> recycled_gradients(at::TensorList like) {
  std::vector<at::Tensor> out;
  out.reserve(like.size());
  std::lock_guard<std::mutex> lock(gradient_mutex());
  auto& cache = gradient_cache();
  const uint64_t call = ++call_counter();
  // Free cached storages by size.
  std::unordered_map<size_t, std::vector<size_t>> free_by_size;
  for (size_t i = 0; i < cache.size(); ++i) {
    if (unreferenced(cache[i].storage)) free_by_size[cache[i].storage.nbytes()].push_back(i);
  }
  for (const at::Tensor& t : like) {
    const size_t nbytes = static_cast<size_t>(t.numel()) * t.element_size();
    if (nbytes == 0) {
      out.push_back(at::empty(t.sizes(), t.options()));
      continue;
    }
    auto it = free_by_size.find(nbytes);
    if (it != free_by_size.end() && !it->second.empty()) {
      CachedStorage& entry = cache[it->second.back()];
      it->second.pop_back();
      entry.last_call = call;
      at::Tensor g = at::detail::make_tensor<c10::TensorImpl>(
          c10::Storage(entry.storage), c10::DispatchKeySet(c10::DispatchKey::CPU), t.dtype());
      g.unsafeGetTensorImpl()->set_sizes_contiguous(t.sizes());
      out.push_back(std::move(g));
      continue;
    }
    at::Tensor g = at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
    cache.push_back({g.storage(), call});
    out.push_back(std::move(g));
  }
  // Forget storages unused for kKeepCalls calls (they are freed here unless someone else holds them).
  size_t kept = 0;
  for (size_t i = 0; i < cache.size(); ++i) {
    if (call - cache[i].last_call < kKeepCalls) cache[kept++] = std::move(cache[i]);
  }
  cache.resize(kept);
  return out;
}

void release_cached_memory() {
  {
    std::lock_guard<std::mutex> lock(gradient_mutex());
    gradient_cache().clear();
  }
  std::lock_guard<std::mutex> lock(pool_mutex());
  for (Buffer& b : pool()) std::free(b.data);
  pool().clear();
}

}  // namespace cpu
}  // namespace catalyst_fused
