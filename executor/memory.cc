#include "executor/memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <new>

namespace switchyard {
namespace {

// Bytes in the largest binary unit that keeps the figure at least 1 (GiB for arenas, KiB for
// the small buffers of tests and tiny models).
std::string gib(int64_t bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  size_t u = 0;
  while (u + 1 < std::size(kUnits) && std::abs(v) >= 1024.0) v /= 1024.0, ++u;
  char buf[48];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.3f %s", v, kUnits[u]);
  return buf;
}

size_t index_of(Tier t) { return static_cast<size_t>(t); }

}  // namespace

OutOfMemory::OutOfMemory(const std::string& what, Tier tier, int64_t requested, int64_t in_use,
                         int64_t capacity)
    : std::runtime_error("out of " + std::string(enum_name(tier)) + " memory: " + what + " needs " +
                         gib(requested) + " with " + gib(in_use) + " of " + gib(capacity) +
                         " in use (" + gib(in_use + requested - capacity) + " short)"),
      tier_(tier),
      requested_(requested),
      in_use_(in_use),
      capacity_(capacity) {}

Buffer::~Buffer() { release(); }

Buffer::Buffer(Buffer&& o) noexcept { *this = std::move(o); }

Buffer& Buffer::operator=(Buffer&& o) noexcept {
  if (this != &o) {
    release();
    data_ = o.data_;
    bytes_ = o.bytes_;
    tier_ = o.tier_;
    pools_ = o.pools_;
    fd_ = o.fd_;
    file_ = std::move(o.file_);
    o.data_ = nullptr;
    o.bytes_ = 0;
    o.pools_ = nullptr;
    o.fd_ = -1;
  }
  return *this;
}

void Buffer::release() {
  if (!data_) return;
  if (fd_ >= 0) {
    munmap(data_, bytes_);
    close(fd_);
    std::error_code ec;
    std::filesystem::remove(file_, ec);
  } else if (pools_ && pools_->allocator_) {
    pools_->allocator_->release(tier_, data_, bytes_);
  } else {
    std::free(data_);
  }
  if (pools_) pools_->give_back(tier_, bytes_);
  data_ = nullptr;
  bytes_ = 0;
  pools_ = nullptr;
  fd_ = -1;
}

MemoryPools::MemoryPools(TierCapacity capacity, std::shared_ptr<TierAllocator> allocator)
    : capacity_(std::move(capacity)), allocator_(std::move(allocator)) {
  if (capacity_.ssd_dir.empty()) capacity_.ssd_dir = std::filesystem::temp_directory_path();
}

int64_t MemoryPools::capacity(Tier tier) const {
  switch (tier) {
    case Tier::kGPU:
      return capacity_.device_bytes;
    case Tier::kCPU:
      return capacity_.host_bytes;
    case Tier::kSSD:
      return capacity_.ssd_bytes;
  }
  return 0;
}

Buffer MemoryPools::allocate(Tier tier, size_t bytes, const std::string& what, bool zero) {
  const auto i = index_of(tier);
  uint64_t file_no = 0;
  {
    std::lock_guard<std::mutex> lock(m_);
    const int64_t cap = capacity(tier);
    const auto want = static_cast<int64_t>(bytes);
    if (cap > 0 && in_use_[i] + want > cap) throw OutOfMemory(what, tier, want, in_use_[i], cap);
    in_use_[i] += want;
    peak_[i] = std::max(peak_[i], in_use_[i]);
    file_no = next_file_++;
  }
  Buffer b;
  b.bytes_ = bytes;
  b.tier_ = tier;
  b.pools_ = this;
  if (bytes == 0) return b;
  if (tier == Tier::kSSD) {
    // A sparse file of the right size, mapped: reads and writes go through the page cache to disk.
    b.file_ = capacity_.ssd_dir / ("switchyard-ssd-" + std::to_string(::getpid()) + "-" +
                                   std::to_string(file_no) + ".bin");
    b.fd_ = ::open(b.file_.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (b.fd_ < 0 || ftruncate(b.fd_, static_cast<off_t>(bytes)) != 0) {
      const std::string err = std::strerror(errno);
      if (b.fd_ >= 0) close(b.fd_);
      std::error_code ec;
      std::filesystem::remove(b.file_, ec);
      give_back(tier, bytes);
      b.pools_ = nullptr;
      throw std::runtime_error("SSD tier: cannot create " + b.file_.string() + " for " + what +
                               ": " + err);
    }
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, b.fd_, 0);
    if (p == MAP_FAILED) {
      close(b.fd_);
      std::error_code ec;
      std::filesystem::remove(b.file_, ec);
      give_back(tier, bytes);
      b.pools_ = nullptr;
      throw std::runtime_error("SSD tier: cannot map " + b.file_.string() + " for " + what);
    }
    b.data_ = p;
    return b;
  }
  b.data_ = allocator_ ? allocator_->allocate(tier, bytes)
                       : std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  if (!b.data_) {
    give_back(tier, bytes);
    b.pools_ = nullptr;
    throw OutOfMemory(what + " (the host refused the allocation)", tier,
                      static_cast<int64_t>(bytes), in_use(tier), capacity(tier));
  }
  if (zero) {
    if (allocator_)
      allocator_->zero(tier, b.data_, bytes);
    else
      std::memset(b.data_, 0, bytes);
  }
  return b;
}

void Buffer::evict() {
  if (tier_ != Tier::kSSD || !data_) return;
  if (msync(data_, bytes_, MS_SYNC) != 0)
    throw std::runtime_error("SSD tier: cannot write back " + file_.string() + ": " +
                             std::strerror(errno));
  // Unmap the pages from this process (a shared file mapping refaults them from the file), then
  // drop the clean pages from the page cache.
  madvise(data_, bytes_, MADV_DONTNEED);
  posix_fadvise(fd_, 0, static_cast<off_t>(bytes_), POSIX_FADV_DONTNEED);
}

void Buffer::write_back(size_t offset, size_t bytes) {
  if (tier_ != Tier::kSSD || !data_ || bytes == 0) return;
  // msync takes page-aligned ranges.
  const auto page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t begin = offset / page * page;
  const size_t end = std::min(bytes_, offset + bytes);
  if (msync(static_cast<char*>(data_) + begin, end - begin, MS_SYNC) != 0)
    throw std::runtime_error("SSD tier: cannot write back " + file_.string() + ": " +
                             std::strerror(errno));
}

void MemoryPools::give_back(Tier tier, size_t bytes) {
  std::lock_guard<std::mutex> lock(m_);
  in_use_[index_of(tier)] -= static_cast<int64_t>(bytes);
}

int64_t MemoryPools::in_use(Tier tier) const {
  std::lock_guard<std::mutex> lock(m_);
  return in_use_[index_of(tier)];
}

int64_t MemoryPools::peak(Tier tier) const {
  std::lock_guard<std::mutex> lock(m_);
  return peak_[index_of(tier)];
}

void MemoryPools::reset_peaks() {
  std::lock_guard<std::mutex> lock(m_);
  for (size_t i = 0; i < 3; ++i) peak_[i] = in_use_[i];
}

}  // namespace switchyard
