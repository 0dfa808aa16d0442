// The `calibrate` subcommand: micro-benchmarks of the CPU backend (GEMMs over shapes, memory
// streaming, attention, and under mpirun each collective over sizes with nccl-tests' bus
// bandwidth) and the least-squares fit of the cluster's cost-model constants
// (cost_models/calibration.h), written as a profile file and stored with its residuals.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>

#include "tools/cli_common.h"

namespace switchyard::cli {

std::function<int()> add_calibrate_command(CLI::App& app, const Common& common);

}  // namespace switchyard::cli
