#include "core/json_io.h"

#include <cmath>
#include <fstream>
#include <sstream>

#include "core/hash.h"

namespace switchyard {

std::string json_type_name(const Json& j) {
  switch (j.type()) {
    case Json::value_t::null:
      return "null";
    case Json::value_t::object:
      return "an object";
    case Json::value_t::array:
      return "an array";
    case Json::value_t::string:
      return "a string";
    case Json::value_t::boolean:
      return "a boolean";
    case Json::value_t::number_integer:
    case Json::value_t::number_unsigned:
      return "an integer";
    case Json::value_t::number_float:
      return "a number";
    default:
      return "an unsupported value";
  }
}

std::string child_path(std::string_view parent, std::string_view key) {
  std::string out(parent);
  if (!out.empty()) out += '.';
  out += key;
  return out;
}

std::string index_path(std::string_view parent, size_t index) {
  return std::string(parent) + "[" + std::to_string(index) + "]";
}

namespace {

// A short rendering of a value for messages; containers are not walked (they may be deep).
std::string shown(const Json& j) {
  if (j.is_object()) return j.empty() ? "{}" : "{...}";
  if (j.is_array()) return j.empty() ? "[]" : "[...]";
  std::string s = j.dump();
  if (s.size() > 40) s = s.substr(0, 37) + "...";
  return s;
}

}  // namespace

std::optional<int64_t> read_int(const Json& j, const std::string& path,
                                std::vector<ConfigIssue>& issues) {
  if (j.is_number_integer()) return j.get<int64_t>();
  if (j.is_number_unsigned()) {
    uint64_t u = j.get<uint64_t>();
    if (u <= static_cast<uint64_t>(INT64_MAX)) return static_cast<int64_t>(u);
  }
  // 8.589934592e10 is an integer written in exponent form: accept it when it is exact.
  if (j.is_number_float()) {
    double d = j.get<double>();
    if (std::isfinite(d) && std::floor(d) == d && std::fabs(d) < 9.0e18)
      return static_cast<int64_t>(d);
  }
  issues.push_back({path, "expected an integer, got " + json_type_name(j) + " " + shown(j)});
  return std::nullopt;
}

std::optional<double> read_number(const Json& j, const std::string& path,
                                  std::vector<ConfigIssue>& issues) {
  if (j.is_number()) {
    double d = j.get<double>();
    if (std::isfinite(d)) return d;
  }
  issues.push_back({path, "expected a number, got " + json_type_name(j) + " " + shown(j)});
  return std::nullopt;
}

std::optional<bool> read_bool(const Json& j, const std::string& path,
                              std::vector<ConfigIssue>& issues) {
  if (j.is_boolean()) return j.get<bool>();
  issues.push_back({path, "expected true or false, got " + json_type_name(j) + " " + shown(j)});
  return std::nullopt;
}

std::optional<std::string> read_string(const Json& j, const std::string& path,
                                       std::vector<ConfigIssue>& issues) {
  if (j.is_string()) return j.get<std::string>();
  issues.push_back({path, "expected a string, got " + json_type_name(j) + " " + shown(j)});
  return std::nullopt;
}

JsonReader::JsonReader(const Json& j, std::string path, std::vector<ConfigIssue>& issues)
    : j_(j), path_(std::move(path)), issues_(issues), is_object_(j.is_object()) {
  if (!is_object_)
    add_issue(path_, "expected an object, got " + json_type_name(j) + " " + shown(j));
}

void JsonReader::add_issue(std::string path, std::string message) {
  issues_.push_back({std::move(path), std::move(message)});
}

bool JsonReader::has(std::string_view key) const {
  if (!is_object_) return false;
  auto it = j_.find(key);
  return it != j_.end() && !it->is_null();
}

const Json* JsonReader::child(std::string_view key, bool required) {
  if (!is_object_) return nullptr;
  known_.emplace(key);
  auto it = j_.find(key);
  if (it == j_.end() || it->is_null()) {
    if (required) add_issue(path_of(key), "missing (required)");
    return nullptr;
  }
  return &*it;
}

bool JsonReader::check_range(std::string_view key, int64_t value, int64_t min_value,
                             int64_t max_value) {
  if (value < min_value) {
    add_issue(path_of(key),
              "must be >= " + std::to_string(min_value) + ", got " + std::to_string(value));
    return false;
  }
  if (value > max_value) {
    add_issue(path_of(key),
              "must be <= " + std::to_string(max_value) + ", got " + std::to_string(value));
    return false;
  }
  return true;
}

bool JsonReader::required(std::string_view key, int64_t* out, int64_t min_value,
                          int64_t max_value) {
  const Json* v = child(key, true);
  if (!v) return false;
  auto r = read_int(*v, path_of(key), issues_);
  if (!r || !check_range(key, *r, min_value, max_value)) return false;
  *out = *r;
  return true;
}

bool JsonReader::optional(std::string_view key, int64_t* out, int64_t min_value,
                          int64_t max_value) {
  const Json* v = child(key, false);
  if (!v) return false;
  auto r = read_int(*v, path_of(key), issues_);
  if (!r || !check_range(key, *r, min_value, max_value)) return false;
  *out = *r;
  return true;
}

bool JsonReader::required(std::string_view key, int* out, int min_value, int max_value) {
  int64_t v = 0;
  if (!required(key, &v, min_value, max_value)) return false;
  *out = static_cast<int>(v);
  return true;
}

bool JsonReader::optional(std::string_view key, int* out, int min_value, int max_value) {
  int64_t v = 0;
  if (!optional(key, &v, min_value, max_value)) return false;
  *out = static_cast<int>(v);
  return true;
}

bool JsonReader::required(std::string_view key, double* out) {
  const Json* v = child(key, true);
  if (!v) return false;
  auto r = read_number(*v, path_of(key), issues_);
  if (r) *out = *r;
  return r.has_value();
}

bool JsonReader::optional(std::string_view key, double* out) {
  const Json* v = child(key, false);
  if (!v) return false;
  auto r = read_number(*v, path_of(key), issues_);
  if (r) *out = *r;
  return r.has_value();
}

bool JsonReader::required(std::string_view key, bool* out) {
  const Json* v = child(key, true);
  if (!v) return false;
  auto r = read_bool(*v, path_of(key), issues_);
  if (r) *out = *r;
  return r.has_value();
}

bool JsonReader::optional(std::string_view key, bool* out) {
  const Json* v = child(key, false);
  if (!v) return false;
  auto r = read_bool(*v, path_of(key), issues_);
  if (r) *out = *r;
  return r.has_value();
}

bool JsonReader::required(std::string_view key, std::string* out) {
  const Json* v = child(key, true);
  if (!v) return false;
  auto r = read_string(*v, path_of(key), issues_);
  if (r) *out = std::move(*r);
  return r.has_value();
}

bool JsonReader::optional(std::string_view key, std::string* out) {
  const Json* v = child(key, false);
  if (!v) return false;
  auto r = read_string(*v, path_of(key), issues_);
  if (r) *out = std::move(*r);
  return r.has_value();
}

bool JsonReader::optional(std::string_view key, std::vector<std::string>* out) {
  const Json* v = child(key, false);
  if (!v) return false;
  if (!v->is_array()) {
    add_issue(path_of(key), "expected an array of strings, got " + json_type_name(*v));
    return false;
  }
  std::vector<std::string> items;
  bool ok = true;
  for (size_t i = 0; i < v->size(); ++i) {
    auto s = read_string((*v)[i], index_path(path_of(key), i), issues_);
    if (s)
      items.push_back(std::move(*s));
    else
      ok = false;
  }
  if (ok) *out = std::move(items);
  return ok;
}

void JsonReader::finish() {
  if (!is_object_) return;
  for (const auto& [key, value] : j_.items()) {
    if (!known_.contains(key)) add_issue(path_of(key), "unknown key");
  }
}

void read_meta(JsonReader& r, ConfigMeta& meta, bool name_required) {
  r.required("schema_version", &meta.schema_version, 1);
  if (meta.schema_version != 1)
    r.add_issue(
        r.path_of("schema_version"),
        "unsupported version " + std::to_string(meta.schema_version) + " (this build reads 1)");
  if (name_required)
    r.required("name", &meta.name);
  else
    r.optional("name", &meta.name);
  r.optional("description", &meta.description);
  r.optional("source", &meta.source);
  r.optional("assumptions", &meta.assumptions);
}

void write_meta(const ConfigMeta& meta, Json& j) {
  j["schema_version"] = meta.schema_version;
  j["name"] = meta.name;
  j["description"] = meta.description;
  j["source"] = meta.source;
  j["assumptions"] = meta.assumptions;
}

namespace {

// Raised from the parser callback; turned into a ConfigError by parse_json_text.
struct StructureError {
  std::string message;
};

}  // namespace

Json parse_json_text(std::string_view text, const std::string& source) {
  // Configs are shallow; a deep nesting is an attack or an accident (and would overflow the stack
  // when printed). Duplicate keys would silently keep the last value, so they are errors too.
  constexpr int kMaxDepth = 64;
  std::vector<std::set<std::string>> keys_by_depth;
  std::string path_hint;
  auto callback = [&](int depth, Json::parse_event_t event, Json& parsed) {
    if (depth > kMaxDepth)
      throw StructureError{"nested deeper than " + std::to_string(kMaxDepth) + " levels"};
    switch (event) {
      case Json::parse_event_t::object_start:
        keys_by_depth.emplace_back();
        break;
      case Json::parse_event_t::object_end:
        if (!keys_by_depth.empty()) keys_by_depth.pop_back();
        break;
      case Json::parse_event_t::key:
        if (!keys_by_depth.empty() &&
            !keys_by_depth.back().insert(parsed.get<std::string>()).second)
          throw StructureError{"duplicate key \"" + parsed.get<std::string>() + "\""};
        break;
      default:
        break;
    }
    return true;
  };
  try {
    return Json::parse(text.begin(), text.end(), callback);
  } catch (const StructureError& e) {
    throw ConfigError(source, "invalid JSON: " + e.message);
  } catch (const Json::exception& e) {
    // e.what() reads "[json.exception.parse_error.101] parse error at line 3, column 7: ...";
    // numbers beyond double range raise out_of_range.406.
    std::string what = e.what();
    auto pos = what.find("] ");
    throw ConfigError(source,
                      "invalid JSON: " + (pos == std::string::npos ? what : what.substr(pos + 2)));
  }
}

Json load_json_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ConfigError(path.string(), "cannot open file");
  std::ostringstream text;
  text << in.rdbuf();
  return parse_json_text(text.str(), path.string());
}

std::string canonical_dump(const Json& j) {
  // nlohmann's default object type is an ordered std::map, so keys come out sorted; floats are
  // written in the shortest form that round-trips.
  return j.dump(-1, ' ', /*ensure_ascii=*/true);
}

std::string content_hash(const Json& j) { return sha256_hex(canonical_dump(j)); }

}  // namespace switchyard
