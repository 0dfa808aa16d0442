#include "tools/calibrate_cmd.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <random>

#include "cost_models/calibration.h"
#include "executor/communicator.h"
#include "executor/device.h"
#include "tuner/store.h"
#ifdef SWITCHYARD_HAVE_MPI
#include "executor/cpu/mpi_communicator.h"
#endif

namespace switchyard::cli {
namespace {

using Clock = std::chrono::steady_clock;

struct CalibrateFlags {
  std::string backend = "cpu";
  InputNames names;  // cluster (and --gpus / --nodes)
  std::string out;
  std::string db = "switchyard.db";
  bool no_db = false;
  bool quick = false;
};

// Median of `reps` timings after one warm-up; `sync` runs untimed before each repetition.
template <typename F, typename S>
double median_s(int reps, F f, S sync) {
  sync();
  f();
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    sync();
    const auto s = Clock::now();
    f();
    t.push_back(std::chrono::duration<double>(Clock::now() - s).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

std::vector<float> randoms(size_t n) {
  std::mt19937 gen(7);
  std::normal_distribution<float> d(0, 1);
  std::vector<float> v(n);
  for (auto& x : v) x = d(gen);
  return v;
}

void measure_compute(Device& dev, bool quick, CalibrationData& d) {
  const auto none = [] {};
  // GEMMs over the smallest dimension (tokens of a micro-batch or an expert's rows) and sizes.
  const std::vector<int> ms =
      quick ? std::vector<int>{16, 128, 512} : std::vector<int>{16, 32, 64, 128, 256, 512, 1024};
  for (int m : ms)
    for (int nk : {256, 1024}) {
      const auto a = randoms(static_cast<size_t>(m) * nk),
                 b = randoms(static_cast<size_t>(nk) * nk);
      std::vector<float> c(static_cast<size_t>(m) * nk);
      const double t = median_s(
          quick ? 3 : 7,
          [&] {
            dev.gemm(false, false, m, nk, nk, 1.0f, a.data(), nk, b.data(), nk, 0.0f, c.data(), nk);
          },
          none);
      d.gemm.push_back({m, nk, nk, t});
    }
  // Streaming: a copy reads and writes every byte.
  for (size_t bytes = size_t{1} << 16; bytes <= (size_t{1} << (quick ? 24 : 26)); bytes *= 4) {
    std::vector<float> a(bytes / 4, 1.0f), b(bytes / 4);
    const double t = median_s(
        quick ? 3 : 9, [&] { dev.copy(b.data(), a.data(), bytes); }, none);
    d.stream.push_back({2.0 * static_cast<double>(bytes), t});
  }
  // Attention at the runner's layout.
  for (int seq : {64, 128, 256}) {
    const int heads = 4, hd = 32, h = heads * hd;
    const auto qkv = randoms(static_cast<size_t>(seq) * 3 * h);
    std::vector<float> out(static_cast<size_t>(seq) * h), lse(static_cast<size_t>(heads) * seq);
    const double t = median_s(
        quick ? 3 : 7,
        [&] { dev.attention(qkv.data(), 1, seq, heads, hd, out.data(), lse.data()); }, none);
    AttentionShape s;
    s.batch = 1;
    s.seq_len = seq;
    s.heads = heads;
    s.kv_heads = heads;
    s.qk_dim = hd;
    s.v_dim = hd;
    d.attention.push_back({s, t});
  }
}

void measure_collectives(Communicator& world, bool quick, CalibrationData& d) {
  if (world.size() < 2) return;
  const int n = world.size();
  const auto sync = [&] { world.barrier(); };
  for (size_t bytes = size_t{1} << 12; bytes <= (size_t{1} << (quick ? 20 : 24)); bytes *= 4) {
    const size_t count = bytes / 4;
    std::vector<float> buf(count * n, 1.0f), out(count * n);
    const int reps = bytes <= (size_t{1} << 16) ? 51 : 9;
    auto record = [&](Collective op, double t) {
      world.all_reduce(&t, 1, DType::kFloat64, ReduceOp::kMax);  // the slowest rank decides
      d.collectives.push_back({op, static_cast<double>(bytes), n, t});
    };
    record(Collective::kAllReduce,
           median_s(
               reps, [&] { world.all_reduce(buf.data(), count, DType::kFloat32, ReduceOp::kSum); },
               sync));
    // nccl-tests' size for all-gather and reduce-scatter is the whole output / input.
    record(Collective::kAllGather,
           median_s(
               reps, [&] { world.all_gather(buf.data(), out.data(), count / n, DType::kFloat32); },
               sync));
    record(Collective::kReduceScatter, median_s(
                                           reps,
                                           [&] {
                                             world.reduce_scatter(buf.data(), out.data(), count / n,
                                                                  DType::kFloat32, ReduceOp::kSum);
                                           },
                                           sync));
    std::vector<size_t> per(n, count / n);
    record(Collective::kAllToAll,
           median_s(
               reps, [&] { world.all_to_allv(buf.data(), per, out.data(), per, DType::kFloat32); },
               sync));
  }
}

int cmd_calibrate(const Common& common, const CalibrateFlags& f) {
  if (f.backend != "cpu")
    throw ConfigError("--backend", "\"" + f.backend +
                                       "\": this build calibrates the cpu backend (the cuda "
                                       "backend's calibration comes with it)");
#ifdef SWITCHYARD_HAVE_MPI
  std::unique_ptr<MpiRuntime> mpi;
  if (launched_by_mpirun()) mpi = MpiRuntime::start(nullptr, nullptr);
  std::unique_ptr<Communicator> world = mpi ? mpi->world(300) : self_communicator("world");
#else
  std::unique_ptr<Communicator> world = self_communicator("world");
#endif
  const ConfigRegistry reg = common.registry();
  ClusterSpec c = reg.load_cluster(f.names.cluster.empty() ? "local-cpu" : f.names.cluster);
  if (f.names.gpus > 0) c = with_gpus(std::move(c), f.names.gpus);
  if (f.names.nodes > 0) c = with_nodes(std::move(c), f.names.nodes);
  CalibrationData data;
  // Compute micro-benchmarks on every rank at once: a rank's core is shared as in a run.
  auto dev = cpu_device({});
  try {
    measure_compute(*dev, f.quick, data);
    measure_collectives(*world, f.quick, data);
  } catch (const std::exception& e) {
#ifdef SWITCHYARD_HAVE_MPI
    if (mpi && world->size() > 1) mpi->abort(1, e.what());  // no rank waits for a failed one
#endif
    throw;
  }
  if (world->rank() != 0) return 0;

  Calibration cal = fit_calibration(data, c, default_cost_profile(c));
  // The CPU backend reserves nothing beside its tensors (no CUDA context, no NCCL buffers).
  cal.profile.runtime_reserved_bytes = 0;
  cal.profile_json["runtime_reserved_bytes"] = 0;
  Json out = cal.report;
  out["cluster"] = c.name;
  out["ranks"] = world->size();
  out["profile"] = cal.profile_json;
  std::cout << "calibration of cluster \"" << c.name << "\" (cpu backend, " << world->size()
            << " rank" << (world->size() > 1 ? "s" : "") << ")\n";
  if (!data.collectives.empty()) {
    std::cout << "  collectives (nccl-tests conventions, slowest rank):\n";
    std::cout << "    op               size(B)    time(us)  algbw(GB/s)  busbw(GB/s)\n";
    const double n = world->size();
    for (const auto& s : data.collectives) {
      const double alg = s.bytes / s.time_s;
      const double factor = s.op == Collective::kAllReduce ? 2 * (n - 1) / n : (n - 1) / n;
      std::printf("    %-14s %9.0f %11.1f %12.2f %12.2f\n",
                  std::string(collective_name(s.op)).c_str(), s.bytes, s.time_s * 1e6, alg / 1e9,
                  alg * factor / 1e9);
    }
  }
  std::cout << "  fitted constants:\n";
  for (const auto& [k, v] : cal.report["fitted"].items())
    std::cout << "    " << k << " = " << v.dump() << "\n";
  std::cout << "  median |residual| under the fitted profile:";
  for (const auto& [k, v] : cal.report["median_abs_residual"].items())
    std::cout << " " << k << " " << fmt("%.1f%%", 100 * v.get<double>());
  std::cout << "\n";
  if (!f.out.empty()) {
    std::ofstream file(f.out);
    file << cal.profile_json.dump(2) << "\n";
    if (!file) throw std::runtime_error("cannot write " + f.out);
    std::cout << "  profile written to " << f.out << " (use it with --profile)\n";
  }
  if (!f.no_db) {
    auto store = Store::open(f.db);
    const std::string ch = store->put_cluster(c);
    store->put_calibration(ch, "cpu", cal.profile_json, out);
    std::cout << "  stored in " << f.db << "\n";
  }
  return 0;
}

}  // namespace

std::function<int()> add_calibrate_command(CLI::App& app, const Common& common) {
  auto f = std::make_shared<CalibrateFlags>();
  auto* cmd = app.add_subcommand(
      "calibrate",
      "Measure GEMMs, memory streaming, attention and (under mpirun) collectives; fit the "
      "cluster's cost-model constants by least squares, with residuals");
  cmd->add_option("--backend", f->backend, "cpu");
  cmd->add_option("--cluster", f->names.cluster, "Cluster to calibrate (default local-cpu)");
  auto* nodes = cmd->add_option("--nodes", f->names.nodes, "Override the node count")
                    ->check(CLI::PositiveNumber);
  cmd->add_option("--gpus", f->names.gpus, "Ranks of the cluster in use")
      ->check(CLI::PositiveNumber)
      ->excludes(nodes);
  cmd->add_option("--out", f->out, "Write the fitted profile (JSON, for --profile) here");
  cmd->add_option("--db", f->db, "Plan store for the calibration (default ./switchyard.db)");
  cmd->add_flag("--no-db", f->no_db, "Do not store the calibration");
  cmd->add_flag("--quick", f->quick, "Fewer sizes and repetitions");
  return [=, &common]() -> int {
    if (!*cmd) return -1;
    return cmd_calibrate(common, *f);
  };
}

}  // namespace switchyard::cli
