#include "cost_models/calibration.h"

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <map>

#include "cost_models/collectives.h"
#include "cost_models/compute.h"

namespace switchyard {
namespace {

double median_abs(std::vector<double> v) {
  if (v.empty()) return 0;
  for (double& x : v) x = std::abs(x);
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

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

  // Streaming kernels first: their intercept is the kernel launch every other class pays too.
  if (!d.stream.empty()) {
    std::vector<double> x, y;
    for (const auto& s : d.stream) x.push_back(s.bytes), y.push_back(s.time_s);
    const LinearFit f = fit_line(x, y);
    p.kernel_launch_s = std::max(0.0, f.intercept);
    p.hbm_efficiency = f.slope > 0 ? 1.0 / (f.slope * c.gpu.hbm_bw_Bps) : p.hbm_efficiency;
    fitted["kernel_launch_s"] = p.kernel_launch_s;
    fitted["hbm_efficiency"] = p.hbm_efficiency;
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
    CostProfile unit = p;
    unit.intra_node_efficiency = 1.0;
    unit.collective_base_s = 0;
    unit.p2p_issue_s = 0;
    std::vector<double> x, y;
    for (const auto& s : d.collectives) {
      const GroupLayout g{s.ranks, s.ranks};
      x.push_back(collective_cost(s.op, s.bytes, g, c, unit).time_s);
      y.push_back(s.time_s);
    }
    const LinearFit f = fit_line(x, y);
    p.collective_base_s = std::max(0.0, f.intercept);
    p.p2p_issue_s = 0;
    if (f.slope > 0) p.intra_node_efficiency = 1.0 / f.slope;
    fitted["collective_base_s"] = p.collective_base_s;
    fitted["p2p_issue_s"] = p.p2p_issue_s;
    fitted["intra_node_efficiency"] = p.intra_node_efficiency;
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
    const double pred = elementwise_cost(s.bytes, c.gpu, p).time_s;
    res_stream.push_back(pred / s.time_s - 1);
    sj.push_back({{"bytes", s.bytes},
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
  out.report = {
      {"fitted", fitted},
      {"median_abs_residual",
       {{"gemm", median_abs(res_gemm)},
        {"stream", median_abs(res_stream)},
        {"attention", median_abs(res_attn)},
        {"collectives", median_abs(res_coll)}}},
      {"samples", {{"gemm", gj}, {"stream", sj}, {"attention", aj}, {"collectives", cj}}}};
  out.profile_json = fitted;
  out.profile_json["name"] = p.name;
  out.profile_json["source"] = p.source;
  return out;
}

}  // namespace switchyard
