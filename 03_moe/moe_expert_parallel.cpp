// Expert parallelism (moe_expert_parallel.h): the shards and the exchange plan, shared by the CPU path
// (moe_cpu.cpp) and the CUDA grouped path (moe_cuda.cu).
#include "03_moe/moe_expert_parallel.h"

#include "common/errors.h"

namespace dsv3 {

ExpertShard expert_shard(int E, int ranks, int rank) {
  require(ranks >= 1 && rank >= 0 && rank < ranks, "expert parallel: rank {} of {}", rank, ranks);
  require(E % ranks == 0, "expert parallel: {} routed experts do not split evenly over {} ranks (a multiple of the "
          "GPUs is needed)", E, ranks);
  return {rank * (E / ranks), E / ranks};
}

ExpertParallel::Plan ExpertParallel::plan(const int* offsets, int E) {
  const int R = comm_->size(), El = shard(E).count;
  Plan p;
  // 1) what this rank sends: its dispatch order is by expert, so peer q's rows are the slice of q's experts
  std::vector<int64_t> to(size_t(R) * El), from(size_t(R) * El);
  p.send_rows.assign(size_t(R), 0);
  for (int q = 0; q < R; ++q)
    for (int j = 0; j < El; ++j) {
      const int e = q * El + j;
      to[size_t(q) * El + j] = offsets[e + 1] - offsets[e];
      p.send_rows[size_t(q)] += to[size_t(q) * El + j];
    }
  // 2) the counts first: from[q * El + j] = rows peer q sends for this rank's expert j
  comm_->all_to_all_counts(to.data(), from.data(), El);
  p.recv_rows.assign(size_t(R), 0);
  std::vector<int64_t> start(size_t(R), 0);
  for (int q = 0; q < R; ++q) {
    for (int j = 0; j < El; ++j) p.recv_rows[size_t(q)] += from[size_t(q) * El + j];
    if (q > 0) start[size_t(q)] = start[size_t(q - 1)] + p.recv_rows[size_t(q - 1)];
  }
  // 3) the received rows grouped by expert: peer q's block holds its rows for expert 0, 1, ... in that order
  p.local_offsets.assign(size_t(El) + 1, 0);
  for (int j = 0; j < El; ++j) {
    for (int q = 0; q < R; ++q) {
      int64_t at = start[size_t(q)];
      for (int i = 0; i < j; ++i) at += from[size_t(q) * El + i];
      for (int64_t k = 0; k < from[size_t(q) * El + j]; ++k) p.local_order.push_back(int(at + k));
    }
    p.local_offsets[size_t(j) + 1] = int(p.local_order.size());
  }
  return p;
}

}  // namespace dsv3
