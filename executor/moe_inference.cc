#include "executor/moe_inference.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <optional>
#include <string>

#include "executor/copy_engine.h"
#include "executor/counter_random.h"
#include "executor/host_kernels.h"
#include "executor/model_shape.h"
#include "executor/moe_trainer.h"

namespace switchyard {
namespace {

struct Tensor {
  Buffer buf;
  float* p() const { return buf.as<float>(); }
};

// Where each parameter of one layer sits in the layer's contiguous block (floats), so a layer
// moves between tiers as one copy, as the StepProgram's param_fetch does.
struct LayerLayout {
  size_t attn_norm = 0, wqkv = 0, wo = 0, ffn_norm = 0, router = 0;
  std::vector<size_t> w1, w2;  // per expert (MoE) or one (dense FFN)
  size_t floats = 0;
  bool moe = false;
};

}  // namespace

std::vector<ConfigIssue> inference_unsupported(const ModelSpec& m, const Plan& p) {
  // The layers are the trainer's: what it cannot run, this cannot either.
  Plan model_only;
  std::vector<ConfigIssue> out = trainer_unsupported(m, model_only);
  auto no = [&out](std::string path, std::string why) {
    out.push_back({std::move(path), "the CPU runner does not run this yet: " + std::move(why)});
  };
  if (p.tp > 1 || p.ep > 1 || p.pp > 1 || p.cp > 1 || p.expert_tp > 1)
    no("plan", "inference runs data-parallel replicas of the whole model (tp = ep = pp = 1)");
  if (p.placement != Placement{})
    no("plan.placement",
       "inference keeps weights on the device tier, or streams them with ring_sections");
  if (p.capacity_factor) no("plan.capacity_factor", "dropless inference only");
  if (p.ring_sections > 0 && p.prefetch.direction != PrefetchDirection::kNone &&
      !p.prefetch.ahead())
    no("plan.prefetch.direction", "a ring prefetches ahead in time (\"ahead\"), or not at all");
  return out;
}

struct MoeInference::Impl : ModelShape {
  ModelSpec m;
  InferenceSettings s;
  Device& dev;
  Device& copier;
  int n_seq = 0, cache_len = 0;
  std::vector<LayerLayout> layout;
  // Weights: per layer a block on the device tier, or (ring) on the host tier with device slots.
  std::vector<Buffer> blocks, slots;
  Buffer embed, final_norm, head;
  std::vector<Buffer> k_cache, v_cache;  // per layer [n_seq, cache_len, h]
  std::vector<double> log_share;
  std::vector<std::vector<double>> log_layer_share;
  std::optional<CopyEngine> engine;
  // The ring across one generate(): the global index of this pass's first layer, the end of all
  // passes' layers, and the loads issued and not yet waited for.
  int64_t ring_base = 0, ring_end = 0;
  std::map<int64_t, CopyEngine::Ticket> ring_tickets;

  Impl(const ModelSpec& model, const InferenceSettings& settings, Device& d, Device& c)
      : m(model), s(settings), dev(d), copier(c) {}

  Tensor alloc(size_t n, const char* what) {
    return {dev.memory().allocate(Tier::kGPU, n * sizeof(float), what, /*zero=*/false)};
  }

  int prompt_token(int64_t sequence, int position) const {
    const uint64_t x = splitmix64(
        s.seed * 0x9e3779b97f4a7c15ull ^ 0x1f3d5b79a3c5e7f1ull ^
        splitmix64(static_cast<uint64_t>(sequence) << 20 | static_cast<uint64_t>(position)));
    return static_cast<int>(x % static_cast<uint64_t>(vocab));
  }

  void mm(const float* x, const float* w, int rows, int k, int n, float* y) {
    dev.gemm(false, false, rows, n, k, 1.0f, x, k, w, n, 0.0f, y, n);
  }

