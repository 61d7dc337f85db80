// Memory the CPU kernels keep between calls, so that a training step allocates (and page-faults) nothing
// new once it is warm.
//
//   * Workspace: scratch memory of one call (per-row sums, per-block column sums, per-group factors),
//     leased from a process-wide pool and returned when the call ends. The pool holds as many buffers as
//     calls ever ran at once, each as large as the largest call that used it.
//   * recycled_gradients: the output buffers of penalty_backward. A fresh multi-megabyte tensor costs a
//     page fault per 4 KiB on its first write (large allocations come straight from mmap), which costs
//     more than the gradient pass itself. The storages handed out by the last calls are kept, and one is
//     handed out again only when nothing else references it (no tensor, no view, no weak reference): the
//     autograd engine dropped it after adding it into an existing .grad, or the user dropped the .grad it
//     became (zero_grad(set_to_none=True)). A storage still in use is never touched.
//   * release_cached_memory() frees both (the catalyst_fused::release_cached_memory operator).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <vector>

namespace catalyst_fused {
namespace cpu {

class Workspace {
 public:
  explicit Workspace(size_t bytes);
  ~Workspace();
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  // `count` elements of T, 64-byte aligned, from the leased buffer (uninitialised).
  template <typename T>
  T* take(size_t count) {
    T* p = reinterpret_cast<T*>(data_ + used_);
    used_ += round_up(count * sizeof(T));
    return p;
  }
  static size_t round_up(size_t bytes) { return (bytes + 63) / 64 * 64; }

 private:
  char* data_ = nullptr;
  size_t capacity_ = 0;
  size_t used_ = 0;
};

// Contiguous, uninitialised tensors shaped like `like` (same dtype and device), recycled as described above.
std::vector<at::Tensor> recycled_gradients(at::TensorList like);

void release_cached_memory();

}  // namespace cpu
}  // namespace catalyst_fused
