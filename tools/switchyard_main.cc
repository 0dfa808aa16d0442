// The switchyard CLI: parses flags (CLI11; unknown flags are errors), loads configs, calls the
// libraries, prints. Exit codes: 0 ok; 2 bad input (flags or configs: every problem is printed with
// its JSON path); 1 anything else.
#include <CLI/CLI.hpp>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <optional>
#include <string>

#include "core/config_registry.h"
#include "core/validate.h"
#include "cost_models/collectives.h"
#include "cost_models/memory.h"
#include "cost_models/profile.h"
#include "simulator/simulator.h"
#include "tools/calibrate_cmd.h"
#include "tools/cli_common.h"
#include "tools/run_cmd.h"
#include "tools/tune_cmd.h"
#include "traces/chrome_trace.h"

namespace sy = switchyard;

namespace {

using namespace switchyard::cli;

// Parses "1G", "256M", "4096", "1.5GiB" (binary multiples, as nccl-tests' -b/-e).
std::optional<double> parse_size(std::string s) {
  double mult = 1;
  while (!s.empty() && (s.back() == 'B' || s.back() == 'i')) s.pop_back();
  if (!s.empty()) {
    switch (s.back()) {
      case 'K':
      case 'k':
        mult = 1024.0;
        s.pop_back();
        break;
      case 'M':
      case 'm':
        mult = 1024.0 * 1024;
        s.pop_back();
        break;
      case 'G':
      case 'g':
        mult = 1024.0 * 1024 * 1024;
        s.pop_back();
        break;
      default:
        break;
    }
  }
  try {
    size_t used = 0;
    double v = std::stod(s, &used);
    if (used != s.size() || !(v > 0) || !std::isfinite(v)) return std::nullopt;
    return v * mult;
  } catch (...) {
    return std::nullopt;
  }
}

int cmd_validate(const Common& common, const sy::InputNames& names, bool json) {
  const sy::ConfigRegistry reg = common.registry();
  const sy::Inputs in = sy::load_inputs(reg, names);
  const auto issues = sy::validate(in.plan, in.model, in.cluster, in.workload);
  if (json) {
    sy::Json out = {{"ok", issues.empty()}, {"issues", sy::Json::array()}};
    for (const auto& i : issues)
      out["issues"].push_back({{"path", i.path}, {"message", i.message}});
    out["plan_hash"] = sy::content_hash(sy::semantic_json(in.plan));
    out["model_hash"] = sy::content_hash(sy::semantic_json(in.model));
    out["cluster_hash"] = sy::content_hash(sy::semantic_json(in.cluster));
    out["workload_hash"] = sy::content_hash(sy::semantic_json(in.workload));
    // Valid plans may still not fit a tier: every such tier, with its numbers (simulate refuses
    // them).
    out["fits"] = nullptr;  // not checked: the plan is invalid
    if (issues.empty()) {
      out["fits"] = sy::Json::array();
      const auto fit = sy::capacity_issues(in.model, in.cluster, in.plan, in.workload,
                                           sy::default_cost_profile(in.cluster));
      for (const auto& i : fit) out["fits"].push_back({{"path", i.path}, {"message", i.message}});
      out["fits"] = out["fits"].empty() ? sy::Json(true) : out["fits"];
    }
    std::cout << out.dump(2) << "\n";
    return issues.empty() ? 0 : kExitBadInput;
  }
  if (!issues.empty()) {
    std::cerr << "invalid: " << issues.size() << " problem" << (issues.size() > 1 ? "s" : "")
              << "\n";
    print_issues(issues);
    return kExitBadInput;
  }
  std::cout << "ok\n";
  std::cout << "  " << in.model.name << " on " << in.cluster.total_gpus() << "x "
            << in.cluster.gpu.name << " (" << in.cluster.num_nodes << " node"
            << (in.cluster.num_nodes > 1 ? "s" : "") << " of " << in.cluster.name << "), workload "
            << in.workload.name << "\n";
  std::cout << "  plan " << (in.plan.name.empty() ? "(unnamed)" : in.plan.name) << ": "
            << plan_summary(in.plan) << "\n";
  const auto mem = sy::peak_memory_per_gpu(in.model, in.cluster, in.plan, in.workload,
                                           sy::default_cost_profile(in.cluster));
  const auto total = mem.total();
  std::cout << "  peak memory per GPU (stage " << mem.stage << "): gpu " << gib(total.gpu) << " of "
            << gib(static_cast<double>(in.cluster.gpu.hbm_bytes)) << ", cpu " << gib(total.cpu)
            << ", ssd " << gib(total.ssd) << "\n";
  std::cout << "   ";
  for (const auto& [name, bytes] : sy::memory_parts(mem))
    if (bytes->total() > 0)
      std::cout << " " << name << " " << fmt("%.2f", bytes->gpu / double(1ull << 30));
  std::cout << " (GiB on the GPU; " << fmt("%.1f", mem.in_flight_micro_batches)
            << " micro-batches in flight)\n";
  // Valid, yet it may not fit a tier (GPU, the node's DRAM or SSD): simulate refuses it.
  for (const auto& i : sy::capacity_issues(in.model, in.cluster, in.plan, in.workload,
                                           sy::default_cost_profile(in.cluster)))
    std::cout << "  note: " << i.path << ": " << i.message
              << " (the plan is valid; simulate refuses it)\n";
  return 0;
}

int cmd_info(const Common& common, const std::string& model_name, const std::string& cluster_name,
             int nodes) {
  const sy::ConfigRegistry reg = common.registry();
  if (!model_name.empty()) {
    const sy::ModelSpec m = reg.load_model(model_name);
    const sy::ParamCounts c = sy::count_params(m);
    const sy::FlopsPerToken f = sy::flops_per_token(m, m.seq_len);
    std::cout << "model " << m.name << ": " << m.description << "\n";
    std::cout << "  layers " << m.num_layers << " (" << m.num_moe_layers() << " MoE), hidden "
              << m.hidden_size << ", heads " << m.num_attention_heads << "/" << m.num_kv_heads
              << ", vocab " << m.vocab_size << "\n";
    std::cout << "  params total " << billions(double(c.total())) << ", active "
              << billions(double(c.active)) << ", dense " << billions(double(c.dense()))
              << ", expert " << billions(double(c.expert())) << "\n";
    if (m.published)
      std::cout << "  published total " << billions(m.published->total_params) << " ("
                << fmt("%+.2f%%", 100.0 * (double(c.total()) / m.published->total_params - 1))
                << ")\n";
    std::cout << "  model FLOPs per token at seq " << m.seq_len << ": forward "
              << fmt("%.3g", f.forward) << ", forward+backward " << fmt("%.3g", f.total()) << "\n";
    std::cout << "  content hash " << sy::content_hash(sy::semantic_json(m)) << "\n";
  }
  if (!cluster_name.empty()) {
    sy::ClusterSpec c = reg.load_cluster(cluster_name);
    if (nodes > 0) c = sy::with_nodes(std::move(c), nodes);
    std::cout << "cluster " << c.name << ": " << c.description << "\n";
    std::cout << "  " << c.num_nodes << " nodes x " << c.gpus_per_node << " " << c.gpu.name
              << ", HBM " << gib(double(c.gpu.hbm_bytes)) << " at "
              << fmt("%.0f GB/s", c.gpu.hbm_bw_Bps / 1e9) << ", bf16 "
              << fmt("%.0f TFLOP/s", c.gpu.peak_bf16_flops / 1e12) << "\n";
    std::cout << "  intra-node " << sy::enum_name(c.intra_node.fabric) << " "
              << fmt("%.0f GB/s", c.intra_node.bw_Bps / 1e9) << " per GPU"
              << (c.intra_node.nvls ? " (NVLS)" : "") << "; " << c.inter_node.nics_per_node
              << " NICs x " << fmt("%.1f GB/s", c.inter_node.nic_bw_Bps / 1e9) << " per node\n";
    std::cout << "  content hash " << sy::content_hash(sy::semantic_json(c)) << "\n";
  }
  return 0;
}

int cmd_list(const Common& common, const std::string& what) {
  const sy::ConfigRegistry reg = common.registry();
  const std::pair<const char*, sy::ConfigKind> kinds[] = {{"models", sy::ConfigKind::kModel},
                                                          {"clusters", sy::ConfigKind::kCluster},
                                                          {"plans", sy::ConfigKind::kPlan},
                                                          {"workloads", sy::ConfigKind::kWorkload}};
  for (const auto& [name, kind] : kinds) {
    if (!what.empty() && what != name) continue;
    std::cout << name << ":";
    for (const auto& n : reg.list(kind)) std::cout << " " << n;
    std::cout << "\n";
  }
  std::cout << "(from " << reg.root().string() << ")\n";
  return 0;
}

int cmd_collective(const Common& common, const std::string& cluster_name, int nodes,
                   const std::string& profile, const std::string& op_name,
                   const std::string& min_size, const std::string& max_size, int ranks_per_node) {
  const sy::ConfigRegistry reg = common.registry();
  sy::ClusterSpec c = reg.load_cluster(cluster_name);
  if (nodes > 0) c = sy::with_nodes(std::move(c), nodes);
  const std::pair<const char*, sy::Collective> ops[] = {
      {"all_reduce", sy::Collective::kAllReduce},
      {"all_gather", sy::Collective::kAllGather},
      {"reduce_scatter", sy::Collective::kReduceScatter},
      {"all_to_all", sy::Collective::kAllToAll},
      {"hierarchical_all_to_all", sy::Collective::kAllToAll},
      {"broadcast", sy::Collective::kBroadcast}};
  std::optional<sy::Collective> op;
  for (const auto& [n, o] : ops)
    if (op_name == n) op = o;
  if (!op)
    throw sy::ConfigError("--op",
                          "unknown collective \"" + op_name +
                              "\"; expected all_reduce, all_gather, reduce_scatter, all_to_all, "
                              "hierarchical_all_to_all or broadcast");
  auto lo = parse_size(min_size), hi = parse_size(max_size);
  if (!lo) throw sy::ConfigError("--min-bytes", "not a size: \"" + min_size + "\"");
  if (!hi) throw sy::ConfigError("--max-bytes", "not a size: \"" + max_size + "\"");
  if (*lo > *hi)
    throw sy::ConfigError("--min-bytes", min_size + " exceeds --max-bytes " + max_size);
  if (ranks_per_node <= 0) ranks_per_node = c.gpus_per_node;
  if (ranks_per_node > c.gpus_per_node)
    throw sy::ConfigError("--ranks-per-node", std::to_string(ranks_per_node) + " exceeds the " +
                                                  std::to_string(c.gpus_per_node) +
                                                  " GPUs of a node");
  const sy::GroupLayout g{ranks_per_node * c.num_nodes, ranks_per_node};
  const sy::CostProfile prof = load_profile(c, profile);
  std::cout << "# predicted " << op_name << " on " << c.name << ": " << c.num_nodes << " node(s) x "
            << ranks_per_node << " ranks, cost profile \"" << prof.name << "\"\n";
  std::cout
      << "#        size(B)      time(us)  algbw(GB/s)  busbw(GB/s)  algorithm     bottleneck\n";
  for (double s = *lo; s <= *hi * 1.0000001; s *= 2) {
    const sy::CollectiveCost cost = op_name == "hierarchical_all_to_all"
                                        ? sy::hierarchical_all_to_all_cost(s, g, c, prof)
                                        : sy::collective_cost(*op, s, g, c, prof);
    std::printf("%16.0f %13.1f %12.2f %12.2f  %-12s  %s\n", s, cost.time_s * 1e6,
                cost.algbw_Bps / 1e9, cost.busbw_Bps / 1e9, std::string(cost.algorithm).c_str(),
                std::string(cost.bottleneck).c_str());
  }
  return 0;
}

void print_prediction(const sy::Inputs& in, const sy::Prediction& p, const sy::CostProfile& prof) {
  const double hbm = static_cast<double>(in.cluster.gpu.hbm_bytes);
  std::cout << in.model.name << " on " << p.gpus << "x " << in.cluster.gpu.name << " ("
            << in.cluster.num_nodes << " node" << (in.cluster.num_nodes > 1 ? "s" : "")
            << "), plan " << plan_summary(in.plan) << ", " << sy::enum_name(in.workload.precision)
            << ", fidelity " << p.fidelity << ", cost profile \"" << prof.name << "\"\n";
  if (p.inference) {
    const sy::InferenceTimes& t = *p.inference;
    const sy::InferenceSpec& inf = *in.workload.inference;
    std::cout << "  prefill          " << fmt("%.3f s", t.prefill_s) << " for " << inf.prefill_batch
              << " x " << inf.prompt_len << " tokens ("
              << fmt("%.0f tokens/s", t.prefill_tokens_per_s) << ")\n";
    std::cout << "  decode step      " << fmt("%.2f ms", t.decode_step_s * 1e3) << " per token for "
              << inf.decode_batch << " sequences\n";
    std::cout << "  batch latency    " << fmt("%.3f s", t.latency_s) << " (" << inf.decode_tokens
              << " tokens generated, " << fmt("%.0f tokens/s", t.generated_tokens_per_s) << ")\n";
  } else {
    std::cout << "  step time        " << fmt("%.3f s", p.step_time_s) << "\n";
  }
  std::cout << "  throughput       " << fmt("%.0f tokens/s", p.tokens_per_s) << " ("
            << fmt("%.0f per GPU", p.tokens_per_s_per_gpu) << ")\n";
  std::cout << "  model TFLOP/s    " << fmt("%.1f per GPU", p.model_tflops_per_gpu) << ", MFU "
            << pct(p.mfu) << "\n";
  const sy::TimeBreakdown& t = p.time;
  const double total = std::max(t.total(), 1e-30);
  std::cout << "  time (stage " << p.critical_stage << ")\n";
  const std::pair<const char*, double> parts[] = {{"compute", t.compute_s},
                                                  {"exposed TP comm", t.tp_comm_s},
                                                  {"exposed CP comm", t.cp_comm_s},
                                                  {"exposed EP comm", t.ep_comm_s},
                                                  {"exposed DP comm", t.dp_comm_s},
                                                  {"pipeline p2p", t.pp_comm_s},
                                                  {"pipeline bubble", t.bubble_s},
                                                  {"optimizer", t.optimizer_s},
                                                  {"stalls", t.stall_s}};
  for (const auto& [name, v] : parts)
    if (v > 0) {
      std::string label = name;
      label.resize(18, ' ');
      std::cout << "    " << label << fmt("%9.3f s", v) << "  " << pct(v / total) << "\n";
    }
  if (p.delayed_update_s > 0)
    std::cout << "    (the host's delayed update, " << fmt("%.3f s", p.delayed_update_s)
              << ", ran beside the step: " << fmt("%.3f s", t.optimizer_s)
              << " of optimizer time exposed)\n";
  std::cout << "  peak memory per GPU (stage " << p.peak_stage << "): gpu " << gib(p.peak.gpu)
            << " of " << gib(hbm) << ", cpu " << gib(p.peak.cpu) << ", ssd " << gib(p.peak.ssd)
            << "\n";
  std::cout << "    " << sy::gpu_parts_gib(p.memory) << " on the GPU\n";
  for (const auto& n : p.notes) std::cout << "  note: " << n << "\n";
}

int cmd_simulate(const Common& common, const sy::InputNames& names, const std::string& fidelity,
                 const std::string& trace, const std::string& profile, bool json) {
  const sy::ConfigRegistry reg = common.registry();
  const sy::Inputs in = sy::load_inputs(reg, names);
  auto issues = sy::validate(in.plan, in.model, in.cluster, in.workload);
  if (in.workload.mode == sy::Mode::kInference && in.plan.pp > 1)
    issues.push_back(
        {"plan.pp", "inference is simulated with pp = 1, got " + std::to_string(in.plan.pp)});
  if (!issues.empty()) throw sy::ConfigError(std::move(issues));
  const sy::CostProfile prof = load_profile(in.cluster, profile);
  // Memory first: a plan that does not fit a tier is reported with its numbers, not simulated.
  auto fit = sy::capacity_issues(in.model, in.cluster, in.plan, in.workload, prof);
  if (!fit.empty()) throw sy::ConfigError(std::move(fit));
  sy::SimulateOptions options;
  options.record_timeline = !trace.empty();
  const sy::Prediction p =
      fidelity == "estimate"
          ? sy::estimate(in.model, in.cluster, in.plan, in.workload, prof)
          : sy::simulate(in.model, in.cluster, in.plan, in.workload, prof, options);
  if (!trace.empty()) {
    if (fidelity == "estimate")
      throw sy::ConfigError("--trace", "needs --fidelity simulate (the estimate has no timeline)");
    sy::write_chrome_trace(trace, p, in);
  }
  // The event simulation's memory curve can peak above the closed form's sum (tensors it keeps
  // alive longer): that peak decides too.
  const double hbm = static_cast<double>(in.cluster.gpu.hbm_bytes);
  if (p.peak.gpu > hbm)
    throw sy::ConfigError("plan", "does not fit: the simulated peak of stage " +
                                      std::to_string(p.peak_stage) + " is " + gib(p.peak.gpu) +
                                      " per GPU (" + sy::gpu_parts_gib(p.memory) + ") but " +
                                      in.cluster.gpu.name + " has " + gib(hbm));
  if (json) {
    sy::Json out = sy::to_json(p);
    out["model"] = in.model.name;
    out["cluster"] = in.cluster.name;
    out["nodes"] = in.cluster.num_nodes;
    out["plan"] = sy::to_json(in.plan);
    out["workload"] = in.workload.name;
    out["profile"] = prof.name;
    std::cout << out.dump(2) << "\n";
  } else {
    print_prediction(in, p, prof);
    if (!trace.empty()) std::cout << "  trace written to " << trace << "\n";
  }
  return 0;
}

// The four inputs of a plan, named the same way by every subcommand that takes them.
void add_input_options(CLI::App* cmd, sy::InputNames& names) {
  cmd->add_option("--model", names.model,
                  "Model: bundled name or path (default: the plan's \"for\")");
  cmd->add_option("--cluster", names.cluster,
                  "Cluster: bundled name or path (default: the plan's \"for\")");
  auto* nodes = cmd->add_option("--nodes", names.nodes, "Override the cluster's node count")
                    ->check(CLI::PositiveNumber);
  cmd->add_option("--gpus", names.gpus,
                  "Use this many GPUs of the cluster: whole nodes, or part of one node")
      ->check(CLI::PositiveNumber)
      ->excludes(nodes);
  cmd->add_option("--plan", names.plan, "Plan: bundled name or path")->required();
  cmd->add_option(
      "--workload", names.workload,
      "Workload: bundled name or path (default: the plan's \"for\", else training at bf16 "
      "with one micro-batch per DP rank and pipeline stage)");
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "switchyard: plan, predict and run the parallel execution of Mixture-of-Experts models"};
  app.require_subcommand(1);
  Common common;
  common.program = argv[0];
  app.add_option("--configs", common.configs,
                 "Directory of bundled configs (default: $SWITCHYARD_CONFIGS, "
                 "then the installed or source tree's configs/)");

