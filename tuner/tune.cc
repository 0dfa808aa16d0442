#include "tuner/tune.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <set>

#include "core/error.h"

namespace switchyard {
namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

}  // namespace

namespace {

SearchOutcome search(const SearchSpace& space, Store& store, int64_t search_id,
                     const SearchSettings& settings, const SearchHooks& hooks) {
  SearchOutcome out;
  out.search_id = search_id;
  const std::string key = space.key();

  // Units still to evaluate: the space's, minus what the store has for this exact space.
  const std::vector<int64_t> done = store.done_units(key);
  const std::set<int64_t> done_set(done.begin(), done.end());
  std::vector<int64_t> missing;
  for (int64_t u = 0; u < space.units(); ++u)
    if (!done_set.count(u)) missing.push_back(u);
  out.reused_units = static_cast<int64_t>(done.size());

  int64_t candidates_done = out.reused_units * space.unit_size();
  int64_t committed = 0;
  double best_tps = 0;
  std::vector<UnitResult> pending;
  auto last_flush = Clock::now();
  auto flush = [&] {
    store.put_units(key, pending);
    committed += static_cast<int64_t>(pending.size());
    pending.clear();
    store.set_progress(search_id, out.reused_units + committed);
    last_flush = Clock::now();
    if (hooks.progress) hooks.progress(candidates_done, space.candidates(), best_tps);
    if (hooks.committed) hooks.committed(committed);
  };
  const std::function<void(UnitResult &&)> sink = [&](UnitResult&& u) {
    candidates_done += u.candidates;
    for (const auto& rec : u.records) best_tps = std::max<double>(best_tps, rec.tokens_per_s);
    pending.push_back(std::move(u));
    // Commit in batches: a transaction per unit would cost more than the unit.
    if (pending.size() >= 64 || seconds_since(last_flush) > 0.5) flush();
  };
  const auto sweep_start = Clock::now();
  if (hooks.sweep)
    hooks.sweep(missing, sink);
  else
    run_sweep(space, missing, settings.threads, sink);
  flush();
  out.sweep_s = seconds_since(sweep_start);
  if (!missing.empty() && out.sweep_s > 0)
    out.candidates_per_s =
        static_cast<double>(missing.size()) * static_cast<double>(space.unit_size()) / out.sweep_s;

  const std::vector<UnitResult> results = store.load_units(key);
  for (const auto& u : results) {
    out.evaluated += static_cast<int64_t>(u.records.size());
    if (!done_set.count(u.unit)) out.fresh_evaluated += static_cast<int64_t>(u.records.size());
    for (const auto& [rule, n] : u.pruned) out.pruned[rule] += n;
  }
  Constraints constraints = settings.constraints;
  if (!constraints.max_gpu_bytes)
    constraints.max_gpu_bytes = static_cast<double>(space.cluster(0).gpu.hbm_bytes);
  out.max_gpu_bytes = *constraints.max_gpu_bytes;
  const size_t rerank_n =
      static_cast<size_t>(settings.rerank > 0 ? settings.rerank : std::max(2 * settings.top, 10));
  const std::vector<Scored> best = rank(space, results, constraints, rerank_n);
  const auto no_plan = [&] {
    store.finish_search(search_id, "done", {{"evaluated", out.evaluated}, {"plans", 0}});
    std::string why = std::to_string(space.candidates()) + " candidates, " +
                      std::to_string(out.evaluated) + " fit the hardware";
    double least = -1;
    for (const auto& u : results)
      for (const auto& rec : u.records)
        if (least < 0 || rec.peak_gpu_bytes < least) least = rec.peak_gpu_bytes;
    if (least >= 0) {
      char gib[32];
      std::snprintf(gib, sizeof gib, "%.2f GiB", least / double(1ull << 30));
      why += std::string("; the least GPU memory any of them needs is ") + gib;
    }
    throw NoFeasiblePlan("max_gpu_bytes", "no plan meets the constraints (" + why + ")");
  };
  if (best.empty()) no_plan();
  out.reranked = best.size();
  if (hooks.reranking) hooks.reranking(best.size());
  StoreCache cache(store, space.model(), space.workload());
  const auto rerank_start = Clock::now();
  out.top = rerank(space, best, constraints, &cache, settings.threads);
  out.rerank_s = seconds_since(rerank_start);
  // simulate()'s peak can exceed estimate()'s and break the limit for every finalist.
  if (out.top.empty()) no_plan();
  if (out.top.size() > static_cast<size_t>(settings.top))
    out.top.resize(static_cast<size_t>(settings.top));
  out.pareto = pareto_front(space, results, constraints);

  // Keep the ranking with the search.
  const std::string model_hash = store.put_model(space.model());
  const std::string workload_hash = store.put_workload(space.workload());
  for (size_t i = 0; i < out.top.size(); ++i) {
    const Finalist& fin = out.top[i];
    const std::string cluster_hash = store.put_cluster(space.cluster(fin.unit));
    const std::string plan_hash = store.put_plan(fin.plan);
    const std::string prof_hash = profile_hash(space.profile(fin.unit));
    const auto pred = store.find_prediction(model_hash, cluster_hash, workload_hash, plan_hash,
                                            prof_hash, "simulate");
    const int64_t id = pred ? pred->first
                            : store.put_prediction(model_hash, cluster_hash, workload_hash,
                                                   plan_hash, prof_hash, fin.simulated);
    out.ranking.push_back({static_cast<int>(i + 1), plan_hash, id, cluster_hash, fin.simulated});
  }
  store.put_ranking(search_id, out.ranking);
  store.finish_search(search_id, "done",
                      {{"candidates", space.candidates()},
                       {"evaluated", out.evaluated},
                       {"pruned", out.pruned},
                       {"reused_units", out.reused_units},
                       {"sweep_s", out.sweep_s},
                       {"rerank_s", out.rerank_s},
                       {"candidates_per_s", out.candidates_per_s},
                       {"best_plan", out.ranking.front().plan_hash},
                       {"best_tokens_per_s", out.top.front().simulated.tokens_per_s}});
  return out;
}

}  // namespace

SearchOutcome run_search(const SearchSpace& space, Store& store, int64_t search_id,
                         const SearchSettings& settings, const SearchHooks& hooks) {
  try {
    return search(space, store, search_id, settings, hooks);
  } catch (const NoFeasiblePlan&) {
    throw;
  } catch (const std::exception& e) {
    try {
      store.finish_search(search_id, "failed", {{"error", e.what()}});
    } catch (const std::exception&) {
      // The store itself failed: the search stays "running" and --resume takes it up.
    }
    throw;
  }
}

}  // namespace switchyard
