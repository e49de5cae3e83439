// Stage 04: load balancing of DeepSeekMoE (paper §2.1.2).
//   1) auxiliary-loss-free balancing: a per-expert bias, used only to choose experts (stage 03), nudged by
//      gamma after every step: down when the expert was overloaded, up when underloaded;
//   2) the complementary sequence-wise balance loss  L = alpha * sum_i f_i * P_i  per sequence;
//   3) the balance metric MaxVio = (max_i load_i - mean load) / mean load.
//
// Shape legend
//   B batch (sequences), T tokens per sequence, N = B*T, E routed experts (N_r in the paper),
//   K experts chosen per token (K_r)
//   scores (N, E)  the router's unbiased affinities s_{i,t} (sigmoid outputs; stage 03's `scores`)
//   topk   (N, K)  the experts each token was routed to (chosen with the bias)
//
// Conventions (common/conventions.h): parameter gradients accumulate (+=), activation gradients overwrite (=).
#pragma once

#include <vector>

namespace dsv3 {

// The two balancing knobs, named as the training section of our config (stage 06) names them.
struct BalanceConfig {
  float aux_alpha = 0.0001f;          // alpha of the sequence-wise loss; 0 disables it
  float bias_update_speed = 0.001f;   // gamma of the bias update; 0 disables it
  void validate() const;
};

// Saved by the loss forward for its backward.
template <typename T>
struct SeqBalanceSaved {
  std::vector<T> f;     // (B, E)  f_{b,i} = E/(K*T) * #tokens of sequence b routed to i
  std::vector<T> ssum;  // (N)     sum_j s_{j,t}, the normaliser of token t's scores
};

// MaxVio of one load vector (tokens per expert): (max - mean) / mean; 0 for an empty load.
double max_violation(const int* load, int E);
// Mean over sequences of each sequence's MaxVio, loads from topk (N, K).
double max_violation_per_sequence(const int* topk, int B, int T, int K, int E);

namespace cpu {

// counts (E) = tokens routed to each expert over all N tokens (overwrites).
void expert_counts(int* counts, const int* topk, int N, int K, int E);

// loss (scalar) = (1/B) sum_b alpha * sum_i f_{b,i} P_{b,i},
//   f_{b,i} = E/(K T) * sum_t 1[i in topk_t],  P_{b,i} = (1/T) sum_t s_{i,t} / sum_j s_{j,t}.
// f (B, E) and ssum (N) are saved for backward.
template <typename T>
void seq_balance_loss_forward(T* loss, T* f, T* ssum, const T* scores, const int* topk, int B, int Tn, int E,
                              int K, float alpha);
// dscores (N, E) = dloss * d loss / d scores (overwrites). The gradient flows through P only: f counts.
template <typename T>
void seq_balance_loss_backward(T* dscores, T dloss, const T* f, const T* ssum, const T* scores, int B, int Tn,
                               int E, float alpha);

// bias_i += gamma * sign(mean_load - load_i): an overloaded expert becomes less attractive, an underloaded
// one more; an expert at exactly the mean load is left alone.
template <typename T>
void bias_update(T* bias, const int* counts, int E, int N, int K, float gamma);

}  // namespace cpu

namespace cuda {

void expert_counts(int* counts, const int* topk, int N, int K, int E);
void seq_balance_loss_forward(float* loss, float* f, float* ssum, const float* scores, const int* topk, int B, int Tn,
                              int E, int K, float alpha);
void seq_balance_loss_backward(float* dscores, float dloss, const float* f, const float* ssum, const float* scores,
                               int B, int Tn, int E, float alpha);
// skip: nullptr, or a device int; when it holds non-zero the update is left out (stage 07's captured step skips
// a non-finite step on the device).
void bias_update(float* bias, const int* counts, int E, int N, int K, float gamma, const int* skip = nullptr);

}  // namespace cuda
}  // namespace dsv3
