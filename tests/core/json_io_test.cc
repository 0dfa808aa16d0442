#include "core/json_io.h"

#include <gtest/gtest.h>

namespace switchyard {
namespace {

bool has_issue(const std::vector<ConfigIssue>& issues, const std::string& path,
               const std::string& fragment) {
  for (const auto& i : issues)
    if (i.path == path && i.message.find(fragment) != std::string::npos) return true;
  return false;
}

TEST(JsonReader, ReadsTypedValuesAndRejectsUnknownKeys) {
  Json j =
      Json::parse(R"({"a": 3, "b": 2.5, "c": true, "d": "x", "e": 8.589934592e10, "extra": 1})");
  std::vector<ConfigIssue> issues;
  JsonReader r(j, "root", issues);
  int64_t a = 0, e = 0;
  double b = 0;
  bool c = false;
  std::string d;
  EXPECT_TRUE(r.required("a", &a));
  EXPECT_TRUE(r.required("b", &b));
  EXPECT_TRUE(r.required("c", &c));
  EXPECT_TRUE(r.required("d", &d));
  EXPECT_TRUE(r.required("e", &e));
  r.finish();
  EXPECT_EQ(a, 3);
  EXPECT_DOUBLE_EQ(b, 2.5);
  EXPECT_TRUE(c);
  EXPECT_EQ(d, "x");
  EXPECT_EQ(e, 85899345920);  // an integer written in exponent form
  ASSERT_EQ(issues.size(), 1u);
  EXPECT_EQ(issues[0].path, "root.extra");
  EXPECT_EQ(issues[0].message, "unknown key");
}

TEST(JsonReader, ReportsEveryProblemWithItsPath) {
  Json j = Json::parse(R"({"n": "eight", "f": 1.5, "m": -1, "s": 4})");
  std::vector<ConfigIssue> issues;
  JsonReader r(j, "plan", issues);
  int n = 0, f = 0, m = 0, missing = 0;
  std::string s;
  EXPECT_FALSE(r.required("n", &n));
  EXPECT_FALSE(r.required("f", &f));
  EXPECT_FALSE(r.required("m", &m, 1));
  EXPECT_FALSE(r.required("missing", &missing));
  EXPECT_FALSE(r.required("s", &s));
  r.finish();
  EXPECT_TRUE(has_issue(issues, "plan.n", "expected an integer, got a string"));
  EXPECT_TRUE(has_issue(issues, "plan.f", "expected an integer, got a number 1.5"));
  EXPECT_TRUE(has_issue(issues, "plan.m", "must be >= 1, got -1"));
  EXPECT_TRUE(has_issue(issues, "plan.missing", "missing"));
  EXPECT_TRUE(has_issue(issues, "plan.s", "expected a string"));
  EXPECT_EQ(issues.size(), 5u);
}

TEST(JsonReader, NullCountsAsAbsentAndNonObjectIsAnIssue) {
  Json j = Json::parse(R"({"x": null})");
  std::vector<ConfigIssue> issues;
  JsonReader r(j, "w", issues);
  int x = 7;
  EXPECT_FALSE(r.optional("x", &x));
  EXPECT_EQ(x, 7);
  r.finish();
  EXPECT_TRUE(issues.empty());

  Json arr = Json::parse("[1,2]");
  JsonReader bad(arr, "w", issues);
  EXPECT_FALSE(bad.is_object());
  ASSERT_EQ(issues.size(), 1u);
  EXPECT_EQ(issues[0].path, "w");
}

TEST(JsonText, SyntaxErrorsNameTheSourceAndPosition) {
  try {
    parse_json_text("{\n  \"a\": 1,\n  \"b\": }", "plan.json");
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    ASSERT_EQ(e.issues().size(), 1u);
    EXPECT_EQ(e.issues()[0].path, "plan.json");
    EXPECT_NE(e.issues()[0].message.find("line 3"), std::string::npos) << e.issues()[0].message;
  }
  EXPECT_THROW(load_json_file("/nonexistent/file.json"), ConfigError);
}

TEST(JsonText, DuplicateKeysDeepNestingAndHugeNumbersAreErrors) {
  auto message = [](const std::string& text) {
    try {
      parse_json_text(text, "x.json");
    } catch (const ConfigError& e) {
      return e.issues().at(0).message;
    }
    return std::string("accepted");
  };
  EXPECT_NE(message(R"({"dp": 2, "dp": 4})").find("duplicate key \"dp\""), std::string::npos);
  EXPECT_EQ(message(R"({"a": {"dp": 2}, "b": {"dp": 4}})"), "accepted");  // same key, other objects
  EXPECT_NE(message(std::string(100000, '[') + std::string(100000, ']')).find("nested deeper"),
            std::string::npos);
  EXPECT_NE(message(R"({"dp": 1e400})").find("invalid JSON"), std::string::npos);
}

TEST(CanonicalJson, IndependentOfKeyOrderAndWhitespace) {
  Json a = Json::parse(R"({"b": [1, 2], "a": {"y": 1.5, "x": "s"}})");
  Json b = Json::parse("{\"a\":{\"x\":\"s\",\"y\":1.5},\n\n \"b\":[1,2]}");
  EXPECT_EQ(canonical_dump(a), canonical_dump(b));
  EXPECT_EQ(content_hash(a), content_hash(b));
  EXPECT_EQ(canonical_dump(a), R"({"a":{"x":"s","y":1.5},"b":[1,2]})");
  Json c = Json::parse(R"({"b": [2, 1], "a": {"y": 1.5, "x": "s"}})");
  EXPECT_NE(content_hash(a), content_hash(c));  // array order matters
}

}  // namespace
}  // namespace switchyard