  sy::InputNames names;
  bool json = false;
  auto* validate =
      app.add_subcommand("validate", "Check a plan against its model, cluster and workload");
  add_input_options(validate, names);
  validate->add_flag("--json", json, "Print the result as JSON");

  sy::InputNames sim_names;
  std::string sim_fidelity = "simulate", sim_trace, sim_profile;
  bool sim_json = false;
  auto* simulate = app.add_subcommand(
      "simulate", "Predict one training step: time, throughput, MFU, memory per tier");
  add_input_options(simulate, sim_names);
  simulate
      ->add_option("--fidelity", sim_fidelity, "estimate (closed form) or simulate (event-driven)")
      ->check(CLI::IsMember({"estimate", "simulate"}));
  simulate->add_option("--trace", sim_trace,
                       "Write the timeline as Chrome trace-event JSON (Perfetto)");
  simulate->add_option(
      "--profile", sim_profile,
      "Cost-model constants (JSON) over the defaults, e.g. a calibration's output");
  simulate->add_flag("--json", sim_json, "Print the prediction as JSON");

  std::string info_model, info_cluster;
  int info_nodes = 0;
  auto* info =
      app.add_subcommand("info", "Show a model's derived parameter counts and FLOPs, or a cluster");
  info->add_option("--model", info_model, "Model: bundled name or path");
  info->add_option("--cluster", info_cluster, "Cluster: bundled name or path");
  info->add_option("--nodes", info_nodes, "Override the cluster's node count")
      ->check(CLI::PositiveNumber);

