#include "tuner/search.h"

#include <algorithm>
#include <mutex>
#include <thread>
#include <tuple>

#include "core/error.h"
#include "simulator/simulator.h"

namespace switchyard {
namespace {

int worker_count(int threads, size_t work) {
  int n = threads > 0 ? threads : static_cast<int>(std::thread::hardware_concurrency());
  n = std::max(1, n);
  return static_cast<int>(std::min<size_t>(static_cast<size_t>(n), std::max<size_t>(work, 1)));
}

// The figures an objective compares, in its order of precedence.
struct Figures {
  double tokens_per_s;
  double gpu_bytes;
  int gpus;
  int64_t unit;
  int64_t index;
};

bool better_figures(const Figures& a, const Figures& b, Objective objective) {
  const auto position = [](const Figures& f) { return std::make_tuple(f.unit, f.index); };
  switch (objective) {
    case Objective::kThroughput:
      if (a.tokens_per_s != b.tokens_per_s) return a.tokens_per_s > b.tokens_per_s;
      if (a.gpu_bytes != b.gpu_bytes) return a.gpu_bytes < b.gpu_bytes;
      break;
    case Objective::kMemory:
      if (a.gpu_bytes != b.gpu_bytes) return a.gpu_bytes < b.gpu_bytes;
      if (a.tokens_per_s != b.tokens_per_s) return a.tokens_per_s > b.tokens_per_s;
      break;
    case Objective::kCost: {
      // GPU-seconds per token; fewer GPUs first when equal.
      const double ca = a.tokens_per_s > 0 ? a.gpus / a.tokens_per_s : 1e300;
      const double cb = b.tokens_per_s > 0 ? b.gpus / b.tokens_per_s : 1e300;
      if (ca != cb) return ca < cb;
      if (a.gpus != b.gpus) return a.gpus < b.gpus;
      if (a.gpu_bytes != b.gpu_bytes) return a.gpu_bytes < b.gpu_bytes;
      break;
    }
  }
  return position(a) < position(b);
}

Figures figures(const Scored& s) {
  return {s.record.tokens_per_s, s.record.peak_gpu_bytes, s.gpus, s.unit, s.record.index};
}

bool meets(const Constraints& c, double gpu_bytes) {
  return !c.max_gpu_bytes || gpu_bytes <= *c.max_gpu_bytes;
}

}  // namespace

void run_sweep(const SearchSpace& space, const std::vector<int64_t>& units, int threads,
               const std::function<void(UnitResult&&)>& on_unit, const std::atomic<bool>* stop) {
  std::atomic<size_t> next{0};
  std::mutex deliver;
  std::exception_ptr failure;
  auto work = [&] {
    try {
      for (size_t i = next++; i < units.size(); i = next++) {
        if (stop && stop->load()) return;
        UnitResult r = space.evaluate(units[i]);
        std::lock_guard<std::mutex> lock(deliver);
        if (failure) return;
        on_unit(std::move(r));
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(deliver);
      if (!failure) failure = std::current_exception();
      next = units.size();
    }
  };
  const int n = worker_count(threads, units.size());
  std::vector<std::thread> pool;
  for (int t = 1; t < n; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  if (failure) std::rethrow_exception(failure);
}

bool better(const Scored& a, const Scored& b, Objective objective) {
  return better_figures(figures(a), figures(b), objective);
}

std::vector<Scored> rank(const SearchSpace& space, const std::vector<UnitResult>& results,
                         const Constraints& constraints, size_t limit) {
  std::vector<Scored> all;
  for (const UnitResult& u : results) {
    const int gpus = space.gpus(u.unit);
    for (const CandidateRecord& r : u.records)
      if (meets(constraints, r.peak_gpu_bytes)) all.push_back({u.unit, r, gpus});
  }
  const auto cmp = [&](const Scored& a, const Scored& b) {
    return better(a, b, constraints.objective);
  };
  const size_t k = std::min(limit, all.size());
  std::partial_sort(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(k), all.end(), cmp);
  all.resize(k);
  return all;
}

std::vector<Scored> pareto_front(const SearchSpace& space, const std::vector<UnitResult>& results,
                                 const Constraints& constraints) {
  std::vector<Scored> all;
  for (const UnitResult& u : results) {
    const int gpus = space.gpus(u.unit);
    for (const CandidateRecord& r : u.records)
      if (meets(constraints, r.peak_gpu_bytes)) all.push_back({u.unit, r, gpus});
  }
  // By memory ascending (throughput descending among equals): a point is on the front when it is
  // faster than everything that needs no more memory.
  std::sort(all.begin(), all.end(),
            [](const Scored& a, const Scored& b) { return better(a, b, Objective::kMemory); });
  std::vector<Scored> front;
  double best = -1;
  for (const Scored& s : all)
    if (s.record.tokens_per_s > best) {
      front.push_back(s);
      best = s.record.tokens_per_s;
    }
  return front;
}

PredictionSummary summarize(const Prediction& p) {
  PredictionSummary s;
  s.fidelity = p.fidelity;
  s.step_time_s = p.step_time_s;
  s.tokens_per_s = p.tokens_per_s;
  s.tokens_per_s_per_gpu = p.tokens_per_s_per_gpu;
  s.model_tflops_per_gpu = p.model_tflops_per_gpu;
  s.mfu = p.mfu;
  s.peak = p.peak;
  s.time = p.time;
  s.bottleneck = kBottleneckNames[bottleneck_index(p.time)];
  return s;
}

namespace {
constexpr std::pair<const char*, double TimeBreakdown::*> kTimeParts[] = {
    {"compute_s", &TimeBreakdown::compute_s}, {"tp_comm_s", &TimeBreakdown::tp_comm_s},
    {"cp_comm_s", &TimeBreakdown::cp_comm_s}, {"ep_comm_s", &TimeBreakdown::ep_comm_s},
    {"dp_comm_s", &TimeBreakdown::dp_comm_s}, {"pp_comm_s", &TimeBreakdown::pp_comm_s},
    {"bubble_s", &TimeBreakdown::bubble_s},   {"optimizer_s", &TimeBreakdown::optimizer_s},
    {"stall_s", &TimeBreakdown::stall_s}};
}  // namespace

Json to_json(const PredictionSummary& s) {
  Json time = Json::object();
  for (const auto& [name, member] : kTimeParts) time[name] = s.time.*member;
  return {{"fidelity", s.fidelity},
          {"step_time_s", s.step_time_s},
          {"tokens_per_s", s.tokens_per_s},
          {"tokens_per_s_per_gpu", s.tokens_per_s_per_gpu},
          {"model_tflops_per_gpu", s.model_tflops_per_gpu},
          {"mfu", s.mfu},
          {"peak_bytes", {{"gpu", s.peak.gpu}, {"cpu", s.peak.cpu}, {"ssd", s.peak.ssd}}},
          {"time", time},
          {"bottleneck", s.bottleneck}};
}

PredictionSummary summary_from_json(const Json& j) {
  std::vector<ConfigIssue> issues;
  PredictionSummary s;
  JsonReader r(j, "prediction", issues);
  r.required("fidelity", &s.fidelity);
  r.required("step_time_s", &s.step_time_s);
  r.required("tokens_per_s", &s.tokens_per_s);
  r.required("tokens_per_s_per_gpu", &s.tokens_per_s_per_gpu);
  r.required("model_tflops_per_gpu", &s.model_tflops_per_gpu);
  r.required("mfu", &s.mfu);
  r.required("bottleneck", &s.bottleneck);
  if (const Json* peak = r.child("peak_bytes", true)) {
    JsonReader pr(*peak, "prediction.peak_bytes", issues);
    pr.required("gpu", &s.peak.gpu);
    pr.required("cpu", &s.peak.cpu);
    pr.required("ssd", &s.peak.ssd);
    pr.finish();
  }
  if (const Json* time = r.child("time", true)) {
    JsonReader tr(*time, "prediction.time", issues);
    for (const auto& [name, member] : kTimeParts) tr.required(name, &(s.time.*member));
    tr.finish();
  }
  r.finish();
  if (!issues.empty()) throw ConfigError(std::move(issues));
  return s;
}

std::vector<Finalist> rerank(const SearchSpace& space, const std::vector<Scored>& candidates,
                             const Constraints& constraints, PredictionCache* cache, int threads) {
  // Every (candidate, bucket size) pair is one simulation; look up the cache first (one thread:
  // the cache is a database connection), simulate the rest in parallel, then store them.
  const auto& buckets = space.grad_bucket_bytes();
  struct Job {
    size_t candidate;
    Plan plan;
    std::optional<PredictionSummary> result;
    bool cached = false;
  };
  std::vector<Job> jobs;
  for (size_t c = 0; c < candidates.size(); ++c)
    for (int64_t b : buckets) {
      Plan p = space.plan(candidates[c].unit, candidates[c].record.index);
      p.grad_bucket_bytes = b;
      jobs.push_back({c, std::move(p), std::nullopt});
    }
  std::vector<size_t> to_simulate;
  for (size_t i = 0; i < jobs.size(); ++i) {
    const int64_t unit = candidates[jobs[i].candidate].unit;
    if (cache) jobs[i].result = cache->find(jobs[i].plan, space.cluster(unit), space.profile(unit));
    jobs[i].cached = jobs[i].result.has_value();
    if (!jobs[i].cached) to_simulate.push_back(i);
  }
  std::atomic<size_t> next{0};
  std::exception_ptr failure;
  std::mutex m;
  auto work = [&] {
    for (size_t t = next++; t < to_simulate.size(); t = next++) {
      Job& job = jobs[to_simulate[t]];
      const int64_t unit = candidates[job.candidate].unit;
      try {
        job.result = summarize(simulate(space.model(), space.cluster(unit), job.plan,
                                        space.workload(), space.profile(unit)));
      } catch (...) {
        std::lock_guard<std::mutex> lock(m);
        if (!failure) failure = std::current_exception();
        next = to_simulate.size();
      }
    }
  };
  const int n = worker_count(threads, to_simulate.size());
  std::vector<std::thread> pool;
  for (int t = 1; t < n; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  if (failure) std::rethrow_exception(failure);
  if (cache)
    for (size_t i : to_simulate) {
      const int64_t unit = candidates[jobs[i].candidate].unit;
      cache->put(jobs[i].plan, space.cluster(unit), space.profile(unit), *jobs[i].result);
    }

  // Each candidate at its best bucket size.
  std::vector<Finalist> out;
  for (size_t c = 0; c < candidates.size(); ++c) {
    const Scored& s = candidates[c];
    // The bucket size that is best under the objective among those that meet the limit.
    const Job* best = nullptr;
    const auto fig = [&](const Job& j) {
      return Figures{j.result->tokens_per_s, j.result->peak.gpu, s.gpus, s.unit, s.record.index};
    };
    for (const Job& j : jobs) {
      if (j.candidate != c || !meets(constraints, j.result->peak.gpu)) continue;
      if (!best || better_figures(fig(j), fig(*best), constraints.objective)) best = &j;
    }
    if (!best) continue;
    Finalist f;
    f.unit = s.unit;
    f.index = s.record.index;
    f.gpus = s.gpus;
    f.plan = best->plan;
    f.storage = space.storage_name(s.record.index);
    f.estimate = summarize(estimate(space.model(), space.cluster(s.unit), f.plan, space.workload(),
                                    space.profile(s.unit)));
    f.simulated = *best->result;
    f.cached = best->cached;
    out.push_back(std::move(f));
  }
  std::sort(out.begin(), out.end(), [&](const Finalist& a, const Finalist& b) {
    return better_figures({a.simulated.tokens_per_s, a.simulated.peak.gpu, a.gpus, a.unit, a.index},
                          {b.simulated.tokens_per_s, b.simulated.peak.gpu, b.gpus, b.unit, b.index},
                          constraints.objective);
  });
  return out;
}

}  // namespace switchyard
