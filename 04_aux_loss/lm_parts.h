// The parts a language-model training loop needs beyond stages 01-03: token embedding, cross-entropy over
// the vocabulary, and AdamW. Stage 04's experiment uses them; later stages (MTP, the full model) link them.
//
// Shape legend: N tokens (B*T), D model width, V vocabulary.
// Conventions (common/conventions.h): parameter gradients accumulate (+=), activation gradients overwrite (=).
#pragma once

#include <cstdint>
#include <vector>

namespace dsv3 {

// Targets equal to kIgnoreTarget contribute no loss and no gradient (e.g. MTP positions without a target).
inline constexpr int kIgnoreTarget = -1;

struct AdamWConfig {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float eps = 1e-8f;
  float weight_decay = 0.1f;  // decoupled; applied only where the caller says (matrices, not norms/biases)
};

// B windows of T+1 tokens (B, T+1) -> inputs (B*T) = the first T of each window, targets (B*T) = the last T.
// UserError unless B, T > 0 and tokens.size() == B*(T+1).
void split_windows(const std::vector<int>& tokens, int B, int T, std::vector<int>& inputs, std::vector<int>& targets);

namespace cpu {

// The output end of a language model: z = RMSNorm(h; norm), logits = z head^T, mean CE against targets.
// Writes logits (N, V) and saves probs (N, V), z (N, D), zrstd (N) for the backward; returns the CE.
template <typename T>
T lm_head_forward(T* logits, T* probs, T* z, T* zrstd, const T* h, const T* norm, const T* head, const int* targets,
                  int N, int D, int V, float eps);
// Gradients of dloss * CE: dnorm (D) +=, dhead (V, D) +=, dh (N, D) = (overwritten). dz_extra (N, D) or
// nullptr: a gradient that reaches z from elsewhere (stage 05's MTP chain reads z), added before the norm's
// backward.
template <typename T>
void lm_head_backward(T* dnorm, T* dhead, T* dh, T dloss, const T* dz_extra, const T* probs, const T* z,
                      const T* zrstd, const T* h, const T* norm, const T* head, const int* targets, int N, int D,
                      int V);

// out (N, D) = wte[tokens] ; UserError on a token outside [0, V).
template <typename T>
void embedding_forward(T* out, const int* tokens, const T* wte, int N, int D, int V);
// dwte (V, D) += scatter of dout rows by token.
template <typename T>
void embedding_backward(T* dwte, const T* dout, const int* tokens, int N, int D, int V);

// Mean cross-entropy over the tokens whose target is not kIgnoreTarget; probs (N, V) = softmax(logits) is saved.
// Returns 0 when no token has a target.
template <typename T>
T cross_entropy_forward(T* probs, const T* logits, const int* targets, int N, int V);
// dlogits (N, V) = dloss * (probs - onehot(target)) / (#tokens with a target); zero rows for ignored tokens.
template <typename T>
void cross_entropy_backward(T* dlogits, T dloss, const T* probs, const int* targets, int N, int V);

// One AdamW step on n parameters; m, v are the moment buffers, step counts from 1.
template <typename T>
void adamw_step(T* param, const T* grad, T* m, T* v, size_t n, int64_t step, const AdamWConfig& c, bool decay);

}  // namespace cpu

namespace cuda {

void embedding_forward(float* out, const int* tokens, const float* wte, int N, int D, int V);
void embedding_backward(float* dwte, const float* dout, const int* tokens, int N, int D, int V);
// Returns the loss on the host (one small device-to-host copy); probs stay on the device.
float cross_entropy_forward(float* probs, const float* logits, const int* targets, int N, int V);
// The same two without a host synchronisation (a CUDA graph can capture them): an id outside [0, V) sets *bad (a
// device int the caller zeroed and reads when it likes) instead of throwing; the mean CE goes to *loss (device).
void embedding_forward(float* out, const int* tokens, const float* wte, int N, int D, int V, int* bad);
void cross_entropy_forward(float* loss, float* probs, const float* logits, const int* targets, int N, int V, int* bad);
// (cross_entropy_backward never synchronises: the count of rows with a target stays on the device.)
void cross_entropy_backward(float* dlogits, float dloss, const float* probs, const int* targets, int N, int V);
void adamw_step(float* param, const float* grad, float* m, float* v, size_t n, int64_t step, const AdamWConfig& c,
                bool decay);

}  // namespace cuda
}  // namespace dsv3
