#include "core/error.h"

#include <utility>

namespace switchyard {

ConfigError::ConfigError(std::vector<ConfigIssue> issues)
    : std::runtime_error(join(issues)), issues_(std::move(issues)) {}

ConfigError::ConfigError(std::string path, std::string message)
    : ConfigError(std::vector<ConfigIssue>{{std::move(path), std::move(message)}}) {}

std::string ConfigError::join(const std::vector<ConfigIssue>& issues) {
  std::string out;
  for (const auto& issue : issues) {
    if (!out.empty()) out += '\n';
    out += issue.to_string();
  }
  return out;
}

ConfigError with_file(const ConfigError& e, const std::string& file) {
  std::vector<ConfigIssue> issues = e.issues();
  for (auto& issue : issues)
    if (issue.file.empty() && issue.path != file) issue.file = file;  // parse errors name it
  return ConfigError(std::move(issues));
}

void throw_if_any(std::vector<ConfigIssue> issues) {
  if (!issues.empty()) throw ConfigError(std::move(issues));
}

}  // namespace switchyard
