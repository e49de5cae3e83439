// Expert parallelism (DeepSeek-V3 paper §3.2, "expert parallelism across nodes"): the routed experts of an MoE
// layer are split across the ranks of a group (common/comm.h), rank r holding experts [r E/R, (r+1) E/R); every
// rank routes its own tokens with the replicated router, then
//
//   dispatch  the (token, expert) slots are sorted by owner rank, then expert; the per-(peer, expert) row counts are
//             exchanged first, then the token rows themselves (one all-to-all);
//   compute   each rank runs its experts' SwiGLU FFNs on the rows it received (from every rank, its own included);
//   combine   the expert outputs go back by the reverse all-to-all, and the source rank weighs and sums them into
//             its tokens' outputs, in slot order.
//
// The backward runs the same way round: the weighted output gradient of each slot travels to the expert's owner,
// which accumulates its experts' weight gradients and returns each row's input gradient. Routing weights' gradients
// (<dout, expert output>) are formed on the source rank, from the expert outputs the combine brought back.
//
// Here on the host (the CPU reference, run by N threads of a host group in the tests): the arithmetic and the
// bookkeeping that a GPU version repeats with NCCL's all-to-all on device buffers. Not wired into stage 06's model
// or stage 07's trainer (README "Several GPUs" says what is missing).
#pragma once

#include <cstdint>
#include <vector>

#include "03_moe/moe.h"
#include "common/comm.h"

namespace dsv3 {

// The experts rank `rank` of `ranks` holds: [first, first + count). UserError unless E is a multiple of ranks.
struct ExpertShard {
  int first = 0, count = 0;
};
ExpertShard expert_shard(int E, int ranks, int rank);

// What the forward keeps for the backward (host vectors).
template <typename T>
struct EpSaved {
  std::vector<int64_t> send_rows, recv_rows;  // rows to / from each peer (dispatch direction)
  std::vector<int> send_slot;                 // dispatch row -> this rank's slot n*K+k, sorted by (owner, expert, slot)
  std::vector<int> local_order;               // received rows grouped by local expert: group row -> received row
  std::vector<int> local_offsets;             // (count + 1) group rows of each local expert
  std::vector<T> xg, h1, h3;                  // received token rows (grouped), and the SwiGLU hiddens (R, F)
  std::vector<T> eo;                          // (NK, D) the expert outputs brought back, slot order (unweighted)
};

// out (N, D) = sum_k weights[n,k] * Expert_{indices[n,k]}(x_n), the experts run by their owner ranks. x (N, D),
// indices and weights (N, K) this rank's tokens and routing; w1, w3 (count, F, D) and w2 (count, D, F) this
// rank's experts (moe.h's stacked layout, rows first..first+count). Every rank of comm calls it together.
template <typename T>
void ep_routed_forward(T* out, EpSaved<T>& saved, const T* x, const int* indices, const T* weights, const T* w1,
                       const T* w2, const T* w3, const MoeConfig& c, int N, Communicator& comm);

// dx (N, D) = d loss / d x through the routed experts (overwritten); dweights (N, K) = d loss / d weights
// (overwritten); dw1, dw2, dw3 += this rank's experts' weight gradients, from every rank's tokens.
template <typename T>
void ep_routed_backward(T* dx, T* dweights, T* dw1, T* dw2, T* dw3, const T* dout, const EpSaved<T>& saved,
                        const int* indices, const T* weights, const T* w1, const T* w2, const T* w3, const MoeConfig& c,
                        int N, Communicator& comm);

}  // namespace dsv3
