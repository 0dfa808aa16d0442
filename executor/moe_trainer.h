// A real MoE transformer training step on a Device and Communicators: embedding, per layer
// RMSNorm -> causal attention -> residual -> RMSNorm -> MoE (router softmax, top-k, dispatch,
// SwiGLU experts, combine) or dense SwiGLU FFN -> residual, final RMSNorm, LM head, cross-entropy;
// the backward of all of it; gradient reduction; Adam. fp32.
//
// Parallelism (this version): data parallelism over `dp` ranks, expert parallelism over `ep`
// ranks (experts split evenly; tokens dispatched by all-to-all and combined by the reverse
// all-to-all), ZeRO stage 0 or 1 (optimizer states sharded over the data-parallel group: gradient
// reduce-scatter, sharded Adam, parameter all-gather), gradient buckets of the plan's size, and
// micro-batches (gradient accumulation), and pipeline parallelism with GPipe or 1F1B (activations
// and their gradients sent between neighbouring stages). Tensor parallelism is not run yet
// (trainer_unsupported() says so).
//
// Determinism: parameters are initialised from (seed, parameter name, element index) and the
// tokens from (seed, step, sequence, position), so any layout of the same model and seed computes
// the same function; one process with every group of size one is the reference a distributed run
// is checked against.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/model.h"
#include "core/plan.h"
#include "core/step_program.h"
#include "executor/communicator.h"
#include "executor/device.h"

namespace switchyard {

struct TrainSettings {
  int64_t global_batch = 8;  // sequences per step
  int64_t seq_len = 0;       // 0 = the model's
  int micro_batch_size = 1;
  int zero_stage = 0;
  int64_t grad_bucket_bytes = kDefaultGradBucketBytes;
  // Pipeline: layers per stage (empty = one stage holding all), the schedule of micro-batches
  // (GPipe, 1F1B, interleaved 1F1B) and, interleaved, the model chunks per stage.
  std::vector<int> stage_layers;
  Schedule schedule = Schedule::k1F1B;
  int vp = 1;
  // Tensor parallelism with sequence parallelism (Megatron-Core's, required with all-to-all
  // dispatch): outside the TP regions each TP rank holds 1/tp of a micro-batch's tokens.
  bool sequence_parallel = false;
  // Routing skew the workload asks for (empty: the router alone decides): each expert's share of
  // the routed rows. The gate adds log(share) plus Gumbel noise, fixed by (seed, step, token,
  // layer, expert), to the router's logits, so its top-k samples the experts in those proportions
  // (Gumbel-top-k) while the router still learns through the softmax; every layout of the same
  // run draws the same noise.
  std::vector<double> routing_share;
  // The same per model layer when the workload routes each MoE layer its own way (an empty entry,
  // or none: routing_share).
  std::vector<std::vector<double>> routing_layer_share;
  // Elastic expert replicas (SE-MoE): per EP rank, the experts of its slots (home experts first,
  // then copies of hot ones; empty = experts / ep contiguous experts each). A replicated expert's
  // rows are dealt round-robin over its copies, whose gradients are summed.
  std::vector<std::vector<int>> rank_experts;
  double capacity_factor = 0;  // 0 = dropless; else per micro-batch and rank, as GShard's groups
  // Where the tensor classes live (SE-MoE's hierarchical storage; ZeRO-Offload, ZeRO-Infinity):
  // dense and expert parameters and the optimizer states on the device, host or SSD tier
  // (gradients and activations stay on the device). Off-device parameters come to device slots
  // before each use (the embedding, each layer, the head), down the levels: SSD reads into host
  // staging on a storage engine, copies to the device on a copy engine, each level `prefetch`
  // units ahead of the one computing; off-device optimizer
  // states are updated on the host (gradients down, Adam, parameters up when they live on the
  // device).
  Placement placement;
  // ZeRO-Offload's one-step delayed update (Plan::delayed_update): a step's update is applied at
  // the end of the next step, whose forward and backward compute with the values one update
  // behind; off-device states are updated by the host's cores meanwhile. finish_update() applies
  // the last one.
  bool delayed_update = false;
  // Units ahead of use per level: SSD reads into host staging, copies to the device (core's
  // fetch_leads of the plan; {0, 0}: both right before use).
  FetchLeads prefetch;
  // Host threads for the host's share of an offloaded update (Adam over off-device states, the
  // sums of off-device gradients): 1 where the device is the CPU (each rank owns a core); beside a
  // GPU, the node's cores per GPU (ZeRO-Offload's multi-threaded CPU Adam).
  int host_threads = 1;
  uint64_t seed = 1234;
  float init_std = 0.02f;  // weights ~ N(0, init_std^2); norm gains start at 1
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float eps = 1e-8f;
};

// The groups a rank trains in. dp: every replica of the dense parameters; ep: the ranks that split
// the experts between them; expert_dp: the replicas of this rank's experts.
struct TrainGroups {
  Communicator* dp = nullptr;
  Communicator* ep = nullptr;
  Communicator* expert_dp = nullptr;
  // Set both for the hierarchical all-to-all: the EP ranks of this node (ep_intra) and the EP
  // ranks with this rank's local index on every node (ep_inter); EP rank = node * L + local.
  Communicator* ep_intra = nullptr;
  Communicator* ep_inter = nullptr;
  // The pipeline: this rank's peers at every stage (rank = stage); nullptr = one stage.
  Communicator* pp = nullptr;
  // Tensor parallelism (Megatron column/row splits of attention and dense FFNs; nullptr = none).
  // With `ppmoe`, Pipeline MoE's dispatch: the experts are spread over the TP group, whose ranks
  // all hold every token: a local index slice, then one all-reduce combines (ep must equal tp).
  Communicator* tp = nullptr;
  bool ppmoe = false;
};

// What the CPU runner cannot run (yet) for this model and plan; empty when it can.
std::vector<ConfigIssue> trainer_unsupported(const ModelSpec& m, const Plan& p);

// One parameter tensor of this rank, its value and gradient in the device tier's memory.
struct Parameter {
  std::string name;  // e.g. "layer1.expert3.w1"; canonical across layouts
  size_t size = 0;
  bool expert = false;
  // A tensor-parallel shard: element i is element global_index[i] of the whole tensor (empty:
  // the whole tensor, element i is element i).
  std::vector<size_t> global_index;
  // Views into the trainer's flat buffers of its space (dense or expert parameters), as Megatron's
  // and PyTorch DDP's contiguous gradient buffers: the reduction and Adam run on them in place.
  float* value = nullptr;
  float* grad = nullptr;
  float* v() const { return value; }
  float* g() const { return grad; }
};

// Copies between tiers of one step.
struct TierStats {
  // The copy engines (storage and copy) busy with the passes' copies: parameter reads and fetches,
  // gradients going down (their spans are program ops).
  double fetch_s = 0;
  double stall_s = 0;  // compute waiting for them
  int64_t fetch_bytes = 0;
  double update_copy_s = 0;  // off-device optimizer states: gradients down, parameters up
  int64_t update_copy_bytes = 0;
};

struct StepStats {
  TierStats tiers;
  double loss = 0;                         // mean cross-entropy over the global batch
  std::vector<int64_t> tokens_per_expert;  // routed (token, choice) pairs per global expert, all
                                           // MoE layers, this rank's experts' share
  std::vector<int64_t> tokens_per_layer_expert;  // the same per model layer: [layer * E + e]
  int64_t dropped = 0;  // (token, choice) pairs past capacity, this rank's micro-batches
};

class MoeTrainer {
 public:
  // Checks the combination (ConfigError listing what is unsupported or inconsistent).
  // `copier` runs the copies between tiers on the copy engine's thread (default: `device`; pass
  // the backend itself when `device` is a timing wrapper).
  static std::unique_ptr<MoeTrainer> create(const ModelSpec& m, const TrainSettings& s,
                                            Device& device, TrainGroups groups,
                                            Device* copier = nullptr);
  ~MoeTrainer();

