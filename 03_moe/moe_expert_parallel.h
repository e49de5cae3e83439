// Expert parallelism (DeepSeek-V3 paper §3.2): the routed experts of every MoE layer split across the ranks of a
// group (common/comm.h), rank r running experts [r E/R, (r+1) E/R). Each rank routes its own tokens with the
// replicated router and dispatches them (moe.h's dispatch order: slots sorted by expert, hence by owner rank);
// then, in place of "every expert on its slice" (step 3 of moe_forward):
//
//     rank 0 tokens          rank 1 tokens                 rank 0 (experts 0-3)      rank 1 (experts 4-7)
//   [e0 e0 e2 | e5 e7]     [e1 e3 | e4 e4 e6]   dispatch   [e0 e0 e2 | e1 e3]        [e5 e7 | e4 e4 e6]
//    to r0      to r1       to r0    to r1     ---------->   from r0    from r1        from r0  from r1
//                                              all-to-all   grouped by expert, FFNs   grouped by expert, FFNs
//   eo in dispatch order   eo in dispatch order  <--------  outputs back in the order they came
//                                                combine
//
//   1. the row counts per (peer, expert) are exchanged first (each rank learns what it will receive);
//   2. the token rows go to their experts' owners (one all-to-all), which group them by expert and run the FFNs;
//   3. the outputs come back by the reverse all-to-all, in the dispatch order they left in, and the layer's own
//      combine weighs and sums them per token (moe_forward's step 4, unchanged).
// The backward is the same trip with gradients: each slot's output gradient to the owner, which accumulates its
// experts' weight gradients and returns the rows' input gradients.
//
// This project's expert parallelism splits the experts' work, not their memory: every rank keeps every expert's
// weights and optimizer state (stage 07 all-reduces every gradient, and a rank that owns no token of an expert
// contributes zeros to it, so the mean over ranks is the whole batch's gradient and the replicas stay equal). So
// checkpoints, resuming on another count and the optimizer are data parallelism's. DeepSeek also shards the
// weights (each GPU holds only its experts): that saves memory this small model does not need.
//
// Where: the CPU reference (cpu::moe_forward/backward, moe_cpu.cpp, host buffers: the emulation of R ranks by a
// host group's threads) and the CUDA grouped expert path (MoeExperts::Grouped, moe_cuda.cu, NCCL on device
// buffers). The exchange sizes are the host's (NCCL's all-to-all takes counts from the host), so an expert-parallel
// layer synchronises with the host once per pass and a training step with it is not captured as a CUDA graph.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "common/comm.h"

namespace dsv3 {

// The experts rank `rank` of `ranks` holds: [first, first + count). UserError unless E is a multiple of ranks.
struct ExpertShard {
  int first = 0, count = 0;
};
ExpertShard expert_shard(int E, int ranks, int rank);

// The group and, per MoE layer, what its last forward's exchange left for the backward (keyed by the layer's gate
// weights, which never move: one object serves every layer of a model, and a layer that alternates between batch
// shapes, as training and validation do, keeps one state). MoeConfig::expert_parallel points to one.
class ExpertParallel {
 public:
  explicit ExpertParallel(Communicator& comm) : comm_(&comm) {}
  Communicator& comm() const { return *comm_; }
  ExpertShard shard(int E) const { return expert_shard(E, comm_->size(), comm_->rank()); }

  // The exchange plan of one layer call, the same on host and device. Rows are D floats.
  struct Plan {
    std::vector<int64_t> send_rows, recv_rows;  // to / from each peer
    std::vector<int> local_order;               // grouped row g (by local expert, then peer) -> received row
    std::vector<int> local_offsets;             // (count + 1): local expert e owns grouped rows [off[e], off[e+1])
  };
  // From the E + 1 dispatch offsets of this rank's slots (host): exchanges the per-(peer, expert) counts and
  // returns the plan. Every rank calls it together.
  Plan plan(const int* offsets, int E);

  // Optional timing (the benchmark's): milliseconds of the row exchanges (the four all-to-alls of a forward and
  // backward) and of the experts' products between them, summed over layer calls. CUDA only: it waits for the
  // device after each exchange and compute, so it slows the step.
  struct Times {
    double exchange_ms = 0, compute_ms = 0;
    int64_t forwards = 0;  // layer forwards timed
  };
  bool timing = false;
  Times times;

  // Per-layer state of the backend that runs the layer (host vectors or device buffers), created on first use;
  // key: the layer's MoeWeights::gate_weight.
  template <typename S>
  S& state(const void* key) {
    auto& p = states_[key];
    if (!p) p = std::make_shared<S>();
    return *std::static_pointer_cast<S>(p);
  }

 private:
  Communicator* comm_;
  std::map<const void*, std::shared_ptr<void>> states_;
};

}  // namespace dsv3
