// Blocks of memory kept between calls for the large intermediates of a call (states, gate activations, the
// normalized terms, their gradients: up to about 80 MB each at the pMNIST shape). glibc's malloc serves blocks that
// large by mmap and unmaps them when they are freed, so every training step page-faulted its intermediates in
// again: about 134,000 page faults and 1.6x the step time of a process whose malloc was tuned (the trainer tunes
// its own; a user's script does not). Tensors made here hand their block back when they die, and the next call of
// the same shape takes it, already mapped. The process's allocator is left as it is.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <map>
#include <mutex>

namespace rbn {

class Workspace {
 public:
  // At most this many bytes are kept unused between calls; a block that would exceed it is freed at once.
  static constexpr size_t kKeepBytes = size_t(2) << 30;

  // Never destroyed: a tensor may hand its block back after static destruction has begun.
  static Workspace& instance() {
    static Workspace* workspace = new Workspace();
    return *workspace;
  }

  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    int64_t count = 1;
    for (int64_t size : sizes) count *= size;
    const size_t bytes = round_up(static_cast<size_t>(count) * options.dtype().itemsize());
    void* block = take(bytes);
    return at::from_blob(block, sizes, [this, bytes](void* data) { give(data, bytes); }, options);
  }

 private:
  static size_t round_up(size_t bytes) {
    constexpr size_t grain = size_t(64) << 10;  // blocks of equal shapes match exactly; 64 KiB keeps them few
    return std::max(grain, (bytes + grain - 1) / grain * grain);
  }

  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto found = free_.find(bytes);
      if (found != free_.end()) {
        void* block = found->second;
        free_.erase(found);
        kept_ -= bytes;
        return block;
      }
    }
    void* block = std::aligned_alloc(64, bytes);
    TORCH_CHECK(block != nullptr, "the fused LSTM could not allocate ", bytes, " bytes");
    return block;
  }

  void give(void* block, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (kept_ + bytes <= kKeepBytes) {
        free_.emplace(bytes, block);
        kept_ += bytes;
        return;
      }
    }
    std::free(block);
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> free_;
  size_t kept_ = 0;
};

// An uninitialized tensor for a call's intermediate, from the workspace.
inline at::Tensor workspace_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return Workspace::instance().empty(sizes, options);
}

}  // namespace rbn