  // One training step: forward and backward of this rank's micro-batches, gradient reduction,
  // Adam. Returns the loss of the whole global batch.
  StepStats step(int64_t step_index);
  // The forward and backward only: this rank's gradients (of its share of the global batch's
  // mean loss) in parameters(), nothing reduced or updated; the loss of this rank's share.
  StepStats forward_backward(int64_t step_index);
  // Delayed update: applies the update still pending (waiting for the host's), so that the values
  // are those of every step taken. Nothing to do otherwise.
  void finish_update();
  // This rank's parameters (dense ones replicated, its experts').
  const std::vector<Parameter>& parameters() const { return params_; }
  // A parameter's values (or gradients) copied to the host, from whichever tier holds them.
  std::vector<float> values(const Parameter& p) const;
  std::vector<float> gradients(const Parameter& p) const;
  int first_expert() const { return first_expert_; }
  int local_experts() const { return local_experts_; }

 private:
  struct Impl;
  MoeTrainer() = default;
  std::vector<Parameter> params_;
  int first_expert_ = 0;
  int local_experts_ = 0;
  std::unique_ptr<Impl> impl_;
};

// How far `run`'s parameters are from `reference`'s (same model and seed, any layout): the
// norm-wise relative error ||a - b|| / ||b|| over all of this rank's parameters, and the largest
// per-tensor one with its name. Norm-wise, because Adam's first steps turn an element whose
// gradient is ~0 into a +-lr step whose sign the summation order decides (tensor parallelism
// sums in another order): one such element moves a small tensor's error, not the model's.
struct ParameterError {
  double relative = 0;  // all parameters together
  double worst_tensor = 0;
  std::string worst;
};
ParameterError parameter_error(const MoeTrainer& run, const MoeTrainer& reference);

// The value a parameter element takes at initialisation (normal with standard deviation `std`;
// norms' gains 1).
float init_value(uint64_t seed, const std::string& name, size_t index, float std = 0.02f);
// init_value of elements 0..n-1 of a tensor (or of a shard: element i is global_index[i]), on
// every host core for large tensors.
void init_values(uint64_t seed, const std::string& name, const std::vector<size_t>& global_index,
                 size_t n, float std, float* out);

}  // namespace switchyard
