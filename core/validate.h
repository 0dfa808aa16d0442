// validate(): every rule a (plan, model, cluster, workload) combination must satisfy, each
// violation reported with the JSON path it is about and the numbers involved. The parallel-degree
// rules follow Megatron-Core (MoE parallel folding: the expert layers refold the tp*cp*dp ranks of
// a pipeline stage as expert_tp*ep*expert_dp; MoE with tp > 1 needs sequence parallelism); the ZeRO
// and pipeline rule follows DeepSpeed (ZeRO-2/3 cannot be combined with pipeline parallelism).
#pragma once

#include <vector>

#include "core/cluster.h"
#include "core/error.h"
#include "core/model.h"
#include "core/plan.h"
#include "core/workload.h"

namespace switchyard {

// Empty when the combination is valid.
std::vector<ConfigIssue> validate(const Plan& plan, const ModelSpec& model,
                                  const ClusterSpec& cluster, const Workload& workload);

}  // namespace switchyard
