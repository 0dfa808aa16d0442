#include "tools/calibrate_cmd.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>

#include "cost_models/calibration.h"
#include "executor/communicator.h"
#include "executor/copy_engine.h"
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
  // Before each repetition, untimed: stream through a buffer twice the core's L2, as the ops
  // between two GEMMs of a step do, so that a kernel does not find its operands where its own
  // previous repetition left them.
  std::vector<float> scratch(size_t{2} << 20, 1.0f);  // 8 MiB
  const auto none = [&scratch] {
    float acc = 0;
    for (size_t i = 0; i < scratch.size(); i += 16) acc += scratch[i]++;
    if (acc < 0) std::abort();  // keeps the loop
  };
  const int reps = quick ? 3 : 7;
  // GEMMs over the smallest dimension (tokens of a micro-batch or an expert's rows, down to the
  // single rows of a decode step) and sizes, in
  // the three layouts a training step runs: forward (X W), data gradient (dY W^T) and weight
  // gradient (X^T dY), each a sample of its shape.
  const std::vector<int> ms = quick ? std::vector<int>{1, 4, 16, 128, 512}
                                    : std::vector<int>{1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024};
  for (int m : ms)
    for (int nk : quick ? std::vector<int>{256, 1024} : std::vector<int>{128, 256, 1024}) {
      const auto a = randoms(static_cast<size_t>(m) * nk),
                 b = randoms(static_cast<size_t>(nk) * nk);
      std::vector<float> c(static_cast<size_t>(std::max(m, nk)) * nk);
      // forward: [m, k] x [k, n]; dgrad: [m, n] x [k, n]^T; wgrad: [m, k]^T x [m, n] -> [k, n]
      d.gemm.push_back({m, nk, nk,
                        median_s(
                            reps,
                            [&] {
                              dev.gemm(false, false, m, nk, nk, 1.0f, a.data(), nk, b.data(), nk,
                                       0.0f, c.data(), nk);
                            },
                            none)});
      d.gemm.push_back({m, nk, nk,
                        median_s(
                            reps,
                            [&] {
                              dev.gemm(false, true, m, nk, nk, 1.0f, a.data(), nk, b.data(), nk,
                                       0.0f, c.data(), nk);
                            },
                            none)});
      d.gemm.push_back({nk, nk, m,
                        median_s(
                            reps,
                            [&] {
                              dev.gemm(true, false, nk, nk, m, 1.0f, a.data(), nk, a.data(), nk,
                                       0.0f, c.data(), nk);
                            },
                            none)});
    }
  // Memory-bound kernels, each counted in bytes the way the lowering counts the op it stands for
  // (core/lower.cc: a norm reads and writes tokens x hidden, its backward 1.5 times that; SwiGLU
  // streams rows x f x 3; a permute 2 x rows x hidden; the loss 12 bytes per logit; fp32 Adam 28
  // bytes per parameter), so the fitted bandwidth prices those ops as this backend runs them.
  const int sreps = quick ? 3 : 9;
  auto sample = [&](const char* kernel, double bytes, auto&& f) {
    d.stream.push_back({bytes, median_s(sreps, f, none), kernel});
  };
  for (size_t bytes = size_t{1} << 16; bytes <= (size_t{1} << (quick ? 22 : 24)); bytes *= 4) {
    std::vector<float> a(bytes / 4, 1.0f), b(bytes / 4);
    sample("copy", 2.0 * static_cast<double>(bytes), [&] { dev.copy(b.data(), a.data(), bytes); });
  }
  for (int rows : quick ? std::vector<int>{128, 2048} : std::vector<int>{128, 512, 2048})
    for (int h : {128, 512}) {
      const size_t n = static_cast<size_t>(rows) * h;
      const auto x = randoms(n), dy = randoms(n), g = randoms(static_cast<size_t>(h));
      std::vector<float> y(n), dx(n), dg(static_cast<size_t>(h));
      const double e = 4.0 * static_cast<double>(n);
      sample("rmsnorm", 2 * e, [&] { dev.rmsnorm(x.data(), g.data(), rows, h, 1e-5f, y.data()); });
      sample("rmsnorm_backward", 3 * e, [&] {
        dev.rmsnorm_backward(x.data(), g.data(), dy.data(), rows, h, 1e-5f, dx.data(), dg.data());
      });
      const int f = 2 * h;
      const auto gu = randoms(n * 4), dout = randoms(n * 2);
      std::vector<float> act(n * 2), dgu(n * 4);
      sample("swiglu", 3 * 2 * e, [&] { dev.swiglu(gu.data(), rows, f, act.data()); });
      sample("swiglu_backward", 4.5 * 2 * e,
             [&] { dev.swiglu_backward(gu.data(), dout.data(), rows, f, dgu.data()); });
      // Top-2 of 8 experts: the permuted buffer holds 2 rows per token.
      const auto logits = randoms(static_cast<size_t>(rows) * 8);
      std::vector<float> probs(static_cast<size_t>(rows) * 8), perm(n * 2), back(n);
      const TokenRouting r = dev.route(logits.data(), rows, 8, 2, true, probs.data());
      sample("permute", 2 * 2 * e, [&] { dev.permute(x.data(), r, h, perm.data()); });
      sample("unpermute_combine", 2 * 2 * e,
             [&] { dev.unpermute_combine(perm.data(), r, h, back.data()); });
      // The loss over a vocabulary 8 times the width.
      const int vocab = 8 * h;
      const auto lg = randoms(static_cast<size_t>(rows) * vocab);
      std::vector<float> work(lg.size());
      std::vector<int> labels(static_cast<size_t>(rows));
      for (int t = 0; t < rows; ++t) labels[static_cast<size_t>(t)] = (t * 7) % vocab;
      // (The kernel overwrites its logits: a fresh copy before each repetition, untimed.)
      d.stream.push_back(
          {12.0 * static_cast<double>(lg.size()),
           median_s(
               sreps, [&] { dev.cross_entropy(work.data(), labels.data(), rows, vocab, 1.0f); },
               [&] {
                 none();
                 std::copy(lg.begin(), lg.end(), work.begin());
               }),
           "cross_entropy"});
    }
  for (size_t n = size_t{1} << 16; n <= (size_t{1} << (quick ? 20 : 22)); n *= 4) {
    std::vector<float> param = randoms(n), grad = randoms(n), m(n, 0.0f), v(n, 0.0f);
    sample("adam", 28.0 * static_cast<double>(n), [&] {
      dev.adam(param.data(), grad.data(), m.data(), v.data(), n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f,
               0.05f);
    });
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

// Copies between tiers on the copy engine, as the ring's and the prefetches' loads run them
// (submit, wait), 1 to 64 MiB, every rank at once (as a node's GPUs move their shares together):
// host memory into the device arena, and SSD-tier files into host memory (evicted from memory
// before each read, so it reads the disk). Each repetition reads
// the next stretch of a source four times the largest copy, so no copy comes from a cache a
// previous one filled (a model's layers do not either).
void measure_transfers(Device& dev, Communicator& world, bool quick, Tier from, Tier to,
                       std::vector<TransferSample>& out) {
  const size_t top = size_t{1} << (quick ? 24 : 26);
  const size_t span = 4 * top;
  Buffer src = dev.memory().allocate(from, span, "calibration source");
  Buffer dst = dev.memory().allocate(to, top, "calibration destination");
  if (from == Tier::kSSD)  // a file written once, as offloaded parameters are
    std::memset(src.data(), 1, span);
  CopyEngine engine(dev);
  size_t offset = 0;
  for (size_t bytes = size_t{1} << 20; bytes <= top; bytes *= 4) {
    const double t = median_s(
        quick ? 3 : 7,
        [&] {
          if (offset + bytes > span) offset = 0;
          engine.wait(engine.submit(dst.data(), src.as<char>() + offset, bytes));
          offset += bytes;
        },
        [&] {
          src.evict();  // SSD tier: the read comes from the disk
          world.barrier();
        });
    out.push_back({static_cast<double>(bytes), t});
  }
}

// How much of an asynchronous all-reduce runs while the rank computes: a GEMM loop and an
// all-reduce of similar length, alone and together (issue the all-reduce, compute, wait).
void measure_overlap(Device& dev, Communicator& world, bool quick, CalibrationData& d) {
  if (world.size() < 2) return;
  const int m = 256, nk = 512, reps = quick ? 3 : 7;
  const auto a = randoms(static_cast<size_t>(m) * nk), b = randoms(static_cast<size_t>(nk) * nk);
  std::vector<float> c(static_cast<size_t>(m) * nk);
  const size_t count = size_t{1} << (quick ? 20 : 22);
  std::vector<float> buf(count, 1.0f);
  const auto sync = [&] { world.barrier(); };
  const auto compute = [&] {
    for (int i = 0; i < 16; ++i)
      dev.gemm(false, false, m, nk, nk, 1.0f, a.data(), nk, b.data(), nk, 0.0f, c.data(), nk);
  };
  const auto comm = [&] {
    world.all_reduce_async(buf.data(), count, DType::kFloat32, ReduceOp::kSum)->wait();
  };
  OverlapSample o;
  o.compute_s = median_s(reps, compute, sync);
  o.comm_s = median_s(reps, comm, sync);
  o.both_s = median_s(
      reps,
      [&] {
        auto pending = world.all_reduce_async(buf.data(), count, DType::kFloat32, ReduceOp::kSum);
        compute();
        pending->wait();
      },
      sync);
  // The slowest rank decides, as in a step.
  double t[3] = {o.compute_s, o.comm_s, o.both_s};
  world.all_reduce(t, 3, DType::kFloat64, ReduceOp::kMax);
  d.overlap = OverlapSample{t[0], t[1], t[2]};
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
  data.ranks = world->size();
  // Compute micro-benchmarks on every rank at once: a rank's core is shared as in a run.
  auto dev = cpu_device({});
  try {
    measure_compute(*dev, f.quick, data);
    measure_collectives(*world, f.quick, data);
    measure_overlap(*dev, *world, f.quick, data);
    measure_transfers(*dev, *world, f.quick, Tier::kCPU, Tier::kGPU, data.host_to_device);
    measure_transfers(*dev, *world, f.quick, Tier::kSSD, Tier::kCPU, data.ssd_to_host);
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
