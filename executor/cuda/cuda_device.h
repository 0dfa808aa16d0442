// The CUDA backend of Device: cuBLAS GEMMs and CUDA kernels on one compute stream, tier memory from
// a stream-ordered device pool (kGPU) and pinned host memory (kCPU), copies on a stream per calling
// thread. It computes what the CPU backend computes (executor/cpu/cpu_device.cc; the contract test
// tests/executor/cuda_device_test.cc holds the two together).
#pragma once

#include <memory>
#include <string>

#include "executor/device.h"

namespace switchyard {

// How gemm and grouped_gemm multiply:
//   kFp32: fp32 operands and arithmetic (no TF32);
//   kTf32: fp32 operands, TF32 tensor-core products, fp32 accumulation;
//   kBf16: operands rounded to bf16 (converted copies, made on every call: the weights too), fp32
//          accumulation and output (beta applied in fp32).
// Attention's batched GEMMs run fp32 under kFp32 and TF32 under kTf32 and kBf16.
enum class GemmMath { kFp32, kTf32, kBf16 };

struct CudaOptions {
  int device = 0;  // CUDA device index
  GemmMath math = GemmMath::kFp32;
};

// A Device on one GPU. Throws DeviceError (executor/cuda/cuda_check.h) with the driver's reason
// when there is no such GPU.
std::unique_ptr<Device> cuda_device(TierCapacity capacity, CudaOptions options = {});

// "fp32" | "tf32" | "bf16"; std::invalid_argument otherwise.
GemmMath parse_gemm_math(const std::string& name);

}  // namespace switchyard
