#include "core/shapes.h"

#include <algorithm>

namespace switchyard {

std::string_view collective_name(Collective c) {
  switch (c) {
    case Collective::kAllReduce:
      return "all_reduce";
    case Collective::kAllGather:
      return "all_gather";
    case Collective::kReduceScatter:
      return "reduce_scatter";
    case Collective::kAllToAll:
      return "all_to_all";
    case Collective::kBroadcast:
      return "broadcast";
    case Collective::kSendRecv:
      return "send_recv";
  }
  return "?";
}

GroupLayout group_layout(int size, int stride, int gpus_per_node) {
  GroupLayout g;
  g.ranks = std::max(size, 1);
  stride = std::max(stride, 1);
  const int per_node = stride >= gpus_per_node ? 1 : gpus_per_node / stride;
  g.ranks_per_node = std::clamp(per_node, 1, g.ranks);
  return g;
}

}  // namespace switchyard
