// Stage 07: sampling from a trained model on the CPU.
//
//   Decoder      KV-cached incremental decoding of a Model<float>, batch 1. Every attention layer keeps only
//                MLA's latent cache (c_kv and k_pe per position, stage 02) and attends in the absorbed form:
//                q_nope W_uk scores against c_kv, the output o_lat W_uv^T. feed() takes a chunk of tokens.
//   draft()      MTP module 1 (stage 05) on z = final_norm(h_L), with its own latent cache: the token
//                after the next one, as speculative decoding's draft.
//   generate()   temperature / top-k / top-p sampling, plainly or speculatively with the MTP draft, past the
//                model's positions by re-filling the cache from the last K tokens (the window rule below).
//   prompts      the line loop of --prompt-file and --interactive, the formatting of a printed sample, the
//                tokenizer a checkpoint samples with.
//
// Bitwise chunk invariance. Every per-token map (linear layers, norms, router, experts, head) is computed as
// row-independent dot products in one fixed summation order (common/rowwise.h), and attention of a
// token reads only its own query and the cache; so feed() of a chunk of n tokens returns logits BITWISE equal
// to n feeds of one token. That is what makes speculative decoding's output identical to plain decoding:
// every emitted token is drawn from the main model's own logits with one RNG draw, in the same order.
//
// MTP stream alignment (the training-time alignment of 05_mtp/mtp.h, k = 1): MTP position j reads z at main
// position j and Emb(t_{j+1}) and predicts t_{j+2}; its block attends causally over MTP positions 0..j (RoPE at
// j). Position j therefore exists once t_{j+1} is known: after feeding t_0..t_{p-1} the main stream holds
// positions 0..p-1 and the MTP stream at most 0..p-1, the last of them needing the not-yet-fed next token t_p.
//
// The window rule (generation longer than the context; nanoGPT crops its context the same way). P =
// max_position_embeddings, K = refill_keep(P) = P / 2. The text is the prompt's last P tokens (a longer prompt is
// cropped, and SampleResult says so) followed by the new tokens, indexed from 0. The cache holds a window of
// consecutive text tokens; when token i is to be fed and the window already holds P, the decoder is reset and fed
// tokens i-K .. i as one chunk (a re-fill), then generation goes on. Re-fills therefore happen at i = P, P + (P-K),
// P + 2(P-K), ...: a function of the token index alone, amortised over P - K new tokens each. Speculative decoding
// drafts only when its two-token chunk fits the window before the next re-fill point, and takes a plain step (which
// re-fills) otherwise, so it stays identical to plain decoding across re-fills.
//
// Shape legend: D hidden_size, V vocab_size, n tokens of a chunk, Dc kv_lora_rank, Dr qk_rope_head_dim,
// Lmax = max_len (cache capacity in positions).
#pragma once

#include <cstdint>
#include <functional>
#include <iosfwd>
#include <memory>
#include <string>
#include <vector>

#include "02_mla/mla.h"
#include "05_mtp/block.h"
#include "06_full_model/model.h"
#include "07_train_gpu/data.h"
#include "common/rng.h"

namespace dsv3 {

// Scratch buffers of the decoder (sampler.cpp), reused across calls so decoding does not allocate per token.
struct DecodeScratch;

class Decoder {
 public:
  // The model must outlive the decoder. max_len: positions the caches hold; UserError when it is < 1 or exceeds
  // the model's max_position_embeddings (the RoPE table).
  Decoder(const Model<float>& model, int max_len);
  ~Decoder();
  Decoder(const Decoder&) = delete;
  Decoder& operator=(const Decoder&) = delete;

  // Forgets every position (main and MTP streams).
  void reset();
  // Feeds tokens at positions pos() .. pos()+n-1 (causal within the chunk and over the cache) and returns their
  // logits (n, V); the reference stays valid until the next call. UserError for an empty chunk, a token outside
  // [0, V) or a chunk that does not fit max_len.
  const std::vector<float>& feed(const std::vector<int>& tokens);
  // Positions fed so far (the next token goes to position pos()).
  int pos() const { return pos_; }
  int max_len() const { return max_len_; }
  // Drops positions new_pos .. pos()-1 of the main stream (a rejected draft) and the MTP positions that read
  // them. UserError unless 0 <= new_pos <= pos().
  void truncate(int new_pos);

  // MTP module 1's logits (V) for token t_{p+1}, p = pos(), given next = t_p, the token that will be fed at
  // position p. Computes the MTP positions still missing (catching up over fed positions, so it equals the
  // training-time MTP forward of the same window) and recomputes any whose input token changed since (a
  // truncate, or a different `next`). UserError when the model has no MTP module, nothing was fed yet, or next
  // is outside [0, V). The reference stays valid until the next call.
  const std::vector<float>& draft(int next);
  // MTP positions currently computed (<= pos()).
  int mtp_pos() const { return mtp_pos_; }
  // z = final_norm(h_L) (D) of fed position p: what the head and the MTP module read.
  const float* normed_hidden(int p) const;

