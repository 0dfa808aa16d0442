// The tuner's search: every candidate is accounted for, pruning never drops a valid fitting
// plan, the search's best equals the brute-force best of simulate() over every valid plan, and
// ranking, memory limits and the Pareto front behave as their contracts say.
#include "tuner/search.h"

#include <gtest/gtest.h>

#include <set>

#include "core/validate.h"
#include "cost_models/memory.h"
#include "simulator/simulator.h"
#include "tests/core/test_util.h"
#include "tuner/space.h"

namespace switchyard {
namespace {

struct Inputs3 {
  ModelSpec model;
  ClusterSpec cluster;
  Workload workload;
};

Inputs3 load(const char* model, const char* cluster, const char* workload) {
  const ConfigRegistry reg = testing::bundled();
  return {reg.load_model(model), reg.load_cluster(cluster), reg.load_workload(workload)};
}

// tiny-moe on 8 H100s: small enough to simulate every valid plan.
SearchSpace tiny_space(SpaceOptions o = {}) {
  const Inputs3 in = load("tiny-moe", "dgx-h100", "tiny-train");
  if (o.gpus.empty()) o.gpus = {8};
  o.micro_batch_sizes = {1, 2};
  o.virtual_stages = {2};
  return SearchSpace::build(in.model, in.cluster, in.workload, o);
}

std::vector<UnitResult> sweep(const SearchSpace& s) {
  std::vector<int64_t> units;
  for (int64_t u = 0; u < s.units(); ++u) units.push_back(u);
  std::vector<UnitResult> out;
  run_sweep(s, units, 2, [&](UnitResult&& r) { out.push_back(std::move(r)); });
  return out;
}

TEST(SearchSpace, EveryCandidateIsTimedOrCountedByExactlyOneRule) {
  const SearchSpace s = tiny_space();
  const auto results = sweep(s);
  ASSERT_EQ(static_cast<int64_t>(results.size()), s.units());
  int64_t timed = 0, pruned = 0;
  for (const auto& u : results) {
    int64_t unit_pruned = 0;
    for (const auto& [rule, n] : u.pruned) unit_pruned += n;
    EXPECT_EQ(unit_pruned + static_cast<int64_t>(u.records.size()), u.candidates) << u.unit;
    timed += static_cast<int64_t>(u.records.size());
    pruned += unit_pruned;
  }
  EXPECT_EQ(timed + pruned, s.candidates());
  EXPECT_GT(timed, 100);
}

TEST(SearchSpace, TimedCandidatesAreValidAndFitAndPrunedOnesAreNot) {
  const SearchSpace s = tiny_space();
  const auto results = sweep(s);
  for (const auto& u : results) {
    std::set<uint32_t> timed;
    for (const auto& r : u.records) timed.insert(r.index);
    for (int64_t i = 0; i < s.unit_size(); ++i) {
      const Plan p = s.plan(u.unit, i);
      const bool valid = validate(p, s.model(), s.cluster(u.unit), s.workload()).empty();
      const bool fits =
          valid &&
          capacity_issues(s.model(), s.cluster(u.unit), p, s.workload(), s.profile(u.unit)).empty();
      if (timed.count(static_cast<uint32_t>(i))) {
        EXPECT_TRUE(valid && fits) << u.unit << ":" << i;
      } else if (valid && fits) {
        // Only a duplicate may be dropped while valid and fitting: another schedule with pp 1,
        // or a dispatch strategy that cannot differ from the flat all-to-all.
        const bool same_schedule = p.pp == 1 && p.schedule != Schedule::k1F1B;
        const bool same_dispatch =
            p.dispatch != Dispatch::kAllToAll &&
            (p.ep == 1 || (p.dispatch == Dispatch::kHierarchicalAllToAll &&
                           p.ep * p.expert_tp <= s.cluster(u.unit).gpus_per_node));
        EXPECT_TRUE(same_schedule || same_dispatch)
            << "valid plan " << u.unit << ":" << i << " pruned: " << semantic_json(p).dump();
      }
    }
  }
}

TEST(SearchSpace, DecodingIsStableAndTheKeyFollowsTheInputs) {
  const SearchSpace a = tiny_space(), b = tiny_space();
  EXPECT_EQ(a.key(), b.key());
  EXPECT_EQ(a.plan(7, 11), b.plan(7, 11));
  SpaceOptions o;
  o.offload = false;
  EXPECT_NE(tiny_space(o).key(), a.key());
  const Inputs3 in = load("tiny-moe", "dgx-h100", "tiny-train");
  Workload w = in.workload;
  w.global_batch_size = 16;
  SpaceOptions o2;
  o2.gpus = {8};
  o2.micro_batch_sizes = {1, 2};
  o2.virtual_stages = {2};
  EXPECT_NE(SearchSpace::build(in.model, in.cluster, w, o2).key(), a.key());
}

TEST(SearchSpace, StorageNamesMatchTheDecodedPlacement) {
  const SearchSpace s = tiny_space();
  std::set<std::string> names;
  for (int64_t i = 0; i < s.unit_size(); ++i) {
    const Plan p = s.plan(3, i);
    const std::string& name = s.storage_name(i);
    names.insert(name);
    const bool on_gpu = p.placement == Placement{} && p.prefetch == Prefetch{};
    EXPECT_EQ(name == "gpu", on_gpu) << name;
    if (name.rfind("offload-optimizer", 0) == 0) {
      EXPECT_EQ(p.placement.optimizer_states, Tier::kCPU);
    }
    EXPECT_EQ(p.delayed_update, name == "offload-optimizer-delayed") << name;
    if (name.find("prefetch2") != std::string::npos) {
      EXPECT_EQ(p.prefetch.depth, 2);
    }
    if (name.find("ssd") != std::string::npos) {
      EXPECT_EQ(p.placement.optimizer_states, Tier::kSSD);
    }
  }
  EXPECT_GE(names.size(), 4u);
}

TEST(SearchSpace, RejectsWhatItCannotSearch) {
  const Inputs3 in = load("tiny-moe", "dgx-h100", "tiny-train");
  SpaceOptions o;
  o.gpus = {12};  // neither part of a node nor whole nodes
  EXPECT_THROW(SearchSpace::build(in.model, in.cluster, in.workload, o), ConfigError);
  o.gpus = {8};
  Workload inference = testing::bundled().load_workload("inference-decode");
  EXPECT_THROW(SearchSpace::build(in.model, in.cluster, inference, o), ConfigError);
}

TEST(SearchSpace, SkewedRoutingAddsCapacityFactorsAndReplicas) {
  const ConfigRegistry reg = testing::bundled();
  const ModelSpec m = reg.load_model("tiny-moe");
  const ClusterSpec c = reg.load_cluster("dgx-h100");
  Workload w = reg.load_workload("tiny-train");
  SpaceOptions o;
  o.gpus = {8};
  const SearchSpace uniform = SearchSpace::build(m, c, w, o);
  w.routing.kind = RoutingKind::kZipf;
  w.routing.zipf_exponent = 1.2;
  const SearchSpace skewed = SearchSpace::build(m, c, w, o);
  // 3 capacity choices instead of 1, 3 replica choices instead of 1.
  EXPECT_EQ(skewed.unit_size(), uniform.unit_size() * 9);
  std::set<int> replicas;
  for (int64_t i = 0; i < skewed.unit_size(); ++i)
    replicas.insert(skewed.plan(0, i).expert_replicas.replicas);
  EXPECT_EQ(replicas, (std::set<int>{1, 2, 4}));
}

// The issue's acceptance test: on a small space the tuner's best is the brute-force best of
// simulate() over every valid plan (every bucket size included).
TEST(Search, BestEqualsBruteForceBestOfSimulate) {
  const SearchSpace s = tiny_space();
  const Constraints c;  // throughput, no memory limit beyond the hardware
  double brute_best = -1;
  Plan brute_plan;
  int simulated = 0;
  for (int64_t u = 0; u < s.units(); ++u)
    for (int64_t i = 0; i < s.unit_size(); ++i) {
      Plan p = s.plan(u, i);
      if (!validate(p, s.model(), s.cluster(u), s.workload()).empty()) continue;
      if (!capacity_issues(s.model(), s.cluster(u), p, s.workload(), s.profile(u)).empty())
        continue;
      for (int64_t b : s.grad_bucket_bytes()) {
        p.grad_bucket_bytes = b;
        const Prediction pred = simulate(s.model(), s.cluster(u), p, s.workload(), s.profile(u));
        ++simulated;
        if (pred.tokens_per_s > brute_best) brute_best = pred.tokens_per_s, brute_plan = p;
      }
    }
  ASSERT_GT(simulated, 100);
  const auto results = sweep(s);
  const auto finalists = rerank(s, rank(s, results, c, 10), c, nullptr, 2);
  ASSERT_FALSE(finalists.empty());
  EXPECT_DOUBLE_EQ(finalists.front().simulated.tokens_per_s, brute_best)
      << "tuner: " << semantic_json(finalists.front().plan).dump()
      << "\nbrute force: " << semantic_json(brute_plan).dump();
}

TEST(Search, MemoryLimitAndObjectiveOrderTheRanking) {
  const SearchSpace s = tiny_space();
  const auto results = sweep(s);
  Constraints fast;
  const auto by_speed = rank(s, results, fast, 50);
  ASSERT_EQ(by_speed.size(), 50u);
  for (size_t i = 1; i < by_speed.size(); ++i)
    EXPECT_GE(by_speed[i - 1].record.tokens_per_s, by_speed[i].record.tokens_per_s);

  Constraints small;
  small.objective = Objective::kMemory;
  const auto by_memory = rank(s, results, small, 50);
  for (size_t i = 1; i < by_memory.size(); ++i)
    EXPECT_LE(by_memory[i - 1].record.peak_gpu_bytes, by_memory[i].record.peak_gpu_bytes);

  // Under a limit the memory objective still orders by memory, and all meet it.
  Constraints small_limited = small;
  small_limited.max_gpu_bytes = by_memory[10].record.peak_gpu_bytes;
  const auto lean = rank(s, results, small_limited, 1000);
  ASSERT_FALSE(lean.empty());
  for (size_t i = 0; i < lean.size(); ++i) {
    EXPECT_LE(lean[i].record.peak_gpu_bytes, *small_limited.max_gpu_bytes);
    if (i > 0) {
      EXPECT_LE(lean[i - 1].record.peak_gpu_bytes, lean[i].record.peak_gpu_bytes);
    }
  }

  // A limit between the leanest and the fastest plan's memory excludes the fastest.
  Constraints limited;
  limited.max_gpu_bytes =
      0.5 * (by_memory.front().record.peak_gpu_bytes + by_speed.front().record.peak_gpu_bytes);
  ASSERT_LT(*limited.max_gpu_bytes, by_speed.front().record.peak_gpu_bytes);
  for (const auto& r : rank(s, results, limited, 1000))
    EXPECT_LE(r.record.peak_gpu_bytes, *limited.max_gpu_bytes);
}

TEST(Search, ParetoFrontIsNonDominatedAndComplete) {
  const SearchSpace s = tiny_space();
  const auto results = sweep(s);
  const auto front = pareto_front(s, results, {});
  ASSERT_GE(front.size(), 2u);
  for (size_t i = 1; i < front.size(); ++i) {
    EXPECT_GE(front[i].record.peak_gpu_bytes, front[i - 1].record.peak_gpu_bytes);
    EXPECT_GT(front[i].record.tokens_per_s, front[i - 1].record.tokens_per_s);
  }
  // No evaluated candidate dominates a front point.
  for (const auto& u : results)
    for (const auto& r : u.records)
      for (const auto& f : front)
        EXPECT_FALSE(r.peak_gpu_bytes <= f.record.peak_gpu_bytes &&
                     r.tokens_per_s > f.record.tokens_per_s);
}

TEST(Search, CostObjectivePrefersFewerGpusAtEqualSpeedPerGpu) {
  SpaceOptions o;
  o.gpus = {4, 8};
  const SearchSpace s = tiny_space(o);
  const auto results = sweep(s);
  Constraints cost;
  cost.objective = Objective::kCost;
  const auto ranked = rank(s, results, cost, 20);
  ASSERT_FALSE(ranked.empty());
  for (size_t i = 1; i < ranked.size(); ++i)
    EXPECT_LE(ranked[i - 1].gpu_hours_per_mtok(), ranked[i].gpu_hours_per_mtok());
  std::set<int> gpus;
  for (const auto& u : results)
    if (!u.records.empty()) gpus.insert(s.gpus(u.unit));
  EXPECT_EQ(gpus, (std::set<int>{4, 8}));
}

TEST(Search, SweepStopsWhenAsked) {
  const SearchSpace s = tiny_space();
  std::vector<int64_t> units;
  for (int64_t u = 0; u < s.units(); ++u) units.push_back(u);
  std::atomic<bool> stop{false};
  size_t seen = 0;
  run_sweep(
      s, units, 1,
      [&](UnitResult&&) {
        if (++seen == 3) stop = true;
      },
      &stop);
  EXPECT_EQ(seen, 3u);
}

}  // namespace
}  // namespace switchyard
