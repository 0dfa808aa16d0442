#include "simulator/op_cost.h"

#include <algorithm>

#include "cost_models/collectives.h"
#include "cost_models/compute.h"
#include "cost_models/transfers.h"

namespace switchyard {

namespace {

// Attention kernels run at bf16 when training in fp8 (FP8 GEMMs, bf16 attention, as NeMo does).
Precision attention_precision(Precision p) { return p == Precision::kFP8 ? Precision::kBF16 : p; }

}  // namespace

OpCost op_cost(const OpTemplate& op, const StepProgram& prog, const ClusterSpec& c,
               const CostProfile& prof, Precision precision) {
  OpCost out;
  const GpuSpec& gpu = c.gpu;
  switch (op.kind) {
    case OpKind::kGemm:
      out.time_s = gemm_cost(op.gemm, precision, gpu, prof).time_s;
      break;
    case OpKind::kGroupedGemm:
      out.time_s =
          grouped_gemm_cost(op.group_rows, op.gemm.n, op.gemm.k, precision, gpu, prof).time_s;
      break;
    case OpKind::kAttention:
      out.time_s =
          op.phase == Phase::kBackward
              ? attention_backward_cost(op.attention, attention_precision(precision), gpu, prof)
                    .time_s
              : attention_forward_cost(op.attention, attention_precision(precision), gpu, prof)
                    .time_s;
      break;
    case OpKind::kElementwise:
      out.time_s = elementwise_cost(op.bytes, gpu, prof, memory_kernel_of_op(op.name)).time_s;
      break;
    case OpKind::kPermute:
      out.time_s = elementwise_cost(op.bytes, gpu, prof, MemoryKernel::kPermute).time_s;
      break;
    case OpKind::kGateTopK: {
      const double t = gate_topk_cost(op.gemm.m, op.gemm.k, op.gemm.n, precision, gpu, prof).time_s;
      out.time_s = op.phase == Phase::kBackward ? 2 * t : t;
      break;
    }
    case OpKind::kOptimizer: {
      if (!op.on_cpu) {
        out.time_s = elementwise_cost(op.bytes, gpu, prof, MemoryKernel::kOptimizer).time_s;
        break;
      }
      // ZeRO-Offload: gradients down and parameters up over PCIe; Adam on the node's CPUs and DRAM,
      // shared by its GPUs' ranks.
      const int sharers = c.gpus_per_node;
      const double host_s = host_optimizer_seconds(op.bytes, op.flops, op.ssd_state_bytes,
                                                   op.ssd_param_write_bytes, c, prof, sharers);
      out.pcie_before_s =
          transfer_cost(TransferPath::kGpuToHost, op.host_down_bytes, c, prof, sharers).time_s;
      out.pcie_after_s =
          transfer_cost(TransferPath::kHostToGpu, op.host_up_bytes, c, prof, sharers).time_s;
      out.time_s = out.pcie_before_s + host_s + out.pcie_after_s;
      break;
    }
    case OpKind::kCollective: {
      const GroupLayout& g = prog.layout(op.group);
      out.time_s = collective_cost(op.collective, op.bytes, g, c, prof).time_s;
      out.link = g.ranks <= 1 ? Link::kNone : g.nodes() > 1 ? Link::kInterNode : Link::kIntraNode;
      break;
    }
    case OpKind::kSendRecv:
      out.time_s = send_recv_cost(op.bytes, true, c, prof).time_s;
      out.link = Link::kIntraNode;
      break;
    case OpKind::kCopy: {
      // Every GPU of the node moves its share at once: DRAM and the SSDs are shared.
      static constexpr TransferPath kPaths[] = {TransferPath::kHostToGpu, TransferPath::kGpuToHost,
                                                TransferPath::kSsdToHost, TransferPath::kHostToSsd};
      out.time_s =
          transfer_cost(kPaths[static_cast<int>(op.copy)], op.bytes, c, prof, c.gpus_per_node)
              .time_s;
      out.link = op.copy == CopyPath::kSsdToHost || op.copy == CopyPath::kHostToSsd ? Link::kSsd
                                                                                    : Link::kPcie;
      break;
    }
  }
  // The host issues one op at a time: no op completes faster than its issue (host-bound steps).
  if (!op.on_cpu) out.time_s = std::max(out.time_s, prof.host_issue_s);
  return out;
}

OpCost p2p_cost(const StepProgram& prog, bool same_node, const ClusterSpec& c,
                const CostProfile& prof) {
  OpCost out;
  if (prog.pp <= 1) return out;
  out.time_s = send_recv_cost(prog.p2p_bytes, same_node, c, prof).time_s;
  out.link = same_node ? Link::kIntraNode : Link::kInterNode;
  return out;
}

std::vector<StageCosts> program_costs(const StepProgram& prog, const ClusterSpec& c,
                                      const CostProfile& prof, Precision precision) {
  std::vector<StageCosts> out;
  out.reserve(prog.stages.size());
  for (const StageProgram& st : prog.stages) {
    StageCosts sc;
    for (const ChunkProgram& ch : st.chunks) {
      std::vector<OpCost> f, b;
      f.reserve(ch.forward.size());
      b.reserve(ch.backward.size());
      for (const OpTemplate& op : ch.forward) f.push_back(op_cost(op, prog, c, prof, precision));
      for (const OpTemplate& op : ch.backward) b.push_back(op_cost(op, prog, c, prof, precision));
      sc.forward.push_back(std::move(f));
      sc.backward.push_back(std::move(b));
    }
    for (const OpTemplate& op : st.step_ops)
      sc.step.push_back(op_cost(op, prog, c, prof, precision));
    out.push_back(std::move(sc));
  }
  return out;
}

}  // namespace switchyard
