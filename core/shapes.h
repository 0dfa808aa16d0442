// The shapes of work, shared by the step program (core), the cost models that time it and the
// executor that runs it: GEMMs, attention, collectives and where a communication group's ranks sit.
#pragma once

#include <cstdint>
#include <string_view>

namespace switchyard {

struct GemmShape {
  int64_t m = 0;  // rows of A and C (tokens)
  int64_t n = 0;  // columns of B and C
  int64_t k = 0;  // inner dimension
  int64_t batch = 1;
};

struct AttentionShape {
  int64_t batch = 0;     // sequences
  int64_t seq_len = 0;   // query length
  int64_t kv_len = 0;    // keys attended to; 0 = seq_len
  int64_t heads = 0;     // query heads on this GPU
  int64_t kv_heads = 0;  // key/value heads on this GPU
  int64_t qk_dim = 0;
  int64_t v_dim = 0;
  bool causal = true;
};

enum class Collective { kAllReduce, kAllGather, kReduceScatter, kAllToAll, kBroadcast, kSendRecv };

std::string_view collective_name(Collective c);

// Where the ranks of one communication group sit.
struct GroupLayout {
  int ranks = 1;
  int ranks_per_node = 1;  // group members in each node (the group is spread evenly)
  int nodes() const { return (ranks + ranks_per_node - 1) / ranks_per_node; }
};

// Layout of a group of `size` ranks whose members are `stride` apart in the global rank order
// (ranks are numbered node by node): a TP group has stride 1, a DP group stride tp*cp...
GroupLayout group_layout(int size, int stride, int gpus_per_node);

}  // namespace switchyard
