// StepProgram: one training step as ordered ops per rank role, lowered from (model, cluster, plan,
// workload). The simulator times it; the executor runs it. Ranks that play the same role (the same
// pipeline stage) share one StageProgram; under skewed routing a stage's program describes its most
// loaded expert rank, which decides the stage's time.
//
// A stage's program is compact: per model chunk (vp of them per stage) a forward and a backward op
// sequence, and the schedule that orders (micro-batch, chunk, direction) units on that stage.
// Inside a sequence every op depends on the last synchronous op before it; `async` ops (gradient
// buckets) depend on it too but nothing waits for them until the step's end. Across units: a unit
// starts after the previous unit of its stage, and after the activation (forward) or gradient
// (backward) it receives from the neighbouring virtual stage. Rank order is Megatron's: tp fastest,
// then cp, then dp, then pp; expert layers refold tp*cp*dp as expert_tp (fastest), ep, expert_dp.
#pragma once

#include <array>
#include <cstdint>
#include <string_view>
#include <vector>

#include "core/cluster.h"
#include "core/model.h"
#include "core/plan.h"
#include "core/shapes.h"
#include "core/workload.h"

namespace switchyard {

// kCopy: copies over the GPU's PCIe link (host <-> GPU); kStorage: reads and writes of the SSD
// tier (SSD <-> host memory), so the two levels of a 2D prefetch pipeline; kHost: work of the
// host's cores beside the GPU (the delayed update of offloaded optimizer states).
enum class StreamKind {
  kCompute,
  kTpComm,
  kCpComm,
  kEpComm,
  kDpComm,
  kPpComm,
  kCopy,
  kHost,
  kStorage
};
inline constexpr int kNumStreams = 9;
std::string_view stream_name(StreamKind s);

enum class OpKind {
  kGemm,         // gemm
  kGroupedGemm,  // group_rows x n x k, one launch
  kAttention,    // fused attention, forward or backward (phase)
  kElementwise,  // bytes streamed through HBM: norms, activations, residuals, embedding, loss
  kGateTopK,     // router GEMM + softmax + top-k (gemm.m tokens, gemm.n experts, gemm.k hidden)
  kPermute,      // gather/scatter of rows by expert
  kOptimizer,    // Adam over `bytes` of state on the GPU (or `cpu`: on the host)
  kCollective,   // `collective` over `group`, nccl-tests size `bytes`
  kSendRecv,     // pipeline activation or gradient to the neighbouring stage
  kCopy,         // `bytes` between storage tiers along `copy` (offloaded params, grads)
};

enum class CopyPath { kHostToGpu, kGpuToHost, kSsdToHost, kHostToSsd };

enum class CommGroup {
  kNone,
  kTp,
  kCp,
  kEp,
  kEpIntra,
  kEpInter,
  kExpertTp,
  kDp,
  kExpertDp,
  kPp,
  kReplicas,  // the copies of a replicated (elastic) expert
};
inline constexpr int kNumGroups = 11;
std::string_view group_name(CommGroup g);

enum class Phase { kForward, kBackward, kRecompute, kStep };

// Tensors whose lifetime the program marks (as bits of a mask); the memory model sizes them.
enum class TensorClass : uint8_t {
  kLayerActivations = 1,    // what a layer keeps from its forward for its backward
  kLayerInput = 2,          // full recompute keeps only the layer's input
  kDispatchBuffer = 4,      // all-to-all send and receive buffers of one MoE layer
  kRecomputeWorkspace = 8,  // a recomputed layer's activations, alive until its backward ends
  kLogits = 16,             // the LM head's logits, until the loss gradient is through
};
using TensorMask = uint8_t;
constexpr TensorMask bit(TensorClass c) { return static_cast<TensorMask>(c); }
inline constexpr TensorClass kTensorClasses[] = {
    TensorClass::kLayerActivations, TensorClass::kLayerInput, TensorClass::kDispatchBuffer,
    TensorClass::kRecomputeWorkspace, TensorClass::kLogits};

struct OpTemplate {
  OpKind kind = OpKind::kElementwise;
  StreamKind stream = StreamKind::kCompute;
  Phase phase = Phase::kForward;
  std::string_view name;  // static text: "qkv", "attn_core", "dispatch", ...
  int layer = -1;         // global layer index; -1 for embedding, head, step ops
  GemmShape gemm;
  std::vector<int64_t> group_rows;  // kGroupedGemm: rows per local expert
  AttentionShape attention;
  double bytes = 0;  // elementwise/permute/optimizer bytes moved; collective and p2p size
  double flops = 0;  // executed FLOPs (reported in traces)
  Collective collective = Collective::kAllReduce;
  CommGroup group = CommGroup::kNone;
  bool on_cpu = false;         // kOptimizer: host Adam (ZeRO-Offload)
  bool delayed = false;        // on_cpu: the previous step's update, on the host beside this step's
                               // compute (Plan::delayed_update); later step ops wait for it
  double host_down_bytes = 0;  // on_cpu: the gradients the host updates with, over PCIe
  double host_up_bytes = 0;    // on_cpu: the updated parameters back to the GPU
  double ssd_state_bytes = 0;  // on_cpu, states on SSD: read into host memory and written back
  double ssd_param_write_bytes = 0;  // on_cpu: updated parameters written back to their SSD home
  CopyPath copy = CopyPath::kHostToGpu;  // kCopy
  bool async = false;             // nothing in the unit waits for it (gradient buckets, prefetches)
  int wait_for = -1;              // index (same op list) of one more op this one waits for: the
                                  // prefetch of its layer's parameters
  bool last_micro_batch = false;  // issued only in the unit of the last micro-batch (grad sync)
  int64_t tokens = 0;             // tokens (or rows) the op processes
  TensorMask allocates = 0;       // tensors that come to life when the op starts
  TensorMask frees = 0;           // tensors released when the op ends
};

struct ChunkProgram {
  int first_layer = 0;
  int num_layers = 0;
  bool has_embedding = false;
  bool has_head = false;
  std::vector<OpTemplate> forward;
  std::vector<OpTemplate> backward;
};

struct ScheduleItem {
  int micro_batch = 0;
  int chunk = 0;
  bool backward = false;
  bool operator==(const ScheduleItem&) const = default;
};

struct StageProgram {
  int stage = 0;
  std::vector<ChunkProgram> chunks;     // vp of them
  std::vector<ScheduleItem> order;      // the compute order of this stage's units
  std::vector<OpTemplate> step_ops;     // after the last unit: optimizer step, parameter all-gather
  bool sends_to_next_same_node = true;  // the p2p link to stage + 1 stays inside a node
};

struct StepProgram {
  int pp = 1;
  int vp = 1;
  int num_micro_batches = 1;
  int64_t tokens_per_micro_batch = 0;  // per data-parallel replica (before cp/sp splits)
  double p2p_bytes = 0;                // activation (or gradient) sent between stages per unit
  bool p2p_wraps_same_node = true;     // last stage -> first stage (interleaving) inside a node
  std::array<GroupLayout, kNumGroups> groups{};
  std::vector<StageProgram> stages;

