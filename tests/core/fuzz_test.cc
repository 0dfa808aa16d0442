// Malformed and truncated configs never crash: every mutation of every bundled file either parses
// or raises ConfigError (never another exception), and what parses can be validated. Mutations are
// drawn from a fixed seed, so a failure reproduces.
#include <gtest/gtest.h>

#include <functional>
#include <random>

#include "core/validate.h"
#include "tests/core/test_util.h"

namespace switchyard {
namespace {

std::string mutate_text(std::string s, std::mt19937& rng) {
  static const std::string kChars = "{}[]\":,0123456789.-eE+ntfalsru \n\\x";
  std::uniform_int_distribution<int> op(0, 5);
  if (s.empty()) return s;
  std::uniform_int_distribution<size_t> pos(0, s.size() - 1);
  std::uniform_int_distribution<size_t> ch(0, kChars.size() - 1);
  switch (op(rng)) {
    case 0:
      s.resize(pos(rng));
      break;  // truncate
    case 1:
      s.erase(pos(rng), 1);
      break;  // delete a byte
    case 2:
      s.insert(pos(rng), 1, kChars[ch(rng)]);
      break;  // insert a byte
    case 3:
      s[pos(rng)] = kChars[ch(rng)];
      break;   // replace a byte
    case 4: {  // duplicate a span
      size_t a = pos(rng), b = std::min(s.size(), a + 1 + pos(rng) % 40);
      s.insert(b, s.substr(a, b - a));
      break;
    }
    default:
      s[pos(rng)] = static_cast<char>(rng() & 0xff);
      break;  // any byte
  }
  return s;
}

// Replaces one random node of the tree with a value of another type or an extreme one.
void mutate_tree(Json& j, std::mt19937& rng) {
  std::vector<Json*> nodes;
  std::function<void(Json&)> collect = [&](Json& n) {
    nodes.push_back(&n);
    if (n.is_object() || n.is_array())
      for (auto& c : n) collect(c);
  };
  collect(j);
  Json* target = nodes[rng() % nodes.size()];
  static const Json kValues[] = {Json("text"),
                                 Json(-1),
                                 Json(0),
                                 Json(1e300),
                                 Json(-1e300),
                                 Json(9.5),
                                 Json(nullptr),
                                 Json::array(),
                                 Json::object(),
                                 Json(true),
                                 Json(int64_t{1} << 62),
                                 Json::parse("[1, 2, 3]"),
                                 Json(2147483648.0)};
  switch (rng() % 3) {
    case 0:
      *target = kValues[rng() % std::size(kValues)];
      break;
    case 1:
      if (target->is_object() && !target->empty())
        target->erase(target->begin());
      else
        *target = kValues[rng() % std::size(kValues)];
      break;
    default:
      if (target->is_object())
        (*target)["unexpected_key"] = 1;
      else
        *target = kValues[rng() % std::size(kValues)];
      break;
  }
}

template <typename Spec>
int fuzz_kind(ConfigKind kind, std::function<Spec(const Json&)> parse,
              std::function<void(const Spec&)> use, uint32_t seed) {
  const ConfigRegistry reg = testing::bundled();
  std::mt19937 rng(seed);
  int parsed = 0;
  for (const auto& name : reg.list(kind)) {
    const Json original = load_json_file(reg.resolve(kind, name));
    const std::string text = original.dump(2);
    for (int i = 0; i < 300; ++i) {
      std::string mutated_text = mutate_text(text, rng);
      Json tree = original;
      mutate_tree(tree, rng);
      for (int variant = 0; variant < 2; ++variant) {
        try {
          const Json j = variant == 0 ? parse_json_text(mutated_text, name) : tree;
          Spec s = parse(j);
          use(s);
          ++parsed;
        } catch (const ConfigError& e) {
          EXPECT_FALSE(e.issues().empty());
          for (const auto& issue : e.issues()) EXPECT_FALSE(issue.message.empty());
        } catch (const std::exception& e) {
          ADD_FAILURE() << name << ": unexpected " << typeid(e).name() << ": " << e.what()
                        << "\ninput:\n"
                        << (variant == 0 ? mutated_text : tree.dump());
        }
      }
    }
  }
  return parsed;
}

class Fuzz : public ::testing::Test {
 protected:
  static Inputs base() {
    InputNames n;
    n.plan = "mixtral-8x7b-megatron";
    return load_inputs(testing::bundled(), n);
  }
};

TEST_F(Fuzz, Models) {
  const Inputs in = base();
  int parsed = fuzz_kind<ModelSpec>(
      ConfigKind::kModel, [](const Json& j) { return parse_model(j); },
      [&](const ModelSpec& m) {
        count_params(m);
        flops_per_token(m, m.seq_len);
        validate(in.plan, m, in.cluster, in.workload);
      },
      1);
  EXPECT_GT(parsed, 0);  // some mutations are harmless (whitespace, a description)
}

TEST_F(Fuzz, Clusters) {
  const Inputs in = base();
  fuzz_kind<ClusterSpec>(
      ConfigKind::kCluster, [](const Json& j) { return parse_cluster(j); },
      [&](const ClusterSpec& c) { validate(in.plan, in.model, c, in.workload); }, 2);
}

TEST_F(Fuzz, Plans) {
  const Inputs in = base();
  fuzz_kind<Plan>(
      ConfigKind::kPlan, [](const Json& j) { return parse_plan(j); },
      [&](const Plan& p) {
        validate(p, in.model, in.cluster, in.workload);
        resolve_stage_layers(p, in.model);
      },
      3);
}

TEST_F(Fuzz, Workloads) {
  const Inputs in = base();
  fuzz_kind<Workload>(
      ConfigKind::kWorkload, [](const Json& j) { return parse_workload(j); },
      [&](const Workload& w) {
        validate(in.plan, in.model, in.cluster, w);
        expert_load_fractions(w, in.model);
      },
      4);
}

}  // namespace
}  // namespace switchyard
