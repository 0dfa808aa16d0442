// Every bundled config: parse -> serialise -> parse is the identity, and the content hash does not
// depend on key order, whitespace, or how an integer is written; it changes with semantics only.
#include <gtest/gtest.h>

#include <functional>

#include "tests/core/test_util.h"

namespace switchyard {
namespace {

using OrderedJson = nlohmann::ordered_json;

// Rewrites `j` with every object's keys in reverse order and integers written as floats (8 -> 8.0).
OrderedJson scramble(const Json& j) {
  if (j.is_object()) {
    OrderedJson out = OrderedJson::object();
    std::vector<std::string> keys;
    for (const auto& [k, v] : j.items()) keys.push_back(k);
    for (auto it = keys.rbegin(); it != keys.rend(); ++it) out[*it] = scramble(j.at(*it));
    return out;
  }
  if (j.is_array()) {
    OrderedJson out = OrderedJson::array();
    for (const auto& v : j) out.push_back(scramble(v));
    return out;
  }
  if (j.is_number_integer() || j.is_number_unsigned())
    return OrderedJson(static_cast<double>(j.get<int64_t>()));
  return OrderedJson::parse(j.dump());
}

template <typename Spec>
void check_kind(ConfigKind kind, std::function<Spec(const Json&)> parse) {
  const ConfigRegistry reg = testing::bundled();
  const auto names = reg.list(kind);
  ASSERT_FALSE(names.empty());
  for (const auto& name : names) {
    SCOPED_TRACE(name);
    const Json raw = load_json_file(reg.resolve(kind, name));
    const Spec a = parse(raw);
    const Spec b = parse(to_json(a));
    EXPECT_TRUE(a == b) << "round trip changed the spec";
    EXPECT_EQ(canonical_dump(to_json(a)), canonical_dump(to_json(b)));

    // Same content, other text: keys reversed, integers as floats, indented differently.
    const std::string text = scramble(raw).dump(3);
    const Spec c = parse(parse_json_text(text, name));
    EXPECT_EQ(content_hash(semantic_json(a)), content_hash(semantic_json(c)));
    EXPECT_TRUE(a == c);
  }
}

TEST(RoundTrip, Models) {
  check_kind<ModelSpec>(ConfigKind::kModel, [](const Json& j) { return parse_model(j); });
}
TEST(RoundTrip, Clusters) {
  check_kind<ClusterSpec>(ConfigKind::kCluster, [](const Json& j) { return parse_cluster(j); });
}
TEST(RoundTrip, Plans) {
  check_kind<Plan>(ConfigKind::kPlan, [](const Json& j) { return parse_plan(j); });
}
TEST(RoundTrip, Workloads) {
  check_kind<Workload>(ConfigKind::kWorkload, [](const Json& j) { return parse_workload(j); });
}

TEST(ContentHash, IgnoresMetadataAndDefaultsButNotSemantics) {
  Plan a = parse_plan(Json::parse(R"({"schema_version": 1, "name": "a", "dp": 8})"));
  Plan b = parse_plan(
      Json::parse(R"({"schema_version": 1, "name": "b", "description": "same plan", "dp": 8,
                                      "tp": 1, "schedule": "1f1b", "capacity_factor": null})"));
  EXPECT_EQ(content_hash(semantic_json(a)), content_hash(semantic_json(b)));
  Plan c = parse_plan(Json::parse(R"({"schema_version": 1, "dp": 4})"));
  EXPECT_NE(content_hash(semantic_json(a)), content_hash(semantic_json(c)));

  ClusterSpec cl = testing::bundled().load_cluster("dgx-h100");
  EXPECT_NE(content_hash(semantic_json(cl)), content_hash(semantic_json(with_nodes(cl, 2))));
}

TEST(ContentHash, StableAcrossVersions) {
  // A store key must never change for the same content: pin one.
  Plan p = parse_plan(Json::parse(R"({"schema_version": 1})"));
  EXPECT_EQ(
      canonical_dump(semantic_json(p)),
      R"({"capacity_factor":null,"cp":1,"dispatch":"all_to_all","dp":1,"ep":1,"expert_replicas":null,)"
      R"("expert_tp":1,"grad_bucket_bytes":25000000,"micro_batch_size":1,"placement":{"activations":"gpu",)"
      R"("dense_params":"gpu","expert_params":"gpu","gradients":"gpu","optimizer_states":"gpu"},"pp":1,)"
      R"("prefetch":{"depth":0,"direction":"none"},"recompute":"none","ring_sections":0,"schedule":"1f1b",)"
      R"("sequence_parallel":false,"stage_layers":null,"tp":1,"vp":1,"zero_stage":0})");
}

}  // namespace
}  // namespace switchyard