  // The latent cache of one transformer block (its weights are read from the model at every call).
  struct LatentCache {
    BlockConfig cfg;
    std::vector<float> c_kv;  // (Lmax, Dc)  kv_norm(c_kv) of every position
    std::vector<float> k_pe;  // (Lmax, Dr)  k_pe with RoPE applied
  };

 private:
  const Model<float>& model_;
  int max_len_ = 0, pos_ = 0, mtp_pos_ = 0;
  std::vector<LatentCache> layers_;       // one per main layer
  std::vector<LatentCache> mtp_;          // 0 or 1: MTP module 1's block
  std::vector<int> tokens_;               // (Lmax) the fed tokens
  std::vector<int> mtp_tokens_;           // (Lmax) t_{j+1}: the token MTP position j embedded
  std::vector<float> hidden_;             // (Lmax, D) z = final_norm(h_L) of every fed position
  std::vector<float> logits_, draft_logits_;
  std::unique_ptr<DecodeScratch> scratch_;
};

// ---- sampling -------------------------------------------------------------------------------------------

struct SampleOptions {
  std::string prompt;          // text; tokenised by generate(); must not tokenise to nothing
  double temperature = 0.8;    // 0: greedy (argmax, no random draw)
  int top_k = 0;               // keep the k most likely tokens; 0: off
  double top_p = 1.0;          // nucleus over the top-k renormalised probabilities; 1: off; the top token stays
  int max_new_tokens = 200;    // may exceed the model's positions (the window rule); at most kMaxNewTokens
  uint64_t seed = 1234;
  bool stop_at_eos = true;     // stop after emitting the tokenizer's eos (it is part of the result)
};
constexpr int kMaxNewTokens = 1 << 20;
// UserError naming the first bad field: temperature >= 0 (finite), top_k >= 0, top_p in (0, 1],
// max_new_tokens in [1, kMaxNewTokens]. The prompt is checked where it is tokenised.
void validate_sample_options(const SampleOptions& opt);

// One token from logits (V). Greedy when temperature == 0: the argmax (lowest id on ties), no draw. Otherwise
// exactly one rng.uniform() draw: candidates sorted by logit (ties: lower id first), cut to top_k, softmax of
// logit / temperature (in double) over them, cut to the shortest prefix whose probability reaches top_p
// (at least one token), renormalised, and inverted at the uniform draw.
int sample_token(const float* logits, int V, const SampleOptions& opt, Rng& rng);

// K of the window rule: the tokens before the new one that a re-fill keeps.
inline int refill_keep(int positions) { return positions / 2; }

struct SampleResult {
  std::vector<int> tokens;      // the new tokens (an eos that stopped generation included)
  std::string text;             // decode(tokens); empty from generate_ids
  int prompt_tokens = 0;        // the prompt tokens the model saw (at most window)
  int prompt_cropped = 0;       // tokens cut from the front of a prompt longer than the window
  int window = 0;               // P: the positions the cache holds (max_position_embeddings)
  int refills = 0;              // re-fills of the cache from the last K tokens (the window rule)
  int drafted = 0, accepted = 0;  // speculative: drafts checked by the main model, and those it agreed with
  double seconds = 0;           // wall time of prefill (the prompt) and decoding
  double tokens_per_s = 0;      // tokens.size() / seconds
  double sampling_seconds = 0;  // of seconds: host time in sample_token (decode_samples; the whole batch's)
};

// ---- the decoding loop, shared by the CPU decoder and the GPU decoder (sampler_gpu.h) ----------------------

// What the decoding loop drives: batch() sequences decoded in lockstep at the same positions (the CPU Decoder: one
// sequence). Logits are host memory.
class TokenDecoder {
 public:
  virtual ~TokenDecoder() = default;
  virtual int batch() const = 0;
  virtual int pos() const = 0;      // positions fed so far (the same for every sequence)
  virtual int max_len() const = 0;  // positions the caches hold
  virtual void reset() = 0;
  // tokens (batch, n): token t of sequence b at b*n + t, fed at positions pos() .. pos()+n-1. Returns the logits of
  // each sequence's last `last` tokens (1 <= last <= n): (batch, last, V), valid until the next call. UserError for
  // an empty chunk, a bad id, or a chunk past max_len().
  virtual const float* feed(const std::vector<int>& tokens, int n, int last) = 0;
  virtual void truncate(int new_pos) = 0;
  // Batch 1: the MTP module's draft for the token after `next` (Decoder::draft's rule): the argmax of its logits,
  // the lowest id on ties.
  virtual int draft(int next) = 0;
  // Greedy choices where the logits are (the GPU decoder: no logits copied to the host). A decoder that can choose
  // every returned row's greedy token itself (sample_token at temperature 0: the argmax, the lowest id on ties;
  // UserError for a non-finite logit) answers greedy_on_device(true) with true; from then on feed() returns nullptr
  // and greedy_tokens() the choices (batch, last) of the last feed, until greedy_on_device(false). The default
  // cannot (false): the loop samples from the logits.
  virtual bool greedy_on_device(bool /*on*/) { return false; }
  virtual const int* greedy_tokens() const { return nullptr; }
};

// The random stream of sample i of a prompt (--num-samples): Rng(sample_seed(seed, i)). Sample 0 uses the seed
// itself (a single sample is what it always was); sample i > 0 the seed plus i times splitmix64's increment
// 0x9E3779B97F4A7C15 (Rng's constructor runs splitmix64 over it, so neighbouring streams are unrelated). So sample
// i is reproducible alone, whatever the batch it was decoded in.
uint64_t sample_seed(uint64_t seed, int i);

// The loop of generate_ids (below) on any decoder, for its batch() samples of one prompt at once: sample b draws
// from the stream sample_seed(opt.seed, first_sample + b). P: the model's positions (the window rule). A sample
// that has ended (eos or max_new_tokens) keeps its place in the batch (its last token is fed again, nothing is
// drawn for it) until every sample has ended. Speculative needs batch 1. UserError as generate_ids.
std::vector<SampleResult> decode_samples(TokenDecoder& dec, int V, int P, const std::vector<int>& prompt_ids,
                                         const SampleOptions& opt, int eos_id, bool speculative, int first_sample = 0);
// The same from text (the tokenizer must have the model's vocabulary), texts decoded.
std::vector<SampleResult> decode_samples(TokenDecoder& dec, const ModelConfig& c, const data::Tokenizer& tok,
                                         const SampleOptions& opt, bool speculative, int first_sample = 0);

// Generation on token ids (opt.prompt is not read). eos_id < 0: no eos (stop_at_eos has no effect).
// UserError for bad options, an empty prompt, an id outside [0, V), or speculative without an MTP module.
// Plain: feed the prompt (its last P tokens), then one token per step, re-filling by the window rule (top of this
// file). Speculative: after sampling t_next, when [t_next, d] fits the window, draft d = argmax of the MTP logits
// and feed [t_next, d]; the logits at t_next's position give the following token (the same sampling rule and RNG
// as plain); if it equals d, d is accepted and the logits at d's position give one more token for free; else the
// main cache drops d's position. When it does not fit, a plain step. The output is identical to plain decoding.
SampleResult generate_ids(const Model<float>& model, const std::vector<int>& prompt_ids, const SampleOptions& opt,
                          int eos_id, bool speculative);
// The same from text: the prompt is encoded with the tokenizer (whose vocabulary must equal the model's),
// the new tokens decoded into result.text.
SampleResult generate(const Model<float>& model, const data::Tokenizer& tok, const SampleOptions& opt,
                      bool speculative);

// Both modes on the same options, for the CLI: speedup = plain.seconds / speculative.seconds; identical tells
// whether the two produced the same tokens (they must).
struct SampleComparison {
  SampleResult plain, speculative;
  double speedup = 0;
  bool identical = false;
};
SampleComparison generate_both(const Model<float>& model, const data::Tokenizer& tok, const SampleOptions& opt);

// ---- prompts, printing, the tokenizer of a checkpoint ------------------------------------------------------

// The line loop of --prompt-file and --interactive: reads `in` to its end and calls on_prompt(text, line number,
// from 1) for every line that is not blank (empty, or spaces and tabs only: skipped); a trailing '\r' is dropped.
// A line is handed over as soon as it is read, so an interactive caller answers it before the next is read.
// Returns the number of prompts handed over.
int for_each_prompt_line(std::istream& in, const std::function<void(const std::string&, int)>& on_prompt);
// The prompts of --prompt-file: its non-blank lines, each checked as a prompt (UTF-8, no reserved character, at
// least one token of tok). UserError naming the file (missing, unreadable, not a regular file, no prompt in it) or
// the file and line.
std::vector<std::string> read_prompt_file(const std::string& path, const data::Tokenizer& tok);

// A sample as the CLI prints it: a note when the prompt was cropped, the header line (the prompt, the new tokens,
// the re-fills, the speed), the prompt and the new text, and "(end of song)" on a line of its own exactly when the
// last new token is eos_id (the model ended the song; the eos itself decodes to nothing).
std::string format_sample(const std::string& prompt, const SampleResult& r, int eos_id);

// The tokenizer to sample a checkpoint's model with: `path` when given (--tokenizer), else the checkpoint
// folder's own copy, else its run folder's (run_checkpoint.h: checkpoint_tokenizer). UserError when there is none,
// when it does not load, or when its vocabulary differs from the model's (vocab_size).
struct SampleTokenizer {
  data::Tokenizer tok;
  std::string path;    // the file loaded
  std::string source;  // which one it is, for the log line
};
SampleTokenizer load_sample_tokenizer(const std::string& checkpoint_dir, const std::string& path, int vocab_size);

}  // namespace dsv3
