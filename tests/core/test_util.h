// Helpers shared by the core and cost-model tests: the bundled configs and small inline models.
#pragma once

#include <string>

#include "core/config_registry.h"

namespace switchyard::testing {

inline ConfigRegistry bundled() { return ConfigRegistry(SWITCHYARD_CONFIG_DIR); }

// A 2-layer model small enough to count by hand: layer 0 dense, layer 1 MoE (4 experts, top-2,
// one shared expert), GQA with 2 query heads and 1 key/value head of width 4.
inline Json tiny_model_json() {
  return Json::parse(R"({
    "schema_version": 1, "name": "hand", "num_layers": 2, "hidden_size": 8, "ffn_hidden_size": 16,
    "num_attention_heads": 2, "num_kv_heads": 1, "vocab_size": 10, "seq_len": 6,
    "moe": {"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 6, "num_shared_experts": 1,
            "layers": {"every": 2, "offset": 1}}
  })");
}

}  // namespace switchyard::testing
