// CPU backend speed (prints JSON; the targets are ratios within this run):
//  - the experts' grouped GEMM against one Eigen GEMM of the same FLOPs on the same shapes (all
//    routed rows against each expert's weight; target >= 0.80), for balanced and skewed routing;
//  - under mpiexec, the Communicator's all_to_allv against a raw MPI_Alltoallv of the same bytes
//    (target >= 0.90), over message sizes.
// Run: build/bench/executor_bench, or mpiexec -n 2 build/bench/executor_bench for the all-to-all.
#include <mpi.h>

#include <Eigen/Dense>
#include <algorithm>
#include <iostream>
#include <random>

#include "bench/bench_timing.h"
#include "core/json_io.h"
#include "executor/cpu/mpi_communicator.h"
#include "executor/device.h"

namespace sy = switchyard;

namespace {

using switchyard::bench::median_s;

sy::Json expert_gemm(const std::vector<int>& rows, int k, int n) {
  auto dev = sy::cpu_device({});
  int total = 0;
  for (int r : rows) total += r;
  std::mt19937 gen(1);
  std::normal_distribution<float> d(0, 1);
  std::vector<float> a(static_cast<size_t>(total) * k), c(static_cast<size_t>(total) * n);
  for (auto& x : a) x = d(gen);
  std::vector<std::vector<float>> w(rows.size(), std::vector<float>(static_cast<size_t>(k) * n));
  std::vector<const float*> wp;
  for (auto& m : w) {
    for (auto& x : m) x = d(gen);
    wp.push_back(m.data());
  }
  const double grouped =
      median_s(7, [&] { dev->grouped_gemm(a.data(), k, rows, wp, false, n, c.data()); });
  using M = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Eigen::Map<const M> A(a.data(), total, k), B(w[0].data(), k, n);
  M C(total, n);
  const double dense = median_s(7, [&] { C.noalias() = A * B; });
  const double flops = 2.0 * total * k * n;
  return {{"rows_per_expert", rows},
          {"k", k},
          {"n", n},
          {"grouped_gflops", flops / grouped / 1e9},
          {"eigen_dense_gflops", flops / dense / 1e9},
          {"ratio", dense / grouped},
          {"target", 0.80}};
}

sy::Json all_to_all(sy::MpiRuntime& mpi) {
  auto comm = mpi.world(120);
  const int n = comm->size();
  sy::Json rows = sy::Json::array();
  for (size_t per_peer : {size_t{1} << 10, size_t{1} << 14, size_t{1} << 18, size_t{1} << 21}) {
    std::vector<float> send(per_peer * n, 1.0f), recv(per_peer * n);
    std::vector<size_t> counts(n, per_peer);
    std::vector<int> icounts(n, static_cast<int>(per_peer)), displs(n);
    for (int i = 0; i < n; ++i) displs[i] = static_cast<int>(i * per_peer);
    auto sync = [&] { MPI_Barrier(MPI_COMM_WORLD); };
    const int reps = per_peer <= (size_t{1} << 14) ? 301 : 15;  // small ones are noisy
    const double ours = median_s(reps, [&] {
      sync();
      comm->all_to_allv(send.data(), counts, recv.data(), counts, sy::DType::kFloat32);
    });
    const double raw = median_s(reps, [&] {
      sync();
      MPI_Alltoallv(send.data(), icounts.data(), displs.data(), MPI_FLOAT, recv.data(),
                    icounts.data(), displs.data(), MPI_FLOAT, MPI_COMM_WORLD);
    });
    // The slowest rank decides.
    double t[2] = {ours, raw}, worst[2];
    MPI_Allreduce(t, worst, 2, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    rows.push_back({{"bytes_per_peer", per_peer * 4},
                    {"communicator_s", worst[0]},
                    {"raw_mpi_s", worst[1]},
                    {"ratio", worst[1] / worst[0]},
                    {"target", 0.90}});
  }
  return rows;
}

}  // namespace

int main(int argc, char** argv) {
  auto mpi = sy::MpiRuntime::start(&argc, &argv);
  sy::Json out;
  out["all_to_allv"] = all_to_all(*mpi);
  out["ranks"] = mpi->world_size();
  if (mpi->world_rank() == 0) {
    // Mixtral-like expert shapes scaled to a CPU core: h 512, 2 * ffn 2048.
    out["expert_gemm_balanced"] = expert_gemm({256, 256, 256, 256, 256, 256, 256, 256}, 512, 2048);
    out["expert_gemm_skewed"] = expert_gemm({896, 448, 256, 192, 128, 64, 32, 32}, 512, 2048);
    std::cout << out.dump(2) << "\n";
  }
  return 0;
}
