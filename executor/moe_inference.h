// Real MoE inference on a Device: a batch of prompts prefilled, then tokens generated one at a
// time (greedy) for a decode batch, with a key/value cache per layer. The model and its weights
// are the trainer's (same layers, parameter names and initialisation for the same seed).
//
// Ring-memory inference (SE-MoE, section 4): every layer's weights live in host memory, and the
// device holds a ring of layer slots. While layer i computes, the copy engine loads layer
// i + ahead into the slot layer i - 1 left, so `ahead` layers load ahead of the one computing
// (ahead + 1 slots); ahead = 0 is the naive alternative (load a layer, then compute it). The
// copies follow the StepProgram's param_fetch ops: each pass (the prefill, every decode step)
// starts by loading its first ahead + 1 layers.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "core/error.h"
#include "core/model.h"
#include "core/plan.h"
#include "executor/device.h"
#include "executor/timed.h"

namespace switchyard {

struct InferenceSettings {
  int64_t prefill_batch = 1;  // prompts per prefill pass
  int64_t prompt_len = 16;
  int64_t decode_batch = 1;  // sequences per decode step (the first decode_batch prompts)
  int64_t decode_tokens = 4;
  // The prompts are sequences first_sequence, first_sequence + 1, ... (a data-parallel replica's
  // share of the requests); their tokens come from (seed, sequence, position).
  int64_t first_sequence = 0;
  // Given prompts instead ([max(prefill_batch, decode_batch)][prompt_len] tokens), when not empty.
  std::vector<int> prompt_tokens;
  bool ring = false;   // weights in host memory, streamed through device slots
  int ring_ahead = 0;  // layers loading ahead of the one computing (0: load, then compute)
  // Routing skew the workload asks for (see TrainSettings::routing_share).
  std::vector<double> routing_share;
  std::vector<std::vector<double>> routing_layer_share;
  uint64_t seed = 1234;
  float init_std = 0.02f;
  bool keep_logits = false;  // keep every pass's next-token logits (for numerics checks)
};

// One forward pass: the prefill of a batch of prompts, or one decode step of the decode batch.
struct InferencePass {
  bool decode = false;
  int sequences = 0;  // in this pass (a prefill's last pass may hold fewer than prefill_batch)
  double wall_s = 0;
  double copy_s = 0;   // the copy engine's busy time for this pass's weight loads
  double stall_s = 0;  // compute waiting for them
  int64_t copy_bytes = 0;
};

struct InferenceResult {
  std::vector<InferencePass> passes;             // the prefills, then the decode steps, in order
  std::vector<int> generated;                    // [decode_tokens][decode_batch] greedy tokens
  std::vector<float> logits;                     // keep_logits: [pass][sequence][vocab]
  std::vector<int64_t> tokens_per_layer_expert;  // routed (token, choice) pairs: [layer * E + e]
};

// What the CPU inference runner cannot run (yet) for this model and plan; empty when it can.
std::vector<ConfigIssue> inference_unsupported(const ModelSpec& m, const Plan& p);

class MoeInference {
 public:
  // Allocates and initialises the weights (device tier, or host tier with device slots when
  // ring): OutOfMemory when they do not fit. `copier` runs the ring's copies on the copy thread.
  static std::unique_ptr<MoeInference> create(const ModelSpec& m, const InferenceSettings& s,
                                              Device& device, Device& copier);
  ~MoeInference();

  // Prefills every prompt (in passes of prefill_batch) and generates decode_tokens tokens for the
  // decode batch. `prefill_ops` / `decode_ops`, when given, collect the StepProgram ops' times of
  // those passes (ProgramOp scopes, the weight loads as "forward param_fetch" and, when they
  // record, the loads' spans and the waits for them as "stall" events).
  InferenceResult generate(OpTimes* prefill_ops = nullptr, OpTimes* decode_ops = nullptr);

  int64_t weight_bytes() const;     // all parameters
  int64_t ring_slot_bytes() const;  // device bytes of the ring's slots (0 without a ring)

 private:
  struct Impl;
  MoeInference() = default;
  std::unique_ptr<Impl> impl_;
};

}  // namespace switchyard
