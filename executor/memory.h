// Memory of one rank by storage tier, as the executor runs a plan: a bounded "device" arena (the
// GPU's HBM on the CUDA backend; on the CPU backend a budget sized from the cluster spec's
// hbm_bytes), host memory, and files on disk for the SSD tier. Every allocation is counted against
// its tier; the peak per tier is what a run reports beside the simulator's prediction, and an
// allocation past a tier's capacity is a clean OutOfMemory with the numbers, never a crash.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>

#include "core/plan.h"

namespace switchyard {

class OutOfMemory : public std::runtime_error {
 public:
  OutOfMemory(const std::string& what, Tier tier, int64_t requested, int64_t in_use,
              int64_t capacity);
  Tier tier() const { return tier_; }
  int64_t requested_bytes() const { return requested_; }
  int64_t in_use_bytes() const { return in_use_; }
  int64_t capacity_bytes() const { return capacity_; }

 private:
  Tier tier_;
  int64_t requested_, in_use_, capacity_;
};

struct TierCapacity {
  int64_t device_bytes = 0;  // 0 = unbounded
  int64_t host_bytes = 0;
  int64_t ssd_bytes = 0;
  std::filesystem::path ssd_dir;  // where SSD-tier files live (default: the temp directory)
};

class MemoryPools;

// Where the device and host tiers' bytes come from. The default (nullptr) is plain host memory
// for both (the CPU backend); the CUDA backend gives device memory from its stream-ordered pool
// and pinned host memory, so copies between the tiers run asynchronously on copy streams.
class TierAllocator {
 public:
  virtual ~TierAllocator() = default;
  // kGPU or kCPU; nullptr when the tier refuses (MemoryPools reports it as OutOfMemory).
  virtual void* allocate(Tier tier, size_t bytes) = 0;
  virtual void release(Tier tier, void* p, size_t bytes) = 0;
  virtual void zero(Tier tier, void* p, size_t bytes) = 0;
};

// An owned region of one tier. Host and device regions are RAM; an SSD region is a file mapped
// into memory (written back by the kernel's page cache; the file is deleted when released).
class Buffer {
 public:
  Buffer() = default;
  ~Buffer();
  Buffer(Buffer&& o) noexcept;
  Buffer& operator=(Buffer&& o) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  void* data() const { return data_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  size_t bytes() const { return bytes_; }
  Tier tier() const { return tier_; }
  explicit operator bool() const { return data_ != nullptr; }
  // SSD tier: writes the region back to its file and drops it from memory (this mapping and the
  // page cache), so the next access reads the disk, as a region kept on an SSD is; a no-op on
  // the other tiers. Throws std::runtime_error when the write-back fails.
  void evict();
  // SSD tier: writes bytes [offset, offset + bytes) back to the file (a no-op on the other tiers).
  void write_back(size_t offset, size_t bytes);

 private:
  friend class MemoryPools;
  void release();
  void* data_ = nullptr;
  size_t bytes_ = 0;
  Tier tier_ = Tier::kGPU;
  MemoryPools* pools_ = nullptr;
  int fd_ = -1;  // SSD tier
  std::filesystem::path file_;
};

// The per-tier accounting. Thread-safe (copy threads allocate staging buffers).
class MemoryPools {
 public:
  explicit MemoryPools(TierCapacity capacity, std::shared_ptr<TierAllocator> allocator = nullptr);
  // Zero-filled unless `zero` is false (SSD-tier files always read as zeros). Throws OutOfMemory
  // when the tier would exceed its capacity; `what` names the tensor in the message.
  Buffer allocate(Tier tier, size_t bytes, const std::string& what, bool zero = true);
  int64_t in_use(Tier tier) const;
  int64_t peak(Tier tier) const;
  int64_t capacity(Tier tier) const;
  void reset_peaks();

 private:
  friend class Buffer;
  void give_back(Tier tier, size_t bytes);
  TierCapacity capacity_;
  std::shared_ptr<TierAllocator> allocator_;
  mutable std::mutex m_;
  int64_t in_use_[3] = {0, 0, 0};
  int64_t peak_[3] = {0, 0, 0};
  uint64_t next_file_ = 0;
};

}  // namespace switchyard
