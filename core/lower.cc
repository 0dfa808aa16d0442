// lower(): (model, cluster, plan, workload) -> StepProgram. See step_program.h for the contract.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"
#include "core/expert_load.h"
#include "core/step_program.h"

namespace switchyard {
namespace {

// Everything the per-layer op lists need, computed once.
// Which pass a chunk describes: a training step, or an inference prefill or decode step.
enum class Pass { kTrain, kPrefill, kDecode };

struct Dims {
  Pass pass = Pass::kTrain;
  double e = 2;      // bytes per activation element
  bool fp8 = false;  // FP8 GEMMs (and FP8 token dispatch)
  int64_t h = 0;
  int64_t mbs = 1;
  int64_t seq = 0;    // keys each query attends to (training, prefill: the sequence; decode: cache)
  int64_t q_len = 0;  // queries per sequence on one rank (seq / cp; decode: 1)
  int64_t head_rows = 0;  // tokens through the LM head (prefill: the last of each prompt)
  bool causal = true;
  int64_t t = 0;   // tokens per micro-batch on one CP rank (what a TP rank's GEMMs see)
  int64_t ts = 0;  // tokens a rank holds outside TP regions (t / tp with SP)
  int tp = 1, cp = 1, ep = 1, etp = 1;
  bool sp = false;
  bool ppmoe = false;
  double grad_bytes = 2;             // per parameter
  double param_bytes = 2;            // per parameter
  std::vector<int64_t> expert_rows;  // rows per local expert copy on the most loaded EP rank
  double dispatch_rows = 0;          // rows this rank sends in the dispatch all-to-all
  int replicated_copies = 0;         // copies on the most loaded rank of experts that have replicas
  // Elastic replicas pile copies on the least loaded ranks: the rank holding the most copies (not
  // the one with the most rows) decides the update after the gradients' collective and the
  // replicas' all-reduce, which wait for every rank.
  int most_copies = 0;
  int most_replicated_copies = 0;
  // Per model layer, when the workload routes each MoE layer its own way: the rows per local
  // expert copy on that layer's most loaded rank (empty: expert_rows).
  std::vector<std::vector<int64_t>> layer_expert_rows;
  const std::vector<int64_t>& rows_of(int layer) const {
    return layer >= 0 && static_cast<size_t>(layer) < layer_expert_rows.size() &&
                   !layer_expert_rows[static_cast<size_t>(layer)].empty()
               ? layer_expert_rows[static_cast<size_t>(layer)]
               : expert_rows;
  }
  // Rows all local expert copies of the most loaded rank process (in `layer`).
  double expert_rows_total(int layer = -1) const {
    double rows = 0;
    for (int64_t r : rows_of(layer)) rows += static_cast<double>(r);
    return rows;
  }
};

class Builder {
 public:
  Builder(const ModelSpec& m, const Plan& p, const Dims& d, std::vector<OpTemplate>& out)
      : m_(m), p_(p), d_(d), out_(out) {}

  OpTemplate& add(OpKind kind, std::string_view name, int layer,
                  StreamKind stream = StreamKind::kCompute) {
    OpTemplate op;
    op.kind = kind;
    op.name = name;
    op.layer = layer;
    op.stream = stream;
    out_.push_back(std::move(op));
    return out_.back();
  }
  // FP8 GEMMs take FP8 inputs: Transformer Engine casts each activation input (amax + cast: read
  // bf16, write fp8) before the GEMM; the backward mirrors it for the incoming gradient.
  void fp8_cast(int layer, double rows, double k) {
    if (d_.fp8) elementwise("fp8_cast", layer, 3.0 * rows * k, static_cast<int64_t>(rows));
  }
  OpTemplate& gemm(std::string_view name, int layer, int64_t rows, int64_t n, int64_t k) {
    fp8_cast(layer, static_cast<double>(rows), static_cast<double>(k));
    OpTemplate& op = add(OpKind::kGemm, name, layer);
    op.gemm = {rows, n, k, 1};
    op.flops = 2.0 * static_cast<double>(rows) * static_cast<double>(n) * static_cast<double>(k);
    op.tokens = rows;
    return op;
  }
  OpTemplate& grouped(std::string_view name, int layer, int64_t n, int64_t k) {
    fp8_cast(layer, d_.expert_rows_total(layer), static_cast<double>(k));
    OpTemplate& op = add(OpKind::kGroupedGemm, name, layer);
    op.group_rows = d_.rows_of(layer);
    op.gemm = {0, n, k, 1};
    const double rows = d_.expert_rows_total(layer);
    op.flops = 2.0 * rows * static_cast<double>(n) * static_cast<double>(k);
    op.tokens = static_cast<int64_t>(rows);
    return op;
  }
  OpTemplate& elementwise(std::string_view name, int layer, double bytes, int64_t tokens) {
    OpTemplate& op = add(OpKind::kElementwise, name, layer);
    op.bytes = bytes;
    op.tokens = tokens;
    return op;
  }
  OpTemplate& comm(Collective c, CommGroup g, std::string_view name, int layer, double bytes) {
    const StreamKind stream = g == CommGroup::kTp || g == CommGroup::kExpertTp ? StreamKind::kTpComm
                              : g == CommGroup::kCp                            ? StreamKind::kCpComm
                              : g == CommGroup::kDp || g == CommGroup::kExpertDp
                                  ? StreamKind::kDpComm
                                  : StreamKind::kEpComm;
    OpTemplate& op = add(OpKind::kCollective, name, layer, stream);
    op.collective = c;
    op.group = g;
    op.bytes = bytes;
    return op;
  }

  // TP collective entering a column-parallel region (SP: all-gather of the sequence shards).
  void tp_enter(int layer) {
    if (d_.tp > 1 && d_.sp)
      comm(Collective::kAllGather, CommGroup::kTp, "tp_all_gather", layer, tok_bytes(d_.t));
  }
  // TP collective leaving a row-parallel region: reduce-scatter (SP) or all-reduce.
  void tp_exit(int layer) {
    if (d_.tp <= 1) return;
    if (d_.sp)
      comm(Collective::kReduceScatter, CommGroup::kTp, "tp_reduce_scatter", layer, tok_bytes(d_.t));
    else
      comm(Collective::kAllReduce, CommGroup::kTp, "tp_all_reduce", layer, tok_bytes(d_.t));
  }
  double tok_bytes(double tokens) const { return tokens * static_cast<double>(d_.h) * d_.e; }

  void attention(int layer) {
    const ModelSpec& m = m_;
    const int64_t h = d_.h, t = d_.t;
    elementwise("norm1", layer, 2 * tok_bytes(d_.ts), d_.ts);
    tp_enter(layer);
    const int64_t heads = m.num_attention_heads / d_.tp;
    int64_t qk_dim = m.head_dim, v_dim = m.head_dim,
            kv_heads = std::max<int64_t>(m.num_kv_heads / d_.tp, 1);
    if (m.attention == AttentionKind::kMLA) {
      const MlaSpec& a = m.mla;
      qk_dim = a.qk_nope_head_dim + a.qk_rope_head_dim;
      v_dim = a.v_head_dim;
      kv_heads = heads;
      if (a.q_lora_rank > 0) {
        gemm("q_down", layer, t, a.q_lora_rank, h);
        gemm("q_up", layer, t, heads * qk_dim, a.q_lora_rank);
      } else {
        gemm("q_proj", layer, t, heads * qk_dim, h);
      }
      gemm("kv_down", layer, t, a.kv_lora_rank + a.qk_rope_head_dim, h);
      gemm("kv_up", layer, t, heads * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank);
    } else {
      gemm("qkv", layer, t, (heads + 2 * kv_heads) * m.head_dim, h);
    }
    if (d_.cp > 1) {
      // Ring attention: every CP rank sees the K and V of the whole sequence.
      const double kv_bytes =
          static_cast<double>(t) * static_cast<double>(kv_heads * (qk_dim + v_dim)) * d_.e;
      comm(Collective::kAllGather, CommGroup::kCp, "cp_kv_all_gather", layer, kv_bytes * d_.cp);
    }
    OpTemplate& core = add(OpKind::kAttention, "attn_core", layer);
    core.attention = {d_.mbs, d_.q_len, d_.seq, heads, kv_heads, qk_dim, v_dim, d_.causal};
    core.tokens = t;
    core.flops = 2.0 * static_cast<double>(d_.mbs) * static_cast<double>(heads) *
                 static_cast<double>(d_.q_len) * static_cast<double>(d_.seq) *
                 static_cast<double>(qk_dim + v_dim) * (d_.causal ? 0.5 : 1.0);
    gemm("attn_out", layer, t, h, heads * v_dim);
    tp_exit(layer);
    elementwise("residual1", layer, 3 * tok_bytes(d_.ts), d_.ts);
  }

