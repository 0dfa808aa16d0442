// Memory model: bytes one GPU of a pipeline stage holds at its peak, per tier (GPU HBM, its share
// of host DRAM, its share of the node's SSD), broken down by tensor class.
//
//  - Parameters, gradients and optimizer states follow the ZeRO paper's accounting (arXiv
//    1910.02054): mixed precision keeps 2-byte params and grads and 12 bytes of fp32 master
//    weights, momentum and variance per parameter; fp32 training 4 + 4 + 8. Dense parameters are
//    split by tp and sharded by ZeRO over dp*cp; expert parameters are split by ep*expert_tp and
//    sharded over expert_dp. Stage 1 shards optimizer states, 2 also gradients, 3 also parameters.
//  - Activations per layer follow Korthikanti et al. (arXiv 2205.05198), re-derived for flash
//    attention (no s^2 scores kept), no dropout, gated FFNs, GQA/MLA and MoE layers; sequence
//    parallelism splits the h-sized terms over tp; FP8 training keeps GEMM inputs in FP8.
//    Recompute: selective drops the outputs of activation functions and norms and MLA's
//    up-projections (Megatron-Core recompute_modules "moe_act", "layernorm", "mla_up_proj");
//    full keeps only each layer's input plus one layer's working set.
//  - Micro-batches in flight on stage s: GPipe m; 1F1B min(pp - s, m); interleaved 1F1B
//    min(2(pp - s - 1) + (vp - 1) pp + 1, m vp) chunks of L_s / vp layers.
//  - MoE dispatch: dropless, the most loaded EP rank receives load_factor times the balanced token
//    count (from the workload's routing); with a capacity factor, buffers are padded to capacity.
//  - A class placed on "cpu" or "ssd" lives there. Offloaded parameters keep (1 + prefetch depth)
//    layers on the GPU as working buffers (and as many in DRAM when they come from the SSD);
//    offloaded gradients stream out through the gradient buckets; offloaded optimizer states are
//    updated on the host (ZeRO-Offload), staged through DRAM layer by layer when on the SSD.
#pragma once

#include <array>
#include <string>
#include <utility>
#include <vector>

#include "core/cluster.h"
#include "core/error.h"
#include "core/expert_load.h"
#include "core/model.h"
#include "core/plan.h"
#include "core/workload.h"
#include "cost_models/profile.h"

namespace switchyard {

struct TierBytes {
  double gpu = 0;
  double cpu = 0;
  double ssd = 0;
  double total() const { return gpu + cpu + ssd; }
  TierBytes& operator+=(const TierBytes& o) {
    gpu += o.gpu;
    cpu += o.cpu;
    ssd += o.ssd;
    return *this;
  }
};

struct MemoryBreakdown {
  int stage = 0;
  double in_flight_micro_batches = 0;
  TierBytes dense_params;
  TierBytes expert_params;
  TierBytes gradients;
  TierBytes optimizer_states;
  TierBytes activations;
  TierBytes kv_cache;
  TierBytes dispatch_buffers;  // all-to-all send/receive buffers of one MoE layer
  TierBytes comm_buffers;      // gradient buckets
  TierBytes prefetch_buffers;  // working layers of offloaded classes, ZeRO-3 gathers
  TierBytes runtime;           // CUDA context, NCCL, allocator slack
  TierBytes total() const;
};

// The breakdown's parts with the names reports give them, in report order.
std::array<std::pair<const char*, const TierBytes*>, 10> memory_parts(const MemoryBreakdown& m);
// "dense params 3.49, gradients 3.49, ..., runtime 1.50 GiB": the parts with bytes on the GPU.
std::string gpu_parts_gib(const MemoryBreakdown& m);

// Bytes per parameter of each class for a training precision and Adam moment precision.
struct StateBytes {
  double param = 0;
  double grad = 0;
  double optimizer = 0;
};
StateBytes state_bytes_per_param(Precision p, Precision moments = Precision::kFP32);

// Micro-batches of activations stage `stage` holds at once (in units of its whole layer stack).
double in_flight_micro_batches(const Plan& plan, int64_t num_micro_batches, int stage);

// Rows of expert buffers relative to a balanced share: capacity_factor when the plan has one
// (buffers are padded to capacity), else expert_rank_load_factor (dropless).
double expert_buffer_rows_factor(const ModelSpec& m, const Plan& plan, const Workload& w);

// Activation bytes one layer keeps for backward, per token of the micro-batch (before dividing
// the sequence by cp), on one GPU.
double activation_bytes_per_token(const ModelSpec& m, const Plan& plan, Precision p, bool moe_layer,
                                  double load_factor);

// Bytes of the tensors a step allocates and releases (one micro-batch, one GPU): what one layer
// keeps for its backward, a layer's input (full recompute), an MoE layer's dispatch buffers, the
// LM head's logits. The step program marks their lifetimes; the simulator adds them up over time.
struct DynamicTensorBytes {
  double dense_layer_activations = 0;
  double moe_layer_activations = 0;
  double layer_input = 0;
  double dispatch = 0;
  double logits = 0;
};
DynamicTensorBytes dynamic_tensor_bytes(const ModelSpec& m, const Plan& plan, const Workload& w);

MemoryBreakdown memory_per_gpu(const ModelSpec& m, const ClusterSpec& c, const Plan& plan,
                               const Workload& w, const CostProfile& prof, int stage);
// Every tier a plan overflows, with the numbers: a GPU's HBM, the node's DRAM (its GPUs' host
// shares together) and the node's SSD. Empty when the plan fits. Paths: "plan.placement" for the
// host tiers, "plan" for HBM.
std::vector<ConfigIssue> capacity_issues(const ModelSpec& m, const ClusterSpec& c, const Plan& plan,
                                         const Workload& w, const CostProfile& prof);

// The stage whose GPUs hold the most HBM.
MemoryBreakdown peak_memory_per_gpu(const ModelSpec& m, const ClusterSpec& c, const Plan& plan,
                                    const Workload& w, const CostProfile& prof);

}  // namespace switchyard
