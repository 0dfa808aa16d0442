// Checks for CUDA, cuBLAS and NCCL calls. Each names the failing call, its error string and the
// site, and throws (library code never exits): a caller decides whether a failure ends the run.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <nccl.h>

#include <stdexcept>
#include <string>

namespace switchyard {

class DeviceError : public std::runtime_error {
 public:
  DeviceError(const std::string& what, int code) : std::runtime_error(what), code_(code) {}
  int code() const { return code_; }

 private:
  int code_;
};

}  // namespace switchyard

#define SWITCHYARD_STR2(x) #x
#define SWITCHYARD_STR(x) SWITCHYARD_STR2(x)

#define CUDA_CHECK(call)                                                                          \
  do {                                                                                            \
    cudaError_t err_ = (call);                                                                    \
    if (err_ != cudaSuccess)                                                                      \
      throw ::switchyard::DeviceError(std::string(#call) + " failed: " + cudaGetErrorName(err_) + \
                                          " (" + cudaGetErrorString(err_) +                       \
                                          ") at " __FILE__ ":" SWITCHYARD_STR(__LINE__),          \
                                      static_cast<int>(err_));                                    \
  } while (0)

#define NCCL_CHECK(call)                                                                \
  do {                                                                                  \
    ncclResult_t res_ = (call);                                                         \
    if (res_ != ncclSuccess)                                                            \
      throw ::switchyard::DeviceError(std::string(#call) +                              \
                                          " failed: " + ncclGetErrorString(res_) +      \
                                          " at " __FILE__ ":" SWITCHYARD_STR(__LINE__), \
                                      static_cast<int>(res_));                          \
  } while (0)

#define CUBLAS_CHECK(call)                                                                \
  do {                                                                                    \
    cublasStatus_t st_ = (call);                                                          \
    if (st_ != CUBLAS_STATUS_SUCCESS)                                                     \
      throw ::switchyard::DeviceError(                                                    \
          std::string(#call) + " failed: " + cublasGetStatusName(st_) + " (" +            \
              cublasGetStatusString(st_) + ") at " __FILE__ ":" SWITCHYARD_STR(__LINE__), \
          static_cast<int>(st_));                                                         \
  } while (0)