  std::string list_what;
  auto* list = app.add_subcommand("list", "List the bundled configs");
  list->add_option("kind", list_what, "models, clusters, plans or workloads (default: all)")
      ->check(CLI::IsMember({"models", "clusters", "plans", "workloads"}));

  std::string coll_cluster, coll_op = "all_reduce", coll_min = "1M", coll_max = "8G", coll_profile;
  int coll_nodes = 0, coll_rpn = 0;
  auto* coll = app.add_subcommand("collective",
                                  "Predicted time and bus bandwidth of a collective over sizes "
                                  "(nccl-tests conventions)");
  coll->add_option("--cluster", coll_cluster, "Cluster: bundled name or path")->required();
  coll->add_option("--nodes", coll_nodes, "Override the cluster's node count")
      ->check(CLI::PositiveNumber);
  coll->add_option("--op", coll_op,
                   "all_reduce, all_gather, reduce_scatter, all_to_all, "
                   "hierarchical_all_to_all, broadcast");
  coll->add_option("--min-bytes", coll_min, "Smallest size (e.g. 1M)");
  coll->add_option("--max-bytes", coll_max, "Largest size (e.g. 8G)");
  coll->add_option("--profile", coll_profile, "Cost-model constants (JSON) over the defaults");
  coll->add_option("--ranks-per-node", coll_rpn, "Group members per node (default: every GPU)")
      ->check(CLI::PositiveNumber);

