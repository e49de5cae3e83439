// Stage 07, the CPU sampler (sampler.h): KV-cached decoding of the whole model through the stages' decode forms
// (stage 05's block_decode: stage 02's absorbed chunk decode, stage 03's MLP and MoE rows), the MTP draft, token
// sampling and speculative decoding. Shapes: see the legend in sampler.h.
//
// Everything a token goes through is computed row by row in a summation order fixed by the source
// (common/rowwise.h), never by cpu::gemm: that is what makes a chunked feed bitwise equal to single feeds.
#include "07_train_gpu/sampler.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <istream>
#include <future>
#include <numeric>
#include <sstream>

#include "01_rmsnorm_rope/rmsnorm_rope.h"
#include "07_train_gpu/corpus.h"
#include "07_train_gpu/data.h"
#include "07_train_gpu/run_checkpoint.h"
#include "common/errors.h"
#include "common/rng.h"
#include "common/rowwise.h"
#include "common/files.h"
#include "common/timer.h"

namespace dsv3 {

// The decoder's scratch: the blocks' (stage 05), the embedded chunk, the final norm's output and the MTP input;
// grown on demand, never shrunk, so after the first few calls decoding allocates nothing.
struct DecodeScratch {
  std::vector<float> x, z, cat;  // (n, D) residual stream, (n, D) final norm, (n, 2D) MTP [en ; hn]
  BlockDecodeScratch<float> block;
};

namespace {

constexpr uint64_t kMaxPromptFileBytes = uint64_t(16) << 20;
// Host threads that draw the tokens of a batch of at least twice as many samples (decode_samples).
constexpr int kSamplingThreads = 4;

MlaCache<float> cache_of(Decoder::LatentCache& lc, int max_len) { return {lc.c_kv.data(), lc.k_pe.data(), max_len}; }

int argmax(const float* v, int n) {
  int best = 0;
  for (int i = 1; i < n; ++i)
    if (v[i] > v[best]) best = i;
  return best;
}

}  // namespace


// ---- Decoder ----------------------------------------------------------------------------------------------

Decoder::Decoder(const Model<float>& model, int max_len)
    : model_(model), max_len_(max_len), scratch_(std::make_unique<DecodeScratch>()) {
  const ModelConfig& c = model.config();
  require(max_len >= 1, "decoder: max_len must be >= 1, got {}", max_len);
  require(max_len <= c.max_position_embeddings && max_len <= model.rope().positions,
          "decoder: max_len {} exceeds the model's max_position_embeddings {} (its RoPE table has {} positions)",
          max_len, c.max_position_embeddings, model.rope().positions);
  auto cache = [&](const BlockConfig& bc) {
    return LatentCache{bc, std::vector<float>(size_t(max_len) * bc.attn.kv_lora_rank),
                       std::vector<float>(size_t(max_len) * bc.attn.qk_rope_head_dim)};
  };
  for (int l = 0; l < c.num_hidden_layers; ++l) layers_.push_back(cache(model.block_config(l)));
  if (c.num_nextn_predict_layers > 0) mtp_.push_back(cache(model.mtp_config().block));
  tokens_.assign(max_len, 0);
  mtp_tokens_.assign(max_len, 0);
  hidden_.assign(size_t(max_len) * c.hidden_size, 0.0f);
}

Decoder::~Decoder() = default;

void Decoder::reset() {
  pos_ = 0;
  mtp_pos_ = 0;
}

void Decoder::truncate(int new_pos) {
  require(new_pos >= 0 && new_pos <= pos_, "decoder: truncate to {} positions, but {} are fed", new_pos, pos_);
  pos_ = new_pos;
  mtp_pos_ = std::min(mtp_pos_, new_pos);  // MTP position new_pos-1 read t_{new_pos}: draft() re-checks it
}

const float* Decoder::normed_hidden(int p) const {
  require(p >= 0 && p < pos_, "decoder: position {} is not fed (pos() = {})", p, pos_);
  return hidden_.data() + size_t(p) * model_.config().hidden_size;
}

const std::vector<float>& Decoder::feed(const std::vector<int>& tokens) {
  const ModelConfig& c = model_.config();
  const int n = int(tokens.size()), D = c.hidden_size, V = c.vocab_size;
  require(n > 0, "decoder: feed needs at least one token");
  require(pos_ + n <= max_len_, "decoder: {} tokens at position {} do not fit max_len {}", n, pos_, max_len_);
  for (int t : tokens) require(t >= 0 && t < V, "decoder: token id {} is outside the vocabulary [0, {})", t, V);
  DecodeScratch& s = *scratch_;
  const MlaRope<float> rope = mla_rope(model_.rope());
  // 1) embedding, 2) every block over its own cache
  float* x = grow(s.x, size_t(n) * D);
  for (int t = 0; t < n; ++t) std::copy_n(model_.embed().data() + size_t(tokens[t]) * D, D, x + size_t(t) * D);
  for (size_t l = 0; l < layers_.size(); ++l)
    cpu::block_decode(x, cache_of(layers_[l], max_len_), model_.layer(int(l)).weights(), layers_[l].cfg, n, pos_,
                      rope, s.block);
  // 3) final norm (its output z is kept for the MTP module) and head
  float* z = grow(s.z, size_t(n) * D);
  cpu::rmsnorm_rows(z, x, model_.final_norm().data(), n, D, float(c.rms_norm_eps));
  std::copy_n(z, size_t(n) * D, hidden_.data() + size_t(pos_) * D);
  logits_.resize(size_t(n) * V);
  linear_rows(logits_.data(), z, model_.head().data(), n, D, V);
  std::copy(tokens.begin(), tokens.end(), tokens_.begin() + pos_);
  pos_ += n;
  return logits_;
}

const std::vector<float>& Decoder::draft(int next) {
  const ModelConfig& c = model_.config();
  const int D = c.hidden_size, V = c.vocab_size;
  require(!mtp_.empty(), "decoder: the model has no MTP module (num_nextn_predict_layers = 0) to draft with");
  require(pos_ > 0, "decoder: draft needs a fed token first (the MTP module reads its normalised final hidden state)");
  require(next >= 0 && next < V, "decoder: token id {} is outside the vocabulary [0, {})", next, V);
  // 1) MTP position j embeds t_{j+1}: keep the computed prefix whose tokens still match (and always recompute
  //    the last position, whose output is what we return)
  auto input_token = [&](int j) { return j + 1 < pos_ ? tokens_[j + 1] : next; };
  int keep = 0;
  while (keep < std::min(mtp_pos_, pos_ - 1) && mtp_tokens_[keep] == input_token(keep)) ++keep;
  mtp_pos_ = keep;
  // 2) MTP positions j0..pos-1 as one chunk: h'_j = eh_proj [enorm(Emb(t_{j+1})) ; hnorm(z_j)] -> block
  const int j0 = mtp_pos_, m = pos_ - j0;
  const MtpConfig mc = model_.mtp_config();
  const MtpModuleWeights<float> mw = model_.mtp_module(0).weights();
  DecodeScratch& s = *scratch_;
  float* cat = grow(s.cat, size_t(m) * 2 * D);
  float* x = grow(s.x, size_t(m) * D);
  for (int r = 0; r < m; ++r) {
    const int j = j0 + r, tok = input_token(j);
    mtp_tokens_[j] = tok;
    cpu::rmsnorm_rows(cat + size_t(r) * 2 * D, model_.embed().data() + size_t(tok) * D, mw.enorm, 1, D,
                      mc.norm_eps);
    cpu::rmsnorm_rows(cat + size_t(r) * 2 * D + D, hidden_.data() + size_t(j) * D, mw.hnorm, 1, D, mc.norm_eps);
  }
  linear_rows(x, cat, mw.eh_proj, m, 2 * D, D);
  cpu::block_decode(x, cache_of(mtp_[0], max_len_), mw.block, mtp_[0].cfg, m, j0, mla_rope(model_.rope()),
                    s.block);
  mtp_pos_ = pos_;
  // 3) the shared final norm and head, on the last position only
  float* z = grow(s.z, D);
  cpu::rmsnorm_rows(z, x + size_t(m - 1) * D, model_.final_norm().data(), 1, D, mc.norm_eps);
  draft_logits_.resize(V);
  linear_rows(draft_logits_.data(), z, model_.head().data(), 1, D, V);
  return draft_logits_;
}

// ---- sampling ---------------------------------------------------------------------------------------------

void validate_sample_options(const SampleOptions& o) {
  require(std::isfinite(o.temperature) && o.temperature >= 0,
          "sample: temperature must be >= 0 (0 = greedy), got {}", o.temperature);
  require(o.top_k >= 0, "sample: top_k must be >= 0 (0 = off), got {}", o.top_k);
  require(o.top_p > 0 && o.top_p <= 1, "sample: top_p must be in (0, 1] (1 = off), got {}", o.top_p);
  require(o.max_new_tokens >= 1 && o.max_new_tokens <= kMaxNewTokens,
          "sample: max_new_tokens must be in [1, {}], got {}", kMaxNewTokens, o.max_new_tokens);
}

int sample_token(const float* logits, int V, const SampleOptions& opt, Rng& rng) {
  for (int i = 0; i < V; ++i)
    require(std::isfinite(logits[i]), "sample: the model produced a non-finite logit ({}) for token {}", logits[i], i);
  if (opt.temperature == 0) return argmax(logits, V);
  // 1) candidates by logit, ties to the lower id; cut to top_k
  std::vector<int> ids(V);
  std::iota(ids.begin(), ids.end(), 0);
  const int k = opt.top_k > 0 && opt.top_k < V ? opt.top_k : V;
  auto before = [&](int a, int b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  if (k < V)
    std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), before);
  else
    std::sort(ids.begin(), ids.end(), before);
  // 2) softmax of logit / temperature over the k (unnormalised weights, in double)
  std::vector<double> p(k);
  double z = 0;
  for (int i = 0; i < k; ++i) z += (p[i] = std::exp((double(logits[ids[i]]) - logits[ids[0]]) / opt.temperature));
  // 3) nucleus: the shortest prefix whose probability reaches top_p, the top token always kept
  int keep = k;
  if (opt.top_p < 1) {
    double cum = 0;
    for (int i = 0; i < k; ++i) {
      cum += p[i] / z;
      if (cum >= opt.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  // 4) one uniform draw, inverted through the cumulative weights of the kept tokens
  double zk = 0;
  for (int i = 0; i < keep; ++i) zk += p[i];
  const double u = rng.uniform() * zk;
  double cum = 0;
  for (int i = 0; i < keep; ++i) {
    cum += p[i];
    if (u < cum) return ids[i];
  }
  return ids[keep - 1];
}

uint64_t sample_seed(uint64_t seed, int i) { return seed + uint64_t(i) * 0x9E3779B97F4A7C15ull; }

namespace {

// The CPU Decoder as the loop's TokenDecoder (batch 1).
class CpuTokenDecoder : public TokenDecoder {
 public:
  explicit CpuTokenDecoder(Decoder& d) : d_(d) {}
  int batch() const override { return 1; }
  int pos() const override { return d_.pos(); }
  int max_len() const override { return d_.max_len(); }
  void reset() override { d_.reset(); }
  const float* feed(const std::vector<int>& tokens, int n, int last) override {
    require(int(tokens.size()) == n && last >= 1 && last <= n, "decoder: {} tokens given for a chunk of {} (last {})",
            tokens.size(), n, last);
    const std::vector<float>& l = d_.feed(tokens);  // (n, V)
    return l.data() + size_t(n - last) * (l.size() / size_t(n));
  }
  void truncate(int new_pos) override { d_.truncate(new_pos); }
  int draft(int next) override {
    const std::vector<float>& l = d_.draft(next);
    return argmax(l.data(), int(l.size()));
  }

 private:
  Decoder& d_;
};

}  // namespace

std::vector<SampleResult> decode_samples(TokenDecoder& dec, int V, int P, const std::vector<int>& prompt_ids,
                                         const SampleOptions& opt, int eos_id, bool speculative, int first_sample) {
  validate_sample_options(opt);
  const int B = dec.batch(), K = refill_keep(P);
  require(!prompt_ids.empty(), "sample: the prompt is empty: it must hold at least one token");
  for (int t : prompt_ids)
    require(t >= 0 && t < V, "sample: prompt token id {} is outside the vocabulary [0, {})", t, V);
  require(!speculative || B == 1, "sample: speculative decoding runs one sample at a time (batch 1), not {}", B);
  CpuTimer timer;
  std::vector<SampleResult> rs(size_t(B), SampleResult{});
  // 1) the text of every sample: the prompt's last P tokens, then its new tokens (the last one not yet fed)
  const int cropped = std::max(0, int(prompt_ids.size()) - P);
  const std::vector<int> prompt(prompt_ids.begin() + cropped, prompt_ids.end());
  std::vector<std::vector<int>> text(size_t(B), prompt);
  std::vector<Rng> rng;
  std::vector<char> done(size_t(B), 0);
  for (int b = 0; b < B; ++b) {
    rng.emplace_back(sample_seed(opt.seed, first_sample + b));
    rs[b].window = P;
    rs[b].prompt_cropped = cropped;
    rs[b].prompt_tokens = int(prompt.size());
  }
  require(dec.max_len() >= std::min<int64_t>(P, int64_t(prompt.size()) + opt.max_new_tokens),
          "sample: the decoder holds {} positions, fewer than the window needs", dec.max_len());
  dec.reset();
  // Greedy choices on the decoder's device when it can (feed() then returns no logits), for this call only.
  const bool device_greedy = dec.greedy_on_device(opt.temperature == 0);
  struct Restore {
    TokenDecoder& d;
    bool on;
    ~Restore() {
      if (on) d.greedy_on_device(false);
    }
  } restore{dec, device_greedy};
  // Appends a new token to sample b; true when that sample is over.
  auto emit = [&](int b, int t) {
    text[b].push_back(t);
    rs[b].tokens.push_back(t);
    return int(rs[b].tokens.size()) == opt.max_new_tokens || (opt.stop_at_eos && eos_id >= 0 && t == eos_id);
  };
  // Feeds the last n tokens of every text as one chunk; the logits of each text's last token (B, V).
  auto feed_tail = [&](int n) {
    std::vector<int> tokens(size_t(B) * n);
    for (int b = 0; b < B; ++b) std::copy(text[b].end() - n, text[b].end(), tokens.begin() + size_t(b) * n);
    return dec.feed(tokens, n, 1);
  };
  // The token of row `row` of the last feed (logits (rows, V)) for sample b: the decoder's greedy choice, or
  // sample_token, its host time counted.
  double sampling_ms = 0;
  auto draw = [&](const float* logits, int row, int b) {
    if (device_greedy) return dec.greedy_tokens()[row];
    CpuTimer t;
    const int x = sample_token(logits + size_t(row) * V, V, opt, rng[b]);
    sampling_ms += t.elapsed_ms();
    return x;
  };
  // One token for every live sample from its logits (B, V); an ended sample repeats its last token. Samples are
  // independent (their own logits row, stream, text and result), so a large batch is drawn by a few host threads
  // (kSamplingThreads; the same tokens as one thread, in any order).
  auto sample_rows = [&](const float* logits, int b0, int b1) {
    for (int b = b0; b < b1; ++b) {
      if (done[b])
        text[b].push_back(text[b].back());
      else
        done[b] = emit(b, device_greedy ? dec.greedy_tokens()[b] : sample_token(logits + size_t(b) * V, V, opt, rng[b]));
    }
  };
  auto sample_all = [&](const float* logits) {
    if (device_greedy) return sample_rows(logits, 0, B);
    CpuTimer t;
    const int threads = B >= 2 * kSamplingThreads ? kSamplingThreads : 1;
    std::vector<std::future<void>> work;
    for (int k = 1; k < threads; ++k)
      work.push_back(std::async(std::launch::async, sample_rows, logits, B * k / threads, B * (k + 1) / threads));
    sample_rows(logits, 0, B / threads);
    for (auto& w : work) w.get();  // rethrows a worker's error (a non-finite logit)
    sampling_ms += t.elapsed_ms();
  };
  // Feeds the texts' last tokens and samples from them. The window holds dec.pos() tokens; when it holds P, the
  // re-fill: reset, and feed the K tokens before the last one with it as one chunk (its last row).
  auto plain_step = [&]() {
    if (dec.pos() < P) return sample_all(feed_tail(1));
    dec.reset();
    for (int b = 0; b < B; ++b) rs[b].refills += !done[b];
    sample_all(feed_tail(K + 1));
  };
  auto all_done = [&]() { return std::all_of(done.begin(), done.end(), [](char d) { return d != 0; }); };
  // 2) prefill, then one token per step (plain), or up to two per verified draft (speculative, batch 1)
  sample_all(feed_tail(int(prompt.size())));
  SampleResult& r = rs[0];
  while (!all_done()) {
    const int remaining = opt.max_new_tokens - int(r.tokens.size());
    // plain step: no drafting, the last token (a draft cannot pay off), or [next, draft] would cross the window's
    // end (the plain step re-fills at the same token as plain decoding does)
    if (!speculative || remaining < 2 || dec.pos() + 2 > P) {
      plain_step();
      continue;
    }
    // speculative step: draft the token after next, let the main model check both in one feed
    const int next = text[0].back();
    const int d = dec.draft(next);
    ++r.drafted;
    const float* two = dec.feed({next, d}, 2, 2);  // (2, V): after next, after d
    const int x = draw(two, 0, 0);
    done[0] = emit(0, x);
    if (x == d) {
      ++r.accepted;
      if (!done[0]) done[0] = emit(0, draw(two, 1, 0));
    } else {
      dec.truncate(dec.pos() - 1);  // d's position is not part of the text
    }
  }
  const double seconds = timer.elapsed_ms() / 1e3;
  for (SampleResult& s : rs) {
    s.seconds = seconds;
    s.tokens_per_s = seconds > 0 ? double(s.tokens.size()) / seconds : 0;
    s.sampling_seconds = sampling_ms / 1e3;
  }
  return rs;
}

std::vector<SampleResult> decode_samples(TokenDecoder& dec, const ModelConfig& c, const data::Tokenizer& tok,
                                         const SampleOptions& opt, bool speculative, int first_sample) {
  validate_sample_options(opt);
  require(tok.vocab_size() == c.vocab_size,
          "sample: the tokenizer has {} tokens but the model's vocabulary is {}: use the tokenizer the model was "
          "trained with",
          tok.vocab_size(), c.vocab_size);
  const std::vector<int> ids = tok.encode(opt.prompt);
  require(!ids.empty(), "sample: the prompt \"{}\" tokenises to nothing: give at least one character", opt.prompt);
  std::vector<SampleResult> rs =
      decode_samples(dec, c.vocab_size, c.max_position_embeddings, ids, opt, tok.eos_id(), speculative, first_sample);
  for (SampleResult& r : rs) r.text = tok.decode(r.tokens);
  return rs;
}

SampleResult generate_ids(const Model<float>& model, const std::vector<int>& prompt_ids, const SampleOptions& opt,
                          int eos_id, bool speculative) {
  validate_sample_options(opt);
  const ModelConfig& c = model.config();
  const int P = c.max_position_embeddings;
  require(!prompt_ids.empty(), "sample: the prompt is empty: it must hold at least one token");
  require(!speculative || c.num_nextn_predict_layers > 0,
          "sample: speculative decoding drafts with the MTP module, and this model has none "
          "(num_nextn_predict_layers = 0)");
  const int64_t window = std::min<int64_t>(P, int64_t(prompt_ids.size())) + opt.max_new_tokens;
  Decoder dec(model, int(std::min<int64_t>(P, window)));
  CpuTokenDecoder td(dec);
  return decode_samples(td, c.vocab_size, P, prompt_ids, opt, eos_id, speculative).front();
}

SampleResult generate(const Model<float>& model, const data::Tokenizer& tok, const SampleOptions& opt,
                      bool speculative) {
  validate_sample_options(opt);
  require(tok.vocab_size() == model.config().vocab_size,
          "sample: the tokenizer has {} tokens but the model's vocabulary is {}: use the tokenizer the model was "
          "trained with",
          tok.vocab_size(), model.config().vocab_size);
  const std::vector<int> ids = tok.encode(opt.prompt);
  require(!ids.empty(), "sample: the prompt \"{}\" tokenises to nothing: give at least one character", opt.prompt);
  SampleResult r = generate_ids(model, ids, opt, tok.eos_id(), speculative);
  r.text = tok.decode(r.tokens);
  return r;
}

SampleComparison generate_both(const Model<float>& model, const data::Tokenizer& tok, const SampleOptions& opt) {
  SampleComparison c;
  c.plain = generate(model, tok, opt, false);
  c.speculative = generate(model, tok, opt, true);
  c.speedup = c.speculative.seconds > 0 ? c.plain.seconds / c.speculative.seconds : 0;
  c.identical = c.plain.tokens == c.speculative.tokens;
  return c;
}

// ---- prompts, printing, the tokenizer of a checkpoint ------------------------------------------------------

int for_each_prompt_line(std::istream& in, const std::function<void(const std::string&, int)>& on_prompt) {
  int prompts = 0;
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;  // blank
    on_prompt(line, number);
    ++prompts;
  }
  return prompts;
}

std::vector<std::string> read_prompt_file(const std::string& path, const data::Tokenizer& tok) {
  std::istringstream in(read_file(path, "prompt file", kMaxPromptFileBytes));
  std::vector<std::string> prompts;
  for_each_prompt_line(in, [&](const std::string& text, int line) {
    const std::string where = fmt::format("prompt file '{}' line {}", path, line);
    data::validate_text(text, where);
    require(!tok.encode(text).empty(), "{} tokenises to nothing: give at least one character", where);
    prompts.push_back(text);
  });
  require(!prompts.empty(), "prompt file '{}' holds no prompt: one prompt per line (blank lines are skipped)", path);
  return prompts;
}

std::string format_sample(const std::string& prompt, const SampleResult& r, int eos_id) {
  std::string s;
  if (r.prompt_cropped > 0)
    s += fmt::format("(the prompt has {} tokens, more than the model's {} positions: it was cropped to its last {})\n",
                     r.prompt_tokens + r.prompt_cropped, r.window, r.prompt_tokens);
  const std::string refills =
      r.refills == 0 ? ""
                     : fmt::format(", {} re-fill{} of the {}-position window from its last {} tokens", r.refills,
                                   r.refills == 1 ? "" : "s", r.window, refill_keep(r.window));
  s += fmt::format("--- prompt: \"{}\" ({} new tokens{}, {:.0f} tokens/s)\n{}{}", prompt, r.tokens.size(), refills,
                   r.tokens_per_s, prompt, r.text);
  if (!r.tokens.empty() && r.tokens.back() == eos_id) s += (s.back() == '\n' ? "" : "\n") + std::string("(end of song)");
  return s + "\n";
}

SampleTokenizer load_sample_tokenizer(const std::string& checkpoint_dir, const std::string& path, int vocab_size) {
  SampleTokenizer s;
  if (!path.empty()) {
    s.path = path;
    s.source = "--tokenizer";
  } else if (const auto found = checkpoint_tokenizer(checkpoint_dir)) {
    s.path = found->path;
    s.source = found->own ? "the checkpoint's own copy" : "the run folder's copy: the checkpoint carries none";
  } else {
    throw UserError(fmt::format("no tokenizer for checkpoint {}: neither {}/{} nor the run folder's {} exists; give "
                                "--tokenizer (the data folder's tokenizer.model)", checkpoint_dir, checkpoint_dir,
                                kTokenizerFile, run_tokenizer_path(checkpoint_dir)));
  }
  s.tok = data::Tokenizer::load(s.path);
  require(s.tok.vocab_size() == vocab_size, "tokenizer {} has {} pieces, the checkpoint's model a vocabulary of {}: "
          "give the tokenizer it was trained with (--tokenizer)", s.path, s.tok.vocab_size(), vocab_size);
  return s;
}

}  // namespace dsv3
