// Helpers the switchyard CLI's subcommands share: formatting, the configs root, cost profiles.
// Header-only: tools/ holds main()s and their subcommands, no library code.
#pragma once

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <functional>
#include <iostream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "core/config_registry.h"
#include "core/error.h"
#include "core/plan.h"
#include "cost_models/profile.h"
#ifdef SWITCHYARD_HAVE_CUDA
#include "executor/cuda/device_info.h"
#endif

namespace switchyard::cli {

namespace sy = switchyard;

constexpr int kExitBadInput = 2;

inline std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

inline std::string gib(double bytes) { return fmt("%.2f GiB", bytes / double(1ull << 30)); }
inline std::string billions(double n) { return fmt("%.3f B", n / 1e9); }

inline void print_issues(const std::vector<sy::ConfigIssue>& issues) {
  for (const auto& issue : issues) std::cerr << "  " << issue.to_string() << "\n";
}

// A failure before a distributed command's work starts. Under mpirun the first rank to exit
// non-zero makes mpirun end the others, so rank 0 reports `failure` (as main() would) and every
// rank leaves only after it has: all pass `barrier`, then return the exit code (2 for bad input).
inline int report_on_rank0(std::exception_ptr failure, bool rank0,
                           const std::function<void()>& barrier) {
  int code = kExitBadInput;
  if (rank0) {
    try {
      std::rethrow_exception(failure);
    } catch (const sy::ConfigError& e) {
      std::cerr << "error: " << e.issues().size() << " problem"
                << (e.issues().size() > 1 ? "s" : "") << " in the input\n";
      print_issues(e.issues());
    } catch (const std::exception& e) {
      std::cerr << "error: " << e.what() << "\n";
      code = 1;
    }
    std::cerr.flush();
  }
  barrier();
  return code;
}

inline std::string plan_summary(const sy::Plan& p) {
  std::string s =
      "dp" + std::to_string(p.dp) + " tp" + std::to_string(p.tp) + " pp" + std::to_string(p.pp);
  if (p.vp > 1) s += " vp" + std::to_string(p.vp);
  if (p.cp > 1) s += " cp" + std::to_string(p.cp);
  s += " ep" + std::to_string(p.ep);
  if (p.expert_tp > 1) s += " etp" + std::to_string(p.expert_tp);
  s += " mbs" + std::to_string(p.micro_batch_size) + " " + std::string(sy::enum_name(p.schedule)) +
       " zero" + std::to_string(p.zero_stage) + " " + std::string(sy::enum_name(p.dispatch));
  return s;
}

// True when mpirun/mpiexec started this process (its launcher environment is set): only then is
// MPI initialised, so a plain `switchyard ...` never pays for a singleton MPI start.
inline bool launched_by_mpirun() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"})
    if (std::getenv(v)) return true;
  return false;
}

struct Common {
  std::string configs;
  sy::ConfigRegistry registry() const {
    return sy::ConfigRegistry(sy::ConfigRegistry::locate_root(
        configs.empty() ? std::nullopt : std::optional<std::filesystem::path>(configs), program));
  }
  const char* program = nullptr;
};

// The default profile for a cluster, with a calibration file's constants over it when given.
inline sy::CostProfile load_profile(const sy::ClusterSpec& cluster, const std::string& path) {
  sy::CostProfile prof = sy::default_cost_profile(cluster);
  if (path.empty()) return prof;
  try {
    return sy::apply_profile_json(sy::load_json_file(path), std::move(prof));
  } catch (const sy::ConfigError& e) {
    throw sy::with_file(e, path);
  }
}

inline std::string pct(double v) { return fmt("%.1f%%", 100.0 * v); }

// The ranks of this job on this node (they share its DRAM, SSD and cores): what the launcher says
// (OpenMPI's mpirun, MPICH's Hydra, Slurm's srun); otherwise the job's ranks up to the cluster's
// GPUs per node (`per_node`; 0: no bound).
inline int ranks_on_this_node(int world_size, int per_node = 0) {
  const int world = std::max(1, world_size);
  for (const char* var : {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"})
    if (const char* v = std::getenv(var))
      if (const int local = std::atoi(v); local > 0) return std::min(local, world);
  return per_node > 0 ? std::min(world, per_node) : world;
}

// The host's threads for a rank's offloaded update (Adam over host-resident states): one on the CPU
// backend (a rank is a core); beside GPUs, the node's cores divided among its ranks.
inline int host_threads_per_rank(const std::string& backend, int ranks_on_node) {
  if (backend == "cpu") return 1;
  return std::max(
      1, static_cast<int>(std::thread::hardware_concurrency()) / std::max(1, ranks_on_node));
}

// `--backend cuda` where this build has none.
inline sy::ConfigError no_cuda_backend() {
  return sy::ConfigError("--backend",
                         "\"cuda\": this build has no CUDA backend (nvcc and NCCL were not found "
                         "when it was configured)");
}

#ifdef SWITCHYARD_HAVE_CUDA
// This rank's GPU for --backend cuda: its node-local rank (OpenMPI's; the rank itself otherwise)
// among the GPUs the process sees. Throws when it sees none, with the driver's reason.
inline int local_cuda_device(int rank) {
  std::string reason;
  const auto gpus = sy::cuda_devices(&reason);
  if (gpus.empty()) throw std::runtime_error("--backend cuda: no CUDA device (" + reason + ")");
  if (const char* l = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK")) rank = std::atoi(l);
  return rank % static_cast<int>(gpus.size());
}
#endif

}  // namespace switchyard::cli
