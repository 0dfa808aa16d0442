#include "tools/tune_cmd.h"

#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>

#include "core/validate.h"
#include "cost_models/memory.h"
#include "simulator/simulator.h"
#include "tools/mpi_tune.h"
#include "tuner/search.h"
#include "tuner/space.h"
#include "tuner/store.h"
#include "tuner/tune.h"

namespace switchyard::cli {
namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// What a user asked `tune` for; stored with the search so `--resume` can repeat it.
struct TuneRequest {
  std::string model;
  std::string cluster;
  int nodes = 0;
  int gpus = 0;
  std::string workload;
  std::string objective = "throughput";
  double max_mem_gib = 0;  // 0 = the GPU's HBM
  int top = 5;
  std::string capacity_factors;  // "" = by routing
  bool offload = true;

  Json to_json() const {
    return {{"model", model},
            {"cluster", cluster},
            {"nodes", nodes},
            {"gpus", gpus},
            {"workload", workload},
            {"objective", objective},
            {"max_mem_gib", max_mem_gib},
            {"top", top},
            {"capacity_factors", capacity_factors},
            {"offload", offload}};
  }
  // The search's identity: everything but how many rows to print.
  Json identity() const {
    Json j = to_json();
    j.erase("top");
    return j;
  }
  static TuneRequest from_json(const Json& j) {
    std::vector<ConfigIssue> issues;
    TuneRequest r;
    JsonReader in(j, "searches.args_json", issues);
    in.required("model", &r.model);
    in.required("cluster", &r.cluster);
    in.required("nodes", &r.nodes);
    in.required("gpus", &r.gpus);
    in.required("workload", &r.workload);
    in.required("objective", &r.objective);
    in.required("max_mem_gib", &r.max_mem_gib);
    in.optional("top", &r.top);
    in.required("capacity_factors", &r.capacity_factors);
    in.required("offload", &r.offload);
    in.finish();
    if (!issues.empty()) throw ConfigError(std::move(issues));
    return r;
  }
};

struct Resolved {
  ModelSpec model;
  ClusterSpec cluster;
  Workload workload;
  std::vector<int> gpus;
  SpaceOptions options;
  Constraints constraints;
};

std::vector<std::optional<double>> parse_capacity_factors(const std::string& list) {
  std::vector<std::optional<double>> out;
  if (list.empty()) return out;
  size_t pos = 0;
  while (pos <= list.size()) {
    const size_t end = std::min(list.find(',', pos), list.size());
    const std::string item = list.substr(pos, end - pos);
    if (item == "none" || item == "dropless") {
      out.push_back(std::nullopt);
    } else {
      try {
        size_t used = 0;
        const double v = std::stod(item, &used);
        if (used != item.size() || !(v > 0) || v > 64) throw std::invalid_argument(item);
        out.push_back(v);
      } catch (const std::exception&) {
        throw ConfigError("--capacity-factors",
                          "\"" + item + "\" is neither \"none\" nor a number in (0, 64]");
      }
    }
    pos = end + 1;
  }
  return out;
}

Resolved resolve(const Common& common, const TuneRequest& req) {
  const ConfigRegistry reg = common.registry();
  Resolved r;
  std::vector<ConfigIssue> issues;
  auto collect = [&issues](auto&& load) {
    try {
      load();
    } catch (const ConfigError& e) {
      issues.insert(issues.end(), e.issues().begin(), e.issues().end());
    }
  };
  collect([&] { r.model = reg.load_model(req.model); });
  collect([&] { r.cluster = reg.load_cluster(req.cluster); });
  if (!issues.empty()) throw ConfigError(std::move(issues));
  if (req.nodes > 0 && req.gpus > 0)
    throw ConfigError("--gpus", "give --nodes or --gpus, not both");
  const int gpn = r.cluster.gpus_per_node;
  if (req.gpus > 0) {
    r.gpus = {req.gpus};
  } else if (req.nodes > 0) {
    r.gpus = {req.nodes * gpn};
  } else if (req.objective == "cost") {
    // Cost per token can favour fewer GPUs: search whole-node counts up to the cluster's.
    for (int n = 1; n < r.cluster.num_nodes; n *= 2) r.gpus.push_back(n * gpn);
    r.gpus.push_back(r.cluster.num_nodes * gpn);
  } else {
    r.gpus = {r.cluster.total_gpus()};
  }
  for (int g : r.gpus) (void)with_gpus(r.cluster, g, req.gpus > 0 ? "--gpus" : "--nodes");

  if (!req.workload.empty()) {
    r.workload = reg.load_workload(req.workload);
  } else {
    const std::string fallback = r.model.name + "-pretrain";
    const auto bundled = reg.list(ConfigKind::kWorkload);
    if (std::find(bundled.begin(), bundled.end(), fallback) == bundled.end())
      throw ConfigError("--workload", "required: no bundled workload \"" + fallback +
                                          "\" for model \"" + r.model.name +
                                          "\" (a tuned plan depends on the global batch)");
    r.workload = reg.load_workload(fallback);
  }
  r.options.gpus = r.gpus;
  r.options.capacity_factors = parse_capacity_factors(req.capacity_factors);
  r.options.offload = req.offload;
  r.constraints.objective = *enum_from_name<Objective>(req.objective);
  if (req.max_mem_gib < 0)
    throw ConfigError("--max-mem-gib", "must be > 0, got " + fmt("%g", req.max_mem_gib));
  if (req.max_mem_gib > 0) r.constraints.max_gpu_bytes = req.max_mem_gib * double(1ull << 30);
  return r;
}

// "candidates done / total, rate, best so far, time left" on one terminal line.
class Progress {
 public:
  Progress(bool enabled, int64_t total) : enabled_(enabled), total_(total), start_(Clock::now()) {}
  void update(int64_t done, double best_tokens_per_s, bool force = false) {
    if (!enabled_) return;
    const double t = seconds_since(start_);
    if (!force && t - last_ < 0.2) return;
    last_ = t;
    const double rate = t > 0 ? static_cast<double>(done - first_) / t : 0;
    if (rate <= 0 && !force) return;  // nothing to extrapolate from yet
    const double left = rate > 0 ? static_cast<double>(total_ - done) / rate : 0;
    std::fprintf(stderr,
                 "\r  %lld / %lld candidates (%.1f%%), %.0f/s, best %.0f tokens/s, %.0f s left   ",
                 static_cast<long long>(done), static_cast<long long>(total_),
                 total_ > 0 ? 100.0 * static_cast<double>(done) / static_cast<double>(total_) : 0,
                 rate, best_tokens_per_s, left);
    std::fflush(stderr);
  }
  void set_first(int64_t done) { first_ = done; }
  void message(const std::string& text) {
    if (!enabled_) return;
    std::fprintf(stderr, "\r%-100s", ("  " + text).c_str());
    std::fflush(stderr);
  }
  void end() {
    if (enabled_) std::fprintf(stderr, "\r%100s\r", "");
  }

