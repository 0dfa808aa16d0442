// What the `run` subcommand's training and inference paths share: the flags, the process's ranks,
// gathering JSON on rank 0, the test hooks. Header-only, tools/ only.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "core/config_registry.h"
#include "core/json_io.h"
#include "core/workload.h"
#include "executor/communicator.h"
#include "executor/memory.h"
#include "executor/timed.h"
#include "tools/cli_common.h"
#include "traces/chrome_trace.h"
#ifdef SWITCHYARD_HAVE_MPI
#include "executor/cpu/mpi_communicator.h"
#endif

namespace switchyard::cli {

using Clock = std::chrono::steady_clock;

struct RunFlags {
  InputNames names;
  int steps = 5;
  int warmup = 1;
  bool check = false;
  std::string db = "switchyard.db";
  bool no_db = false;
  double timeout_s = 300;
  uint64_t seed = 1234;
  std::string profile;
  std::string trace;
  bool json = false;
  std::string routing = "workload";
};

// The process's ranks: MPI when launched by mpirun, else one process.
struct Ranks {
#ifdef SWITCHYARD_HAVE_MPI
  std::unique_ptr<MpiRuntime> mpi;
#endif
  std::unique_ptr<Communicator> world;
  int rank = 0;
  int size = 1;
  [[noreturn]] void abort(int code, const std::string& message) {
#ifdef SWITCHYARD_HAVE_MPI
    if (mpi) mpi->abort(code, message);
#endif
    std::fprintf(stderr, "error: %s\n", message.c_str());
    std::_Exit(code);
  }
};

inline Ranks start_ranks(double timeout_s) {
  Ranks r;
#ifdef SWITCHYARD_HAVE_MPI
  if (launched_by_mpirun()) {
    r.mpi = MpiRuntime::start(nullptr, nullptr);
    r.world = r.mpi->world(timeout_s);
    r.rank = r.world->rank();
    r.size = r.world->size();
    return r;
  }
#else
  (void)timeout_s;
#endif
  r.world = self_communicator("world", 0);
  return r;
}

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// Test hooks: the rank named by SWITCHYARD_TEST_DIE_RANK dies (exits without a word) before the
// first measured step, as a crashed process would; SWITCHYARD_TEST_HANG_RANK stops responding
// instead, as a stuck one would.
inline void maybe_fail(int rank) {
  if (const char* r = std::getenv("SWITCHYARD_TEST_DIE_RANK"); r && std::atoi(r) == rank)
    std::_Exit(137);
  if (const char* r = std::getenv("SWITCHYARD_TEST_HANG_RANK"); r && std::atoi(r) == rank)
    std::this_thread::sleep_for(std::chrono::hours(1));
}

// Every rank's `mine` to rank 0 (in rank order there; empty elsewhere).
inline std::vector<Json> gather_json(Ranks& ranks, const Json& mine) {
  std::vector<Json> all;
  if (ranks.rank != 0) {
    const std::string text = mine.dump();
    const int64_t n = static_cast<int64_t>(text.size());
    ranks.world->send(&n, 1, DType::kInt64, 0, 11);
    ranks.world->send(text.data(), text.size(), DType::kByte, 0, 12);
    return all;
  }
  all.push_back(mine);
  for (int src = 1; src < ranks.size; ++src) {
    int64_t n = 0;
    ranks.world->recv(&n, 1, DType::kInt64, src, 11);
    std::string buf(static_cast<size_t>(n), '\0');
    ranks.world->recv(buf.data(), buf.size(), DType::kByte, src, 12);
    all.push_back(Json::parse(buf));
  }
  return all;
}

// Every rank's measured events (device and collective calls, program ops, copies between tiers)
// to rank 0, with their rank (empty elsewhere).
inline std::vector<MeasuredEvent> gather_events(Ranks& ranks,
                                                const std::vector<const OpTimes*>& sources) {
  Json mine = Json::array();
  for (const OpTimes* t : sources)
    for (const OpEvent& e : t->events)
      mine.push_back({e.op, e.communication, e.start_s, e.end_s,
                      e.program ? op_phase_name(e.phase) : "", e.copy});
  std::vector<MeasuredEvent> events;
  const std::vector<Json> all = gather_json(ranks, mine);
  for (size_t rank = 0; rank < all.size(); ++rank)
    for (const auto& e : all[rank])
      events.push_back({static_cast<int>(rank), e[0].get<std::string>(), e[1].get<bool>(),
                        e[2].get<double>(), e[3].get<double>(), e[4].get<std::string>(),
                        e[5].get<bool>()});
  return events;
}

// One rank's memory: the GPU's HBM as its device arena, its share of the node's DRAM and SSD.
inline TierCapacity rank_capacity(const ClusterSpec& c) {
  TierCapacity cap;
  cap.device_bytes = c.gpu.hbm_bytes;
  cap.host_bytes = c.host.dram_bytes / std::max(1, c.gpus_per_node);
  cap.ssd_bytes = c.host.ssd_bytes / std::max(1, c.gpus_per_node);
  return cap;
}

// The routing the workload asks the gate for: each expert's share of the routed rows, and per
// model layer when the workload routes each MoE layer its own way (empty for a dense model).
inline void workload_routing(const Inputs& in, std::vector<double>& share,
                             std::vector<std::vector<double>>& layer_share) {
  if (!in.model.moe) return;
  share = expert_load_fractions(in.workload, in.model);
  if (in.workload.routing.per_layer.empty()) return;
  layer_share.resize(static_cast<size_t>(in.model.num_layers));
  int moe_layer = 0;
  for (int64_t l = 0; l < in.model.num_layers; ++l)
    if (in.model.is_moe_layer(l))
      layer_share[static_cast<size_t>(l)] =
          expert_load_fractions(in.workload, in.model, moe_layer++);
}

// The inference path of `run` (the workload's mode is inference): called by every rank after
// the inputs passed validation.
int run_inference(const RunFlags& f, Ranks& ranks, const Inputs& in);

}  // namespace switchyard::cli
