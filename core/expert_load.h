// Which rank of an EP group holds which expert copies, and what share of the routed rows each copy
// receives. Home copies sit on contiguous ranks (expert e on rank e / (E / ep)); extra copies of
// replicated (elastic) experts go to the least loaded rank, hottest first, and split their expert's
// rows evenly. A capacity factor caps the rows one copy accepts (the rest are dropped).
#pragma once

#include <vector>

#include "core/model.h"
#include "core/plan.h"
#include "core/workload.h"

namespace switchyard {

struct ExpertCopy {
  int expert = 0;
  double share = 0;  // of all rows routed in the EP group (a balanced copy holds 1/E)
};

struct RankExperts {
  std::vector<ExpertCopy> copies;
  double share = 0;  // sum over copies
};

// One entry per EP rank; empty for a dense model.
// With `moe_layer` >= 0, the routing of that MoE layer (per-layer histograms), else the step's.
std::vector<RankExperts> expert_rank_loads(const ModelSpec& m, const Plan& plan, const Workload& w,
                                           int moe_layer = -1);
// Index of the rank with the largest share.
int most_loaded_rank(const std::vector<RankExperts>& ranks);
// Rows the most loaded rank receives relative to a balanced share (1 = balanced).
double expert_rank_load_factor(const ModelSpec& m, const Plan& plan, const Workload& w);

}  // namespace switchyard
