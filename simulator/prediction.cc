#include "simulator/prediction.h"

namespace switchyard {

namespace {

Json tier_json(const TierBytes& t) { return {{"gpu", t.gpu}, {"cpu", t.cpu}, {"ssd", t.ssd}}; }

}  // namespace

Json to_json(const Prediction& p) {
  Json j;
  j["fidelity"] = p.fidelity;
  j["step_time_s"] = p.step_time_s;
  j["delayed_update_s"] = p.delayed_update_s;
  j["tokens_per_step"] = p.tokens_per_step;
  j["tokens_per_s"] = p.tokens_per_s;
  j["tokens_per_s_per_gpu"] = p.tokens_per_s_per_gpu;
  j["model_tflops_per_gpu"] = p.model_tflops_per_gpu;
  j["mfu"] = p.mfu;
  j["gpus"] = p.gpus;
  j["critical_stage"] = p.critical_stage;
  j["time_breakdown"] = {{"compute_s", p.time.compute_s}, {"tp_comm_s", p.time.tp_comm_s},
                         {"cp_comm_s", p.time.cp_comm_s}, {"ep_comm_s", p.time.ep_comm_s},
                         {"dp_comm_s", p.time.dp_comm_s}, {"pp_comm_s", p.time.pp_comm_s},
                         {"bubble_s", p.time.bubble_s},   {"optimizer_s", p.time.optimizer_s},
                         {"stall_s", p.time.stall_s}};
  const MemoryBreakdown& m = p.memory;
  j["memory"] = {{"peak_bytes", tier_json(p.peak)},
                 {"peak_stage", p.peak_stage},
                 {"stage_peak_gpu_bytes", p.stage_peak_gpu_bytes}};
  j["memory_breakdown"] = {{"dense_params", tier_json(m.dense_params)},
                           {"expert_params", tier_json(m.expert_params)},
                           {"gradients", tier_json(m.gradients)},
                           {"optimizer_states", tier_json(m.optimizer_states)},
                           {"activations", tier_json(m.activations)},
                           {"kv_cache", tier_json(m.kv_cache)},
                           {"dispatch_buffers", tier_json(m.dispatch_buffers)},
                           {"comm_buffers", tier_json(m.comm_buffers)},
                           {"prefetch_buffers", tier_json(m.prefetch_buffers)},
                           {"runtime", tier_json(m.runtime)}};
  if (p.inference) {
    const InferenceTimes& t = *p.inference;
    j["inference"] = {{"prefill_s", t.prefill_s},
                      {"decode_step_s", t.decode_step_s},
                      {"latency_s", t.latency_s},
                      {"prefill_tokens_per_s", t.prefill_tokens_per_s},
                      {"generated_tokens_per_s", t.generated_tokens_per_s}};
  }
  j["ops"] = p.ops;
  j["notes"] = p.notes;
  return j;
}

}  // namespace switchyard
