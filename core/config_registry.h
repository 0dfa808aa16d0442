// Finds configs by bundled name or by path, and loads them. A name with a '/' or ending in ".json"
// is a path; anything else is looked up as ROOT/models/NAME.json (clusters/, plans/, workloads/).
// The root comes from, in order: an explicit directory (the CLI's --configs), $SWITCHYARD_CONFIGS,
// ../share/switchyard/configs beside the executable, the source tree's configs/ (compiled in).
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/cluster.h"
#include "core/model.h"
#include "core/plan.h"
#include "core/workload.h"

namespace switchyard {

enum class ConfigKind { kModel, kCluster, kPlan, kWorkload };

std::string_view config_kind_dir(ConfigKind kind);  // "models", "clusters", ...

// The four inputs of a plan, resolved together.
struct Inputs {
  ModelSpec model;
  ClusterSpec cluster;
  Plan plan;
  Workload workload;
};

// What the user named on the command line; empty strings are "not given".
struct InputNames {
  std::string model;
  std::string cluster;
  int nodes = 0;  // 0 = not given
  int gpus = 0;   // 0 = not given; whole nodes or part of one node (excludes nodes)
  std::string plan;
  std::string workload;
};

class ConfigRegistry;
// Loads all four. A name that is not given falls back to the plan's "for" object; a workload that
// is named nowhere defaults to default_workload(). Throws ConfigError (every problem of every
// file).
Inputs load_inputs(const ConfigRegistry& reg, const InputNames& names);
// Training at bf16 with the model's sequence length and one micro-batch per DP rank for each
// pipeline stage (global batch = micro_batch_size * dp * pp), uniform routing.
Workload default_workload(const ModelSpec& m, const Plan& p);

class ConfigRegistry {
 public:
  explicit ConfigRegistry(std::filesystem::path root) : root_(std::move(root)) {}

  // The bundled configs directory; `explicit_dir` wins when given. `argv0` helps find an installed
  // copy beside the executable. Throws ConfigError when no candidate exists.
  static std::filesystem::path locate_root(const std::optional<std::filesystem::path>& explicit_dir,
                                           const char* argv0);

  const std::filesystem::path& root() const { return root_; }
  // Throws ConfigError naming the bundled choices when `name` matches nothing.
  std::filesystem::path resolve(ConfigKind kind, std::string_view name) const;
  std::vector<std::string> list(ConfigKind kind) const;

  // Load and parse; issues carry the file they came from.
  ModelSpec load_model(std::string_view name) const;
  ClusterSpec load_cluster(std::string_view name) const;
  Plan load_plan(std::string_view name) const;
  Workload load_workload(std::string_view name) const;

 private:
  std::filesystem::path root_;
};

}  // namespace switchyard
