#include "tuner/space.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "core/error.h"
#include "core/expert_load.h"
#include "core/validate.h"
#include "cost_models/memory.h"
#include "simulator/simulator.h"

namespace switchyard {
namespace {

std::vector<int> divisors(int64_t n, int64_t max_value) {
  std::vector<int> out;
  for (int64_t d = 1; d <= std::min(n, max_value); ++d)
    if (n % d == 0) out.push_back(static_cast<int>(d));
  return out;
}

std::vector<int> powers_of_two_upto(int64_t max_value) {
  std::vector<int> out;
  for (int64_t v = 1; v <= max_value; v *= 2) out.push_back(static_cast<int>(v));
  return out;
}

// The rule a capacity issue is about, as a pruning counter's name.
std::string memory_rule(const ConfigIssue& issue) {
  if (issue.path == "plan") return "memory: GPU HBM";
  if (issue.message.rfind("host memory", 0) == 0) return "memory: node DRAM";
  if (issue.message.rfind("SSD", 0) == 0) return "memory: node SSD";
  return "memory: " + issue.path;
}

std::vector<StoragePreset> storage_presets(const ModelSpec& m, const ClusterSpec& c, bool offload) {
  std::vector<StoragePreset> out;
  out.push_back({"gpu", {}, {}});
  if (!offload) return out;
  Placement zero_offload;  // ZeRO-Offload: gradients out, optimizer step on the host
  zero_offload.gradients = Tier::kCPU;
  zero_offload.optimizer_states = Tier::kCPU;
  out.push_back({"offload-optimizer", zero_offload, {}});
  // ZeRO-Offload's delayed update: the host's step beside the next step.
  out.push_back({"offload-optimizer-delayed", zero_offload, {}, true});
  // The bulk of an MoE model's parameters are its experts: those move; a dense model moves its
  // layers' parameters.
  Placement params = zero_offload;
  (m.moe ? params.expert_params : params.dense_params) = Tier::kCPU;
  const std::string what = m.moe ? "experts" : "params";
  out.push_back({"offload-" + what + "-prefetch1", params, {1, PrefetchDirection::kAhead}});
  out.push_back({"offload-" + what + "-prefetch2", params, {2, PrefetchDirection::kAhead}});
  if (c.host.ssd_bytes > 0) {
    Placement opt_ssd = zero_offload;
    opt_ssd.optimizer_states = Tier::kSSD;
    out.push_back({"optimizer-ssd", opt_ssd, {}});
    // SE-MoE's 2D prefetch: SSD -> DRAM -> HBM, two layers ahead.
    Placement ssd = opt_ssd;
    (m.moe ? ssd.expert_params : ssd.dense_params) = Tier::kSSD;
    out.push_back({what + "-ssd-2d-prefetch2", ssd, {2, PrefetchDirection::k2D}});
  }
  return out;
}

// No replicas, and for skewed routing the experts hotter than 1.5x the mean with 2 and 4 copies.
std::vector<ExpertReplicas> replica_choices(const ModelSpec& m, const Workload& w) {
  std::vector<ExpertReplicas> out(1);
  if (!m.moe) return out;
  const auto share = expert_load_fractions(w, m);
  const double mean = 1.0 / static_cast<double>(share.size());
  int hot = 0;
  for (double s : share) hot += s > 1.5 * mean ? 1 : 0;
  if (hot == 0) return out;
  for (int copies : {2, 4}) {
    ExpertReplicas r;
    r.kind = ExpertReplicas::Kind::kHot;
    r.hot_experts = hot;
    r.replicas = copies;
    out.push_back(r);
  }
  return out;
}

bool skewed(const Workload& w) {
  if (w.routing.kind != RoutingKind::kUniform) return true;
  for (const auto& t : w.task_routing)
    if (t.routing.kind != RoutingKind::kUniform) return true;
  return false;
}

void put_u32(std::string& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void put_u64(std::string& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void put_f32(std::string& out, float f) {
  uint32_t v;
  std::memcpy(&v, &f, 4);
  put_u32(out, v);
}
uint32_t get_u32(const unsigned char* p) {
  return uint32_t{p[0]} | uint32_t{p[1]} << 8 | uint32_t{p[2]} << 16 | uint32_t{p[3]} << 24;
}
uint64_t get_u64(const unsigned char* p) {
  return uint64_t{get_u32(p)} | uint64_t{get_u32(p + 4)} << 32;
}
float get_f32(const unsigned char* p) {
  const uint32_t v = get_u32(p);
  float f;
  std::memcpy(&f, &v, 4);
  return f;
}

}  // namespace

uint8_t bottleneck_index(const TimeBreakdown& t) {
  const double v[] = {t.compute_s, t.tp_comm_s, t.cp_comm_s,   t.ep_comm_s, t.dp_comm_s,
                      t.pp_comm_s, t.bubble_s,  t.optimizer_s, t.stall_s};
  return static_cast<uint8_t>(std::max_element(std::begin(v), std::end(v)) - std::begin(v));
}

std::string pack_records(const std::vector<CandidateRecord>& records) {
  std::string out;
  out.reserve(records.size() * kCandidateRecordBytes);
  for (const auto& r : records) {
    put_u32(out, r.index);
    for (float f : {r.step_time_s, r.tokens_per_s, r.mfu, r.peak_gpu_bytes, r.peak_cpu_bytes,
                    r.peak_ssd_bytes})
      put_f32(out, f);
    out.push_back(static_cast<char>(r.bottleneck));
  }
  return out;
}

std::vector<CandidateRecord> unpack_records(const unsigned char* data, size_t bytes) {
  if (bytes % kCandidateRecordBytes != 0)
    throw std::invalid_argument("candidate records: " + std::to_string(bytes) +
                                " bytes is not a multiple of " +
                                std::to_string(kCandidateRecordBytes));
  std::vector<CandidateRecord> out(bytes / kCandidateRecordBytes);
  for (size_t i = 0; i < out.size(); ++i) {
    const unsigned char* r = data + i * kCandidateRecordBytes;
    CandidateRecord& c = out[i];
    c.index = get_u32(r);
    c.step_time_s = get_f32(r + 4);
    c.tokens_per_s = get_f32(r + 8);
    c.mfu = get_f32(r + 12);
    c.peak_gpu_bytes = get_f32(r + 16);
    c.peak_cpu_bytes = get_f32(r + 20);
    c.peak_ssd_bytes = get_f32(r + 24);
    c.bottleneck = r[28];
  }
  return out;
}

// unit u64, candidates u64, pruned-JSON length u32, pruned JSON, records.
std::string encode_unit(const UnitResult& u) {
  Json pruned = Json::object();
  for (const auto& [rule, n] : u.pruned) pruned[rule] = n;
  const std::string text = pruned.dump();
  std::string out;
  put_u64(out, static_cast<uint64_t>(u.unit));
  put_u64(out, static_cast<uint64_t>(u.candidates));
  put_u32(out, static_cast<uint32_t>(text.size()));
  out += text;
  out += pack_records(u.records);
  return out;
}

UnitResult decode_unit(std::string_view bytes) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  if (bytes.size() < 20) throw std::invalid_argument("unit message too short");
  UnitResult u;
  u.unit = static_cast<int64_t>(get_u64(p));
  u.candidates = static_cast<int64_t>(get_u64(p + 8));
  const size_t text_len = get_u32(p + 16);
  if (bytes.size() < 20 + text_len) throw std::invalid_argument("unit message truncated");
  const Json pruned = Json::parse(bytes.substr(20, text_len), nullptr, /*allow_exceptions=*/false);
  if (!pruned.is_object()) throw std::invalid_argument("unit message: bad pruning counts");
  for (const auto& [rule, n] : pruned.items()) {
    if (!n.is_number_integer()) throw std::invalid_argument("unit message: bad count");
    u.pruned[rule] = n.get<int64_t>();
  }
  u.records = unpack_records(p + 20 + text_len, bytes.size() - 20 - text_len);
  return u;
}

SearchSpace SearchSpace::build(const ModelSpec& model, const ClusterSpec& cluster,
                               const Workload& workload, SpaceOptions options) {
  if (workload.mode != Mode::kTrain)
    throw ConfigError("--workload",
                      "\"" + workload.name +
                          "\" is an inference workload; tune searches training plans (simulate "
                          "an inference plan directly)");
  if (options.gpus.empty()) throw ConfigError("--gpus", "no GPU count to search");
  if (options.micro_batch_sizes.empty() || options.grad_bucket_bytes.empty())
    throw ConfigError("tune", "empty choice list");
  // Ascending: a unit is judged by its first (most permissive) candidate.
  for (auto* list : {&options.micro_batch_sizes, &options.virtual_stages}) {
    std::sort(list->begin(), list->end());
    list->erase(std::unique(list->begin(), list->end()), list->end());
  }
  for (int v : options.micro_batch_sizes)
    if (v < 1) throw ConfigError("tune", "micro-batch sizes must be >= 1");
  SearchSpace s;
  s.model_ = model;
  s.workload_ = workload;
  int max_gpus = 0;
  for (int g : options.gpus) {
    s.clusters_.push_back(with_gpus(cluster, g));
    s.profiles_.push_back(default_cost_profile(s.clusters_.back()));
    max_gpus = std::max(max_gpus, g);
  }
  const int gpn = s.clusters_.front().gpus_per_node;
  const bool moe = model.moe.has_value();
  if (options.capacity_factors.empty()) {
    options.capacity_factors.push_back(std::nullopt);
    if (moe && skewed(workload)) {
      options.capacity_factors.push_back(1.0);
      options.capacity_factors.push_back(1.25);
    }
  }
  if (!moe && (options.capacity_factors.size() != 1 || options.capacity_factors[0]))
    throw ConfigError("--capacity-factors",
                      "model \"" + model.name + "\" is dense: it has no expert capacity to choose");
  for (size_t i = 0; i < options.capacity_factors.size(); ++i)
    for (size_t k = 0; k < i; ++k)
      if (options.capacity_factors[i] == options.capacity_factors[k])
        throw ConfigError("--capacity-factors", "lists the same choice twice");

  s.tp_ = powers_of_two_upto(gpn);
  if (std::find(s.tp_.begin(), s.tp_.end(), gpn) == s.tp_.end()) s.tp_.push_back(gpn);
  // Context parallelism only while each rank keeps at least 2,048 tokens of a sequence.
  s.cp_ = powers_of_two_upto(std::max<int64_t>(1, workload.effective_seq_len(model) / 2048));
  if (s.cp_.size() > 4) s.cp_.resize(4);
  s.pp_ = divisors(max_gpus, model.num_layers);
  s.ep_ = moe ? divisors(model.moe->num_experts, max_gpus) : std::vector<int>{1};
  s.expert_tp_ = moe ? powers_of_two_upto(gpn) : std::vector<int>{1};
  s.dispatch_ = moe ? std::vector<Dispatch>{Dispatch::kAllToAll, Dispatch::kHierarchicalAllToAll,
                                            Dispatch::kPPMoEIndexSlice}
                    : std::vector<Dispatch>{Dispatch::kAllToAll};
  s.schedules_ = {{Schedule::k1F1B, 1}, {Schedule::kGPipe, 1}};
  for (int v : options.virtual_stages)
    if (v >= 2) s.schedules_.push_back({Schedule::kInterleaved1F1B, v});
  s.storage_ = storage_presets(model, s.clusters_.front(), options.offload);
  s.replicas_ = replica_choices(model, workload);
  s.options_ = std::move(options);

  s.units_ = static_cast<int64_t>(s.clusters_.size() * s.tp_.size() * s.cp_.size() * s.pp_.size() *
                                  s.ep_.size() * s.expert_tp_.size() * s.dispatch_.size());
  s.unit_size_ = static_cast<int64_t>(s.schedules_.size() * s.options_.micro_batch_sizes.size() *
                                      s.zero_.size() * s.recompute_.size() *
                                      s.options_.capacity_factors.size() * s.storage_.size() *
                                      s.replicas_.size());
  return s;
}

SearchSpace::Degrees SearchSpace::degrees(int64_t unit) const {
  Degrees d{};
  auto take = [&unit](size_t n) {
    const auto i = static_cast<size_t>(unit % static_cast<int64_t>(n));
    unit /= static_cast<int64_t>(n);
    return i;
  };
  d.dispatch = dispatch_[take(dispatch_.size())];
  d.expert_tp = expert_tp_[take(expert_tp_.size())];
  d.ep = ep_[take(ep_.size())];
  d.pp = pp_[take(pp_.size())];
  d.cp = cp_[take(cp_.size())];
  d.tp = tp_[take(tp_.size())];
  d.variant = static_cast<int>(take(clusters_.size()));
  return d;
}

int SearchSpace::gpus(int64_t unit) const { return options_.gpus[degrees(unit).variant]; }
const ClusterSpec& SearchSpace::cluster(int64_t unit) const {
  return clusters_[degrees(unit).variant];
}
const CostProfile& SearchSpace::profile(int64_t unit) const {
  return profiles_[degrees(unit).variant];
}

const std::string& SearchSpace::storage_name(int64_t index) const {
  // Storage is the second-innermost digit (replicas are innermost).
  const auto n = static_cast<int64_t>(replicas_.size());
  return storage_[static_cast<size_t>((index / n) % static_cast<int64_t>(storage_.size()))].name;
}

Plan SearchSpace::plan(int64_t unit, int64_t index) const {
  const Degrees d = degrees(unit);
  Plan p;
  p.tp = d.tp;
  p.cp = d.cp;
  p.pp = d.pp;
  p.ep = d.ep;
  p.expert_tp = d.expert_tp;
  p.dispatch = d.dispatch;
  const int stage_ranks = options_.gpus[d.variant] / d.pp;
  p.dp = std::max(1, stage_ranks / std::max(1, d.tp * d.cp));
  if (d.pp * d.tp * d.cp * p.dp != options_.gpus[d.variant]) p.dp = 0;  // validate() names it
  p.sequence_parallel = d.tp > 1 && d.dispatch != Dispatch::kPPMoEIndexSlice;
  auto take = [&index](size_t n) {
    const auto i = static_cast<size_t>(index % static_cast<int64_t>(n));
    index /= static_cast<int64_t>(n);
    return i;
  };
  p.expert_replicas = replicas_[take(replicas_.size())];
  const StoragePreset& st = storage_[take(storage_.size())];
  p.placement = st.placement;
  p.prefetch = st.prefetch;
  p.delayed_update = st.delayed_update;
  p.capacity_factor = options_.capacity_factors[take(options_.capacity_factors.size())];
  p.recompute = recompute_[take(recompute_.size())];
  p.zero_stage = zero_[take(zero_.size())];
  p.micro_batch_size = options_.micro_batch_sizes[take(options_.micro_batch_sizes.size())];
  const ScheduleChoice sc = schedules_[take(schedules_.size())];
  p.schedule = sc.schedule;
  p.vp = sc.vp;
  p.grad_bucket_bytes = options_.grad_bucket_bytes.front();
  return p;
}

std::string SearchSpace::duplicate_reason(const Degrees& d) const {
  if (!model_.moe) return {};
  if (d.ep == 1 && d.dispatch != Dispatch::kAllToAll)
    return "duplicate: with ep 1 there is no dispatch to choose";
  if (d.dispatch == Dispatch::kHierarchicalAllToAll &&
      d.expert_tp * d.ep <= clusters_[d.variant].gpus_per_node)
    return "duplicate: hierarchical all-to-all inside one node is the flat one";
  return {};
}

UnitResult SearchSpace::evaluate(int64_t unit) const {
  UnitResult out;
  out.unit = unit;
  out.candidates = unit_size_;
  const Degrees d = degrees(unit);
  if (std::string why = duplicate_reason(d); !why.empty()) {
    out.pruned[why] = unit_size_;
    return out;
  }
  if (options_.gpus[d.variant] % (d.tp * d.cp * d.pp) != 0) {
    out.pruned["rule: tp*cp*pp divides the GPU count"] = unit_size_;
    return out;
  }
  const ClusterSpec& c = clusters_[d.variant];
  const CostProfile& prof = profiles_[d.variant];
  // The unit's degrees alone (everything inner at its most permissive) break a rule: every
  // candidate of the unit would.
  if (auto issues = validate(plan(unit, 0), model_, c, workload_); !issues.empty()) {
    out.pruned["rule: " + issues.front().path] = unit_size_;
    return out;
  }
  for (int64_t i = 0; i < unit_size_; ++i) {
    const Plan p = plan(unit, i);
    if (p.pp == 1 && p.schedule != Schedule::k1F1B) {
      ++out.pruned["duplicate: with pp 1 every schedule is the same"];
      continue;
    }
    if (auto issues = validate(p, model_, c, workload_); !issues.empty()) {
      ++out.pruned["rule: " + issues.front().path];
      continue;
    }
    if (auto fit = capacity_issues(model_, c, p, workload_, prof); !fit.empty()) {
      ++out.pruned[memory_rule(fit.front())];
      continue;
    }
    const Prediction pred = estimate(model_, c, p, workload_, prof);
    CandidateRecord r;
    r.index = static_cast<uint32_t>(i);
    r.step_time_s = static_cast<float>(pred.step_time_s);
    r.tokens_per_s = static_cast<float>(pred.tokens_per_s);
    r.mfu = static_cast<float>(pred.mfu);
    r.peak_gpu_bytes = static_cast<float>(pred.peak.gpu);
    r.peak_cpu_bytes = static_cast<float>(pred.peak.cpu);
    r.peak_ssd_bytes = static_cast<float>(pred.peak.ssd);
    r.bottleneck = bottleneck_index(pred.time);
    out.records.push_back(r);
  }
  return out;
}

Json SearchSpace::describe() const {
  Json j;
  j["space_version"] = kSpaceVersion;
  j["cost_model_version"] = kCostModelVersion;
  j["model"] = content_hash(semantic_json(model_));
  j["workload"] = content_hash(semantic_json(workload_));
  Json clusters = Json::array();
  for (size_t v = 0; v < clusters_.size(); ++v)
    clusters.push_back({{"gpus", options_.gpus[v]},
                        {"cluster", content_hash(semantic_json(clusters_[v]))},
                        {"profile", content_hash(to_json(profiles_[v]))}});
  j["clusters"] = clusters;
  Json cf = Json::array();
  for (const auto& f : options_.capacity_factors) cf.push_back(f ? Json(*f) : Json(nullptr));
  j["capacity_factors"] = cf;
  j["micro_batch_sizes"] = options_.micro_batch_sizes;
  j["virtual_stages"] = options_.virtual_stages;
  j["offload"] = options_.offload;
  j["grad_bucket_bytes"] = options_.grad_bucket_bytes;
  return j;
}

std::string SearchSpace::key() const { return content_hash(describe()); }

}  // namespace switchyard
