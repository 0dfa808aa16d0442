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
  if (r.kind == ExpertReplicas::Kind::kPerExpert &&
      static_cast<int64_t>(r.per_expert.size()) == experts) {
    copies = r.per_expert;
  } else if (r.kind == ExpertReplicas::Kind::kHot) {
    std::vector<int64_t> order(static_cast<size_t>(experts));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return share[a] > share[b]; });
    for (int i = 0; i < std::min<int64_t>(r.hot_experts, experts); ++i)
      copies[order[i]] = r.replicas;
  }
  const double cap = plan.capacity_factor ? *plan.capacity_factor / static_cast<double>(experts)
                                          : std::numeric_limits<double>::infinity();
  std::vector<RankExperts> ranks(static_cast<size_t>(ep));
  const int64_t per_rank = std::max<int64_t>(experts / ep, 1);
  std::vector<ExpertCopy> extras;
  for (int64_t e = 0; e < experts; ++e) {
    const double per_copy = std::min(share[e] / copies[e], cap);
    RankExperts& home = ranks[static_cast<size_t>(std::min<int64_t>(e / per_rank, ep - 1))];
    home.copies.push_back({static_cast<int>(e), per_copy});
    home.share += per_copy;
    for (int c = 1; c < copies[e]; ++c) extras.push_back({static_cast<int>(e), per_copy});
  }
  std::stable_sort(extras.begin(), extras.end(),
                   [](const ExpertCopy& a, const ExpertCopy& b) { return a.share > b.share; });
  // Each extra copy to the least loaded rank that does not hold that expert yet (a second copy
  // on the same rank would split nothing).
  for (const ExpertCopy& copy : extras) {
    const auto holds = [&copy](const RankExperts& r) {
      return std::any_of(r.copies.begin(), r.copies.end(),
                         [&copy](const ExpertCopy& c) { return c.expert == copy.expert; });
    };
    RankExperts* best = nullptr;
    for (RankExperts& r : ranks)
      if (!holds(r) && (!best || r.share < best->share)) best = &r;
    if (!best) continue;  // more copies than ranks: every rank has one
    best->copies.push_back(copy);
    best->share += copy.share;
  }
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