 private:
  bool enabled_;
  int64_t total_;
  int64_t first_ = 0;
  Clock::time_point start_;
  double last_ = -1;
};

std::string gib_plain(double bytes) { return fmt("%.1f", bytes / double(1ull << 30)); }

std::string cf_name(const Plan& p) {
  return p.capacity_factor ? fmt("%g", *p.capacity_factor) : std::string("dropless");
}

std::string replicas_name(const Plan& p) {
  if (p.expert_replicas.kind == ExpertReplicas::Kind::kNone) return "-";
  return std::to_string(p.expert_replicas.hot_experts) + "x" +
         std::to_string(p.expert_replicas.replicas);
}

// Leaves of a JSON object as "a.b" paths.
void flatten(const Json& j, const std::string& prefix, std::map<std::string, Json>& out) {
  if (j.is_object() && !j.empty()) {
    for (const auto& [k, v] : j.items()) flatten(v, prefix.empty() ? k : prefix + "." + k, out);
  } else {
    out[prefix] = j;
  }
}

std::vector<std::string> plan_differences(const Json& a, const Json& b) {
  std::map<std::string, Json> fa, fb;
  flatten(a, "", fa);
  flatten(b, "", fb);
  std::set<std::string> keys;
  for (const auto& [k, v] : fa) keys.insert(k);
  for (const auto& [k, v] : fb) keys.insert(k);
  std::vector<std::string> out;
  for (const auto& k : keys) {
    const Json va = fa.count(k) ? fa[k] : Json(), vb = fb.count(k) ? fb[k] : Json();
    if (va != vb) out.push_back(k + ": " + va.dump() + " -> " + vb.dump());
  }
  return out;
}

// The predicted consequences of two plans, part by part.
void print_comparison(const PredictionSummary& a, const PredictionSummary& b, const char* label_a,
                      const char* label_b) {
  std::printf("    %-18s %12s %12s %10s\n", "", label_a, label_b, "change");
  auto row = [](const char* name, double va, double vb, const char* unit, double scale) {
    if (va == 0 && vb == 0) return;
    std::printf("    %-18s %10.3f %s %10.3f %s %+9.3f %s\n", name, va * scale, unit, vb * scale,
                unit, (vb - va) * scale, unit);
  };
  row("step time", a.step_time_s, b.step_time_s, "s", 1);
  row("  compute", a.time.compute_s, b.time.compute_s, "s", 1);
  row("  exposed TP comm", a.time.tp_comm_s, b.time.tp_comm_s, "s", 1);
  row("  exposed CP comm", a.time.cp_comm_s, b.time.cp_comm_s, "s", 1);
  row("  exposed EP comm", a.time.ep_comm_s, b.time.ep_comm_s, "s", 1);
  row("  exposed DP comm", a.time.dp_comm_s, b.time.dp_comm_s, "s", 1);
  row("  pipeline p2p", a.time.pp_comm_s, b.time.pp_comm_s, "s", 1);
  row("  pipeline bubble", a.time.bubble_s, b.time.bubble_s, "s", 1);
  row("  optimizer", a.time.optimizer_s, b.time.optimizer_s, "s", 1);
  row("  stalls", a.time.stall_s, b.time.stall_s, "s", 1);
  row("tokens/s (k)", a.tokens_per_s, b.tokens_per_s, " ", 1e-3);
  row("GPU memory", a.peak.gpu, b.peak.gpu, "G", 1.0 / double(1ull << 30));
  row("CPU memory", a.peak.cpu, b.peak.cpu, "G", 1.0 / double(1ull << 30));
  row("SSD", a.peak.ssd, b.peak.ssd, "G", 1.0 / double(1ull << 30));
}

std::optional<int> kill_after_units() {
  // Test hook: SIGKILL this process once that many units are committed (resume tests).
  const char* v = std::getenv("SWITCHYARD_TEST_KILL_AFTER_UNITS");
  if (!v || !*v) return std::nullopt;
  return std::atoi(v);
}

struct TuneFlags {
  TuneRequest req;
  std::string db = "switchyard.db";
  bool resume = false;
  bool search_flags = false;  // flags that describe a search besides --model were given
  bool quiet = false;
  bool json = false;
  int threads = 0;
  int rerank = 0;  // 0 = max(2 * top, 10)
};

int cmd_tune(const Common& common, TuneFlags f) {
  const auto t0 = Clock::now();
  const std::unique_ptr<MpiTune> mpi = MpiTune::start_if_launched(nullptr, nullptr);
  const bool worker = mpi && mpi->rank() > 0;
  if (mpi && f.threads == 0) f.threads = mpi->default_threads();

  // Rank 0 (or the only process) owns the store; `--resume` alone takes its arguments from it.
  std::unique_ptr<Store> store;
  std::optional<SearchRecord> resumed;
  const bool named = !f.req.model.empty();
  std::exception_ptr failure;
  if (!worker) {
    try {
      if (f.resume && !named && f.search_flags)
        throw ConfigError("--resume",
                          "alone resumes the newest interrupted search with its own "
                          "arguments; to pick one, give --model and --cluster too");
      store = Store::open(f.db);
      if (f.resume && !named) {
        resumed = store->find_interrupted(Json());
        if (!resumed) throw ConfigError("--resume", "no interrupted search in \"" + f.db + "\"");
        const int top = f.req.top;
        f.req = TuneRequest::from_json(resumed->args);
        f.req.top = top;
      }
      if (f.req.model.empty()) throw ConfigError("--model", "required (or --resume alone)");
      if (f.req.cluster.empty()) throw ConfigError("--cluster", "required (or --resume alone)");
    } catch (...) {
      failure = std::current_exception();
    }
  }
  if (mpi) {
    const std::string shared = mpi->share(failure ? std::string() : f.req.to_json().dump());
    if (shared.empty()) return report_on_rank0(failure, !worker, [&] { mpi->barrier(); });
    if (worker) f.req = TuneRequest::from_json(Json::parse(shared));
  } else if (failure) {
    std::rethrow_exception(failure);
  }

  // Every rank: the same inputs and the same space.
  std::optional<Resolved> r;
  std::optional<SearchSpace> space;
  try {
    r = resolve(common, f.req);
    space = SearchSpace::build(r->model, r->cluster, r->workload, r->options);
  } catch (...) {
    failure = std::current_exception();
  }
  if (mpi && !mpi->all_ok(!failure))
    return report_on_rank0(
        failure
            ? failure
            : std::make_exception_ptr(std::runtime_error("another rank could not load the inputs")),
        !worker, [&] { mpi->barrier(); });
  if (failure) std::rethrow_exception(failure);
  if (worker) return mpi->work(*space, f.threads) ? 0 : kExitBadInput;

  if (f.req.workload.empty()) f.req.workload = r->workload.name;
  int64_t search_id = 0;
  try {
    if (f.resume && named) {
      resumed = store->find_interrupted(f.req.identity());
      if (!resumed)
        throw ConfigError("--resume",
                          "no interrupted search in \"" + f.db + "\" was asked these arguments");
    }
    if (resumed && resumed->space_key != space->key())
      throw ConfigError("--resume", "search " + std::to_string(resumed->id) +
                                        " was made with other configs or cost models than the "
                                        "ones found now; start a new search");
    search_id = resumed ? resumed->id
                        : store->begin_search(f.req.identity(), space->key(), space->units(),
                                              space->candidates());
  } catch (...) {
    if (mpi) mpi->cancel();
    throw;
  }

  const bool show = !f.quiet && !f.json && isatty(STDERR_FILENO);
  Progress progress(show, space->candidates());
  SearchHooks hooks;
  bool first = true;
  hooks.progress = [&](int64_t done, int64_t, double best) {
    if (first) progress.set_first(done), first = false;
    progress.update(done, best);
  };
  hooks.reranking = [&](size_t n) {
    progress.message("re-ranking the best " + std::to_string(n) + " with simulate...");
  };
  if (const auto kill_after = kill_after_units())
    hooks.committed = [n = *kill_after](int64_t committed) {
      if (committed >= n) std::raise(SIGKILL);
    };
  if (mpi) hooks.sweep = mpi->coordinator_sweep(*space, f.threads);
  SearchSettings settings;
  settings.constraints = r->constraints;
  settings.top = f.req.top;
  settings.rerank = f.rerank;
  settings.threads = f.threads;
  SearchOutcome o;
  try {
    o = run_search(*space, *store, search_id, settings, hooks);
  } catch (const NoFeasiblePlan& e) {
    progress.end();
    // The sweep is complete (every rank has finished): an ordinary bad-input exit.
    throw ConfigError(f.req.max_mem_gib > 0 ? "--max-mem-gib" : "tune", e.issues().front().message);
  } catch (const std::exception& e) {
    progress.end();
    if (mpi) {
      // Workers may be blocked sending to rank 0: end the whole job.
      std::cerr << "error (rank 0): " << e.what() << "\n";
      mpi->abort(dynamic_cast<const ConfigError*>(&e) ? kExitBadInput : 1);
    }
    throw;
  }
  progress.end();
  const double total_s = seconds_since(t0);
  const std::vector<Finalist>& finalists = o.top;
  const std::vector<Scored>& front = o.pareto;
  Json summary = {{"candidates", space->candidates()},
                  {"units", space->units()},
                  {"evaluated", o.evaluated},
                  {"pruned", o.pruned},
                  {"reused_units", o.reused_units},
                  {"sweep_s", o.sweep_s},
                  {"rerank_s", o.rerank_s},
                  {"total_s", total_s},
                  {"candidates_per_s", o.candidates_per_s}};

  if (f.json) {
    Json out = summary;
    out["search_id"] = search_id;
    out["db"] = f.db;
    out["model"] = r->model.name;
    out["cluster"] = r->cluster.name;
    out["gpus"] = r->gpus;
    out["workload"] = r->workload.name;
    out["objective"] = f.req.objective;
    out["max_gpu_bytes"] = o.max_gpu_bytes;
    out["fresh_evaluated"] = o.fresh_evaluated;
    Json top = Json::array();
    for (size_t i = 0; i < finalists.size(); ++i) {
      const Finalist& fin = finalists[i];
      top.push_back({{"rank", i + 1},
                     {"plan_hash", o.ranking[i].plan_hash},
                     {"gpus", fin.gpus},
                     {"plan", semantic_json(fin.plan)},
                     {"storage", fin.storage},
                     {"estimate", to_json(fin.estimate)},
                     {"simulate", to_json(fin.simulated)},
                     {"simulate_cached", fin.cached}});
    }
    out["top"] = top;
    Json pf = Json::array();
    for (const Scored& s : front)
      pf.push_back({{"tokens_per_s", s.record.tokens_per_s},
                    {"peak_gpu_bytes", s.record.peak_gpu_bytes},
                    {"gpus", s.gpus},
                    {"plan", semantic_json(space->plan(s.unit, s.record.index))}});
    out["pareto"] = pf;
    std::cout << out.dump(2) << "\n";
    return 0;
  }

  std::cout << "tune " << r->model.name << " on ";
  for (size_t i = 0; i < r->gpus.size(); ++i) std::cout << (i ? "/" : "") << r->gpus[i];
  std::cout << "x " << r->cluster.gpu.name << " (" << r->cluster.name << "), workload "
            << r->workload.name << ", objective " << f.req.objective
            << ", GPU memory <= " << gib(o.max_gpu_bytes) << "\n";
  std::cout << "  space      " << space->candidates() << " candidates in " << space->units()
            << " units of " << space->unit_size() << "; " << o.evaluated
            << " fit the hardware and were timed with estimate";
  if (o.reused_units > 0)
    std::cout << " (" << o.reused_units << " of " << space->units() << " units from the store)";
  std::cout << "\n  pruned    ";
  std::vector<std::pair<int64_t, std::string>> by_count;
  for (const auto& [rule, n] : o.pruned) by_count.push_back({n, rule});
  std::sort(by_count.rbegin(), by_count.rend());
  for (size_t i = 0; i < by_count.size(); ++i)
    std::cout << (i ? "\n             " : " ") << by_count[i].first << "  " << by_count[i].second;
  std::cout << "\n  time       " << fmt("%.2f s", total_s) << " (sweep "
            << fmt("%.2f s", o.sweep_s);
  if (o.candidates_per_s > 0) std::cout << ", " << fmt("%.0f candidates/s", o.candidates_per_s);
  std::cout << "; " << o.reranked << " best re-ranked with simulate in "
            << fmt("%.2f s", o.rerank_s) << ")\n\n";

  std::printf("  %-3s %-5s %-58s %-26s %-9s %-8s %11s %6s %7s %7s %7s  %s\n", "#", "gpus", "plan",
              "storage", "recompute", "capacity", "tokens/s", "MFU", "GPU GiB", "CPU GiB",
              "SSD GiB", "bottleneck");
  for (size_t i = 0; i < finalists.size(); ++i) {
    const Finalist& fin = finalists[i];
    std::string storage = fin.storage;
    if (fin.plan.expert_replicas.kind != ExpertReplicas::Kind::kNone)
      storage += " rep" + replicas_name(fin.plan);
    if (fin.plan.grad_bucket_bytes != kDefaultGradBucketBytes)
      storage += fmt(" bucket%gM", static_cast<double>(fin.plan.grad_bucket_bytes) / 1e6);
    std::printf("  %-3zu %-5d %-58s %-26s %-9s %-8s %11.0f %5.1f%% %7s %7s %7s  %s\n", i + 1,
                fin.gpus, plan_summary(fin.plan).c_str(), storage.c_str(),
                std::string(enum_name(fin.plan.recompute)).c_str(), cf_name(fin.plan).c_str(),
                fin.simulated.tokens_per_s, 100 * fin.simulated.mfu,
                gib_plain(fin.simulated.peak.gpu).c_str(),
                gib_plain(fin.simulated.peak.cpu).c_str(),
                gib_plain(fin.simulated.peak.ssd).c_str(), fin.simulated.bottleneck.c_str());
  }
  std::cout << "  (tokens/s, MFU and memory by simulate; estimate's tokens/s for #1: "
            << fmt("%.0f", finalists.front().estimate.tokens_per_s) << ")\n";

  std::cout << "\n  Pareto front, tokens/s against peak GPU memory (estimate), " << front.size()
            << " plans:\n";
  const size_t shown = std::min<size_t>(front.size(), 12);
  for (size_t i = 0; i < shown; ++i) {
    // Spread the shown points over the whole front.
    const size_t k = shown == front.size() ? i : i * (front.size() - 1) / (shown - 1);
    const Scored& s = front[k];
    std::printf("    %7s GiB %11.0f tokens/s  %s%s\n", gib_plain(s.record.peak_gpu_bytes).c_str(),
                static_cast<double>(s.record.tokens_per_s),
                plan_summary(space->plan(s.unit, s.record.index)).c_str(),
                (" " + space->storage_name(s.record.index)).c_str());
  }
  if (finalists.size() >= 2) {
    std::cout << "\n  Why #1 wins over #2:\n";
    print_comparison(finalists[1].simulated, finalists[0].simulated, "#2", "#1");
    std::cout << "    plan #2 -> #1: ";
    const auto diffs =
        plan_differences(semantic_json(finalists[1].plan), semantic_json(finalists[0].plan));
    for (size_t i = 0; i < diffs.size(); ++i) std::cout << (i ? "; " : "") << diffs[i];
    std::cout << "\n";
  }
  std::cout << "\n  search " << search_id << " stored in " << f.db << "; export the winner with: "
            << "switchyard plans export " << search_id << ":1 --out plan.json\n";
  return 0;
}

// ----- plans -----

struct PlanRef {
  StoredPlan plan;
  std::optional<SearchRecord> search;  // the search that ranked it, when known
  int rank = 0;
  std::optional<RankedPlan> ranked;
};

PlanRef resolve_ref(Store& store, const std::string& ref) {
  PlanRef out;
  auto from_search = [&](const SearchRecord& s, int rank) {
    const auto ranking = store.ranking(s.id);
    if (rank < 1 || rank > static_cast<int>(ranking.size()))
      throw ConfigError("plan", "search " + std::to_string(s.id) + " ranked " +
                                    std::to_string(ranking.size()) + " plans; no rank " +
                                    std::to_string(rank));
    const RankedPlan& rp = ranking[static_cast<size_t>(rank - 1)];
    out.plan = *store.find_plan(rp.plan_hash);
    out.search = s;
    out.rank = rank;
    out.ranked = rp;
  };
  const auto searches = store.list_searches();
  if (ref == "best") {
    for (auto it = searches.rbegin(); it != searches.rend(); ++it)
      if (it->status == "done" && !store.ranking(it->id).empty()) {
        from_search(*it, 1);
        return out;
      }
    throw ConfigError("plan", "no finished search in \"" + store.path().string() + "\"");
  }
  if (const size_t colon = ref.find(':'); colon != std::string::npos) {
    int64_t id = 0;
    int rank = 0;
    const auto whole = [](std::string_view text, auto& value) {
      const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
      return ec == std::errc() && end == text.data() + text.size();
    };
    if (!whole(std::string_view(ref).substr(0, colon), id) ||
        !whole(std::string_view(ref).substr(colon + 1), rank))
      throw ConfigError("plan", "\"" + ref + "\" is not SEARCH:RANK (e.g. 3:1)");
    const auto s = store.find_search(id);
    if (!s) throw ConfigError("plan", "no search " + std::to_string(id));
    from_search(*s, rank);
    return out;
  }
  if (ref.size() < 6 || ref.find_first_not_of("0123456789abcdef") != std::string::npos)
    throw ConfigError("plan", "\"" + ref +
                                  "\" is neither SEARCH:RANK, best, nor a plan hash prefix (at "
                                  "least 6 hex digits)");
  const auto p = store.find_plan(ref);
  if (!p)
    throw ConfigError("plan", "\"" + ref +
                                  "\" matches no single stored plan (give SEARCH:RANK, best, or "
                                  "a longer hash prefix)");
  out.plan = *p;
  for (auto it = searches.rbegin(); it != searches.rend() && !out.search; ++it)
    for (const auto& rp : store.ranking(it->id))
      if (rp.plan_hash == p->hash) {
        out.search = *it;
        out.rank = rp.rank;
        out.ranked = rp;
        break;
      }
  return out;
}

// A stored plan (semantic JSON: no file metadata) as a Plan.
Plan stored_plan(const PlanRef& r) {
  Json j = r.plan.plan;
  j["schema_version"] = 1;
  j["name"] = "stored-" + r.plan.hash.substr(0, 12);
  return parse_plan(j);
}

std::string ref_name(const PlanRef& r) {
  return r.search ? std::to_string(r.search->id) + ":" + std::to_string(r.rank)
                  : r.plan.hash.substr(0, 12);
}

int cmd_plans_list(Store& store) {
  const auto searches = store.list_searches();
  std::printf("%-4s %-8s %-22s %-14s %-7s %-10s %11s %13s %12s  %s\n", "id", "status", "model",
              "cluster", "gpus", "objective", "candidates", "units", "best tok/s", "started");
  for (const auto& s : searches) {
    const TuneRequest r = TuneRequest::from_json(s.args);
    const std::string gpus = r.gpus > 0    ? std::to_string(r.gpus)
                             : r.nodes > 0 ? std::to_string(r.nodes) + "n"
                                           : "all";
    const std::string units = std::to_string(s.units_done) + "/" + std::to_string(s.units_total);
    const double best = s.result.is_object() && s.result.contains("best_tokens_per_s")
                            ? s.result["best_tokens_per_s"].get<double>()
                            : 0;
    std::printf("%-4lld %-8s %-22s %-14s %-7s %-10s %11lld %13s %12.0f  %s\n",
                static_cast<long long>(s.id), s.status.c_str(), r.model.c_str(), r.cluster.c_str(),
                gpus.c_str(), r.objective.c_str(), static_cast<long long>(s.candidates_total),
                units.c_str(), best, s.started_at.c_str());
  }
  std::cout << searches.size() << " searches; " << store.count_rows("plans") << " plans, "
            << store.count_rows("predictions") << " predictions, "
            << store.count_rows("measurements") << " measurements, "
            << store.count_rows("calibrations") << " calibrations in " << store.path().string()
            << "\n";
  return 0;
}

void print_ref(const PlanRef& r, bool json) {
  if (json) {
    Json out = {{"ref", ref_name(r)}, {"plan_hash", r.plan.hash}, {"plan", r.plan.plan}};
    if (r.ranked) out["prediction"] = to_json(r.ranked->prediction);
    if (r.search) out["search"] = r.search->args;
    std::cout << out.dump(2) << "\n";
    return;
  }
  const Plan p = stored_plan(r);
  std::cout << "plan " << r.plan.hash << "\n  " << plan_summary(p) << ", recompute "
            << enum_name(p.recompute) << ", capacity " << cf_name(p) << ", replicas "
            << replicas_name(p) << "\n";
  if (r.search) {
    const TuneRequest req = TuneRequest::from_json(r.search->args);
    std::cout << "  rank " << r.rank << " of search " << r.search->id << " (" << req.model << " on "
              << req.cluster << ", objective " << req.objective << ")\n";
  }
  if (r.ranked) {
    const PredictionSummary& s = r.ranked->prediction;
    std::cout << "  predicted (" << s.fidelity << "): step " << fmt("%.3f s", s.step_time_s) << ", "
              << fmt("%.0f tokens/s", s.tokens_per_s) << ", MFU " << pct(s.mfu) << ", GPU "
              << gib(s.peak.gpu) << ", CPU " << gib(s.peak.cpu) << ", SSD " << gib(s.peak.ssd)
              << ", bottleneck " << s.bottleneck << "\n";
  }
  std::cout << r.plan.plan.dump(2) << "\n";
}

int cmd_plans_diff(Store& store, const std::string& a, const std::string& b) {
  const PlanRef ra = resolve_ref(store, a), rb = resolve_ref(store, b);
  std::cout << "plan " << ref_name(ra) << " -> " << ref_name(rb) << "\n";
  const auto diffs = plan_differences(ra.plan.plan, rb.plan.plan);
  if (diffs.empty()) std::cout << "  identical plans\n";
  for (const auto& d : diffs) std::cout << "  " << d << "\n";
  if (ra.ranked && rb.ranked) {
    std::cout << "predicted consequences:\n";
    const std::string la = ref_name(ra), lb = ref_name(rb);
    print_comparison(ra.ranked->prediction, rb.ranked->prediction, la.c_str(), lb.c_str());
  } else {
    std::cout << "(no stored prediction for " << (ra.ranked ? ref_name(rb) : ref_name(ra))
              << ": simulate it to compare)\n";
  }
  return 0;
}

int cmd_plans_export(const Common& common, Store& store, const std::string& ref,
                     const std::string& out_path) {
  const PlanRef r = resolve_ref(store, ref);
  Plan p = stored_plan(r);
  p.name = "tuned-" + r.plan.hash.substr(0, 12);
  p.description = "Plan found by switchyard tune";
  p.source = "switchyard plan store " + store.path().string() + ", plan " + r.plan.hash;
  if (r.search) {
    const TuneRequest req = TuneRequest::from_json(r.search->args);
    p.description += " (search " + std::to_string(r.search->id) + ", rank " +
                     std::to_string(r.rank) + ", objective " + req.objective + ")";
    PlanTarget t;
    t.model = req.model;
    t.cluster = req.cluster;
    t.workload = req.workload;
    // The node count it was ranked on (a cost search spans several).
    const ClusterSpec c = common.registry().load_cluster(req.cluster);
    const int total = p.world_size();
    if (total % c.gpus_per_node == 0)
      t.nodes = total / c.gpus_per_node;
    else
      std::cerr << "note: the plan uses " << total << " of a node's " << c.gpus_per_node
                << " GPUs; a plan file cannot name part of a node\n";
    p.target = t;
  }
  const std::string text = to_json(p).dump(2) + "\n";
  if (out_path.empty() || out_path == "-") {
    std::cout << text;
    return 0;
  }
  std::ofstream out(out_path);
  out << text;
  out.close();
  if (!out) throw std::runtime_error("cannot write " + out_path);
  std::cerr << "wrote " << out_path << " (" << plan_summary(p) << ")\n";
  return 0;
}

// One stored run op by op: its op classes and its step-program ops, predicted beside measured.
int compare_one_run(const Store::Comparison& c) {
  std::cout << "run " << c.measurement_id << ": " << c.model << " on " << c.cluster << ", plan "
            << c.plan_hash.substr(0, 12) << " (" << c.backend << ", " << c.steps << " steps)\n";
  const auto secs = [](const Json& v) {
    return v.is_number() ? fmt("%10.4f s", v.get<double>()) : std::string("         - ");
  };
  const auto error = [](const Json& p, const Json& m) {
    return p.is_number() && m.is_number() && m.get<double>() > 0
               ? fmt("%+7.0f%%", 100 * (p.get<double>() / m.get<double>() - 1))
               : std::string("       ");
  };
  std::printf("  %-34s %12s %12s %8s\n", "step", "predicted", "measured", "error");
  std::printf("  %-34s %s %s %s\n", "", secs(Json(c.predicted_step_s)).c_str(),
              secs(Json(c.measured_step_s)).c_str(),
              error(Json(c.predicted_step_s), Json(c.measured_step_s)).c_str());
  if (c.details.contains("op_classes")) {
    std::printf("  %-34s\n", "per op class (slowest rank)");
    for (const auto& [name, v] : c.details["op_classes"].items())
      std::printf("    %-32s %s %s %s\n", name.c_str(), secs(v["predicted_s"]).c_str(),
                  secs(v["measured_s"]).c_str(), error(v["predicted_s"], v["measured_s"]).c_str());
  }
  // Inference runs: per pass; both: the copies between tiers and the stalls they caused.
  for (const char* key : {"prefill_s", "decode_step_s"})
    if (c.details.contains(key)) {
      const Json& v = c.details[key];
      std::printf("  %-34s %s %s %s\n", key == std::string("prefill_s") ? "prefill" : "decode step",
                  secs(v["predicted"]).c_str(), secs(v["measured"]).c_str(),
                  error(v["predicted"], v["measured"]).c_str());
    }
  const Json* tiers = c.details.contains("tiers") ? &c.details["tiers"] : &c.details;
  const char* copy_key = c.details.contains("tiers") ? "copy_s" : "weight_copy_s";
  if (tiers->contains(copy_key) && tiers->contains("stall_s") &&
      tiers->contains("copy_hidden_fraction")) {
    std::printf("  %-34s\n", "copies between tiers (per step or batch)");
    for (const auto& [label, key] :
         {std::pair{"copies", copy_key}, std::pair{"stalls", "stall_s"}}) {
      const Json& v = (*tiers)[key];
      std::printf("    %-32s %s %s %s\n", label, secs(v["predicted"]).c_str(),
                  secs(v["measured"]).c_str(), error(v["predicted"], v["measured"]).c_str());
    }
    const Json& h = (*tiers)["copy_hidden_fraction"];
    const auto pct_of = [](const Json& x) {
      return x.is_number() ? fmt("%11.1f%%", 100 * x.get<double>()) : std::string("           -");
    };
    std::printf("    %-32s %s %s\n", "copy time hidden", pct_of(h["predicted"]).c_str(),
                pct_of(h["measured"]).c_str());
  }
  if (c.details.contains("program_ops")) {
    std::printf("  %-34s\n", "per step-program op (per step, slowest stage / rank)");
    for (const auto& o : c.details["program_ops"])
      std::printf(
          "    %-32s %s %s %s\n",
          (o.value("phase", o.value("pass", std::string())) + " " + o["op"].get<std::string>())
              .c_str(),
          secs(o["predicted_s"]).c_str(), secs(o["measured_s"]).c_str(),
          error(o["predicted_s"], o["measured_s"]).c_str());
  }
  return 0;
}

int cmd_compare(Store& store, bool json, int64_t run) {
  auto rows = store.comparisons();
  if (run > 0) {
    std::erase_if(rows, [run](const Store::Comparison& c) { return c.measurement_id != run; });
    if (rows.empty())
      throw ConfigError("--run", "no stored run " + std::to_string(run) + " (compare lists them)");
    if (!json) return compare_one_run(rows.front());
  }
  if (json) {
    Json out = Json::array();
    for (const auto& c : rows)
      out.push_back({{"measurement_id", c.measurement_id},
                     {"model", c.model},
                     {"cluster", c.cluster},
                     {"plan_hash", c.plan_hash},
                     {"backend", c.backend},
                     {"steps", c.steps},
                     {"measured_step_s", c.measured_step_s},
                     {"predicted_step_s", c.predicted_step_s},
                     {"profile_hash", c.profile_hash},
                     {"step_time_error",
                      c.predicted_step_s > 0 ? c.predicted_step_s / c.measured_step_s - 1 : 0.0},
                     {"measured_peak_gpu_bytes", c.measured_peak_gpu_bytes},
                     {"predicted_peak_gpu_bytes", c.predicted_peak_gpu_bytes},
                     {"op_classes",
                      c.details.contains("op_classes") ? c.details["op_classes"] : Json(nullptr)},
                     {"program_ops",
                      c.details.contains("program_ops") ? c.details["program_ops"] : Json(nullptr)},
                     {"details", c.details}});
    std::cout << out.dump(2) << "\n";
    return 0;
  }
  std::printf("%-5s %-14s %-12s %-12s %-8s %12s %12s %8s %10s %10s  %s\n", "run", "model",
              "cluster", "plan", "backend", "measured s", "predicted s", "error", "meas GiB",
              "pred GiB", "profile");
  std::vector<double> errors;
  for (const auto& c : rows) {
    const bool predicted = c.predicted_step_s > 0;
    const double err = predicted ? c.predicted_step_s / c.measured_step_s - 1 : 0;
    if (predicted) errors.push_back(std::abs(err));
    std::printf(
        "%-5lld %-14s %-12s %-12s %-8s %12.4f %12s %8s %10.3f %10s  %s\n",
        static_cast<long long>(c.measurement_id), c.model.c_str(), c.cluster.c_str(),
        c.plan_hash.substr(0, 12).c_str(), c.backend.c_str(), c.measured_step_s,
        predicted ? fmt("%.4f", c.predicted_step_s).c_str() : "-",
        predicted ? fmt("%+.1f%%", 100 * err).c_str() : "-",
        c.measured_peak_gpu_bytes / double(1ull << 30),
        predicted ? fmt("%.3f", c.predicted_peak_gpu_bytes / double(1ull << 30)).c_str() : "-",
        c.profile_hash.substr(0, 12).c_str());
  }
  if (!errors.empty()) {
    std::sort(errors.begin(), errors.end());
    std::cout << rows.size() << " comparisons; median |step-time error| "
              << fmt("%.1f%%", 100 * errors[errors.size() / 2]) << "\n";
  } else {
    std::cout << "no measurements with a prediction yet (switchyard run stores both)\n";
  }
  return 0;
}

}  // namespace

