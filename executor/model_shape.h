// The widths a runner lays a model out with (ints, as the kernels take them), shared by the
// trainer and the inference runner.
#pragma once

#include <string>

#include "core/error.h"
#include "core/model.h"

namespace switchyard {

struct ModelShape {
  int h = 0, heads = 0, head_dim = 0, vocab = 0, layers = 0, ffn = 0;
  int experts = 0, top_k = 0, f = 0;  // MoE: experts per layer, routed per token, expert width
};

// ConfigError when the CPU runners cannot lay the model out.
inline ModelShape model_shape(const ModelSpec& m) {
  ModelShape s;
  s.h = static_cast<int>(m.hidden_size);
  s.heads = static_cast<int>(m.num_attention_heads);
  s.head_dim =
      static_cast<int>(m.head_dim > 0 ? m.head_dim : m.hidden_size / m.num_attention_heads);
  if (s.head_dim * s.heads != s.h)
    throw ConfigError("model.head_dim", "the CPU runner needs heads * head_dim = hidden_size");
  s.vocab = static_cast<int>(m.vocab_size);
  s.layers = static_cast<int>(m.num_layers);
  s.ffn = static_cast<int>(m.ffn_hidden_size);
  if (m.moe) {
    s.experts = static_cast<int>(m.moe->num_experts);
    s.top_k = static_cast<int>(m.moe->top_k);
    s.f = static_cast<int>(m.moe->expert_ffn_hidden_size);
  }
  return s;
}

}  // namespace switchyard
