// The `tune` and `plans` subcommands of the switchyard CLI (tuner/ and its SQLite store).
#pragma once

#include <CLI/CLI.hpp>
#include <functional>

#include "tools/cli_common.h"

namespace switchyard::cli {

// Adds the subcommands; the returned function runs whichever was chosen (returns -1 when none
// of them was).
std::function<int()> add_tune_commands(CLI::App& app, const Common& common);

}  // namespace switchyard::cli
