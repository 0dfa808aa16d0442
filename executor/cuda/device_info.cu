#include "executor/cuda/cuda_check.h"
#include "executor/cuda/device_info.h"

namespace switchyard {

std::vector<CudaDeviceInfo> cuda_devices(std::string* reason) {
  std::vector<CudaDeviceInfo> out;
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    if (reason)
      *reason = std::string("cudaGetDeviceCount: ") + cudaGetErrorName(err) + " (" +
                cudaGetErrorString(err) + ")";
    cudaGetLastError();  // clear the sticky error
    return out;
  }
  if (count == 0 && reason) *reason = "no CUDA device";
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    CUDA_CHECK(cudaGetDeviceProperties(&prop, i));
    CudaDeviceInfo d;
    d.index = i;
    d.name = prop.name;
    d.compute_major = prop.major;
    d.compute_minor = prop.minor;
    d.multiprocessors = prop.multiProcessorCount;
    d.memory_bytes = static_cast<int64_t>(prop.totalGlobalMem);
    out.push_back(d);
  }
  return out;
}

int nccl_runtime_version() {
  int v = 0;
  NCCL_CHECK(ncclGetVersion(&v));
  return v;
}

int nccl_header_version() { return NCCL_VERSION_CODE; }

}  // namespace switchyard
