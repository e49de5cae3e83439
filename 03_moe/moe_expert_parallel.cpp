// Expert parallelism on the host (moe_expert_parallel.h): dispatch, the local experts, combine; and back.
#include "03_moe/moe_expert_parallel.h"

#include <algorithm>
#include <numeric>

#include "common/errors.h"

namespace dsv3 {

ExpertShard expert_shard(int E, int ranks, int rank) {
  require(ranks >= 1 && rank >= 0 && rank < ranks, "expert parallel: rank {} of {}", rank, ranks);
  require(E % ranks == 0, "expert parallel: {} routed experts do not split evenly over {} ranks", E, ranks);
  return {rank * (E / ranks), E / ranks};
}

namespace {

template <typename T>
MlpConfig expert_config(const MoeConfig& c) {
  MlpConfig m;
  m.dim = c.dim;
  m.inter_dim = c.moe_inter_dim;
  return m;
}

// Rows of width w exchanged through comm's float all-to-all (T = float: in place of a copy).
template <typename T>
void exchange(const std::vector<T>& send, const std::vector<int64_t>& send_rows, std::vector<T>& recv,
              const std::vector<int64_t>& recv_rows, int64_t w, Communicator& comm) {
  static_assert(std::is_same<T, float>::value, "the host group exchanges float rows");
  recv.assign(size_t(std::accumulate(recv_rows.begin(), recv_rows.end(), int64_t(0)) * w), T(0));
  comm.all_to_all(send.data(), send_rows.data(), recv.data(), recv_rows.data(), w);
}

}  // namespace

template <typename T>
void ep_routed_forward(T* out, EpSaved<T>& s, const T* x, const int* indices, const T* weights, const T* w1,
                       const T* w2, const T* w3, const MoeConfig& c, int N, Communicator& comm) {
  require(!comm.on_device(), "ep_routed_forward: host buffers, {} reduces device buffers", comm.describe());
  const int R = comm.size(), E = c.n_routed_experts, K = c.n_activated_experts;
  const int64_t D = c.dim, F = c.moe_inter_dim, NK = int64_t(N) * K;
  const ExpertShard mine = expert_shard(E, R, comm.rank());
  const int El = mine.count;
  for (int64_t i = 0; i < NK; ++i)
    require(indices[i] >= 0 && indices[i] < E, "ep_routed_forward: slot {} routes to expert {} of {}", i, indices[i], E);

  // 1) dispatch order: slots by expert (so by owner rank, then expert), stable in slot order
  s.send_slot.resize(size_t(NK));
  std::iota(s.send_slot.begin(), s.send_slot.end(), 0);
  std::stable_sort(s.send_slot.begin(), s.send_slot.end(), [&](int a, int b) { return indices[a] < indices[b]; });
  std::vector<float> count_to(size_t(E), 0.f);  // rows for peer e / El's expert e % El, as floats (exact)
  for (int64_t i = 0; i < NK; ++i) count_to[size_t(indices[i])] += 1.f;
  s.send_rows.assign(size_t(R), 0);
  for (int e = 0; e < E; ++e) s.send_rows[size_t(e / El)] += int64_t(count_to[size_t(e)]);

  // 2) the counts first: El per peer
  std::vector<float> count_from;
  const std::vector<int64_t> ones(size_t(R), 1);
  count_from.resize(size_t(R) * El);
  comm.all_to_all(count_to.data(), ones.data(), count_from.data(), ones.data(), El);
  s.recv_rows.assign(size_t(R), 0);
  for (int p = 0; p < R; ++p)
    for (int e = 0; e < El; ++e) s.recv_rows[size_t(p)] += int64_t(count_from[size_t(p) * El + e]);

  // 3) the token rows
  std::vector<T> send(static_cast<size_t>(NK * D)), recv;
  for (int64_t row = 0; row < NK; ++row)
    std::copy_n(x + (s.send_slot[size_t(row)] / K) * D, D, send.begin() + row * D);
  exchange(send, s.send_rows, recv, s.recv_rows, D, comm);

  // 4) grouped by local expert: peer p's block holds its rows for expert 0, 1, ... of this rank, in that order
  s.local_offsets.assign(size_t(El) + 1, 0);
  s.local_order.clear();
  std::vector<int64_t> peer_start(size_t(R), 0);
  for (int p = 1; p < R; ++p) peer_start[size_t(p)] = peer_start[size_t(p - 1)] + s.recv_rows[size_t(p - 1)];
  for (int e = 0; e < El; ++e) {
    for (int p = 0; p < R; ++p) {
      int64_t at = peer_start[size_t(p)];
      for (int q = 0; q < e; ++q) at += int64_t(count_from[size_t(p) * El + q]);
      for (int64_t j = 0; j < int64_t(count_from[size_t(p) * El + e]); ++j) s.local_order.push_back(int(at + j));
    }
    s.local_offsets[size_t(e) + 1] = int(s.local_order.size());
  }
  const int64_t G = int64_t(s.local_order.size());
  s.xg.resize(size_t(G * D));
  for (int64_t g = 0; g < G; ++g) std::copy_n(recv.begin() + s.local_order[size_t(g)] * D, D, s.xg.begin() + g * D);

  // 5) this rank's experts
  s.h1.assign(size_t(G * F), T(0));
  s.h3.assign(size_t(G * F), T(0));
  std::vector<T> yg(size_t(G * D), T(0));
  const MlpConfig mc = expert_config<T>(c);
  for (int e = 0; e < El; ++e) {
    const int64_t o = s.local_offsets[size_t(e)], n = s.local_offsets[size_t(e) + 1] - o;
    if (n == 0) continue;
    const MlpWeights<T> we{w1 + e * F * D, w2 + e * D * F, w3 + e * F * D};
    cpu::mlp_forward(yg.data() + o * D, s.h1.data() + o * F, s.h3.data() + o * F, s.xg.data() + o * D, we, mc, int(n));
  }

  // 6) combine: back in received order, back to the source ranks, weighed and summed in slot order
  std::vector<T> yr(size_t(G * D)), back;
  for (int64_t g = 0; g < G; ++g) std::copy_n(yg.begin() + g * D, D, yr.begin() + s.local_order[size_t(g)] * D);
  exchange(yr, s.recv_rows, back, s.send_rows, D, comm);
  s.eo.resize(size_t(NK * D));
  for (int64_t row = 0; row < NK; ++row)
    std::copy_n(back.begin() + row * D, D, s.eo.begin() + int64_t(s.send_slot[size_t(row)]) * D);
  for (int64_t n = 0; n < N; ++n) {
    T* o = out + n * D;
    std::fill_n(o, D, T(0));
    for (int k = 0; k < K; ++k) {
      const T w = weights[n * K + k];
      const T* eo = s.eo.data() + (n * K + k) * D;
      for (int64_t d = 0; d < D; ++d) o[d] += w * eo[d];
    }
  }
}

template <typename T>
void ep_routed_backward(T* dx, T* dweights, T* dw1, T* dw2, T* dw3, const T* dout, const EpSaved<T>& s,
                        const int* indices, const T* weights, const T* w1, const T* w2, const T* w3,
                        const MoeConfig& c, int N, Communicator& comm) {
  (void)indices;
  const int K = c.n_activated_experts;
  const int64_t D = c.dim, F = c.moe_inter_dim, NK = int64_t(N) * K;
  const int El = expert_shard(c.n_routed_experts, comm.size(), comm.rank()).count;
  require(int64_t(s.send_slot.size()) == NK, "ep_routed_backward: the saved dispatch is for {} slots, not {}",
          s.send_slot.size(), NK);
  // 1) the source side: the routing weights' gradients, and each slot's output gradient weighed, in dispatch order
  std::vector<T> send(static_cast<size_t>(NK * D)), recv;
  for (int64_t n = 0; n < N; ++n)
    for (int k = 0; k < K; ++k) {
      const T* eo = s.eo.data() + (n * K + k) * D;
      T dot = 0;
      for (int64_t d = 0; d < D; ++d) dot += dout[n * D + d] * eo[d];
      dweights[n * K + k] = dot;
    }
  for (int64_t row = 0; row < NK; ++row) {
    const int slot = s.send_slot[size_t(row)];
    const T w = weights[slot];
    for (int64_t d = 0; d < D; ++d) send[size_t(row * D + d)] = w * dout[(slot / K) * D + d];
  }
  exchange(send, s.send_rows, recv, s.recv_rows, D, comm);
  // 2) the owner: its experts' backward on the rows it received
  const int64_t G = int64_t(s.local_order.size());
  std::vector<T> dyg(size_t(G * D)), dxg(size_t(G * D), T(0));
  for (int64_t g = 0; g < G; ++g) std::copy_n(recv.begin() + s.local_order[size_t(g)] * D, D, dyg.begin() + g * D);
  const MlpConfig mc = expert_config<T>(c);
  for (int e = 0; e < El; ++e) {
    const int64_t o = s.local_offsets[size_t(e)], n = s.local_offsets[size_t(e) + 1] - o;
    if (n == 0) continue;
    const MlpWeights<T> we{w1 + e * F * D, w2 + e * D * F, w3 + e * F * D};
    const MlpGrads<T> ge{dw1 + e * F * D, dw2 + e * D * F, dw3 + e * F * D};
    cpu::mlp_backward(ge, dxg.data() + o * D, dyg.data() + o * D, s.h1.data() + o * F, s.h3.data() + o * F,
                      s.xg.data() + o * D, we, mc, int(n));
  }
  // 3) the input gradients back to the source ranks, summed per token in k order
  std::vector<T> dxr(size_t(G * D)), back;
  for (int64_t g = 0; g < G; ++g) std::copy_n(dxg.begin() + g * D, D, dxr.begin() + s.local_order[size_t(g)] * D);
  exchange(dxr, s.recv_rows, back, s.send_rows, D, comm);
  std::vector<int64_t> slot_row(static_cast<size_t>(NK));
  for (int64_t row = 0; row < NK; ++row) slot_row[size_t(s.send_slot[size_t(row)])] = row;
  for (int64_t n = 0; n < N; ++n) {
    T* o = dx + n * D;
    std::fill_n(o, D, T(0));
    for (int k = 0; k < K; ++k) {
      const T* g = back.data() + slot_row[size_t(n * K + k)] * D;
      for (int64_t d = 0; d < D; ++d) o[d] += g[d];
    }
  }
}

template void ep_routed_forward<float>(float*, EpSaved<float>&, const float*, const int*, const float*, const float*,
                                       const float*, const float*, const MoeConfig&, int, Communicator&);
template void ep_routed_backward<float>(float*, float*, float*, float*, float*, const float*, const EpSaved<float>&,
                                        const int*, const float*, const float*, const float*, const float*,
                                        const MoeConfig&, int, Communicator&);

}  // namespace dsv3