  void dense_mlp(int layer) {
    const int64_t f = m_.ffn_hidden_size / d_.tp;
    const int mats = m_.ffn_matrices();
    elementwise("norm2", layer, 2 * tok_bytes(d_.ts), d_.ts);
    tp_enter(layer);
    gemm("fc1", layer, d_.t, (mats - 1) * f, d_.h);
    elementwise("act", layer, static_cast<double>(d_.t * f * mats) * d_.e, d_.t);
    gemm("fc2", layer, d_.t, d_.h, f);
    tp_exit(layer);
    elementwise("residual2", layer, 3 * tok_bytes(d_.ts), d_.ts);
  }

  void shared_experts(int layer, int64_t tokens) {
    if (!m_.moe || m_.moe->num_shared_experts == 0) return;
    const int64_t fs = m_.moe->num_shared_experts * m_.moe->shared_expert_ffn_hidden_size / d_.tp;
    const int mats = m_.ffn_matrices();
    gemm("shared_fc1", layer, tokens, (mats - 1) * fs, d_.h);
    elementwise("shared_act", layer, static_cast<double>(tokens * fs * mats) * d_.e, tokens);
    gemm("shared_fc2", layer, tokens, d_.h, fs);
  }

  void experts(int layer) {
    const int64_t fe = m_.moe->expert_ffn_hidden_size / d_.etp;
    const int mats = m_.ffn_matrices();
    grouped("experts_fc1", layer, (mats - 1) * fe, d_.h);
    const double rows = d_.expert_rows_total(layer);
    elementwise("experts_act", layer, rows * static_cast<double>(fe * mats) * d_.e,
                static_cast<int64_t>(rows));
    grouped("experts_fc2", layer, d_.h, fe);
  }

  void moe_mlp(int layer) {
    const MoeSpec& moe = *m_.moe;
    elementwise("norm2", layer, 2 * tok_bytes(d_.ts), d_.ts);
    if (d_.ppmoe) {
      // Pipeline MoE: every TP rank holds all tokens; the experts of this rank take their rows by
      // index (no communication) and one all-reduce in the TP group combines the outputs.
      OpTemplate& gate = add(OpKind::kGateTopK, "router", layer);
      gate.gemm = {d_.t, moe.num_experts, d_.h, 1};
      gate.tokens = d_.t;
      const double rows = d_.expert_rows_total(layer);
      OpTemplate& slice = add(OpKind::kPermute, "index_slice", layer);
      slice.bytes = 2 * tok_bytes(rows);
      slice.tokens = static_cast<int64_t>(rows);
      experts(layer);
      OpTemplate& gather = add(OpKind::kPermute, "index_combine", layer);
      gather.bytes = 2 * tok_bytes(rows);
      gather.tokens = static_cast<int64_t>(rows);
      shared_experts(layer, d_.t);
      if (d_.tp > 1)
        comm(Collective::kAllReduce, CommGroup::kTp, "combine_all_reduce", layer, tok_bytes(d_.t));
      elementwise("residual2", layer, 3 * tok_bytes(d_.ts), d_.ts);
      return;
    }
    OpTemplate& gate = add(OpKind::kGateTopK, "router", layer);
    gate.gemm = {d_.ts, moe.num_experts, d_.h, 1};
    gate.tokens = d_.ts;
    // With one EP rank the permute is the whole dispatch (no exchange; Megatron-Core permutes
    // locally), and it holds the dispatch buffer itself.
    const bool local = p_.ep == 1;
    OpTemplate& perm = add(OpKind::kPermute, "permute", layer);
    perm.bytes = 2 * tok_bytes(d_.dispatch_rows);
    perm.tokens = static_cast<int64_t>(d_.dispatch_rows);
    if (local)
      perm.allocates = bit(TensorClass::kDispatchBuffer);
    else
      exchange(layer, "dispatch", bit(TensorClass::kDispatchBuffer), 0);
    if (d_.etp > 1)
      comm(Collective::kAllGather, CommGroup::kExpertTp, "etp_all_gather", layer,
           rows_bytes(layer) * d_.etp);
    experts(layer);
    if (d_.etp > 1)
      comm(Collective::kReduceScatter, CommGroup::kExpertTp, "etp_reduce_scatter", layer,
           rows_bytes(layer) * d_.etp);
    if (!local) exchange(layer, "combine", 0, bit(TensorClass::kDispatchBuffer));
    OpTemplate& unperm = add(OpKind::kPermute, "unpermute", layer);
    unperm.bytes = 2 * tok_bytes(d_.dispatch_rows);
    unperm.tokens = static_cast<int64_t>(d_.dispatch_rows);
    if (local) unperm.frees = bit(TensorClass::kDispatchBuffer);
    if (moe.num_shared_experts > 0) {
      tp_enter(layer);
      shared_experts(layer, d_.t);
      tp_exit(layer);
    }
    elementwise("residual2", layer, 3 * tok_bytes(d_.ts), d_.ts);
  }

  // Rows received by the most loaded rank, as bytes.
  double rows_bytes(int layer) const {
    const double rows = d_.expert_rows_total(layer);
    return tok_bytes(rows) / d_.etp;
  }

  // The dispatch or combine exchange: one flat all-to-all, or SE-MoE's hierarchical exchange
  // (transform, intra-node all-to-all, inter-node all-to-all of the aggregated buffers, transform).
  // The most loaded rank sends its own tokens' rows and receives its experts' rows (the reverse in
  // the combine): its exchange moves the larger of the two, and the others' waits on it.
  void exchange(int layer, std::string_view what, TensorMask alloc, TensorMask release) {
    const bool dispatch = what == "dispatch";
    const double rows = std::max(d_.dispatch_rows, rows_bytes(layer) / tok_bytes(1.0));
    // FP8 training dispatches FP8 tokens (DeepSeek-V3 section 3.3); the combine returns bf16.
    const double bytes = tok_bytes(rows) * (dispatch && d_.fp8 ? 0.5 : 1.0);
    const auto rows_moved = static_cast<int64_t>(std::llround(rows));
    if (p_.dispatch == Dispatch::kHierarchicalAllToAll) {
      OpTemplate& a =
          elementwise(dispatch ? "dispatch_transform" : "combine_transform", layer, 2 * bytes, 0);
      a.allocates = alloc;
      comm(Collective::kAllToAll, CommGroup::kEpIntra,
           dispatch ? "dispatch_intra" : "combine_intra", layer, bytes)
          .tokens = rows_moved;
      comm(Collective::kAllToAll, CommGroup::kEpInter,
           dispatch ? "dispatch_inter" : "combine_inter", layer, bytes)
          .tokens = rows_moved;
      OpTemplate& b =
          elementwise(dispatch ? "dispatch_transform2" : "combine_transform2", layer, 2 * bytes, 0);
      b.frees = release;
      return;
    }
    OpTemplate& op = comm(Collective::kAllToAll, CommGroup::kEp, what, layer, bytes);
    op.tokens = rows_moved;
    op.allocates = alloc;
    op.frees = release;
  }