  const GroupLayout& layout(CommGroup g) const { return groups[static_cast<size_t>(g)]; }
};

// The order of (micro-batch, chunk, direction) units on `stage` for a schedule (Megatron-LM's
// schedules.py order for 1F1B and interleaved 1F1B; GPipe: all forwards, then all backwards).
std::vector<ScheduleItem> schedule_order(Schedule schedule, int pp, int vp, int num_micro_batches,
                                         int stage);

// Lowers a validated combination (call validate() first: the lowering assumes its rules hold).
// Inference workloads (pp = 1) lower to one stage with two forward-only chunks: the prefill of the
// prompts and one decode step at the average context, run in that order.
// For closed-form estimates: the ops of one representative layer of each kind (layers of a kind
// cost alike), of the embedding and of the LM head, each as a chunk, and each stage's step ops —
// what lower() would put in the program, without instantiating every layer.
struct LayerKindsProgram {
  int dense_layer = -1;  // index of the representative dense layer; -1: the model has none
  int moe_layer = -1;
  ChunkProgram dense, moe, embedding, head;
  std::vector<int> dense_layers_per_stage, moe_layers_per_stage;
  std::vector<std::vector<OpTemplate>> step_ops;  // per stage
};
LayerKindsProgram lower_layer_kinds(const ModelSpec& model, const ClusterSpec& cluster,
                                    const Plan& plan, const Workload& workload);
// The process-wide communication groups and pipeline facts of lower(), without any op.
StepProgram lower_frame(const ModelSpec& model, const ClusterSpec& cluster, const Plan& plan,
                        const Workload& workload);

// Ring-memory inference: the layers the ring loads ahead of the one computing (one section,
// num_layers / ring_sections rounded up; 0 when the plan turns prefetching off: load, then
// compute).
int ring_ahead_layers(const ModelSpec& model, const Plan& plan);

// How many units (layers; the embedding and the head when they are fetched) ahead of its use an
// offloaded unit's copies are issued, per level (SE-MoE's 2D prefetch, plan.prefetch):
//   none: both right before use;  down: SSD reads `depth` ahead, the copy to the GPU before use;
//   ahead: both `depth` ahead;    2d: SSD reads 2 * depth ahead, the copy to the GPU depth ahead.
// The SSD reads and the copies to the GPU run on their own streams, so the levels pipeline.
// Ring-memory inference: the ring's layers ahead over PCIe.
struct FetchLeads {
  int ssd = 0;
  int pcie = 0;
  bool operator==(const FetchLeads&) const = default;
};
FetchLeads fetch_leads(const ModelSpec& model, const Plan& plan);

StepProgram lower(const ModelSpec& model, const ClusterSpec& cluster, const Plan& plan,
                  const Workload& workload);

}  // namespace switchyard
