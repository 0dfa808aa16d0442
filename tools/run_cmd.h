// The `run` subcommand of the switchyard CLI: runs a plan on the CPU backend (executor/), under
// mpirun when it has more than one rank, measures it, checks it against the one-process reference
// and stores the measurement beside the prediction.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>

#include "tools/cli_common.h"

namespace switchyard::cli {

// Adds `run`; the returned function runs it when chosen (returns -1 otherwise).
std::function<int()> add_run_command(CLI::App& app, const Common& common);

}  // namespace switchyard::cli
