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
#include "executor/host_kernels.h"
#include "tuner/store.h"
#ifdef SWITCHYARD_HAVE_MPI
#include "executor/cpu/mpi_communicator.h"
#endif
#ifdef SWITCHYARD_HAVE_CUDA
#include "executor/cuda/cuda_device.h"
#include "executor/cuda/nccl_communicator.h"
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

// Device memory for the micro-benchmarks: `n` floats, or a host vector's values.
struct DeviceFloats {
  Buffer b;
  float* p() const { return b.as<float>(); }
};
DeviceFloats on_device(Device& dev, size_t n) {
  return {dev.memory().allocate(Tier::kGPU, n * sizeof(float), "calibration buffer")};
}
DeviceFloats on_device(Device& dev, const std::vector<float>& v) {
  DeviceFloats out = on_device(dev, v.size());
  dev.copy(out.p(), v.data(), v.size() * sizeof(float));
  return out;
}

// The shapes measured: the CPU backend's (one core: up to 1024) or a GPU's (up to 8192, where a
// GEMM fills the chip).
void measure_compute(Device& dev, bool quick, CalibrationData& d) {
  const bool gpu = dev.name() != "cpu";
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
  std::vector<int> ms = quick ? std::vector<int>{1, 4, 16, 128, 512}
                              : std::vector<int>{1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024};
  std::vector<int> nks = quick ? std::vector<int>{256, 1024} : std::vector<int>{128, 256, 1024};
  if (gpu) {
    ms = quick ? std::vector<int>{1, 16, 256, 2048, 8192}
               : std::vector<int>{1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192};
    nks = quick ? std::vector<int>{1024, 4096} : std::vector<int>{1024, 2048, 4096, 8192};
  }
  for (int m : ms)
    for (int nk : nks) {
      const auto a = on_device(dev, randoms(static_cast<size_t>(m) * nk)),
                 b = on_device(dev, randoms(static_cast<size_t>(nk) * nk));
      const auto c = on_device(dev, static_cast<size_t>(std::max(m, nk)) * nk);
      // forward: [m, k] x [k, n]; dgrad: [m, n] x [k, n]^T; wgrad: [m, k]^T x [m, n] -> [k, n]
      d.gemm.push_back({m, nk, nk,
                        median_s(
                            reps,
                            [&] {
                              dev.gemm(false, false, m, nk, nk, 1.0f, a.p(), nk, b.p(), nk, 0.0f,
                                       c.p(), nk);
                            },
                            none)});
      d.gemm.push_back({m, nk, nk,
                        median_s(
                            reps,
                            [&] {
                              dev.gemm(false, true, m, nk, nk, 1.0f, a.p(), nk, b.p(), nk, 0.0f,
                                       c.p(), nk);
                            },
                            none)});
      d.gemm.push_back({nk, nk, m,
                        median_s(
                            reps,
                            [&] {
                              dev.gemm(true, false, nk, nk, m, 1.0f, a.p(), nk, a.p(), nk, 0.0f,
                                       c.p(), nk);
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
  const int big = gpu ? 6 : 0;  // a GPU streams 64 times more before bandwidth dominates
  for (size_t bytes = size_t{1} << 16; bytes <= (size_t{1} << ((quick ? 22 : 24) + big));
       bytes *= 4) {
    const auto a = on_device(dev, bytes / 4), b = on_device(dev, bytes / 4);
    sample("copy", 2.0 * static_cast<double>(bytes), [&] { dev.copy(b.p(), a.p(), bytes); });
  }
  for (int rows : quick ? std::vector<int>{128, 2048} : std::vector<int>{128, 512, 2048})
    for (int h : gpu ? std::vector<int>{1024, 4096} : std::vector<int>{128, 512}) {
      const size_t n = static_cast<size_t>(rows) * h;
      const auto x = on_device(dev, randoms(n)), dy = on_device(dev, randoms(n)),
                 g = on_device(dev, randoms(static_cast<size_t>(h)));
      const auto y = on_device(dev, n), dx = on_device(dev, n),
                 dg = on_device(dev, static_cast<size_t>(h));
      const double e = 4.0 * static_cast<double>(n);
      sample("rmsnorm", 2 * e, [&] { dev.rmsnorm(x.p(), g.p(), rows, h, 1e-5f, y.p()); });
      sample("rmsnorm_backward", 3 * e,
             [&] { dev.rmsnorm_backward(x.p(), g.p(), dy.p(), rows, h, 1e-5f, dx.p(), dg.p()); });
      const int f = 2 * h;
      const auto gu = on_device(dev, randoms(n * 4)), dout = on_device(dev, randoms(n * 2));
      const auto act = on_device(dev, n * 2), dgu = on_device(dev, n * 4);
      sample("swiglu", 3 * 2 * e, [&] { dev.swiglu(gu.p(), rows, f, act.p()); });
      sample("swiglu_backward", 4.5 * 2 * e,
             [&] { dev.swiglu_backward(gu.p(), dout.p(), rows, f, dgu.p()); });
      // Top-2 of 8 experts: the permuted buffer holds 2 rows per token.
      const auto logits = on_device(dev, randoms(static_cast<size_t>(rows) * 8));
      const auto probs = on_device(dev, static_cast<size_t>(rows) * 8),
                 perm = on_device(dev, n * 2), back = on_device(dev, n);
      const TokenRouting r = dev.route(logits.p(), rows, 8, 2, true, probs.p());
      sample("permute", 2 * 2 * e, [&] { dev.permute(x.p(), r, h, perm.p()); });
      sample("unpermute_combine", 2 * 2 * e,
             [&] { dev.unpermute_combine(perm.p(), r, h, back.p()); });
      // The loss over a vocabulary 8 times the width.
      const int vocab = 8 * h;
      const auto lg = on_device(dev, randoms(static_cast<size_t>(rows) * vocab));
      const auto work = on_device(dev, static_cast<size_t>(rows) * vocab);
      const size_t lg_bytes = sizeof(float) * static_cast<size_t>(rows) * vocab;
      std::vector<int> labels(static_cast<size_t>(rows));
      for (int t = 0; t < rows; ++t) labels[static_cast<size_t>(t)] = (t * 7) % vocab;
      // (The kernel overwrites its logits: a fresh copy before each repetition, untimed.)
      d.stream.push_back(
          {12.0 * static_cast<double>(rows) * vocab,
           median_s(
               sreps, [&] { dev.cross_entropy(work.p(), labels.data(), rows, vocab, 1.0f); },
               [&] {
                 none();
                 dev.copy(work.p(), lg.p(), lg_bytes);
               }),
           "cross_entropy"});
    }
  for (size_t n = size_t{1} << 16; n <= (size_t{1} << ((quick ? 20 : 22) + big)); n *= 4) {
    const auto param = on_device(dev, randoms(n)), grad = on_device(dev, randoms(n));
    const auto m = on_device(dev, n), v = on_device(dev, n);
    dev.zero(m.p(), n * sizeof(float));
    dev.zero(v.p(), n * sizeof(float));
    sample("adam", 28.0 * static_cast<double>(n), [&] {
      dev.adam(param.p(), grad.p(), m.p(), v.p(), n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.05f);
    });
  }
  // Attention at the runner's layout.
  for (int seq : gpu ? std::vector<int>{256, 1024, 2048} : std::vector<int>{64, 128, 256}) {
    const int heads = gpu ? 16 : 4, hd = gpu ? 64 : 32, h = heads * hd;
    const auto qkv = on_device(dev, randoms(static_cast<size_t>(seq) * 3 * h));
    const auto out = on_device(dev, static_cast<size_t>(seq) * h),
               lse = on_device(dev, static_cast<size_t>(heads) * seq);
    const double t = median_s(
        quick ? 3 : 7, [&] { dev.attention(qkv.p(), 1, seq, heads, hd, out.p(), lse.p()); }, none);
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

void measure_collectives(Device& dev, Communicator& world, bool quick, CalibrationData& d) {
  if (world.size() < 2) return;
  const int n = world.size();
  const auto sync = [&] { world.barrier(); };
  for (size_t bytes = size_t{1} << 12; bytes <= (size_t{1} << (quick ? 20 : 24)); bytes *= 4) {
    const size_t count = bytes / 4;
    const auto buf_d = on_device(dev, std::vector<float>(count * n, 1.0f)),
               out_d = on_device(dev, count * n);
    float *buf = buf_d.p(), *out = out_d.p();
    const int reps = bytes <= (size_t{1} << 16) ? 51 : 9;
    auto record = [&](Collective op, double t) {
      world.all_reduce(&t, 1, DType::kFloat64, ReduceOp::kMax);  // the slowest rank decides
      d.collectives.push_back({op, static_cast<double>(bytes), n, t});
    };
    record(Collective::kAllReduce,
           median_s(
               reps, [&] { world.all_reduce(buf, count, DType::kFloat32, ReduceOp::kSum); }, sync));
    // nccl-tests' size for all-gather and reduce-scatter is the whole output / input.
    record(Collective::kAllGather,
           median_s(
               reps, [&] { world.all_gather(buf, out, count / n, DType::kFloat32); }, sync));
    record(Collective::kReduceScatter,
           median_s(
               reps,
               [&] { world.reduce_scatter(buf, out, count / n, DType::kFloat32, ReduceOp::kSum); },
               sync));
    std::vector<size_t> per(n, count / n);
    record(Collective::kAllToAll,
           median_s(
               reps, [&] { world.all_to_allv(buf, per, out, per, DType::kFloat32); }, sync));
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

// The host's Adam over host-resident states, as an offloaded update runs it (host_adam on
// `threads` threads), every rank at once: 28 bytes per parameter read and written, as the lowering
// counts an fp32 update.
void measure_host_adam(Communicator& world, bool quick, int threads,
                       std::vector<TransferSample>& out) {
  for (size_t n = size_t{1} << 18; n <= (size_t{1} << (quick ? 22 : 24)); n *= 4) {
    std::vector<float> param = randoms(n), grad = randoms(n), m(n, 0.0f), v(n, 0.0f);
    const double t = median_s(
        quick ? 3 : 5,
        [&] {
          host_adam_threads(static_cast<size_t>(threads), param.data(), grad.data(), m.data(),
                            v.data(), n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.05f);
        },
        [&] { world.barrier(); });
    out.push_back({28.0 * static_cast<double>(n), t});
  }
}

// How much of an asynchronous all-reduce runs while the rank computes: a GEMM loop and an
// all-reduce of similar length, alone and together (issue the all-reduce, compute, wait).
void measure_overlap(Device& dev, Communicator& world, bool quick, CalibrationData& d) {
  if (world.size() < 2) return;
  const int m = 256, nk = 512, reps = quick ? 3 : 7;
  const auto a = on_device(dev, randoms(static_cast<size_t>(m) * nk)),
             b = on_device(dev, randoms(static_cast<size_t>(nk) * nk)),
             c = on_device(dev, static_cast<size_t>(m) * nk);
  const size_t count = size_t{1} << (quick ? 20 : 22);
  const auto buf = on_device(dev, std::vector<float>(count, 1.0f));
  const auto sync = [&] { world.barrier(); };
  const auto compute = [&] {
    for (int i = 0; i < 16; ++i)
      dev.gemm(false, false, m, nk, nk, 1.0f, a.p(), nk, b.p(), nk, 0.0f, c.p(), nk);
  };
  const auto comm = [&] {
    world.all_reduce_async(buf.p(), count, DType::kFloat32, ReduceOp::kSum)->wait();
  };
  OverlapSample o;
  o.compute_s = median_s(reps, compute, sync);
  o.comm_s = median_s(reps, comm, sync);
  o.both_s = median_s(
      reps,
      [&] {
        auto pending = world.all_reduce_async(buf.p(), count, DType::kFloat32, ReduceOp::kSum);
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
  if (f.backend == "cuda" && f.names.cluster.empty())
    throw ConfigError("--cluster",
                      "name the cluster whose GPU this is (e.g. --cluster dgx-h100 --gpus 1)");
#ifndef SWITCHYARD_HAVE_CUDA
  if (f.backend == "cuda") throw no_cuda_backend();
#endif
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
  // The ranks loading at once from this node's DRAM and SSD (the simulator's sharers are the GPUs
  // of one node), not the whole job.
  data.ranks = ranks_on_this_node(world->size(), c.gpus_per_node);
  // Compute micro-benchmarks on every rank at once: a rank's core (or GPU) is shared as in a run.
  std::unique_ptr<Device> dev;
  Communicator* collectives = world.get();  // cuda: NCCL over the GPUs
#ifdef SWITCHYARD_HAVE_CUDA
  std::unique_ptr<Communicator> nccl;
  if (f.backend == "cuda") {
    CudaOptions o;
    o.device = local_cuda_device(world->rank());
    dev = cuda_device({}, o);  // fp32 GEMMs, as `run --backend cuda` computes by default
    nccl = nccl_world(*world, o.device, 300);
    collectives = nccl.get();
  }
#endif
  if (!dev) dev = cpu_device({});
  try {
    measure_compute(*dev, f.quick, data);
    measure_collectives(*dev, *collectives, f.quick, data);
    measure_overlap(*dev, *collectives, f.quick, data);
    measure_transfers(*dev, *world, f.quick, Tier::kCPU, Tier::kGPU, data.host_to_device);
    measure_transfers(*dev, *world, f.quick, Tier::kSSD, Tier::kCPU, data.ssd_to_host);
    measure_host_adam(*world, f.quick, host_threads_per_rank(f.backend, data.ranks),
                      data.host_adam);
  } catch (const std::exception& e) {
#ifdef SWITCHYARD_HAVE_MPI
    if (mpi && world->size() > 1) mpi->abort(1, e.what());  // no rank waits for a failed one
#endif
    throw;
  }
  if (world->rank() != 0) return 0;

  Calibration cal = fit_calibration(data, c, default_cost_profile(c));
  // The CPU backend reserves nothing beside its tensors (no CUDA context, no NCCL buffers).
  if (f.backend == "cpu") {
    cal.profile.runtime_reserved_bytes = 0;
    cal.profile_json["runtime_reserved_bytes"] = 0;
  }
  Json out = cal.report;
  out["cluster"] = c.name;
  out["ranks"] = world->size();
  out["ranks_on_node"] = data.ranks;
  out["profile"] = cal.profile_json;
  std::cout << "calibration of cluster \"" << c.name << "\" (" << f.backend << " backend, "
            << world->size() << " rank" << (world->size() > 1 ? "s" : "") << ")\n";
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
    store->put_calibration(ch, f.backend, cal.profile_json, out);
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
  cmd->add_option("--backend", f->backend,
                  "cpu (default) or cuda (this rank's GPU: cuBLAS fp32 GEMMs, HBM, PCIe, NCCL)")
      ->check(CLI::IsMember({"cpu", "cuda"}));
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