  const std::function<int()> run_tune = sy::cli::add_tune_commands(app, common);
  const std::function<int()> run_run = sy::cli::add_run_command(app, common);
  const std::function<int()> run_calibrate = sy::cli::add_calibrate_command(app, common);

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::Error& e) {
    app.exit(e);
    return kExitBadInput;
  }

  try {
    if (*validate) return cmd_validate(common, names, json);
    if (*simulate)
      return cmd_simulate(common, sim_names, sim_fidelity, sim_trace, sim_profile, sim_json);
    if (*info) {
      if (info_model.empty() && info_cluster.empty())
        throw sy::ConfigError("info", "give --model and/or --cluster");
      return cmd_info(common, info_model, info_cluster, info_nodes);
    }
    if (*list) return cmd_list(common, list_what);
    if (const int rc = run_tune(); rc >= 0) return rc;
    if (const int rc = run_run(); rc >= 0) return rc;
    if (const int rc = run_calibrate(); rc >= 0) return rc;
    if (*coll)
      return cmd_collective(common, coll_cluster, coll_nodes, coll_profile, coll_op, coll_min,
                            coll_max, coll_rpn);
  } catch (const sy::ConfigError& e) {
    if ((*validate && json) || (*simulate && sim_json)) {
      sy::Json out = {{"ok", false}, {"issues", sy::Json::array()}};
      for (const auto& i : e.issues())
        out["issues"].push_back({{"path", i.path}, {"message", i.message}, {"file", i.file}});
      std::cout << out.dump(2) << "\n";
      return kExitBadInput;
    }
    std::cerr << "error: " << e.issues().size() << " problem" << (e.issues().size() > 1 ? "s" : "")
              << " in the input\n";
    print_issues(e.issues());
    return kExitBadInput;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 1;
}