  // One forward pass over `batch` sequences (cache rows first..first+batch), q_len new tokens each,
  // the context growing to ctx; writes the next token of every sequence (greedy) to `next`.
  void pass(const std::vector<int>& tokens, int first, int batch, int q_len, int ctx,
            const std::vector<int64_t>& sequence_ids, InferencePass& out, std::vector<int>& next,
            InferenceResult& res) {
    const int T = batch * q_len;
    const size_t th = static_cast<size_t>(T) * h;
    ProgramOpCursor op(OpPhase::kForward);
    op.at("embedding");
    Tensor x = alloc(th, "hidden states");
    dev.gather_rows(embed.as<float>(), tokens.data(), T, h, x.p());
    // Ring: layers are numbered across the passes of generate() (g = ring_base + l) and land in
    // slot g % (ahead + 1). Layer g's start loads layer g + ahead into the slot layer g - 1 left
    // (the last layers of a pass load the next pass's first ones: the ring runs on); a pass starts
    // by loading whatever of its first ahead + 1 layers the previous pass has not.
    const int ahead = s.ring ? std::min(s.ring_ahead, layers - 1) : 0;
    const int64_t g0 = ring_base;
    const auto load = [&](int64_t g) {
      if (!s.ring || g >= ring_end || ring_tickets.count(g)) return;
      const size_t l = static_cast<size_t>(g % layers);
      ring_tickets[g] =
          engine->submit(slots[static_cast<size_t>(g) % slots.size()].data(), blocks[l].data(),
                         layout[l].floats * sizeof(float), "param_fetch");
    };
    for (int64_t g = g0; g <= g0 + ahead; ++g) load(g);
    for (int l = 0; l < layers; ++l) {
      const LayerLayout& L = layout[static_cast<size_t>(l)];
      const float* w;
      if (s.ring) {
        op.close();  // a wait for a load is no program op's time (a gap, as the simulator shows)
        const int64_t g = g0 + l;
        if (l > 0) load(g + ahead);
        const double waited = engine->wait(ring_tickets.at(g));
        ring_tickets.erase(g);
        record_stall(waited);
        out.stall_s += waited;
        w = slots[static_cast<size_t>(g) % slots.size()].as<float>();
      } else {
        w = blocks[static_cast<size_t>(l)].as<float>();
      }
      op.at("norm1");
      Tensor a = alloc(th, "norm output");
      dev.rmsnorm(x.p(), w + L.attn_norm, T, h, 1e-5f, a.p());
      op.at("qkv");
      Tensor qkv = alloc(th * 3, "qkv");
      mm(a.p(), w + L.wqkv, T, h, 3 * h, qkv.p());
      op.at("attn_core");
      // This pass's keys and values join the cache at positions ctx - q_len .. ctx - 1.
      float* kc = k_cache[static_cast<size_t>(l)].as<float>();
      float* vc = v_cache[static_cast<size_t>(l)].as<float>();
      for (int b = 0; b < batch; ++b) {
        const float* rows = qkv.p() + static_cast<size_t>(b) * q_len * 3 * h;
        const size_t at = ((static_cast<size_t>(first) + b) * cache_len + (ctx - q_len)) * h;
        const size_t row_bytes = sizeof(float) * h;
        dev.copy_2d(kc + at, row_bytes, rows + h, 3 * row_bytes, row_bytes, q_len);
        dev.copy_2d(vc + at, row_bytes, rows + 2 * h, 3 * row_bytes, row_bytes, q_len);
      }
      Tensor o = alloc(th, "attention output");
      const size_t cache0 = static_cast<size_t>(first) * cache_len * h;
      dev.attention_cached(qkv.p(), 3 * h, kc + cache0, vc + cache0, batch, q_len, ctx, cache_len,
                           heads, head_dim, o.p());
      op.at("attn_out");
      Tensor proj = alloc(th, "attention projection");
      mm(o.p(), w + L.wo, T, h, h, proj.p());
      op.at("residual1");
      dev.add(x.p(), proj.p(), th, x.p());
      op.at("norm2");
      Tensor b2 = alloc(th, "norm output");
      dev.rmsnorm(x.p(), w + L.ffn_norm, T, h, 1e-5f, b2.p());
      Tensor y = alloc(th, "mlp output");
      if (L.moe) {
        op.at("router");
        Tensor logits = alloc(static_cast<size_t>(T) * experts, "router logits");
        mm(b2.p(), w + L.router, T, h, experts, logits.p());
        const std::vector<double>& logs = static_cast<size_t>(l) < log_layer_share.size() &&
                                                  !log_layer_share[static_cast<size_t>(l)].empty()
                                              ? log_layer_share[static_cast<size_t>(l)]
                                              : log_share;
        if (!logs.empty()) {
          // The bias is drawn on the host and added on the device.
          std::vector<float> bias(static_cast<size_t>(T) * experts, 0.0f);
          for (size_t t = 0; t < static_cast<size_t>(T); ++t) {
            const size_t b = t / static_cast<size_t>(q_len), i = t % static_cast<size_t>(q_len);
            const uint64_t position = static_cast<uint64_t>(ctx - q_len) + i;
            const uint64_t key = splitmix64(s.seed ^ 0x6a09e667f3bcc909ull ^
                                            splitmix64(static_cast<uint64_t>(sequence_ids[b])) ^
                                            (position << 24) ^ (static_cast<uint64_t>(l) << 48));
            add_gate_bias(bias.data() + t * experts, experts, logs, key);
          }
          Tensor bd = alloc(bias.size(), "router bias");
          dev.copy(bd.p(), bias.data(), sizeof(float) * bias.size());
          dev.add(logits.p(), bd.p(), bias.size(), logits.p());
        }
        Tensor probs = alloc(static_cast<size_t>(T) * experts, "router probabilities");
        const TokenRouting r = dev.route(logits.p(), T, experts, top_k, top_k > 1, probs.p());
        for (int e = 0; e < experts; ++e)
          res.tokens_per_layer_expert[static_cast<size_t>(l) * experts + e] +=
              r.rows_per_expert[static_cast<size_t>(e)];
        op.at("permute");
        const size_t rows = static_cast<size_t>(T) * top_k;
        Tensor perm = alloc(rows * h, "dispatch buffer");
        dev.permute(b2.p(), r, h, perm.p());
        std::vector<const float*> w1, w2;
        for (int e = 0; e < experts; ++e) {
          w1.push_back(w + L.w1[static_cast<size_t>(e)]);
          w2.push_back(w + L.w2[static_cast<size_t>(e)]);
        }
        op.at("experts_fc1");
        Tensor gu = alloc(rows * 2 * f, "expert gate/up");
        dev.grouped_gemm(perm.p(), h, r.rows_per_expert, w1, false, 2 * f, gu.p());
        op.at("experts_act");
        Tensor act = alloc(rows * f, "expert activation");
        dev.swiglu(gu.p(), static_cast<int>(rows), f, act.p());
        op.at("experts_fc2");
        Tensor ye = alloc(rows * h, "expert output");
        dev.grouped_gemm(act.p(), f, r.rows_per_expert, w2, false, h, ye.p());
        op.at("unpermute");
        dev.unpermute_combine(ye.p(), r, h, y.p());
      } else {
        op.at("fc1");
        Tensor gu = alloc(static_cast<size_t>(T) * 2 * ffn, "ffn gate/up");
        mm(b2.p(), w + L.w1[0], T, h, 2 * ffn, gu.p());
        op.at("act");
        Tensor act = alloc(static_cast<size_t>(T) * ffn, "ffn activation");
        dev.swiglu(gu.p(), T, ffn, act.p());
        op.at("fc2");
        mm(act.p(), w + L.w2[0], T, ffn, h, y.p());
      }
      op.at("residual2");
      dev.add(x.p(), y.p(), th, x.p());
    }
    // The next token needs only each sequence's last position.
    op.at("final_norm");
    Tensor last = alloc(static_cast<size_t>(batch) * h, "last positions");
    std::vector<int> last_rows(static_cast<size_t>(batch));
    for (int b = 0; b < batch; ++b) last_rows[static_cast<size_t>(b)] = b * q_len + q_len - 1;
    dev.gather_rows(x.p(), last_rows.data(), batch, h, last.p());
    Tensor xf = alloc(static_cast<size_t>(batch) * h, "final norm");
    dev.rmsnorm(last.p(), final_norm.as<float>(), batch, h, 1e-5f, xf.p());
    op.at("lm_head");
    Tensor logits = alloc(static_cast<size_t>(batch) * vocab, "logits");
    mm(xf.p(), head.as<float>(), batch, h, vocab, logits.p());
    op.at("sample");
    std::vector<float> host_logits(static_cast<size_t>(batch) * vocab);
    dev.copy(host_logits.data(), logits.p(), sizeof(float) * host_logits.size());
    next.resize(static_cast<size_t>(batch));
    for (int b = 0; b < batch; ++b) {
      const float* row = host_logits.data() + static_cast<size_t>(b) * vocab;
      next[static_cast<size_t>(b)] = static_cast<int>(std::max_element(row, row + vocab) - row);
    }
    if (s.keep_logits) res.logits.insert(res.logits.end(), host_logits.begin(), host_logits.end());
  }
};

MoeInference::~MoeInference() = default;

int64_t MoeInference::weight_bytes() const {
  const Impl& I = *impl_;
  int64_t n = static_cast<int64_t>(I.embed.bytes() + I.final_norm.bytes() + I.head.bytes());
  for (const Buffer& b : I.blocks) n += static_cast<int64_t>(b.bytes());
  return n;
}

int64_t MoeInference::ring_slot_bytes() const {
  int64_t n = 0;
  for (const Buffer& b : impl_->slots) n += static_cast<int64_t>(b.bytes());
  return n;
}

std::unique_ptr<MoeInference> MoeInference::create(const ModelSpec& m, const InferenceSettings& s,
                                                   Device& device, Device& copier) {
  std::vector<ConfigIssue> issues = inference_unsupported(m, Plan{});
  if (s.prefill_batch < 1) issues.push_back({"workload.inference.prefill_batch", "must be >= 1"});
  if (s.decode_batch < 1) issues.push_back({"workload.inference.decode_batch", "must be >= 1"});
  if (s.prompt_len < 1) issues.push_back({"workload.inference.prompt_len", "must be >= 1"});
  if (s.decode_tokens < 0) issues.push_back({"workload.inference.decode_tokens", "must be >= 0"});
  if (s.ring_ahead < 0) issues.push_back({"plan.ring_sections", "layers ahead must be >= 0"});
  if (!s.prompt_tokens.empty()) {
    const int64_t want = std::max(s.prefill_batch, s.decode_batch) * s.prompt_len;
    if (static_cast<int64_t>(s.prompt_tokens.size()) != want)
      issues.push_back({"prompts", "has " + std::to_string(s.prompt_tokens.size()) +
                                       " tokens, not " + std::to_string(want)});
    for (int tok : s.prompt_tokens)
      if (tok < 0 || tok >= m.vocab_size) {
        issues.push_back(
            {"prompts", "token " + std::to_string(tok) + " is outside the vocabulary"});
        break;
      }
  }
  if (!issues.empty()) throw ConfigError(std::move(issues));
  std::unique_ptr<MoeInference> t(new MoeInference());
  t->impl_ = std::make_unique<Impl>(m, s, device, copier);
  Impl& I = *t->impl_;
  static_cast<ModelShape&>(I) = model_shape(m);
  if (m.moe) {
    for (double x : s.routing_share) I.log_share.push_back(std::log(std::max(x, 1e-30)));
    if (!s.routing_share.empty() && static_cast<int>(s.routing_share.size()) != I.experts)
      throw ConfigError("workload.routing", "has " + std::to_string(s.routing_share.size()) +
                                                " expert shares for " + std::to_string(I.experts) +
                                                " experts");
    if (static_cast<int64_t>(s.routing_layer_share.size()) > m.num_layers)
      throw ConfigError("workload.routing.per_layer",
                        "has shares for " + std::to_string(s.routing_layer_share.size()) +
                            " layers; the model has " + std::to_string(m.num_layers));
    for (const auto& shares : s.routing_layer_share) {
      if (!shares.empty() && static_cast<int>(shares.size()) != I.experts)
        throw ConfigError("workload.routing.per_layer",
                          "a layer has " + std::to_string(shares.size()) + " expert shares for " +
                              std::to_string(I.experts) + " experts");
      auto& logs = I.log_layer_share.emplace_back();
      for (double x : shares) logs.push_back(std::log(std::max(x, 1e-30)));
    }
  }
  I.n_seq = static_cast<int>(std::max(s.prefill_batch, s.decode_batch));
  I.cache_len = static_cast<int>(s.prompt_len + s.decode_tokens);

  // Layouts, then the weights: initialised by the trainer's names, so this is the same model.
  const size_t h = static_cast<size_t>(I.h);
  struct Named {
    std::string name;
    size_t offset, size;
  };
  std::vector<std::vector<Named>> names(static_cast<size_t>(I.layers));
  size_t largest = 0;
  for (int l = 0; l < I.layers; ++l) {
    LayerLayout& L = I.layout.emplace_back();
    auto& nm = names[static_cast<size_t>(l)];
    const auto place = [&](const std::string& name, size_t n) {
      nm.push_back({"layer" + std::to_string(l) + "." + name, L.floats, n});
      L.floats += n;
      return L.floats - n;
    };
    L.attn_norm = place("attn_norm", h);
    L.wqkv = place("wqkv", h * 3 * h);
    L.wo = place("wo", h * h);
    L.ffn_norm = place("ffn_norm", h);
    L.moe = m.is_moe_layer(l);
    if (L.moe) {
      L.router = place("router", h * static_cast<size_t>(I.experts));
      for (int e = 0; e < I.experts; ++e) {
        const std::string ex = "expert" + std::to_string(e) + ".";
        L.w1.push_back(place(ex + "w1", h * 2 * static_cast<size_t>(I.f)));
        L.w2.push_back(place(ex + "w2", static_cast<size_t>(I.f) * h));
      }
    } else {
      L.w1.push_back(place("w1", h * 2 * static_cast<size_t>(I.ffn)));
      L.w2.push_back(place("w2", static_cast<size_t>(I.ffn) * h));
    }
    largest = std::max(largest, L.floats);
  }
  // Initialised on the host, copied to wherever the weights live.
  std::vector<float> init;
  const auto fill = [&](float* p, const std::string& name, size_t n) {
    init.resize(n);
    init_values(s.seed, name, {}, n, s.init_std, init.data());
    device.copy(p, init.data(), n * sizeof(float));
  };
  MemoryPools& mem = device.memory();
  const size_t vh = static_cast<size_t>(I.vocab) * h;
  I.embed = mem.allocate(Tier::kGPU, vh * sizeof(float), "embedding", false);
  fill(I.embed.as<float>(), "embed", vh);
  I.final_norm = mem.allocate(Tier::kGPU, h * sizeof(float), "final norm", false);
  fill(I.final_norm.as<float>(), "final_norm", h);
  I.head = mem.allocate(Tier::kGPU, vh * sizeof(float), "LM head", false);
  fill(I.head.as<float>(), "head", vh);
  const Tier weights = s.ring ? Tier::kCPU : Tier::kGPU;
  for (int l = 0; l < I.layers; ++l) {
    const LayerLayout& L = I.layout[static_cast<size_t>(l)];
    Buffer& b = I.blocks.emplace_back(mem.allocate(
        weights, L.floats * sizeof(float), "layer " + std::to_string(l) + " weights", false));
    for (const Named& n : names[static_cast<size_t>(l)])
      fill(b.as<float>() + n.offset, n.name, n.size);
  }
  if (s.ring) {
    const int n_slots = std::min(s.ring_ahead, I.layers - 1) + 1;
    for (int i = 0; i < n_slots; ++i)
      I.slots.push_back(mem.allocate(Tier::kGPU, largest * sizeof(float),
                                     "ring slot " + std::to_string(i), false));
  }
  const size_t cache = static_cast<size_t>(I.n_seq) * I.cache_len * h;
  for (int l = 0; l < I.layers; ++l) {
    I.k_cache.push_back(mem.allocate(Tier::kGPU, cache * sizeof(float),
                                     "layer " + std::to_string(l) + " key cache", false));
    I.v_cache.push_back(mem.allocate(Tier::kGPU, cache * sizeof(float),
                                     "layer " + std::to_string(l) + " value cache", false));
  }
  return t;
}

InferenceResult MoeInference::generate(OpTimes* prefill_ops, OpTimes* decode_ops) {
  Impl& I = *impl_;
  const InferenceSettings& s = I.s;
  InferenceResult res;
  res.tokens_per_layer_expert.assign(static_cast<size_t>(I.layers) * I.experts, 0);
  if (s.ring) I.engine.emplace(I.copier);
  const int64_t prefill_passes = (I.n_seq + s.prefill_batch - 1) / s.prefill_batch;
  I.ring_base = 0;
  I.ring_end = (prefill_passes + s.decode_tokens) * I.layers;
  I.ring_tickets.clear();
  const auto run_pass = [&](bool decode, const std::vector<int>& tokens, int first, int batch,
                            int q_len, int ctx, const std::vector<int64_t>& ids,
                            std::vector<int>& next) {
    // A prefill pass with fewer prompts than prefill_batch (the last of an uneven split) is not
    // the pass the program describes: it stays out of the program ops.
    OpTimes* ops = decode ? decode_ops : batch == s.prefill_batch ? prefill_ops : nullptr;
    InferencePass p;
    p.decode = decode;
    p.sequences = batch;
    const auto t0 = std::chrono::steady_clock::now();
    std::optional<ProgramOpSink> sink;
    if (ops) sink.emplace(*ops);
    I.pass(tokens, first, batch, q_len, ctx, ids, p, next, res);
    I.ring_base += I.layers;
    p.wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (I.engine) {
      // The loads finished so far (the next pass's first layers may still be on their way: they
      // count where they finish).
      for (const CopyEngine::Span& sp : I.engine->take_spans()) {
        p.copy_s += sp.seconds();
        p.copy_bytes += static_cast<int64_t>(sp.bytes);
        record_copy_op(sp.label, OpPhase::kForward, sp.start, sp.end);
      }
    }
    res.passes.push_back(p);
  };

  // Prefill every prompt, prefill_batch at a time.
  std::vector<int> next_token(static_cast<size_t>(I.n_seq));
  const int P = static_cast<int>(s.prompt_len);
  for (int first = 0; first < I.n_seq; first += static_cast<int>(s.prefill_batch)) {
    const int batch = std::min(static_cast<int>(s.prefill_batch), I.n_seq - first);
    std::vector<int> tokens;
    std::vector<int64_t> ids;
    for (int b = 0; b < batch; ++b) {
      ids.push_back(s.first_sequence + first + b);
      for (int i = 0; i < P; ++i)
        tokens.push_back(s.prompt_tokens.empty()
                             ? I.prompt_token(ids.back(), i)
                             : s.prompt_tokens[static_cast<size_t>(first + b) * P + i]);
    }
    std::vector<int> next;
    run_pass(false, tokens, first, batch, P, P, ids, next);
    std::copy(next.begin(), next.end(), next_token.begin() + first);
  }
  // Decode: each step feeds every sequence its last token and appends one position.
  const int B = static_cast<int>(s.decode_batch);
  std::vector<int64_t> ids;
  for (int b = 0; b < B; ++b) ids.push_back(s.first_sequence + b);
  std::vector<int> tokens(next_token.begin(), next_token.begin() + B);
  for (int64_t t = 0; t < s.decode_tokens; ++t) {
    std::vector<int> next;
    run_pass(true, tokens, 0, B, 1, P + static_cast<int>(t) + 1, ids, next);
    res.generated.insert(res.generated.end(), next.begin(), next.end());
    tokens = std::move(next);
  }
  I.engine.reset();
  return res;
}

}  // namespace switchyard
