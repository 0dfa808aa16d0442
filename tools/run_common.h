// What the `run` subcommand's training and inference paths share: the flags, the process's ranks,
// gathering JSON on rank 0, the test hooks. Header-only, tools/ only.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
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
#ifdef SWITCHYARD_HAVE_CUDA
#include "executor/cuda/cuda_device.h"
#include "executor/cuda/nccl_communicator.h"
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
  std::string backend = "cpu";     // cpu | cuda
  std::string gemm_math = "fp32";  // cuda: fp32 | tf32 | bf16
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

// The backend a run computes and communicates on: its Device (the per-tier memory included) and
// the world its runner's groups split from (the process world on cpu; an NCCL world over it on
// cuda, one GPU per rank: the node-local rank's).
struct Backend {
  std::unique_ptr<Device> device;
  std::unique_ptr<Communicator> nccl_world;
  Communicator* groups_world = nullptr;
};

// On cuda the device tier holds the GPU's memory less what the cost profile reserves for the CUDA
// runtime (context, cuBLAS workspace, NCCL buffers), as the simulator counts it.
inline Backend make_backend(const RunFlags& f, Ranks& ranks, TierCapacity capacity,
                            int64_t runtime_reserved_bytes) {
  Backend b;
  if (f.backend == "cpu") {
    b.device = cpu_device(std::move(capacity));
    b.groups_world = ranks.world.get();
    return b;
  }
#ifdef SWITCHYARD_HAVE_CUDA
  CudaOptions o;
  o.device = local_cuda_device(ranks.rank);
  try {
    o.math = parse_gemm_math(f.gemm_math);
  } catch (const std::invalid_argument& e) {
    throw ConfigError("--gemm-math", e.what());
  }
  if (capacity.device_bytes > 0) {
    if (capacity.device_bytes <= runtime_reserved_bytes)
      throw ConfigError("cluster.gpu.hbm_bytes",
                        std::to_string(capacity.device_bytes) +
                            " leaves nothing for tensors on a GPU once the cost profile's "
                            "runtime_reserved_bytes " +
                            std::to_string(runtime_reserved_bytes) +
                            " (CUDA context, cuBLAS and NCCL buffers) are set aside");
    capacity.device_bytes -= runtime_reserved_bytes;
  }
  b.device = cuda_device(std::move(capacity), o);
  b.nccl_world = nccl_world(*ranks.world, o.device, f.timeout_s);
  b.groups_world = b.nccl_world.get();
  return b;
#else
  (void)runtime_reserved_bytes;
  throw no_cuda_backend();
#endif
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
                      e.program ? op_phase_name(e.phase) : "", e.copy, e.host});
  std::vector<MeasuredEvent> events;
  const std::vector<Json> all = gather_json(ranks, mine);
  for (size_t rank = 0; rank < all.size(); ++rank)
    for (const auto& e : all[rank])
      events.push_back({static_cast<int>(rank), e[0].get<std::string>(), e[1].get<bool>(),
                        e[2].get<double>(), e[3].get<double>(), e[4].get<std::string>(),
                        e[5].get<bool>(), e[6].get<bool>()});
  return events;
}

// Per StepProgram op ("<phase> <name>"), the slowest rank's seconds in `times`, divided by `per`
// (the steps or passes they cover); on rank 0 (empty elsewhere).
inline std::map<std::string, double> gather_program_seconds(Ranks& ranks, const OpTimes& times,
                                                            double per) {
  std::map<std::string, double> out;
  for (const Json& rank_ops : gather_json(ranks, Json(times.program_seconds)))
    for (const auto& [key, secs] : rank_ops.items())
      out[key] = std::max(out[key], secs.get<double>() / per);
  return out;
}

// Appends predicted beside measured per program op to `out`: the keys of `order` (the program's
// order), then those only the measurement has. Each entry names its op and its phase, or, for an
// inference pass, the `pass` (and not the phase: every inference op is a forward one).
inline void append_program_ops(Json& out, std::vector<std::string> order,
                               const std::map<std::string, double>& predicted,
                               const std::map<std::string, double>& measured,
                               const char* pass = nullptr) {
  for (const auto& [key, secs] : measured)
    if (!predicted.count(key)) order.push_back(key);
  for (const std::string& key : order) {
    const size_t space = key.find(' ');
    const auto p = predicted.find(key);
    const auto m = measured.find(key);
    Json o = {{"op", key.substr(space + 1)},
              {"predicted_s", p == predicted.end() ? Json(nullptr) : Json(p->second)},
              {"measured_s", m == measured.end() ? Json(nullptr) : Json(m->second)}};
    if (pass)
      o["pass"] = pass;
    else
      o["phase"] = key.substr(0, space);
    out.push_back(std::move(o));
  }
}

// The fraction of copy time compute hid: 1 - stalls / copies (null without copies).
inline Json hidden_fraction(double copy_s, double stall_s) {
  return copy_s > 0 ? Json(std::clamp(1.0 - stall_s / copy_s, 0.0, 1.0)) : Json(nullptr);
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