 private:
  const ModelSpec& m_;
  const Plan& p_;
  const Dims& d_;
  std::vector<OpTemplate>& out_;
};

// Names of the swapped collectives in the backward.
std::string_view backward_name(std::string_view forward) {
  static constexpr std::pair<std::string_view, std::string_view> kSwaps[] = {
      {"tp_all_gather", "tp_reduce_scatter"},
      {"tp_reduce_scatter", "tp_all_gather"},
      {"etp_all_gather", "etp_reduce_scatter"},
      {"etp_reduce_scatter", "etp_all_gather"},
      {"embedding_reduce_scatter", "embedding_all_gather"},
      {"cp_kv_all_gather", "cp_kv_reduce_scatter"}};
  for (const auto& [f, b] : kSwaps)
    if (f == forward) return b;
  return forward;
}

// The backward of one forward op list: reverse order; a GEMM becomes its data-gradient and
// weight-gradient GEMMs; all-gather and reduce-scatter swap (ZeRO-3 parameter gathers stay: the
// backward needs the parameters again); all-to-all and all-reduce stay. What the forward allocated
// dies in the backward, and what the forward released the backward needs again.
void append_backward(const std::vector<OpTemplate>& fwd, std::vector<OpTemplate>& out) {
  out.reserve(out.size() + 2 * fwd.size());
  // ZeRO-3 gathers a layer's parameters again before its backward (the forward's copy is gone);
  // the embedding's backward reads no weights and the head's follows its forward, so theirs are
  // not gathered again.
  const auto is_gather = [](const OpTemplate& op) {
    return op.kind == OpKind::kCollective && op.name.substr(0, 5) == "zero3";
  };
  for (const OpTemplate& op : fwd)
    if (is_gather(op) && op.layer >= 0) {
      out.push_back(op);
      out.back().phase = Phase::kBackward;
    }
  for (auto it = fwd.rbegin(); it != fwd.rend(); ++it) {
    if (is_gather(*it)) continue;
    OpTemplate op = *it;
    op.phase = Phase::kBackward;
    op.allocates = it->frees;
    op.frees = it->allocates;
    switch (op.kind) {
      case OpKind::kGemm: {
        OpTemplate dgrad = op;
        dgrad.gemm = {it->gemm.m, it->gemm.k, it->gemm.n, 1};
        dgrad.frees = 0;
        out.push_back(dgrad);
        op.allocates = 0;
        op.gemm = {it->gemm.k, it->gemm.n, it->gemm.m, 1};  // weight gradient: X^T dY
        break;
      }
      case OpKind::kGroupedGemm: {
        OpTemplate dgrad = op;
        dgrad.gemm = {0, it->gemm.k, it->gemm.n, 1};
        dgrad.frees = 0;
        out.push_back(dgrad);
        op.allocates = 0;
        break;  // the weight gradient has the same FLOPs and the same thin dimension
      }
      case OpKind::kElementwise:
      case OpKind::kPermute:
        op.bytes *= 1.5;  // read the gradient and the saved input, write the gradient
        break;
      case OpKind::kAttention:
        op.flops *= 2.5;  // recomputed scores and five GEMMs against the forward's two
        break;
      case OpKind::kCollective:
        // Megatron's vocab-parallel embedding sums its partial rows with an all-reduce whose
        // backward is the identity, and the vocab-parallel loss's reductions have no backward
        // communication (each rank's logits get their gradient locally).
        if ((it->name == "embedding_all_reduce" || it->name == "loss_all_reduce") &&
            !it->allocates && !it->frees)
          continue;
        if (it->collective == Collective::kAllGather)
          op.collective = Collective::kReduceScatter;
        else if (it->collective == Collective::kReduceScatter)
          op.collective = Collective::kAllGather;
        op.name = backward_name(it->name);
        break;
      default:
        break;
    }
    out.push_back(std::move(op));
  }
}

Dims make_dims(const ModelSpec& m, const Plan& p, const Workload& w, Pass pass = Pass::kTrain) {
  Dims d;
  d.pass = pass;
  d.e = w.precision == Precision::kFP32 ? 4.0 : 2.0;
  d.fp8 = w.precision == Precision::kFP8;
  d.param_bytes = w.precision == Precision::kFP32 ? 4.0 : 2.0;
  d.grad_bytes = d.param_bytes;
  d.h = m.hidden_size;
  d.mbs = p.micro_batch_size;
  d.seq = w.effective_seq_len(m);
  if (pass != Pass::kTrain && w.inference) {
    // Inference: each DP replica serves its share of the batch; a decode step attends to the
    // prompt and, on average, half of the generated tokens.
    const InferenceSpec& inf = *w.inference;
    const bool prefill = pass == Pass::kPrefill;
    d.mbs = std::max<int64_t>((prefill ? inf.prefill_batch : inf.decode_batch) / p.dp, 1);
    d.seq = prefill ? inf.prompt_len : inf.prompt_len + inf.decode_tokens / 2;
  }
  d.tp = p.tp;
  d.cp = p.cp;
  d.ep = p.ep;
  d.etp = p.expert_tp;
  d.sp = p.sequence_parallel && p.tp > 1;
  d.ppmoe = p.dispatch == Dispatch::kPPMoEIndexSlice;
  d.q_len = pass == Pass::kDecode ? 1 : d.seq / d.cp;
  d.causal = pass != Pass::kDecode;
  d.t = d.mbs * d.q_len;
  d.ts = d.sp ? std::max<int64_t>(d.t / d.tp, 1) : d.t;
  d.head_rows = pass == Pass::kPrefill ? d.mbs : d.t;
  if (m.moe) {
    const auto ranks = expert_rank_loads(m, p, w);
    const RankExperts& hot = ranks[static_cast<size_t>(most_loaded_rank(ranks))];
    const double k = static_cast<double>(m.moe->top_k);
    const double experts = static_cast<double>(m.moe->num_experts);
    // Rows routed in the EP group per micro-batch: every EP rank dispatches its tokens' top-k
    // (PPMoE: the TP group shares one copy of the tokens).
    const double routed =
        d.ppmoe ? static_cast<double>(d.t) * k : static_cast<double>(d.ts) * k * p.ep;
    for (const ExpertCopy& copy : hot.copies) {
      // Capacity: buffers and expert GEMMs run padded to capacity (GShard, DeepSpeed-MoE).
      const double rows =
          p.capacity_factor ? *p.capacity_factor * routed / experts : copy.share * routed;
      d.expert_rows.push_back(static_cast<int64_t>(std::llround(rows)) * (d.etp > 1 ? d.etp : 1));
    }
    d.dispatch_rows =
        static_cast<double>(d.ts) * k * (p.capacity_factor ? *p.capacity_factor : 1.0);
    // Elastic replicas: how many copies each expert has, and how many of the hot rank's copies
    // belong to replicated experts (their gradients are all-reduced among the copies).
    std::vector<int> copies(static_cast<size_t>(m.moe->num_experts), 0);
    for (const RankExperts& r : ranks)
      for (const ExpertCopy& c : r.copies) ++copies[static_cast<size_t>(c.expert)];
    for (const ExpertCopy& c : hot.copies)
      d.replicated_copies += copies[static_cast<size_t>(c.expert)] > 1 ? 1 : 0;
    for (const RankExperts& r : ranks) {
      int replicated = 0;
      for (const ExpertCopy& c : r.copies)
        replicated += copies[static_cast<size_t>(c.expert)] > 1 ? 1 : 0;
      d.most_copies = std::max(d.most_copies, static_cast<int>(r.copies.size()));
      d.most_replicated_copies = std::max(d.most_replicated_copies, replicated);
    }
    // A routing measured per layer: each MoE layer waits for its own most loaded rank.
    if (w.routing.kind == RoutingKind::kHistogram && !w.routing.per_layer.empty() &&
        !p.capacity_factor) {
      d.layer_expert_rows.assign(static_cast<size_t>(m.num_layers), {});
      int moe_layer = 0;
      for (int64_t l = 0; l < m.num_layers; ++l) {
        if (!m.is_moe_layer(l)) continue;
        const auto layer_ranks = expert_rank_loads(m, p, w, moe_layer++);
        const RankExperts& layer_hot =
            layer_ranks[static_cast<size_t>(most_loaded_rank(layer_ranks))];
        auto& rows = d.layer_expert_rows[static_cast<size_t>(l)];
        for (const ExpertCopy& copy : layer_hot.copies)
          rows.push_back(static_cast<int64_t>(std::llround(copy.share * routed)) *
                         (d.etp > 1 ? d.etp : 1));
      }
    }
  }
  return d;
}

// Parameters of one layer on one GPU: dense (split by tp) and expert (this rank's copies).
struct LayerParams {
  double dense = 0;
  double expert = 0;
};

LayerParams layer_params(const ModelSpec& m, const Plan& p, const Dims& d, int layer) {
  LayerParams lp;
  lp.dense = static_cast<double>(attention_params_per_layer(m)) / p.tp +
             static_cast<double>(norm_params_per_layer(m));
  if (m.is_moe_layer(layer)) {
    lp.dense += static_cast<double>(m.moe->num_shared_experts * shared_expert_params(m)) / p.tp +
                static_cast<double>(m.num_gates() * m.hidden_size * m.moe->num_experts);
    lp.expert = static_cast<double>(d.expert_rows.size()) * static_cast<double>(expert_params(m)) /
                p.expert_tp;
  } else {
    lp.dense += static_cast<double>(dense_ffn_params(m)) / p.tp;
  }
  return lp;
}

// A collective on the data-parallel stream (gradient buckets, parameter gathers).
OpTemplate dp_collective(Collective c, CommGroup g, std::string_view name, Phase phase,
                         double bytes) {
  OpTemplate op;
  op.kind = OpKind::kCollective;
  op.stream = StreamKind::kDpComm;
  op.phase = phase;
  op.name = name;
  op.collective = c;
  op.group = g;
  op.bytes = bytes;
  return op;
}

// A gradient collective issued in the backward of the last micro-batch only, overlapping the rest
// of the backward (nothing waits for it until the step's end).
OpTemplate grad_sync(Collective c, CommGroup g, std::string_view name, double bytes, int layer) {
  OpTemplate op = dp_collective(c, g, name, Phase::kBackward, bytes);
  op.layer = layer;
  op.async = true;
  op.last_micro_batch = true;
  return op;
}

// Gradient reduction for the layers of a chunk, fused into buckets of about grad_bucket_bytes
// (0: one collective per layer), issued as each layer's weight gradients finish, overlapping the
// rest of the backward: in the last micro-batch where every rank accumulates whole gradients
// (ZeRO 0-1, Megatron's distributed optimizer); in every micro-batch under ZeRO 2-3, whose ranks
// keep only their shard of the gradients (DeepSpeed reduce-scatters at each micro-step).
class BucketFiller {
 public:
  BucketFiller(const Plan& p, const Dims& d, std::vector<OpTemplate>& out)
      : p_(p), d_(d), out_(out) {}
  void add(const LayerParams& lp, int layer) {
    dense_ += lp.dense * d_.grad_bytes;
    expert_ += lp.expert * d_.grad_bytes;
    if (dense_ + expert_ >= static_cast<double>(p_.grad_bucket_bytes)) flush(layer);
  }
  void flush(int layer) {
    const Collective c = p_.zero_stage >= 1 ? Collective::kReduceScatter : Collective::kAllReduce;
    emit(c, CommGroup::kDp, "dp_grad_bucket", dense_, layer, p_.dp * p_.cp);
    emit(c, CommGroup::kExpertDp, "edp_grad_bucket", expert_, layer, p_.expert_dp());
    dense_ = expert_ = 0;
  }

