#include "core/expert_load.h"

#include <algorithm>
#include <limits>
#include <numeric>

namespace switchyard {

std::vector<RankExperts> expert_rank_loads(const ModelSpec& m, const Plan& plan, const Workload& w,
                                           int moe_layer) {
  if (!m.moe || plan.ep <= 0) return {};
  const int64_t experts = m.moe->num_experts;
  const int ep = plan.ep;
  // The placement (which experts are replicated, where each copy sits) follows the step's load;
  // a layer with its own routing then spreads its rows over those copies.
  const std::vector<double> share = expert_load_fractions(w, m);
  std::vector<int> copies(static_cast<size_t>(experts), 1);
  const ExpertReplicas& r = plan.expert_replicas;
  std::vector<int64_t> candidates;  // kHot: the hot experts, which may gain copies
  if (r.kind == ExpertReplicas::Kind::kPerExpert &&
      static_cast<int64_t>(r.per_expert.size()) == experts) {
    copies = r.per_expert;
  } else if (r.kind == ExpertReplicas::Kind::kHot) {
    std::vector<int64_t> order(static_cast<size_t>(experts));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return share[a] > share[b]; });
    candidates.assign(order.begin(), order.begin() + std::min<int64_t>(r.hot_experts, experts));
  }
  const double cap = plan.capacity_factor ? *plan.capacity_factor / static_cast<double>(experts)
                                          : std::numeric_limits<double>::infinity();
  const auto per_copy = [&](int64_t e, int c) { return std::min(share[e] / c, cap); };
  std::vector<RankExperts> ranks(static_cast<size_t>(ep));
  const int64_t per_rank = std::max<int64_t>(experts / ep, 1);
  const auto home_of = [&](int64_t e) {
    return static_cast<int>(std::min<int64_t>(e / per_rank, ep - 1));
  };
  for (int64_t e = 0; e < experts; ++e)
    ranks[static_cast<size_t>(home_of(e))].share += per_copy(e, copies[e]);
  std::vector<std::pair<int64_t, int>> placed;  // extra copies (expert, rank), in order
  const auto holds = [&](int64_t e, int k) {
    return home_of(e) == k ||
           std::find(placed.begin(), placed.end(), std::pair{e, k}) != placed.end();
  };
  // The least loaded rank that does not hold expert e yet (a second copy on one rank would split
  // nothing); -1 when every rank holds one.
  const auto least_loaded_without = [&](int64_t e) {
    int best = -1;
    for (int k = 0; k < ep; ++k) {
      if (holds(e, k)) continue;
      if (best < 0 || ranks[static_cast<size_t>(k)].share < ranks[static_cast<size_t>(best)].share)
        best = k;
    }
    return best;
  };
  if (r.kind == ExpertReplicas::Kind::kPerExpert) {
    // Copies as the plan lists them: each extra copy, hottest first, to the least loaded rank.
    std::vector<std::pair<int64_t, double>> extras;
    for (int64_t e = 0; e < experts; ++e)
      for (int c = 1; c < copies[e]; ++c) extras.push_back({e, per_copy(e, copies[e])});
    std::stable_sort(extras.begin(), extras.end(),
                     [](const auto& a, const auto& b) { return a.second > b.second; });
    for (const auto& [e, s] : extras) {
      const int best = least_loaded_without(e);
      if (best < 0) continue;  // more copies than ranks: every rank has one
      placed.push_back({e, best});
      ranks[static_cast<size_t>(best)].share += s;
    }
  } else if (r.kind == ExpertReplicas::Kind::kHot) {
    // Elastic (SE-MoE sizes replication by load): a hot expert gains a copy (up to `replicas`) when
    // one of its copies sits on a most loaded rank and the new copy, on the least loaded rank
    // without one, keeps that rank below the most loaded one: the copy takes load off a straggler
    // without making a new one. The hottest copy first, until no copy qualifies. Under balanced
    // load none does (a copy would turn its rank into the new straggler).
    const auto on_most_loaded = [&](int64_t e, double max_share) {
      const auto at_max = [&](int k) {
        return ranks[static_cast<size_t>(k)].share >= max_share * (1 - 1e-12);
      };
      if (at_max(home_of(e))) return true;
      for (const auto& [x, k] : placed)
        if (x == e && at_max(k)) return true;
      return false;
    };
    for (;;) {
      double max_share = 0;
      for (const RankExperts& rk : ranks) max_share = std::max(max_share, rk.share);
      int64_t pick = -1;
      int target = -1;
      for (int64_t e : candidates) {
        if (copies[e] >= r.replicas || !on_most_loaded(e, max_share)) continue;
        const int k = least_loaded_without(e);
        if (k < 0 || ranks[static_cast<size_t>(k)].share + per_copy(e, copies[e] + 1) >=
                         max_share * (1 - 1e-12))
          continue;
        if (pick < 0 || per_copy(e, copies[e]) > per_copy(pick, copies[pick])) pick = e, target = k;
      }
      if (pick < 0) break;
      const double before = per_copy(pick, copies[pick]), after = per_copy(pick, copies[pick] + 1);
      ranks[static_cast<size_t>(home_of(pick))].share += after - before;
      for (const auto& [e, k] : placed)
        if (e == pick) ranks[static_cast<size_t>(k)].share += after - before;
      ranks[static_cast<size_t>(target)].share += after;
      placed.push_back({pick, target});
      ++copies[pick];
    }
  }
  // Each rank's copies: its home experts in order, then the extra copies in the order placed.
  for (int64_t e = 0; e < experts; ++e)
    ranks[static_cast<size_t>(home_of(e))].copies.push_back(
        {static_cast<int>(e), per_copy(e, copies[e])});
  for (const auto& [e, rank] : placed)
    ranks[static_cast<size_t>(rank)].copies.push_back(
        {static_cast<int>(e), per_copy(e, copies[e])});
  if (moe_layer >= 0 && w.routing.kind == RoutingKind::kHistogram && !w.routing.per_layer.empty()) {
    const std::vector<double> layer = expert_load_fractions(w, m, moe_layer);
    for (RankExperts& rank : ranks) {
      rank.share = 0;
      for (ExpertCopy& copy : rank.copies) {
        const size_t e = static_cast<size_t>(copy.expert);
        copy.share = std::min(layer[e] / copies[e], cap);
        rank.share += copy.share;
      }
    }
  }
  return ranks;
}

int most_loaded_rank(const std::vector<RankExperts>& ranks) {
  int best = 0;
  for (size_t i = 1; i < ranks.size(); ++i)
    if (ranks[i].share > ranks[static_cast<size_t>(best)].share) best = static_cast<int>(i);
  return best;
}

double expert_rank_load_factor(const ModelSpec& m, const Plan& plan, const Workload& w) {
  // Uniform routing over whole experts per rank, nothing replicated or capped: balanced.
  if (m.moe && w.routing.kind == RoutingKind::kUniform && w.task_routing.empty() &&
      plan.expert_replicas.kind == ExpertReplicas::Kind::kNone && !plan.capacity_factor &&
      plan.ep > 0 && m.moe->num_experts % plan.ep == 0)
    return 1.0;
  const auto ranks = expert_rank_loads(m, plan, w);
  if (ranks.empty()) return 1.0;
  return ranks[static_cast<size_t>(most_loaded_rank(ranks))].share * plan.ep;
}

}  // namespace switchyard
