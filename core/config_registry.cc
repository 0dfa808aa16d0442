#include "core/config_registry.h"

#include <algorithm>
#include <cstdlib>
#include <optional>

namespace switchyard {

#ifndef SWITCHYARD_CONFIG_DIR
#define SWITCHYARD_CONFIG_DIR ""
#endif

namespace fs = std::filesystem;

std::string_view config_kind_dir(ConfigKind kind) {
  switch (kind) {
    case ConfigKind::kModel:
      return "models";
    case ConfigKind::kCluster:
      return "clusters";
    case ConfigKind::kPlan:
      return "plans";
    case ConfigKind::kWorkload:
      return "workloads";
  }
  return "";
}

fs::path ConfigRegistry::locate_root(const std::optional<fs::path>& explicit_dir,
                                     const char* argv0) {
  std::vector<fs::path> candidates;
  if (explicit_dir) {
    candidates.push_back(*explicit_dir);
  } else {
    if (const char* env = std::getenv("SWITCHYARD_CONFIGS"); env && *env)
      candidates.emplace_back(env);
    std::error_code ec;
    if (argv0 && *argv0) {
      fs::path exe = fs::weakly_canonical(fs::path(argv0), ec);
      if (!ec)
        candidates.push_back(exe.parent_path().parent_path() / "share" / "switchyard" / "configs");
    }
    if (*SWITCHYARD_CONFIG_DIR) candidates.emplace_back(SWITCHYARD_CONFIG_DIR);
  }
  for (const auto& c : candidates) {
    std::error_code ec;
    if (fs::is_directory(c / "models", ec)) return c;
  }
  std::string tried;
  for (const auto& c : candidates) tried += (tried.empty() ? "" : ", ") + c.string();
  throw ConfigError("--configs", "no configs directory (with a models/ folder) found; tried: " +
                                     (tried.empty() ? std::string("nothing") : tried));
}

fs::path ConfigRegistry::resolve(ConfigKind kind, std::string_view name) const {
  const std::string n(name);
  const bool is_path = n.find('/') != std::string::npos ||
                       (n.size() > 5 && n.compare(n.size() - 5, 5, ".json") == 0);
  if (is_path) {
    std::error_code ec;
    if (!fs::is_regular_file(n, ec))
      throw ConfigError(n, ec ? "cannot read: " + ec.message() : std::string("no such file"));
    return n;
  }
  fs::path p = root_ / config_kind_dir(kind) / (n + ".json");
  std::error_code ec;
  if (fs::is_regular_file(p, ec)) return p;
  std::string choices;
  for (const auto& c : list(kind)) choices += (choices.empty() ? "" : ", ") + c;
  throw ConfigError(std::string(config_kind_dir(kind)),
                    "no bundled " + std::string(config_kind_dir(kind)) + " named \"" + n +
                        "\"; bundled: " + choices);
}

std::vector<std::string> ConfigRegistry::list(ConfigKind kind) const {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(root_ / config_kind_dir(kind), ec))
    if (entry.path().extension() == ".json") out.push_back(entry.path().stem().string());
  std::sort(out.begin(), out.end());
  return out;
}

namespace {

template <typename Parse>
auto load(const ConfigRegistry& reg, ConfigKind kind, std::string_view name, Parse parse) {
  const fs::path path = reg.resolve(kind, name);
  try {
    return parse(load_json_file(path));
  } catch (const ConfigError& e) {
    throw with_file(e, path.string());
  }
}

}  // namespace

ModelSpec ConfigRegistry::load_model(std::string_view name) const {
  return load(*this, ConfigKind::kModel, name, [](const Json& j) { return parse_model(j); });
}
ClusterSpec ConfigRegistry::load_cluster(std::string_view name) const {
  return load(*this, ConfigKind::kCluster, name, [](const Json& j) { return parse_cluster(j); });
}
Plan ConfigRegistry::load_plan(std::string_view name) const {
  return load(*this, ConfigKind::kPlan, name, [](const Json& j) { return parse_plan(j); });
}
Workload ConfigRegistry::load_workload(std::string_view name) const {
  return load(*this, ConfigKind::kWorkload, name, [](const Json& j) { return parse_workload(j); });
}

Workload default_workload(const ModelSpec& m, const Plan& p) {
  Workload w;
  w.name = "default";
  w.description = "training, bf16, model sequence length, one micro-batch per DP rank per stage";
  w.global_batch_size = static_cast<int64_t>(p.micro_batch_size) * p.dp * p.pp;
  w.seq_len = m.seq_len;
  return w;
}

Inputs load_inputs(const ConfigRegistry& reg, const InputNames& names) {
  std::vector<ConfigIssue> issues;
  auto collect = [&](auto&& fn) {
    try {
      fn();
    } catch (const ConfigError& e) {
      issues.insert(issues.end(), e.issues().begin(), e.issues().end());
    }
  };
  Inputs in;
  std::optional<PlanTarget> target;
  bool plan_ok = false;
  if (names.plan.empty()) {
    issues.push_back({"--plan", "missing (required)"});
  } else {
    collect([&] {
      in.plan = reg.load_plan(names.plan);
      target = in.plan.target;
      plan_ok = true;
    });
  }
  auto pick = [&](const std::string& given, std::string PlanTarget::*field) {
    return !given.empty() ? given : (target ? (*target).*field : std::string());
  };
  const std::string model = pick(names.model, &PlanTarget::model);
  const std::string cluster = pick(names.cluster, &PlanTarget::cluster);
  const std::string workload = pick(names.workload, &PlanTarget::workload);
  if (model.empty() && plan_ok)
    issues.push_back({"--model", "missing (required: the plan names no model in \"for\")"});
  if (cluster.empty() && plan_ok)
    issues.push_back({"--cluster", "missing (required: the plan names no cluster in \"for\")"});
  bool model_ok = false;
  if (!model.empty())
    collect([&] {
      in.model = reg.load_model(model);
      model_ok = true;
    });
  if (!cluster.empty()) {
    collect([&] {
      in.cluster = reg.load_cluster(cluster);
      const int nodes =
          names.nodes > 0 ? names.nodes : (target && target->nodes > 0 ? target->nodes : 0);
      if (names.gpus > 0 && names.nodes > 0)
        throw ConfigError("--gpus", "give --nodes or --gpus, not both");
      if (names.gpus > 0)
        in.cluster = with_gpus(std::move(in.cluster), names.gpus, "--gpus");
      else if (nodes > 0)
        in.cluster = with_nodes(std::move(in.cluster), nodes,
                                names.nodes > 0 ? "--nodes" : "plan.for.nodes");
    });
  }
  if (!workload.empty())
    collect([&] { in.workload = reg.load_workload(workload); });
  else if (model_ok && plan_ok)
    in.workload = default_workload(in.model, in.plan);
  throw_if_any(std::move(issues));
  return in;
}

}  // namespace switchyard