 private:
  void emit(Collective c, CommGroup g, std::string_view name, double bytes, int layer, int ranks) {
    if (bytes <= 0 || ranks <= 1) return;
    out_.push_back(grad_sync(c, g, name, bytes, layer));
    out_.back().last_micro_batch = p_.zero_stage < 2;
  }
  const Plan& p_;
  const Dims& d_;
  std::vector<OpTemplate>& out_;
  double dense_ = 0, expert_ = 0;
};

// The ranks a ZeRO stage >= `from` shards a class of parameters' state over (optimizer states
// from stage 1, gradients from 2, the parameters themselves from 3): dense over dp * cp, experts
// over their data-parallel replicas; 1 below that stage.
double zero_shard(const Plan& p, bool experts, int from) {
  if (p.zero_stage < from) return 1.0;
  return experts ? std::max(p.expert_dp(), 1) : static_cast<double>(p.dp) * p.cp;
}

OpTemplate copy_op(std::string_view name, CopyPath path, double bytes, int layer, Phase phase) {
  OpTemplate op;
  op.kind = OpKind::kCopy;
  // The SSD tier's reads and writes have their own stream: they pipeline with the PCIe copies.
  op.stream = path == CopyPath::kSsdToHost || path == CopyPath::kHostToSsd ? StreamKind::kStorage
                                                                           : StreamKind::kCopy;
  op.phase = phase;
  op.name = name;
  op.layer = layer;
  op.copy = path;
  op.bytes = bytes;
  op.async = true;
  return op;
}

// Appends the copies that bring `bytes` of one class of parameters down from `tier`, as the
// runner issues them: from host memory one copy over PCIe; from the SSD a read into host staging
// and the copy over PCIe that waits for it (wait_for: the read's index in this unit's list, which
// with_prefetches remaps).
void level_fetches(Tier tier, double bytes, int layer, Phase phase, std::vector<OpTemplate>& out) {
  if (bytes <= 0 || tier == Tier::kGPU) return;
  int read = -1;
  if (tier == Tier::kSSD) {
    out.push_back(copy_op("param_ssd_read", CopyPath::kSsdToHost, bytes, layer, phase));
    read = static_cast<int>(out.size()) - 1;
  }
  out.push_back(copy_op("param_fetch", CopyPath::kHostToGpu, bytes, layer, phase));
  out.back().wait_for = read;
}

// The copies that bring a layer's offloaded parameters to the GPU.
std::vector<OpTemplate> param_fetches(const ModelSpec& m, const Plan& p, const Dims& d, int layer,
                                      Phase phase) {
  const Placement& pl = p.placement;
  if (p.ring_sections == 0 && pl.dense_params == Tier::kGPU && pl.expert_params == Tier::kGPU)
    return {};
  const LayerParams lp = layer_params(m, p, d, layer);
  if (p.ring_sections > 0) {
    // Ring-memory inference: every layer's parameters come from host memory.
    return {copy_op("param_fetch", CopyPath::kHostToGpu, (lp.dense + lp.expert) * d.param_bytes,
                    layer, phase)};
  }
  // ZeRO-3: a rank keeps only its shard (off the GPU too), fetches that and all-gathers the rest.
  // The dense parameters' copies, then the experts' (the runner's order).
  std::vector<OpTemplate> out;
  level_fetches(pl.dense_params, lp.dense / zero_shard(p, false, 3) * d.param_bytes, layer, phase,
                out);
  level_fetches(pl.expert_params, lp.expert / zero_shard(p, true, 3) * d.param_bytes, layer, phase,
                out);
  return out;
}

// The embedding's or the head's (final norm included) parameters when the plan keeps the dense
// parameters off the GPU: fetched like a layer's (not in ring-memory inference, which keeps them
// on the GPU).
std::vector<OpTemplate> dense_unit_fetches(const Plan& p, const Dims& d, double params,
                                           Phase phase) {
  std::vector<OpTemplate> out;
  level_fetches(p.placement.dense_params, params * d.param_bytes / zero_shard(p, false, 3), -1,
                phase, out);
  return out;
}

// Offloaded gradients leave the GPU as a unit's backward produces them (and go on to the SSD):
// those of `dense` and `expert` parameters of layer `layer` (-1: the embedding or the head); under
// ZeRO 2-3 only this rank's reduced shard.
void grad_offload_params(const Plan& p, const Dims& d, double dense, double expert, int layer,
                         std::vector<OpTemplate>& out) {
  if (p.placement.gradients == Tier::kGPU) return;
  const double bytes =
      (dense / zero_shard(p, false, 2) + expert / zero_shard(p, true, 2)) * d.grad_bytes;
  out.push_back(copy_op("grad_offload", CopyPath::kGpuToHost, bytes, layer, Phase::kBackward));
  if (p.placement.gradients == Tier::kSSD) {
    OpTemplate w = copy_op("grad_ssd_write", CopyPath::kHostToSsd, bytes, layer, Phase::kBackward);
    w.wait_for = static_cast<int>(out.size()) - 1;
    out.push_back(std::move(w));
  }
}

void grad_offload(const ModelSpec& m, const Plan& p, const Dims& d, int layer,
                  std::vector<OpTemplate>& out) {
  const LayerParams lp = layer_params(m, p, d, layer);
  grad_offload_params(p, d, lp.dense, lp.expert, layer, out);
}

// Rebuilds `ops` with each unit's fetches issued ahead of its use: begins[i] is where the i-th unit
// in order of use starts in `ops`, fetches[i] its copies (an SSD read, then the copy to the GPU
// that waits for it), each issued `leads` units ahead by its level; the unit's first op waits for
// its last copy. Indices in wait_for are remapped to the new list.
// The ring of ring-memory inference runs on across passes: the last units of a pass already load
// the next pass's first ones (`wrap`), so a pass that follows another finds them loaded
// (`preloaded`) and issues only the later ones.
std::vector<OpTemplate> with_prefetches(std::vector<OpTemplate> ops,
                                        const std::vector<size_t>& begins,
                                        const std::vector<std::vector<OpTemplate>>& fetches,
                                        FetchLeads leads, bool preloaded = false,
                                        bool wrap = false) {
  bool any = false;
  for (const auto& f : fetches) any = any || !f.empty();
  if (!any) return ops;
  const size_t n = begins.size();
  // What each unit's start issues: (unit, copy, for the next pass).
  struct Issue {
    size_t unit, copy;
    bool next_pass;
  };
  std::vector<std::vector<Issue>> at(n);
  for (size_t i = 0; i < n; ++i)
    for (size_t k = 0; k < fetches[i].size(); ++k) {
      const auto lead =
          static_cast<size_t>(fetches[i][k].copy == CopyPath::kSsdToHost ? leads.ssd : leads.pcie);
      if (i >= lead) {
        at[i - lead].push_back({i, k, false});
        continue;
      }
      if (!preloaded) at[0].push_back({i, k, false});  // (else the pass before loaded it)
      if (wrap) at[n > lead - i ? n - (lead - i) : 0].push_back({i, k, true});
    }
  std::vector<OpTemplate> out;
  out.reserve(ops.size() + 2 * n);
  std::vector<int> new_index(ops.size(), -1);
  std::vector<int> ready(n, -1);  // a unit's last copy of this pass
  // Where each of a unit's copies went in `out` (this pass, the next): a copy's wait_for names
  // another of its unit's copies (the SSD read it copies on).
  std::vector<std::vector<int>> issued(n), issued_next;
  for (size_t i = 0; i < n; ++i) issued[i].assign(fetches[i].size(), -1);
  if (wrap) issued_next = issued;
  size_t next = 0;
  int pending = -1;
  for (size_t pos = 0; pos <= ops.size(); ++pos) {
    while (next < n && begins[next] == pos) {
      for (const Issue& is : at[next]) {
        OpTemplate f = fetches[is.unit][is.copy];
        std::vector<int>& where = (is.next_pass ? issued_next : issued)[is.unit];
        const int index = static_cast<int>(out.size());
        if (f.wait_for >= 0) f.wait_for = where[static_cast<size_t>(f.wait_for)];
        where[is.copy] = index;
        // The unit's first op waits for its last copy to the GPU (the copy stream runs in order).
        // (A copy for the next pass is waited for by no op of this one.)
        if (f.copy != CopyPath::kSsdToHost && !is.next_pass) ready[is.unit] = index;
        out.push_back(std::move(f));
      }
      pending = ready[next];
      ++next;
    }
    if (pos == ops.size()) break;
    OpTemplate op = ops[pos];
    if (op.wait_for >= 0) op.wait_for = new_index[static_cast<size_t>(op.wait_for)];
    if (pending >= 0) {
      op.wait_for = pending;
      pending = -1;
    }
    new_index[pos] = static_cast<int>(out.size());
    out.push_back(std::move(op));
  }
  return out;
}

ChunkProgram lower_chunk(const ModelSpec& m, const Plan& p, const Dims& d, int first_layer,
                         int layers, bool embedding, bool head, bool backward = true) {
  ChunkProgram cp;
  cp.first_layer = first_layer;
  cp.num_layers = layers;
  cp.has_embedding = embedding;
  cp.has_head = head;
  const double vocab = static_cast<double>(m.vocab_size);
  const double h = static_cast<double>(d.h);

  // The embedding's parameters, and the head's: an untied LM head (or a tied one's copy on a
  // pipeline's last stage) and the final norm.
  const double vocab_rows = static_cast<double>(m.vocab_size) / d.tp * d.h;
  const double head_params = (!m.tied_embeddings || p.pp > 1 ? vocab_rows : 0.0) +
                             (m.norm == NormKind::kLayerNorm ? 2.0 : 1.0) * d.h;

  // Forward, and per layer the forward ops (to mirror them in the backward and in recompute).
  std::vector<std::vector<OpTemplate>> layer_fwd;
  std::vector<OpTemplate> head_fwd, embed_fwd;
  if (embedding) {
    Builder b(m, p, d, embed_fwd);
    // ZeRO-3 gathers the embedding's shards before use, as it does a layer's.
    if (p.zero_stage >= 3)
      b.comm(Collective::kAllGather, CommGroup::kDp, "zero3_param_all_gather", -1,
             vocab_rows * d.param_bytes);
    b.elementwise("embedding", -1, 2 * static_cast<double>(d.ts) * h * d.e, d.ts);
    if (d.tp > 1) {
      // Vocab-parallel embedding: partial rows combine across TP.
      if (d.sp)
        b.comm(Collective::kReduceScatter, CommGroup::kTp, "embedding_reduce_scatter", -1,
               b.tok_bytes(d.t));
      else
        b.comm(Collective::kAllReduce, CommGroup::kTp, "embedding_all_reduce", -1,
               b.tok_bytes(d.t));
    }
  }
  layer_fwd.reserve(static_cast<size_t>(layers));
  for (int l = first_layer; l < first_layer + layers; ++l) {
    std::vector<OpTemplate> ops;
    ops.reserve(48);
    Builder b(m, p, d, ops);
    if (p.zero_stage >= 3) {
      const LayerParams lp = layer_params(m, p, d, l);
      b.comm(Collective::kAllGather, CommGroup::kDp, "zero3_param_all_gather", l,
             lp.dense * d.param_bytes);
      if (lp.expert > 0 && p.expert_dp() > 1)
        b.comm(Collective::kAllGather, CommGroup::kExpertDp, "zero3_expert_all_gather", l,
               lp.expert * d.param_bytes);
    }
    b.attention(l);
    if (m.is_moe_layer(l))
      b.moe_mlp(l);
    else
      b.dense_mlp(l);
    // The layer's saved activations (full recompute: its input) live from its forward to its
    // backward.
    ops.front().allocates |= bit(p.recompute == Recompute::kFull ? TensorClass::kLayerInput
                                                                 : TensorClass::kLayerActivations);
    layer_fwd.push_back(std::move(ops));
  }
  if (head) {
    Builder b(m, p, d, head_fwd);
    // (A head tied to the embedding on the same stage gathers the shared matrix again: ZeRO-3
    // released it after the embedding.)
    if (p.zero_stage >= 3)
      b.comm(Collective::kAllGather, CommGroup::kDp, "zero3_param_all_gather", -1,
             (head_params + (m.tied_embeddings && p.pp == 1 ? vocab_rows : 0.0)) * d.param_bytes);
    b.elementwise("final_norm", -1, 2 * b.tok_bytes(d.ts), d.ts);
    b.tp_enter(-1);
    OpTemplate& lm = b.gemm("lm_head", -1, d.head_rows, m.vocab_size / d.tp, d.h);
    lm.allocates = bit(TensorClass::kLogits);
    if (backward) {
      b.elementwise("loss", -1, 3.0 * 4.0 * static_cast<double>(d.head_rows) * vocab / d.tp,
                    d.head_rows);
      if (d.tp > 1)
        b.comm(Collective::kAllReduce, CommGroup::kTp, "loss_all_reduce", -1,
               8.0 * static_cast<double>(d.t));
    } else {
      // Inference: the next token of every row, greedy (one pass over the logits for the
      // argmax); vocab-parallel, each TP rank's best (value, index) pair is reduced.
      b.elementwise("sample", -1, d.e * static_cast<double>(d.head_rows) * vocab / d.tp,
                    d.head_rows);
      if (d.tp > 1)
        b.comm(Collective::kAllReduce, CommGroup::kTp, "sample_all_reduce", -1,
               8.0 * static_cast<double>(d.head_rows));
    }
  }

  // Offloaded parameters come to the GPU before each use, ahead of it as the plan's prefetch says
  // (SE-MoE's 2D prefetch: fetch_leads), right before the layer otherwise.
  // Ring-memory inference loads section i+1 (about L / sections layers) while section i computes,
  // unless the plan turns prefetching off (the naive load-then-compute alternative).
  const FetchLeads leads = fetch_leads(m, p);
  std::vector<size_t> fwd_begins;
  std::vector<std::vector<OpTemplate>> fwd_fetches;
  size_t total = embed_fwd.size() + head_fwd.size();
  for (const auto& ops : layer_fwd) total += ops.size();
  cp.forward.reserve(total);
  cp.backward.reserve(3 * total);
  // Units of use: the embedding, the layers, the head (the embedding and the head are fetched
  // only with the dense parameters off the GPU).
  const bool dense_units = p.ring_sections == 0 && p.placement.dense_params != Tier::kGPU;
  if (embedding && dense_units) {
    fwd_begins.push_back(0);
    fwd_fetches.push_back(dense_unit_fetches(p, d, vocab_rows, Phase::kForward));
  }
  cp.forward.insert(cp.forward.end(), embed_fwd.begin(), embed_fwd.end());
  for (int i = 0; i < layers; ++i) {
    fwd_begins.push_back(cp.forward.size());
    fwd_fetches.push_back(param_fetches(m, p, d, first_layer + i, Phase::kForward));
    const auto& ops = layer_fwd[static_cast<size_t>(i)];
    cp.forward.insert(cp.forward.end(), ops.begin(), ops.end());
  }
  if (head && dense_units) {
    fwd_begins.push_back(cp.forward.size());
    fwd_fetches.push_back(dense_unit_fetches(p, d, head_params, Phase::kForward));
  }
  cp.forward.insert(cp.forward.end(), head_fwd.begin(), head_fwd.end());
  // Ring-memory inference: the ring runs on into the next pass; a decode step follows one.
  const bool ring = p.ring_sections > 0;
  cp.forward = with_prefetches(std::move(cp.forward), fwd_begins, fwd_fetches, leads,
                               ring && d.pass == Pass::kDecode, ring);
  if (!backward) {
    // Forward only (inference): nothing is kept for a backward; a layer's working set is freed as
    // it goes (the memory model counts one layer's).
    const TensorMask kept = bit(TensorClass::kLayerActivations) | bit(TensorClass::kLayerInput) |
                            bit(TensorClass::kLogits);
    for (OpTemplate& op : cp.forward) op.allocates &= static_cast<TensorMask>(~kept);
    return cp;
  }

  // Backward: head, then layers in reverse (recomputing what the plan recomputes), then embedding.
  append_backward(head_fwd, cp.backward);
  if (head) grad_offload_params(p, d, head_params, 0, -1, cp.backward);
  BucketFiller buckets(p, d, cp.backward);
  std::vector<size_t> bwd_begins;
  std::vector<std::vector<OpTemplate>> bwd_fetches;
  for (int i = layers - 1; i >= 0; --i) {
    const int l = first_layer + i;
    const std::vector<OpTemplate>& fwd = layer_fwd[static_cast<size_t>(i)];
    bwd_begins.push_back(cp.backward.size());
    bwd_fetches.push_back(param_fetches(m, p, d, l, Phase::kBackward));
    if (p.recompute == Recompute::kFull) {
      // Re-run the layer's forward from its saved input; its activations live until the layer's
      // backward ends.
      for (size_t j = 0; j < fwd.size(); ++j) {
        OpTemplate op = fwd[j];
        op.phase = Phase::kRecompute;
        if (j == 0) op.allocates = bit(TensorClass::kRecomputeWorkspace);
        cp.backward.push_back(std::move(op));
      }
    } else if (p.recompute == Recompute::kSelective) {
      // Re-run what selective recompute does not keep: norms, activation functions and MLA's
      // up-projections.
      for (OpTemplate op : fwd) {
        const bool cheap = op.name == "norm1" || op.name == "norm2" || op.name == "act" ||
                           op.name == "experts_act" || op.name == "shared_act" ||
                           op.name == "q_up" || op.name == "kv_up";
        if (!cheap) continue;
        op.phase = Phase::kRecompute;
        op.allocates = op.frees = 0;
        cp.backward.push_back(std::move(op));
      }
    }
    append_backward(fwd, cp.backward);
    if (p.recompute == Recompute::kFull)
      cp.backward.back().frees |= bit(TensorClass::kRecomputeWorkspace);
    // ZeRO 2-3 offload the reduced shard: the layer's gradients are reduce-scattered first (a
    // bucket of their own) and the shard goes down after that collective.
    const bool shard_offload = p.zero_stage >= 2 && p.placement.gradients != Tier::kGPU;
    if (!shard_offload) grad_offload(m, p, d, l, cp.backward);
    if (m.is_moe_layer(l) && d.most_replicated_copies > 0) {
      // Elastic replicas: the copies of a replicated expert sum their gradients before the update
      // (the rank with the most such copies moves the most).
      cp.backward.push_back(
          grad_sync(Collective::kAllReduce, CommGroup::kReplicas, "replica_grad_all_reduce",
                    d.most_replicated_copies * static_cast<double>(expert_params(m)) / p.expert_tp *
                        d.grad_bytes,
                    l));
    }
    buckets.add(layer_params(m, p, d, l), l);
    if (shard_offload) {
      buckets.flush(l);
      const int reduced = static_cast<int>(cp.backward.size()) - 1;  // its last collective
      const size_t first = cp.backward.size();
      grad_offload(m, p, d, l, cp.backward);
      if (first < cp.backward.size() && cp.backward[reduced].kind == OpKind::kCollective)
        cp.backward[first].wait_for = reduced;
    }
  }
  buckets.flush(first_layer);
  append_backward(embed_fwd, cp.backward);
  if (embedding) grad_offload_params(p, d, vocab_rows, 0, -1, cp.backward);
  cp.backward = with_prefetches(std::move(cp.backward), bwd_begins, bwd_fetches, leads);
  return cp;
}

// The optimizer step over this stage's parameters (all its chunks), and the distributed
// optimizer's parameter all-gather.
std::vector<OpTemplate> lower_step_ops(const ModelSpec& m, const Plan& p, const Dims& d,
                                       const Workload& w, const std::vector<ChunkProgram>& chunks,
                                       int stage) {
  std::vector<OpTemplate> ops;
  LayerParams total;
  for (const ChunkProgram& chunk : chunks)
    for (int l = chunk.first_layer; l < chunk.first_layer + chunk.num_layers; ++l) {
      const LayerParams lp = layer_params(m, p, d, l);
      total.dense += lp.dense;
      total.expert += lp.expert;
    }
  // The update's expert share: the rank holding the most copies (see Dims::most_copies).
  if (!d.expert_rows.empty() && d.most_copies > static_cast<int>(d.expert_rows.size()))
    total.expert *= static_cast<double>(d.most_copies) / static_cast<double>(d.expert_rows.size());
  const double vh = static_cast<double>(m.vocab_size) * static_cast<double>(m.hidden_size) / p.tp;
  if (stage == 0) total.dense += vh;
  if (stage == p.pp - 1 && (!m.tied_embeddings || p.pp > 1)) total.dense += vh;
  const double dense_shard = zero_shard(p, false, 1), expert_shard = zero_shard(p, true, 1);
  // Adam reads param, grad, (master,) m, v and writes them back: 14 + 4 * moment bytes per
  // parameter in mixed precision (bf16 param and grad, fp32 master), 12 + 4 * moment bytes in fp32.
  const double moment_bytes = w.optimizer_moments == Precision::kBF16 ? 2.0 : 4.0;
  const double bytes_per_param =
      (w.precision == Precision::kFP32 ? 12.0 : 14.0) + 4.0 * moment_bytes;
  OpTemplate opt;
  opt.kind = OpKind::kOptimizer;
  opt.phase = Phase::kStep;
  opt.name = "optimizer";
  opt.bytes = (total.dense / dense_shard + total.expert / expert_shard) * bytes_per_param;
  opt.flops = (total.dense / dense_shard + total.expert / expert_shard) * 12.0;  // ~12 FLOPs/param
  opt.on_cpu = p.placement.optimizer_states != Tier::kGPU;
  if (opt.on_cpu && p.delayed_update) {
    opt.delayed = true;
    opt.stream = StreamKind::kHost;
  }
  if (opt.on_cpu) {
    // ZeRO-Offload: this rank's gradients go down; the parameters that live on the GPU come back
    // up updated (off-GPU parameters are updated where they live).
    const double dense = total.dense / dense_shard, expert = total.expert / expert_shard;
    // (Gradients kept off the GPU went down during the backward: grad_offload.)
    opt.host_down_bytes =
        p.placement.gradients == Tier::kGPU ? (dense + expert) * d.grad_bytes : 0.0;
    opt.host_up_bytes = ((p.placement.dense_params == Tier::kGPU ? dense : 0) +
                         (p.placement.expert_params == Tier::kGPU ? expert : 0)) *
                        d.param_bytes;
    // Parameters on SSD: the host writes the updated ones back to their files.
    opt.ssd_param_write_bytes = ((p.placement.dense_params == Tier::kSSD ? dense : 0) +
                                 (p.placement.expert_params == Tier::kSSD ? expert : 0)) *
                                d.param_bytes;
    // States on SSD (ZeRO-Infinity): the fp32 master and both moments stream through host memory.
    if (p.placement.optimizer_states == Tier::kSSD)
      opt.ssd_state_bytes =
          (dense + expert) * ((w.precision == Precision::kFP32 ? 0.0 : 4.0) + 2.0 * moment_bytes);
  }
  ops.push_back(opt);
  if (p.zero_stage >= 1 && p.zero_stage < 3) {
    // The distributed optimizer gathers the updated parameter shards.
    auto gather = [&](CommGroup g, std::string_view name, double params, int ranks) {
      if (params <= 0 || ranks <= 1) return;
      ops.push_back(
          dp_collective(Collective::kAllGather, g, name, Phase::kStep, params * d.param_bytes));
    };
    gather(CommGroup::kDp, "dp_param_all_gather", total.dense, p.dp * p.cp);
    gather(CommGroup::kExpertDp, "edp_param_all_gather", total.expert, p.expert_dp());
  }
  return ops;
}

}  // namespace

StepProgram lower_frame(const ModelSpec& m, const ClusterSpec& c, const Plan& p,
                        const Workload& w) {
  StepProgram prog;
  const int64_t seq = w.effective_seq_len(m);
  const bool sp = p.sequence_parallel && p.tp > 1;
  const double e = w.precision == Precision::kFP32 ? 4.0 : 2.0;
  prog.pp = std::max(p.pp, 1);
  prog.vp = p.schedule == Schedule::kInterleaved1F1B ? std::max(p.vp, 1) : 1;
  prog.num_micro_batches = static_cast<int>(std::max<int64_t>(
      w.global_batch_size / std::max<int64_t>(int64_t{p.micro_batch_size} * p.dp, 1), 1));
  prog.tokens_per_micro_batch = p.micro_batch_size * seq;
  const int64_t t = p.micro_batch_size * seq / p.cp;
  prog.p2p_bytes = static_cast<double>(sp ? t / p.tp : t) * static_cast<double>(m.hidden_size) * e;

  const int gpn = c.gpus_per_node;
  auto set = [&](CommGroup g, GroupLayout layout) { prog.groups[static_cast<size_t>(g)] = layout; };
  set(CommGroup::kTp, group_layout(p.tp, 1, gpn));
  set(CommGroup::kCp, group_layout(p.cp, p.tp, gpn));
  set(CommGroup::kDp, group_layout(p.dp * p.cp, p.tp, gpn));
  const bool ppmoe = p.dispatch == Dispatch::kPPMoEIndexSlice;
  const GroupLayout ep = ppmoe ? group_layout(p.ep, 1, gpn) : group_layout(p.ep, p.expert_tp, gpn);
  set(CommGroup::kEp, ep);
  set(CommGroup::kEpIntra, {ep.ranks_per_node, ep.ranks_per_node});
  set(CommGroup::kEpInter, {ep.nodes(), 1});
  set(CommGroup::kExpertTp, group_layout(p.expert_tp, 1, gpn));
  // Copies of a replicated expert sit on EP ranks spread over the EP group's nodes.
  {
    int replicas = 1;
    if (p.expert_replicas.kind == ExpertReplicas::Kind::kHot) replicas = p.expert_replicas.replicas;
    for (int c : p.expert_replicas.per_expert) replicas = std::max(replicas, c);
    replicas = std::min(replicas, p.ep);
    set(CommGroup::kReplicas, {replicas, std::max(1, replicas / ep.nodes())});
  }
  set(CommGroup::kExpertDp, group_layout(std::max(p.expert_dp(), 1), p.expert_tp * p.ep, gpn));
  const int stage_stride = p.tp * p.cp * p.dp;
  set(CommGroup::kPp, group_layout(p.pp, stage_stride, gpn));
  auto node_of_stage = [&](int s) { return static_cast<int64_t>(s) * stage_stride / gpn; };
  prog.p2p_wraps_same_node = node_of_stage(prog.pp - 1) == node_of_stage(0);
  prog.stages.resize(static_cast<size_t>(prog.pp));
  for (int s = 0; s < prog.pp; ++s) {
    prog.stages[static_cast<size_t>(s)].stage = s;
    prog.stages[static_cast<size_t>(s)].sends_to_next_same_node =
        s + 1 < prog.pp && node_of_stage(s) == node_of_stage(s + 1);
  }
  return prog;
}

// Layer ranges of each stage's chunks: virtual stage (chunk c, stage s) holds stage_layers[s] / vp
// layers, and virtual stages are ordered chunk-major, so a layer index grows along (c, s).
std::vector<std::vector<std::pair<int, int>>> chunk_ranges(const ModelSpec& m, const Plan& p,
                                                           int pp, int vp) {
  const std::vector<int> stage_layers = resolve_stage_layers(p, m);
  std::vector<std::vector<std::pair<int, int>>> ranges(static_cast<size_t>(pp));
  int next = 0;
  for (int ch = 0; ch < vp; ++ch)
    for (int s = 0; s < pp; ++s) {
      const int n = stage_layers[static_cast<size_t>(s)] / vp;
      ranges[static_cast<size_t>(s)].emplace_back(next, n);
      next += n;
    }
  return ranges;
}

LayerKindsProgram lower_layer_kinds(const ModelSpec& m, const ClusterSpec& /*cluster*/,
                                    const Plan& p, const Workload& w) {
  LayerKindsProgram out;
  Dims d = make_dims(m, p, w);
  // Per-layer routing: the representative MoE layer gets the mean over the MoE layers of each
  // layer's most loaded rank's rows (as many MoE layers as there are, each waiting for its own
  // hottest rank); copies counted differently across layers fall back to the step's histogram.
  if (!d.layer_expert_rows.empty()) {
    std::vector<double> sum;
    int layers = 0;
    bool same = true;
    for (const auto& rows : d.layer_expert_rows) {
      if (rows.empty()) continue;
      if (sum.empty()) sum.assign(rows.size(), 0.0);
      same = same && rows.size() == sum.size();
      if (!same) break;
      for (size_t i = 0; i < rows.size(); ++i) sum[i] += static_cast<double>(rows[i]);
      ++layers;
    }
    if (same && layers > 0) {
      d.expert_rows.clear();
      for (double x : sum) d.expert_rows.push_back(std::llround(x / layers));
    }
    d.layer_expert_rows.clear();
  }
  for (int l = 0; l < m.num_layers; ++l) {
    int& slot = m.is_moe_layer(l) ? out.moe_layer : out.dense_layer;
    if (slot < 0) slot = l;
  }
  if (out.dense_layer >= 0) out.dense = lower_chunk(m, p, d, out.dense_layer, 1, false, false);
  if (out.moe_layer >= 0) out.moe = lower_chunk(m, p, d, out.moe_layer, 1, false, false);
  out.embedding = lower_chunk(m, p, d, 0, 0, true, false);
  out.head = lower_chunk(m, p, d, 0, 0, false, true);
  const int pp = std::max(p.pp, 1);
  const int vp = p.schedule == Schedule::kInterleaved1F1B ? std::max(p.vp, 1) : 1;
  const auto ranges = chunk_ranges(m, p, pp, vp);
  out.dense_layers_per_stage.assign(static_cast<size_t>(pp), 0);
  out.moe_layers_per_stage.assign(static_cast<size_t>(pp), 0);
  for (int s = 0; s < pp; ++s) {
    std::vector<ChunkProgram> chunks;
    for (const auto& [first, n] : ranges[static_cast<size_t>(s)]) {
      ChunkProgram range;
      range.first_layer = first;
      range.num_layers = n;
      for (int l = first; l < first + n; ++l)
        ++(m.is_moe_layer(l) ? out.moe_layers_per_stage
                             : out.dense_layers_per_stage)[static_cast<size_t>(s)];
      chunks.push_back(std::move(range));
    }
    out.step_ops.push_back(lower_step_ops(m, p, d, w, chunks, s));
  }
  return out;
}

// Inference: one stage whose two chunks are the prefill of the prompts and one decode step at the
// average context; the schedule runs the prefill, then the decode step.
StepProgram lower_inference(const ModelSpec& m, const ClusterSpec& c, const Plan& p,
                            const Workload& w) {
  if (p.pp > 1)
    throw ConfigError(
        "plan.pp", "inference is lowered for pp = 1 (tensor, expert and data parallelism), got " +
                       std::to_string(p.pp));
  StepProgram prog = lower_frame(m, c, p, w);
  prog.vp = 2;
  prog.num_micro_batches = 1;
  prog.stages.resize(1);
  StageProgram& st = prog.stages[0];
  const int layers = static_cast<int>(m.num_layers);
  st.chunks.push_back(
      lower_chunk(m, p, make_dims(m, p, w, Pass::kPrefill), 0, layers, true, true, false));
  st.chunks.push_back(
      lower_chunk(m, p, make_dims(m, p, w, Pass::kDecode), 0, layers, true, true, false));
  st.order = {{0, 0, false}, {0, 1, false}};
  return prog;
}

int ring_ahead_layers(const ModelSpec& m, const Plan& p) {
  if (p.ring_sections <= 0 || p.prefetch.direction == PrefetchDirection::kNone) return 0;
  return static_cast<int>((m.num_layers + p.ring_sections - 1) / p.ring_sections);
}

FetchLeads fetch_leads(const ModelSpec& m, const Plan& p) {
  if (p.ring_sections > 0) return {0, ring_ahead_layers(m, p)};
  const int d = p.prefetch.depth;
  switch (p.prefetch.direction) {
    case PrefetchDirection::kNone:
      return {0, 0};
    case PrefetchDirection::kDown:
      return {d, 0};
    case PrefetchDirection::kAhead:
      return {d, d};
    case PrefetchDirection::k2D:
      return {2 * d, d};
  }
  return {0, 0};
}

StepProgram lower(const ModelSpec& m, const ClusterSpec& c, const Plan& p, const Workload& w) {
  if (w.mode == Mode::kInference) return lower_inference(m, c, p, w);
  StepProgram prog = lower_frame(m, c, p, w);
  const Dims d = make_dims(m, p, w);
  const auto ranges = chunk_ranges(m, p, prog.pp, prog.vp);
  for (int s = 0; s < prog.pp; ++s) {
    StageProgram& st = prog.stages[static_cast<size_t>(s)];
    for (int ch = 0; ch < prog.vp; ++ch) {
      const auto& [first, n] = ranges[static_cast<size_t>(s)][static_cast<size_t>(ch)];
      st.chunks.push_back(
          lower_chunk(m, p, d, first, n, s == 0 && ch == 0, s == prog.pp - 1 && ch == prog.vp - 1));
    }
    st.order = schedule_order(p.schedule, prog.pp, prog.vp, prog.num_micro_batches, s);
    st.step_ops = lower_step_ops(m, p, d, w, st.chunks, s);
  }
  return prog;
}

}  // namespace switchyard
