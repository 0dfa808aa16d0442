// The time of one op of a StepProgram on a cluster: the bridge between the program (core) and the
// cost models. Costs depend only on the op's template, so callers evaluate each template once and
// reuse the result for every micro-batch.
#pragma once

#include <vector>

#include "core/step_program.h"
#include "cost_models/profile.h"

namespace switchyard {

enum class Link : uint8_t { kNone, kIntraNode, kInterNode, kPcie, kSsd };
inline constexpr int kNumLinks = 5;

struct OpCost {
  double time_s = 0;
  Link link = Link::kNone;  // the link a communication op loads (shared with concurrent ones)
  // Of time_s, the parts on the GPU's PCIe link before and after the op's own work (a host
  // update's gradient download and parameter upload): simulate runs them as their own pieces on
  // that link, shared with the traffic that crosses it at the same time.
  double pcie_before_s = 0;
  double pcie_after_s = 0;
};

OpCost op_cost(const OpTemplate& op, const StepProgram& prog, const ClusterSpec& cluster,
               const CostProfile& prof, Precision precision);
// Pipeline send/recv of one unit's activation or gradient.
OpCost p2p_cost(const StepProgram& prog, bool same_node, const ClusterSpec& cluster,
                const CostProfile& prof);

// Costs of every template of a stage: [chunk][forward ops..., backward ops...] and step ops.
struct StageCosts {
  std::vector<std::vector<OpCost>> forward;   // per chunk
  std::vector<std::vector<OpCost>> backward;  // per chunk
  std::vector<OpCost> step;
};
std::vector<StageCosts> program_costs(const StepProgram& prog, const ClusterSpec& cluster,
                                      const CostProfile& prof, Precision precision);

}  // namespace switchyard
