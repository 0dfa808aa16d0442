// Runs a shell command line for the CLI tests and keeps its exit code and standard output.
#pragma once

#include <sys/wait.h>

#include <cstdio>
#include <string>

namespace switchyard::testing {

struct ShellResult {
  int exit_code = -1;  // -1 when the command did not exit normally
  std::string output;  // standard output (append " 2>&1" to the command for stderr too)
};

inline ShellResult sh(const std::string& cmd) {
  ShellResult r;
  FILE* pipe = popen(cmd.c_str(), "r");
  if (!pipe) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, pipe)) > 0) r.output.append(buf, n);
  const int status = pclose(pipe);
  if (WIFEXITED(status)) r.exit_code = WEXITSTATUS(status);
  return r;
}

}  // namespace switchyard::testing
