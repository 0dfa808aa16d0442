// What the CUDA backend can see: the devices of this process and the NCCL it linked. With no driver
// or no GPU, cudaGetDeviceCount fails (error 35, cudaErrorInsufficientDriver, among others): every
// such error means "no device", never a failure, so CPU-only machines run the rest of the suite.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace switchyard {

struct CudaDeviceInfo {
  int index = 0;
  std::string name;
  int compute_major = 0;
  int compute_minor = 0;
  int multiprocessors = 0;
  int64_t memory_bytes = 0;
};

// Devices visible to this process; empty when there is no driver or no GPU. `reason` (optional)
// receives why the list is empty.
std::vector<CudaDeviceInfo> cuda_devices(std::string* reason = nullptr);

// NCCL version of the linked library (e.g. 22703 for 2.27.3) and of the header compiled against.
int nccl_runtime_version();
int nccl_header_version();

}  // namespace switchyard
