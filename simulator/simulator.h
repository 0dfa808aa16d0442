// The two fidelities of the simulator.
//  - estimate(): closed form. Costs one representative layer of each kind per stage (dense, MoE,
//    embedding, head) and composes them with the schedule's bubble; microseconds per plan, for the
//    tuner's pruning.
//  - simulate(): discrete-event run of the whole StepProgram: ops on one stream serialise, ops on
//    different streams overlap, communication ops of a rank that load the same link (NVLink, or
//    the GPU's PCIe link that both host copies and NIC traffic cross, or the SSDs) at the same time
//    share its bandwidth, pipeline sends connect stages; memory over time
//    follows the program's allocations and releases, and the peak is the maximum of that curve.
// Both take a validated combination (validate() first) and report the same Prediction.
#pragma once

#include "core/cluster.h"
#include "core/model.h"
#include "core/plan.h"
#include "core/workload.h"
#include "cost_models/profile.h"
#include "simulator/prediction.h"

namespace switchyard {

struct SimulateOptions {
  bool record_timeline = false;  // keep every op's start and end (for --trace)
};

Prediction estimate(const ModelSpec& model, const ClusterSpec& cluster, const Plan& plan,
                    const Workload& workload, const CostProfile& prof);
Prediction simulate(const ModelSpec& model, const ClusterSpec& cluster, const Plan& plan,
                    const Workload& workload, const CostProfile& prof,
                    const SimulateOptions& options = {});

// Inference times from the prefill's time and one decode step's.
void fill_inference_times(Prediction& p, const Workload& w, double prefill_s, double decode_step_s);

// Throughput figures of a step time (inference: of the batch's latency, forward FLOPs): tokens/s
// (total, per GPU), model TFLOP/s per GPU (the PaLM/Megatron model-FLOPs convention of
// flops_per_token) and MFU against the dense peak of the workload's precision.
void fill_throughput(Prediction& p, const ModelSpec& model, const ClusterSpec& cluster,
                     const Plan& plan, const Workload& workload);

}  // namespace switchyard
