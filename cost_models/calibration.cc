#include "cost_models/calibration.h"

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <map>

#include "cost_models/collectives.h"
#include "cost_models/compute.h"
#include "cost_models/transfers.h"

namespace switchyard {
namespace {

double median_abs(std::vector<double> v) {
  if (v.empty()) return 0;
  for (double& x : v) x = std::abs(x);
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

MemoryKernel memory_kernel_of_sample(const std::string& kernel) {
  if (kernel.rfind("rmsnorm", 0) == 0 || kernel.rfind("layernorm", 0) == 0)
    return MemoryKernel::kNorm;
  if (kernel.rfind("swiglu", 0) == 0 || kernel.rfind("gelu", 0) == 0)
    return MemoryKernel::kActivation;
  if (kernel == "permute" || kernel == "unpermute_combine") return MemoryKernel::kPermute;
  if (kernel == "cross_entropy") return MemoryKernel::kLoss;
  if (kernel == "adam") return MemoryKernel::kOptimizer;
  return MemoryKernel::kStream;
}

LinearFit fit_line(const std::vector<double>& x, const std::vector<double>& y,
                   bool through_origin) {
  const auto n = static_cast<Eigen::Index>(x.size());
  LinearFit f;
  if (n == 0) return f;
  if (through_origin || n == 1) {
    // Weighted like the two-parameter fit (relative residuals): minimise sum((s x/y - 1)^2).
    double xy = 0, xx = 0;
    for (Eigen::Index i = 0; i < n; ++i) {
      const double w = y[i] > 0 ? 1.0 / y[i] : 1.0;
      xy += w * x[i] * w * y[i];
      xx += w * x[i] * w * x[i];
    }
    f.slope = xx > 0 ? xy / xx : 0;
    return f;
  }
  // Relative least squares: each sample weighted by 1 / y, so small and large sizes count alike.
  Eigen::MatrixXd a(n, 2);
  Eigen::VectorXd b(n);
  for (Eigen::Index i = 0; i < n; ++i) {
    const double w = y[i] > 0 ? 1.0 / y[i] : 1.0;
    a(i, 0) = w;
    a(i, 1) = w * x[i];
    b(i) = w * y[i];
  }
  const Eigen::VectorXd sol = a.colPivHouseholderQr().solve(b);
  f.intercept = sol(0);
  f.slope = sol(1);
  if (f.intercept < 0) {  // a negative fixed cost is not physical: refit through the origin
    f = fit_line(x, y, true);
  }
  return f;
}

Calibration fit_calibration(const CalibrationData& d, const ClusterSpec& c, CostProfile base) {
  Calibration out;
  CostProfile& p = out.profile;
  p = std::move(base);
  p.name = "calibrated";
  p.source = "switchyard calibrate: least-squares fit to micro-benchmarks on this machine";
  Json fitted = Json::object();
  const double peak = c.gpu.peak_flops(Precision::kFP32);

  // Streaming kernels first: the plain copies' intercept is the kernel launch every other class
  // pays too, their slope the stream bandwidth; each other class of memory-bound kernel gets its
  // own bandwidth (a least-squares fit through the origin after the launch).
  if (!d.stream.empty()) {
    std::map<MemoryKernel, std::pair<std::vector<double>, std::vector<double>>> by_class;
    for (const auto& s : d.stream) {
      auto& xy = by_class[memory_kernel_of_sample(s.kernel)];
      xy.first.push_back(s.bytes);
      xy.second.push_back(s.time_s);
    }
    if (const auto it = by_class.find(MemoryKernel::kStream); it != by_class.end()) {
      const LinearFit f = fit_line(it->second.first, it->second.second);
      p.kernel_launch_s = std::max(0.0, f.intercept);
      if (f.slope > 0) p.hbm_efficiency = 1.0 / (f.slope * c.gpu.hbm_bw_Bps);
      fitted["kernel_launch_s"] = p.kernel_launch_s;
      fitted["hbm_efficiency"] = p.hbm_efficiency;
    }
    for (auto& [kind, xy] : by_class) {
      if (kind == MemoryKernel::kStream) continue;
      for (double& y : xy.second) y = std::max(0.0, y - p.kernel_launch_s);
      const LinearFit f = fit_line(xy.first, xy.second, /*through_origin=*/true);
      if (f.slope <= 0) continue;
      const double e = 1.0 / (f.slope * c.gpu.hbm_bw_Bps);
      const std::string key = std::string(memory_kernel_name(kind)) + "_efficiency";
      fitted[key] = e;
      switch (kind) {
        case MemoryKernel::kNorm:
          p.norm_efficiency = e;
          break;
        case MemoryKernel::kActivation:
          p.activation_efficiency = e;
          break;
        case MemoryKernel::kPermute:
          p.permute_efficiency = e;
          break;
        case MemoryKernel::kLoss:
          p.loss_efficiency = e;
          break;
        case MemoryKernel::kOptimizer:
          p.optimizer_efficiency = e;
          break;
        case MemoryKernel::kStream:
          break;
      }
    }
  }
  // GEMMs by class of their smallest dimension (powers of two).
  if (!d.gemm.empty() && peak > 0) {
    std::map<int, std::pair<std::vector<double>, std::vector<double>>> by_class;
    for (const auto& g : d.gemm) {
      const double min_dim = static_cast<double>(std::min({g.m, g.n, g.k}));
      const int cls = static_cast<int>(std::lround(std::log2(min_dim)));
      by_class[cls].first.push_back(2.0 * g.m * g.n * g.k);
      by_class[cls].second.push_back(std::max(0.0, g.time_s - p.kernel_launch_s));
    }
    std::vector<EfficiencyPoint> table;
    for (const auto& [cls, xy] : by_class) {
      const LinearFit f = fit_line(xy.first, xy.second, /*through_origin=*/true);
      // A class whose times do not grow with FLOPs says nothing about efficiency: keep the base.
      const double min_dim = std::ldexp(1.0, cls);
      table.push_back(
          {min_dim, f.slope > 0 ? 1.0 / (f.slope * peak) : p.gemm_efficiency_at(min_dim)});
    }
    p.gemm_efficiency = std::move(table);
    Json fitted_table = Json::array();
    for (const auto& pt : p.gemm_efficiency) fitted_table.push_back({pt.min_dim, pt.efficiency});
    fitted["gemm_efficiency"] = fitted_table;
  }
  if (!d.attention.empty() && peak > 0) {
    std::vector<double> x, y;
    for (const auto& a : d.attention) {
      const KernelCost unit = attention_forward_cost(a.shape, Precision::kFP32, c.gpu, [&] {
        CostProfile q = p;
        q.attention_efficiency = 1.0;
        q.kernel_launch_s = 0;
        return q;
      }());
      x.push_back(unit.time_s);
      y.push_back(std::max(0.0, a.forward_s - p.kernel_launch_s));
    }
    const LinearFit f = fit_line(x, y, true);
    if (f.slope > 0) p.attention_efficiency = 1.0 / f.slope;
    fitted["attention_efficiency"] = p.attention_efficiency;
  }
  if (!d.collectives.empty()) {
    // time = base + latency + t_move / intra_node_efficiency + t_reduce /
    // intra_node_reduce_efficiency (latency: the cluster file's link latencies):
    // t_move is the model's time of a moving collective (all-gather, all-to-all, broadcast) at
    // efficiency 1 and base 0, t_reduce that of an adding one (all-reduce, reduce-scatter); each
    // sample is weighted by 1 / time (relative residuals). A class without samples keeps the base.
    CostProfile unit = p;
    unit.intra_node_efficiency = 1.0;
    unit.intra_node_reduce_efficiency = 0;
    unit.collective_base_s = 0;
    unit.p2p_issue_s = 0;
    // The links' latencies are the cluster file's: only the bandwidth terms scale.
    CostProfile latency_only = unit;
    latency_only.intra_node_efficiency = 1e30;
    const auto n = static_cast<Eigen::Index>(d.collectives.size());
    Eigen::MatrixXd a = Eigen::MatrixXd::Zero(n, 3);
    Eigen::VectorXd b(n);
    bool has[2] = {false, false};
    for (Eigen::Index i = 0; i < n; ++i) {
      const CollectiveSample& cs = d.collectives[static_cast<size_t>(i)];
      const double w = cs.time_s > 0 ? 1.0 / cs.time_s : 1.0;
      const bool reduces = cs.op == Collective::kAllReduce || cs.op == Collective::kReduceScatter;
      const GroupLayout g{cs.ranks, cs.ranks};
      const double lat = collective_cost(cs.op, cs.bytes, g, c, latency_only).time_s;
      a(i, 0) = w;
      a(i, reduces ? 2 : 1) = w * (collective_cost(cs.op, cs.bytes, g, c, unit).time_s - lat);
      has[reduces ? 1 : 0] = true;
      b(i) = w * (cs.time_s - lat);
    }
    std::vector<Eigen::Index> cols = {0};
    for (int k = 0; k < 2; ++k)
      if (has[k]) cols.push_back(k + 1);
    Eigen::MatrixXd used(n, static_cast<Eigen::Index>(cols.size()));
    for (size_t k = 0; k < cols.size(); ++k)
      used.col(static_cast<Eigen::Index>(k)) = a.col(cols[k]);
    Eigen::VectorXd sol = used.colPivHouseholderQr().solve(b);
    if (sol(0) < 0) {  // a negative fixed cost is not physical: refit without it
      used = used.rightCols(used.cols() - 1).eval();
      const Eigen::VectorXd rest = used.colPivHouseholderQr().solve(b);
      sol = Eigen::VectorXd::Zero(static_cast<Eigen::Index>(cols.size()));
      sol.tail(rest.size()) = rest;
    }
    p.collective_base_s = std::max(0.0, sol(0));
    p.p2p_issue_s = 0;
    for (size_t k = 1; k < cols.size(); ++k) {
      const double slope = sol(static_cast<Eigen::Index>(k));
      if (slope <= 0) continue;
      (cols[k] == 1 ? p.intra_node_efficiency : p.intra_node_reduce_efficiency) = 1.0 / slope;
    }
    if (!has[0] && p.intra_node_reduce_efficiency > 0)
      p.intra_node_efficiency = p.intra_node_reduce_efficiency;
    fitted["collective_base_s"] = p.collective_base_s;
    fitted["p2p_issue_s"] = p.p2p_issue_s;
    fitted["intra_node_efficiency"] = p.intra_node_efficiency;
    if (p.intra_node_reduce_efficiency > 0)
      fitted["intra_node_reduce_efficiency"] = p.intra_node_reduce_efficiency;
  }
  if (d.host_to_device.size() >= 2) {
    // time = latency + bytes / (pcie_bw * pcie_efficiency): the link's efficiency against the
    // cluster file's PCIe bandwidth and its fixed cost.
    std::vector<double> x, y;
    for (const TransferSample& t : d.host_to_device) {
      x.push_back(t.bytes);
      y.push_back(t.time_s);
    }
    const LinearFit f = fit_line(x, y);
    if (f.slope > 0 && c.host.pcie_bw_Bps > 0) {
      const double bw = 1.0 / f.slope;  // per rank, d.ranks of them loading at once
      p.pcie_efficiency = std::min(10.0, bw / c.host.pcie_bw_Bps);
      p.pcie_latency_s = std::max(0.0, f.intercept);
      fitted["pcie_efficiency"] = p.pcie_efficiency;
      fitted["pcie_latency_s"] = p.pcie_latency_s;
      // A load is also capped by the GPU's share of the node's DRAM bandwidth: when the measured
      // bandwidth is above that cap, DRAM delivers more than the profile assumed.
      const int sharers = std::max(1, d.ranks);
      if (c.host.dram_bw_Bps > 0 && c.host.dram_bw_Bps * p.dram_efficiency / sharers < bw) {
        p.dram_efficiency = std::min(10.0, bw * sharers / c.host.dram_bw_Bps);
        fitted["dram_efficiency"] = p.dram_efficiency;
      }
    }
  }
  if (d.ssd_to_host.size() >= 2 && c.host.ssd_read_Bps > 0) {
    // time = latency + bytes / (ssd_read_Bps * ssd_efficiency / d.ranks): the ranks that
    // measured read their shares at once.
    std::vector<double> x, y;
    for (const TransferSample& t : d.ssd_to_host) {
      x.push_back(t.bytes);
      y.push_back(t.time_s);
    }
    const LinearFit f = fit_line(x, y);
    if (f.slope > 0) {
      p.ssd_efficiency = std::min(10.0, std::max(1, d.ranks) / (f.slope * c.host.ssd_read_Bps));
      p.ssd_latency_s = std::max(0.0, f.intercept);
      fitted["ssd_efficiency"] = p.ssd_efficiency;
      fitted["ssd_latency_s"] = p.ssd_latency_s;
    }
  }
  if (!d.host_adam.empty() && c.host.dram_bw_Bps > 0) {
    // Every rank updated at once: each had its share of the node's DRAM (and its threads).
    std::vector<double> x, y;
    for (const TransferSample& t : d.host_adam) {
      x.push_back(t.bytes);
      y.push_back(t.time_s);
    }
    const LinearFit f = fit_line(x, y, /*through_origin=*/true);
    if (f.slope > 0) {
      p.host_optimizer_efficiency =
          std::min(10.0, std::max(1, d.ranks) / (f.slope * c.host.dram_bw_Bps));
      fitted["host_optimizer_efficiency"] = p.host_optimizer_efficiency;
    }
  }
  if (d.overlap && d.overlap->compute_s > 0 && d.overlap->comm_s > 0) {
    const OverlapSample& o = *d.overlap;
    const double hidden = o.compute_s + o.comm_s - o.both_s;
    p.comm_compute_overlap = std::clamp(hidden / std::min(o.compute_s, o.comm_s), 0.0, 1.0);
    fitted["comm_compute_overlap"] = p.comm_compute_overlap;
  }

  // Residuals under the fitted profile.
  Json samples = Json::object();
  std::vector<double> res_gemm, res_stream, res_attn, res_coll;
  Json gj = Json::array(), sj = Json::array(), aj = Json::array(), cj = Json::array();
  for (const auto& g : d.gemm) {
    const double pred = gemm_cost({g.m, g.n, g.k, 1}, Precision::kFP32, c.gpu, p).time_s;
    res_gemm.push_back(pred / g.time_s - 1);
    gj.push_back({{"m", g.m},
                  {"n", g.n},
                  {"k", g.k},
                  {"measured_s", g.time_s},
                  {"predicted_s", pred},
                  {"residual", res_gemm.back()}});
  }
  for (const auto& s : d.stream) {
    const double pred =
        elementwise_cost(s.bytes, c.gpu, p, memory_kernel_of_sample(s.kernel)).time_s;
    res_stream.push_back(pred / s.time_s - 1);
    sj.push_back({{"kernel", s.kernel},
                  {"bytes", s.bytes},
                  {"measured_s", s.time_s},
                  {"predicted_s", pred},
                  {"residual", res_stream.back()}});
  }
  for (const auto& a : d.attention) {
    const double pred = attention_forward_cost(a.shape, Precision::kFP32, c.gpu, p).time_s;
    res_attn.push_back(pred / a.forward_s - 1);
    aj.push_back({{"seq_len", a.shape.seq_len},
                  {"heads", a.shape.heads},
                  {"measured_s", a.forward_s},
                  {"predicted_s", pred},
                  {"residual", res_attn.back()}});
  }
  for (const auto& s : d.collectives) {
    const double pred = collective_cost(s.op, s.bytes, {s.ranks, s.ranks}, c, p).time_s;
    res_coll.push_back(pred / s.time_s - 1);
    cj.push_back({{"op", collective_name(s.op)},
                  {"bytes", s.bytes},
                  {"ranks", s.ranks},
                  {"measured_s", s.time_s},
                  {"predicted_s", pred},
                  {"residual", res_coll.back()}});
  }
  // Transfers as the simulator prices them, shared by the ranks that measured them.
  const auto transfer_residuals = [&](const std::vector<TransferSample>& samples, TransferPath path,
                                      std::vector<double>& res, Json& rows) {
    rows = Json::array();
    for (const TransferSample& t : samples) {
      const double pred = transfer_cost(path, t.bytes, c, p, std::max(1, d.ranks)).time_s;
      res.push_back(pred / t.time_s - 1);
      rows.push_back({{"bytes", t.bytes},
                      {"measured_s", t.time_s},
                      {"predicted_s", pred},
                      {"residual", res.back()}});
    }
  };
  std::vector<double> res_h2d, res_ssd, res_adam;
  Json hj, ssdj, adamj = Json::array();
  transfer_residuals(d.host_to_device, TransferPath::kHostToGpu, res_h2d, hj);
  transfer_residuals(d.ssd_to_host, TransferPath::kSsdToHost, res_ssd, ssdj);
  for (const TransferSample& t : d.host_adam) {
    const double pred = host_optimizer_seconds(t.bytes, 0, 0, 0, c, p, std::max(1, d.ranks));
    res_adam.push_back(pred / t.time_s - 1);
    adamj.push_back({{"bytes", t.bytes},
                     {"measured_s", t.time_s},
                     {"predicted_s", pred},
                     {"residual", res_adam.back()}});
  }
  out.report = {{"fitted", fitted},
                {"median_abs_residual",
                 {{"gemm", median_abs(res_gemm)},
                  {"stream", median_abs(res_stream)},
                  {"attention", median_abs(res_attn)},
                  {"collectives", median_abs(res_coll)},
                  {"host_to_device", median_abs(res_h2d)},
                  {"ssd_to_host", median_abs(res_ssd)},
                  {"host_adam", median_abs(res_adam)}}},
                {"samples",
                 {{"gemm", gj},
                  {"stream", sj},
                  {"attention", aj},
                  {"collectives", cj},
                  {"host_to_device", hj},
                  {"ssd_to_host", ssdj},
                  {"host_adam", adamj}}}};
  if (d.overlap)
    out.report["samples"]["overlap"] = {{"compute_s", d.overlap->compute_s},
                                        {"collective_s", d.overlap->comm_s},
                                        {"both_s", d.overlap->both_s}};
  out.profile_json = fitted;
  out.profile_json["name"] = p.name;
  out.profile_json["source"] = p.source;
  return out;
}

}  // namespace switchyard
