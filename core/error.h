// Errors for user input. Every problem with a config names the JSON path where it was found and the
// rule it breaks (`plan.ep: 6 does not divide model.moe.num_experts 64`). Parsing and validation
// collect every problem before throwing, so a user fixes a file in one pass. Library code never
// exits: the CLI catches ConfigError, prints each issue and exits with code 2.
#pragma once

#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace switchyard {

struct ConfigIssue {
  ConfigIssue() = default;
  ConfigIssue(std::string p, std::string m, std::string f = {})
      : path(std::move(p)), message(std::move(m)), file(std::move(f)) {}

  std::string path;     // JSON path, e.g. "plan.placement.gradients" or "model.moe.layers[3]"
  std::string message;  // the rule and the numbers, e.g. "must be >= 1, got 0"
  std::string file;     // the file the value came from, when it came from one

  std::string to_string() const {
    std::string out = file.empty() ? "" : file + ": ";
    return out + (path.empty() ? message : path + ": " + message);
  }
  bool operator==(const ConfigIssue&) const = default;
};

class ConfigError : public std::runtime_error {
 public:
  explicit ConfigError(std::vector<ConfigIssue> issues);
  ConfigError(std::string path, std::string message);

  const std::vector<ConfigIssue>& issues() const { return issues_; }

 private:
  static std::string join(const std::vector<ConfigIssue>& issues);
  std::vector<ConfigIssue> issues_;
};

// Sets the file of every issue that has none, e.g. when a parse error surfaces while loading a
// file.
ConfigError with_file(const ConfigError& e, const std::string& file);

// Throws ConfigError when `issues` is not empty.
void throw_if_any(std::vector<ConfigIssue> issues);

}  // namespace switchyard
