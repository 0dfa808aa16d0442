// Strict JSON reading for configs. A JsonReader walks one JSON object: each getter names the key it
// reads, checks its type, and records a ConfigIssue with the full JSON path when the key is missing
// or mistyped; finish() reports every key nobody asked for. Nothing throws until the caller has
// read the whole object, so one pass reports every problem. Also: canonical serialisation and the
// content hash used as store keys (independent of key order and formatting).
#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/error.h"

namespace switchyard {

using Json = nlohmann::json;

// Enum <-> JSON string tables. Specialise with
//   static constexpr std::pair<E, std::string_view> kValues[] = {{E::kA, "a"}, ...};
template <typename E>
struct EnumNames;

template <typename E>
std::string_view enum_name(E value) {
  for (const auto& [v, name] : EnumNames<E>::kValues)
    if (v == value) return name;
  return "?";
}

template <typename E>
std::optional<E> enum_from_name(std::string_view name) {
  for (const auto& [v, n] : EnumNames<E>::kValues)
    if (n == name) return v;
  return std::nullopt;
}

template <typename E>
std::string enum_choices() {
  std::string out;
  for (const auto& [v, n] : EnumNames<E>::kValues) {
    if (!out.empty()) out += ", ";
    out += '"';
    out += n;
    out += '"';
  }
  return out;
}

// Human-readable JSON type name for error messages ("string", "number", "object", ...).
std::string json_type_name(const Json& j);
std::string child_path(std::string_view parent, std::string_view key);
std::string index_path(std::string_view parent, size_t index);

// Reads typed scalars from `j` at `path`; returns nullopt and records an issue on mismatch.
std::optional<int64_t> read_int(const Json& j, const std::string& path,
                                std::vector<ConfigIssue>& issues);
std::optional<double> read_number(const Json& j, const std::string& path,
                                  std::vector<ConfigIssue>& issues);
std::optional<bool> read_bool(const Json& j, const std::string& path,
                              std::vector<ConfigIssue>& issues);
std::optional<std::string> read_string(const Json& j, const std::string& path,
                                       std::vector<ConfigIssue>& issues);

class JsonReader {
 public:
  // `j` should be an object; if it is not, an issue is recorded and every getter is a no-op.
  JsonReader(const Json& j, std::string path, std::vector<ConfigIssue>& issues);

  bool is_object() const { return is_object_; }
  const std::string& path() const { return path_; }
  std::string path_of(std::string_view key) const { return child_path(path_, key); }
  bool has(std::string_view key) const;  // present and not null

  // Required getters record "missing" when the key is absent (or null). Optional getters leave
  // *out untouched when the key is absent or null. All return true when *out was set.
  // Integers are checked against [min_value, max_value]; the upper bounds used by the config
  // parsers sit far above any real model or cluster and keep derived products inside int64.
  bool required(std::string_view key, int64_t* out, int64_t min_value = INT64_MIN,
                int64_t max_value = INT64_MAX);
  bool optional(std::string_view key, int64_t* out, int64_t min_value = INT64_MIN,
                int64_t max_value = INT64_MAX);
  bool required(std::string_view key, int* out, int min_value = INT32_MIN,
                int max_value = INT32_MAX);
  bool optional(std::string_view key, int* out, int min_value = INT32_MIN,
                int max_value = INT32_MAX);
  bool required(std::string_view key, double* out);
  bool optional(std::string_view key, double* out);
  bool required(std::string_view key, bool* out);
  bool optional(std::string_view key, bool* out);
  bool required(std::string_view key, std::string* out);
  bool optional(std::string_view key, std::string* out);
  bool optional(std::string_view key, std::vector<std::string>* out);

  template <typename E>
  bool required_enum(std::string_view key, E* out) {
    const Json* v = child(key, /*required=*/true);
    return v && parse_enum(*v, path_of(key), out);
  }
  template <typename E>
  bool optional_enum(std::string_view key, E* out) {
    const Json* v = child(key, /*required=*/false);
    return v && parse_enum(*v, path_of(key), out);
  }

  // Marks `key` as known and returns its value (nullptr when absent or null, recording "missing"
  // when required). The caller reads nested objects and arrays from it.
  const Json* child(std::string_view key, bool required);

  // Records an issue for every key that no getter asked for.
  void finish();

  std::vector<ConfigIssue>& issues() { return issues_; }
  void add_issue(std::string path, std::string message);

 private:
  template <typename E>
  bool parse_enum(const Json& v, const std::string& path, E* out) {
    auto s = read_string(v, path, issues_);
    if (!s) return false;
    if (auto e = enum_from_name<E>(*s)) {
      *out = *e;
      return true;
    }
    add_issue(path, "unknown value \"" + *s + "\"; expected one of " + enum_choices<E>());
    return false;
  }
  bool check_range(std::string_view key, int64_t value, int64_t min_value, int64_t max_value);

  const Json& j_;
  std::string path_;
  std::vector<ConfigIssue>& issues_;
  bool is_object_;
  std::set<std::string, std::less<>> known_;
};

// What every config file carries besides its content: excluded from the content hash.
struct ConfigMeta {
  int schema_version = 1;
  std::string name;
  std::string description;
  std::string source;                    // the public documents its numbers come from
  std::vector<std::string> assumptions;  // numbers that are estimates, and why
  bool operator==(const ConfigMeta&) const = default;
};

// Reads schema_version (must be 1), name, description, source and assumptions.
void read_meta(JsonReader& r, ConfigMeta& meta, bool name_required);
void write_meta(const ConfigMeta& meta, Json& j);

// Parses JSON text; syntax errors become a ConfigError naming `source` and the position.
Json parse_json_text(std::string_view text, const std::string& source);
// Reads and parses a file; a missing or unreadable file is a ConfigError too.
Json load_json_file(const std::filesystem::path& path);

// Canonical text: keys sorted, no whitespace, numbers in shortest round-trip form.
std::string canonical_dump(const Json& j);
// SHA-256 of the canonical text, as 64 lower-case hex digits.
std::string content_hash(const Json& j);

}  // namespace switchyard