std::function<int()> add_tune_commands(CLI::App& app, const Common& common) {
  auto flags = std::make_shared<TuneFlags>();
  auto* tune = app.add_subcommand(
      "tune", "Search the plan space for the best plans; results go to the SQLite plan store");
  TuneRequest& req = flags->req;
  tune->add_option("--model", req.model, "Model: bundled name or path");
  tune->add_option("--cluster", req.cluster, "Cluster: bundled name or path");
  auto* nodes = tune->add_option("--nodes", req.nodes,
                                 "Nodes to plan for (default: the "
                                 "cluster file's; objective cost: 1, 2, 4... up to them)")
                    ->check(CLI::PositiveNumber);
  tune->add_option("--gpus", req.gpus, "GPUs to plan for: whole nodes or part of one node")
      ->check(CLI::PositiveNumber)
      ->excludes(nodes);
  tune->add_option("--workload", req.workload,
                   "Workload: bundled name or path (default: MODEL-pretrain when bundled)");
  tune->add_option("--objective", req.objective,
                   "throughput (tokens/s), memory (peak GPU memory) or cost (GPU-hours per "
                   "token)")
      ->check(CLI::IsMember({"throughput", "memory", "cost"}));
  tune->add_option("--max-mem-gib", req.max_mem_gib,
                   "Peak GPU memory limit per GPU (default: the GPU's HBM)")
      ->check(CLI::PositiveNumber);
  tune->add_option("--top", req.top, "Plans to show")->check(CLI::Range(1, 100));
  tune->add_option("--capacity-factors", req.capacity_factors,
                   "Capacity factors to try, e.g. none,1.0,1.25 (default: dropless only under "
                   "uniform routing, also 1.0 and 1.25 under skewed routing)");
  tune->add_flag("!--no-offload", req.offload,
                 "Only plans that keep every tensor class on the GPU");
  tune->add_option("--db", flags->db, "Plan store (SQLite; default ./switchyard.db)");
  tune->add_flag("--resume", flags->resume,
                 "Continue the newest interrupted search (with these arguments, when given)");
  tune->add_flag("--quiet", flags->quiet, "No progress line");
  tune->add_flag("--json", flags->json, "Print the result as JSON");
  tune->add_option("--threads", flags->threads, "Worker threads (default: every core)")
      ->check(CLI::NonNegativeNumber);
  tune->add_option("--rerank", flags->rerank,
                   "Candidates re-ranked with simulate (default: max(2 * top, 10))")
      ->check(CLI::PositiveNumber);

  auto* plans =
      app.add_subcommand("plans", "Browse the plan store: list, show, diff, export, best");
  plans->require_subcommand(1);
  auto db = std::make_shared<std::string>("switchyard.db");
  auto refs = std::make_shared<std::vector<std::string>>();
  auto out = std::make_shared<std::string>();
  auto plans_json = std::make_shared<bool>(false);
  auto* list = plans->add_subcommand("list", "Searches and what the store holds");
  auto* show = plans->add_subcommand("show", "A plan with its prediction");
  show->add_option("plan", *refs, "SEARCH:RANK, best, or a plan hash (prefix)")
      ->required()
      ->expected(1);
  show->add_flag("--json", *plans_json, "Print as JSON");
  auto* diff = plans->add_subcommand("diff", "Two plans field by field, with their predictions");
  diff->add_option("plans", *refs, "Two plans: SEARCH:RANK, best, or hash prefixes")
      ->required()
      ->expected(2);
  auto* exp = plans->add_subcommand("export", "A plan as a plan.json that simulate accepts");
  exp->add_option("plan", *refs, "SEARCH:RANK, best, or a plan hash (prefix)")
      ->required()
      ->expected(1);
  exp->add_option("--out", *out, "File to write (default: standard output)");
  auto* best = plans->add_subcommand("best", "The winner of the newest finished search");
  best->add_flag("--json", *plans_json, "Print as JSON");
  for (CLI::App* sub : {list, show, diff, exp, best})
    sub->add_option("--db", *db, "Plan store (default ./switchyard.db)");

  auto* compare = app.add_subcommand(
      "compare", "Predicted against measured step time (and peak memory) for the stored runs");
  auto compare_db = std::make_shared<std::string>("switchyard.db");
  auto compare_json = std::make_shared<bool>(false);
  auto compare_run = std::make_shared<int64_t>(0);
  compare->add_option("--db", *compare_db, "Plan store (default ./switchyard.db)");
  compare->add_flag("--json", *compare_json, "Print as JSON");
  compare
      ->add_option("--run", *compare_run,
                   "One stored run op by op: per op class and per step-program op")
      ->check(CLI::PositiveNumber);

  return [=, &common]() -> int {
    if (*compare) {
      if (!std::filesystem::exists(*compare_db))
        throw ConfigError("--db", "no plan store at \"" + *compare_db + "\"");
      auto store = Store::open(*compare_db);
      return cmd_compare(*store, *compare_json, *compare_run);
    }
    if (*tune) {
      for (const char* name : {"--cluster", "--nodes", "--gpus", "--workload", "--objective",
                               "--max-mem-gib", "--capacity-factors", "--no-offload"})
        flags->search_flags = flags->search_flags || tune->count(name) > 0;
      return cmd_tune(common, *flags);
    }
    if (*plans) {
      if (!std::filesystem::exists(*db))
        throw ConfigError("--db", "no plan store at \"" + *db + "\" (run switchyard tune first)");
      auto store = Store::open(*db);
      if (*list) return cmd_plans_list(*store);
      if (*show) {
        print_ref(resolve_ref(*store, refs->front()), *plans_json);
        return 0;
      }
      if (*best) {
        print_ref(resolve_ref(*store, "best"), *plans_json);
        return 0;
      }
      if (*diff) return cmd_plans_diff(*store, (*refs)[0], (*refs)[1]);
      if (*exp) return cmd_plans_export(common, *store, refs->front(), *out);
    }
    return -1;
  };
}

}  // namespace switchyard::cli
