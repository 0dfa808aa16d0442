#include "core/step_program.h"

#include <algorithm>

namespace switchyard {

std::string_view stream_name(StreamKind s) {
  switch (s) {
    case StreamKind::kCompute:
      return "compute";
    case StreamKind::kTpComm:
      return "tp_comm";
    case StreamKind::kCpComm:
      return "cp_comm";
    case StreamKind::kEpComm:
      return "ep_comm";
    case StreamKind::kDpComm:
      return "dp_comm";
    case StreamKind::kPpComm:
      return "pp_comm";
    case StreamKind::kCopy:
      return "copy";
    case StreamKind::kHost:
      return "host";
    case StreamKind::kStorage:
      return "storage";
  }
  return "?";
}

std::string_view group_name(CommGroup g) {
  switch (g) {
    case CommGroup::kNone:
      return "none";
    case CommGroup::kTp:
      return "tp";
    case CommGroup::kCp:
      return "cp";
    case CommGroup::kEp:
      return "ep";
    case CommGroup::kEpIntra:
      return "ep_intra";
    case CommGroup::kEpInter:
      return "ep_inter";
    case CommGroup::kExpertTp:
      return "expert_tp";
    case CommGroup::kDp:
      return "dp";
    case CommGroup::kExpertDp:
      return "expert_dp";
    case CommGroup::kPp:
      return "pp";
    case CommGroup::kReplicas:
      return "replicas";
  }
  return "?";
}

std::vector<ScheduleItem> schedule_order(Schedule schedule, int pp, int vp, int m, int stage) {
  std::vector<ScheduleItem> order;
  pp = std::max(pp, 1);
  m = std::max(m, 1);
  if (schedule == Schedule::kGPipe) {
    for (int mb = 0; mb < m; ++mb) order.push_back({mb, 0, false});
    for (int mb = 0; mb < m; ++mb) order.push_back({mb, 0, true});
    return order;
  }
  if (schedule == Schedule::k1F1B) {
    const int warmup = std::min(pp - stage - 1, m);
    const int remaining = m - warmup;
    for (int i = 0; i < warmup; ++i) order.push_back({i, 0, false});
    for (int i = 0; i < remaining; ++i) {
      order.push_back({warmup + i, 0, false});
      order.push_back({i, 0, true});
    }
    for (int i = remaining; i < m; ++i) order.push_back({i, 0, true});
    return order;
  }
  // Interleaved 1F1B (Megatron-LM forward_backward_pipelining_with_interleaving): units k = 0 ..
  // m*vp-1; unit k runs chunk (k mod pp*vp) / pp (reversed for backward) on micro-batch
  // (k / (pp*vp)) * pp + k mod pp.
  vp = std::max(vp, 1);
  const int total = m * vp;
  const int warmup = m == pp ? total : std::min((pp - stage - 1) * 2 + (vp - 1) * pp, total);
  const int remaining = total - warmup;
  auto unit = [&](int k, bool backward) {
    const int in_group = k % (pp * vp);
    int chunk = in_group / pp;
    if (backward) chunk = vp - 1 - chunk;
    return ScheduleItem{(k / (pp * vp)) * pp + in_group % pp, chunk, backward};
  };
  for (int k = 0; k < warmup; ++k) order.push_back(unit(k, false));
  for (int i = 0; i < remaining; ++i) {
    order.push_back(unit(warmup + i, false));
    order.push_back(unit(i, true));
  }
  for (int k = remaining; k < total; ++k) order.push_back(unit(k, true));
  return order;
}

}  // namespace switchyard
