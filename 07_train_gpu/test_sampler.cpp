// Tests of stage 07's sampler: the chunked absorbed MLA decode against stage 02, cached decoding against the
// full forward, chunked feeds bitwise equal to single feeds, the MTP draft against the training-time MTP
// forward, speculative == plain decoding (greedy and sampled), the sampling rules, bad input, the window rule of
// generation past the model's positions, the prompt line loop and the printed sample, and a checkpoint folder that
// carries its tokenizer.
// Models: the tiny preset of stage 06 (layer 0 dense, layer 1 MoE, one MoE MTP module) with random weights,
// a variant of it (no q compression, softmax router, YaRN), and the tiny model trained for a moment on a
// cyclic sequence, so that most drafts are accepted and the accept path of speculative decoding is exercised.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <sstream>

#include "05_mtp/mtp.h"
#include "06_full_model/model.h"
#include "06_full_model/checkpoint.h"
#include "07_train_gpu/backend.h"
#include "07_train_gpu/data.h"
#include "07_train_gpu/run_checkpoint.h"
#include "07_train_gpu/sampler.h"
#include "07_train_gpu/test_support.h"
#include "07_train_gpu/train.h"
#include "common/errors.h"
#include "common/rng.h"
#include "common/testing.h"

using namespace dsv3;

namespace {

using test::random_tokens;
using test::tiny_variant;

// Logits of feeding `tokens` in chunks of the given sizes (the sizes sum to tokens.size()), rows concatenated.
std::vector<float> feed_in_chunks(Decoder& dec, const std::vector<int>& tokens, const std::vector<int>& sizes) {
  std::vector<float> all;
  size_t at = 0;
  for (int n : sizes) {
    const auto& l = dec.feed(std::vector<int>(tokens.begin() + at, tokens.begin() + at + n));
    all.insert(all.end(), l.begin(), l.end());
    at += n;
  }
  EXPECT_EQ(at, tokens.size());
  return all;
}

std::vector<double> softmax(const std::vector<float>& logits) {
  const float m = *std::max_element(logits.begin(), logits.end());
  std::vector<double> p(logits.size());
  double z = 0;
  for (size_t i = 0; i < p.size(); ++i) z += (p[i] = std::exp(double(logits[i]) - m));
  for (auto& x : p) x /= z;
  return p;
}

using test::bitwise_equal;
using test::cyclic_model;
using test::kCycle;

// Short texts over ten words and a SentencePiece tokenizer trained on them (vocab_size pieces).
std::vector<std::string> word_texts(int n, int offset = 0) {
  const char* words[] = {"love", "night", "river", "shine", "heart", "road", "home", "rain", "song", "light"};
  std::vector<std::string> texts;
  for (int i = offset; i < offset + n; ++i) {
    std::string t;
    for (int w = 0; w < 8; ++w) t += std::string(w ? " " : "") + words[(i * 7 + w * w) % 10] + (w % 4 == 3 ? "\n" : "");
    texts.push_back(t);
  }
  return texts;
}
const data::Tokenizer& word_tokenizer() {
  static const data::Tokenizer tok = data::Tokenizer::train(word_texts(60), 300);
  return tok;
}

SampleOptions greedy(int max_new) {
  SampleOptions o;
  o.temperature = 0;
  o.max_new_tokens = max_new;
  return o;
}

SampleOptions sampled(uint64_t seed, int max_new) {
  SampleOptions o;
  o.temperature = 0.8;
  o.top_k = 20;
  o.top_p = 0.9;
  o.seed = seed;
  o.max_new_tokens = max_new;
  return o;
}

}  // namespace

// ---- cached decoding of the whole model -------------------------------------------------------------------

// Every position's logits of the cached decoder equal Model::forward's (12 tokens, fed one by one and in
// chunks). Tolerance kElementwiseTol (abs 1e-6 + rel 1e-5): fp32, absorbed vs expanded attention and dot
// products vs Eigen GEMMs only reorder sums of at most 2D = 48 terms per output.
TEST(SamplerDecoder, CachedLogitsMatchFullForward) {
  for (const ModelConfig& c : {config_preset("tiny"), tiny_variant()}) {
    Model<float> m(c, 7);
    const int T = 12, V = c.vocab_size;
    const std::vector<int> window = random_tokens(T + 1, V, 8);
    m.forward(window, 1, T);
    const std::vector<int> inputs(window.begin(), window.end() - 1);
    Decoder dec(m, T);
    const std::vector<float> single = feed_in_chunks(dec, inputs, std::vector<int>(T, 1));
    EXPECT_CLOSE(compare(single, m.logits(), kElementwiseTol), "decoder (one by one) vs Model::forward");
    for (int p = 0; p < T; ++p) {  // the kept hidden states are the forward's z = final_norm(h_L)
      const float* h = dec.normed_hidden(p);
      const float* ref = m.normed_hidden().data() + size_t(p) * c.hidden_size;
      EXPECT_CLOSE(compare(h, ref, c.hidden_size, kElementwiseTol), "z at position " + std::to_string(p));
    }
    dec.reset();
    const std::vector<float> chunked = feed_in_chunks(dec, inputs, {5, 3, 4});
    EXPECT_CLOSE(compare(chunked, m.logits(), kElementwiseTol), "decoder (chunks 5+3+4) vs Model::forward");
  }
}

// The property speculative decoding rests on: any chunking gives the same bits as single-token feeds.
TEST(SamplerDecoder, ChunkedFeedIsBitwiseEqualToOneByOne) {
  for (const ModelConfig& c : {config_preset("tiny"), tiny_variant()}) {
    Model<float> m(c, 9);
    const int T = 14;
    const std::vector<int> tokens = random_tokens(T, c.vocab_size, 10);
    Decoder dec(m, T);
    const std::vector<float> ref = feed_in_chunks(dec, tokens, std::vector<int>(T, 1));
    const std::vector<std::vector<int>> chunkings = {{14}, {2, 2, 2, 2, 2, 2, 2}, {1, 6, 7}, {9, 5}};
    for (const std::vector<int>& sizes : chunkings) {
      dec.reset();
      EXPECT_TRUE(bitwise_equal(feed_in_chunks(dec, tokens, sizes), ref)) << "chunks of " << sizes[0] << "...";
    }
    // after a truncate, re-feeding gives the same bits as well
    dec.reset();
    dec.feed(std::vector<int>(tokens.begin(), tokens.begin() + 10));
    dec.truncate(6);
    std::vector<float> tail = feed_in_chunks(dec, std::vector<int>(tokens.begin() + 6, tokens.end()), {3, 5});
    EXPECT_TRUE(bitwise_equal(tail, std::vector<float>(ref.begin() + 6 * c.vocab_size, ref.end())));
  }
}

// ---- the MTP draft --------------------------------------------------------------------------------------

// The draft at position p (z of p, Emb(t_{p+1})) equals the training-time MTP module 1 on the same window:
// stage 05's mtp_forward on the model's weights and its forward's z = final_norm(h_L) (checked to be what Model::forward runs:
// its CE equals the model's mtp_losses()). Tolerance on probabilities kElementwiseTol.
TEST(SamplerDraft, DraftEqualsTrainingTimeMtpForward) {
  for (const ModelConfig& c : {config_preset("tiny"), tiny_variant()}) {
    Model<float> m(c, 11);
    const int T = 12, V = c.vocab_size;
    const std::vector<int> window = random_tokens(T + 1, V, 12);
    m.forward(window, 1, T);
    const MtpConfig mc = m.mtp_config();
    MtpHostSaved<float> saved(mc, 1, T);
    const MtpModuleWeights<float> mw = m.mtp_module(0).weights();
    float ce = 0;
    cpu::mtp_forward(&ce, saved.saved.data(), m.normed_hidden().data(), window.data(),
                     MtpShared<float>{m.embed().data(), m.final_norm().data(), m.head().data()}, &mw, mc, 1, T,
                     mla_rope(m.rope()));
    ASSERT_FLOAT_EQ(ce, m.mtp_losses().at(0));
    auto training_probs = [&](int p) {
      return std::vector<float>(saved.saved[0].probs + size_t(p) * V, saved.saved[0].probs + size_t(p + 1) * V);
    };
    // incremental: feed t_p, draft with t_{p+1}
    Decoder dec(m, T);
    std::vector<float> last;
    for (int p = 0; p < T; ++p) {
      dec.feed({window[p]});
      last = dec.draft(window[p + 1]);
      EXPECT_EQ(dec.mtp_pos(), p + 1);
      EXPECT_CLOSE(compare(softmax(last), training_probs(p), kElementwiseTol),
                   "draft at position " + std::to_string(p));
    }
    // catching up: the whole prompt in one feed, then one draft computes MTP positions 0..T-1 at once
    Decoder bulk(m, T);
    bulk.feed(std::vector<int>(window.begin(), window.end() - 1));
    EXPECT_EQ(bulk.mtp_pos(), 0);
    EXPECT_TRUE(bitwise_equal(bulk.draft(window[T]), last)) << "catch-up draft differs from incremental drafts";
    EXPECT_EQ(bulk.mtp_pos(), T);
  }
}

// A rejected draft's truncate, or a change of mind about the next token, leaves the MTP stream as a fresh
// decoder fed only the kept tokens would have it (bitwise).
TEST(SamplerDraft, TruncateAndChangedNextTokenRecomputeTheMtpStream) {
  const ModelConfig c = config_preset("tiny");
  Model<float> m(c, 13);
  const std::vector<int> t = random_tokens(12, c.vocab_size, 14);
  auto fresh_draft = [&](int fed, int next) {
    Decoder d(m, 12);
    d.feed(std::vector<int>(t.begin(), t.begin() + fed));
    return d.draft(next);
  };
  Decoder dec(m, 12);
  dec.feed(std::vector<int>(t.begin(), t.begin() + 8));
  dec.draft(t[8]);
  dec.feed({t[8], t[9]});  // as speculative decoding feeds [next, draft]
  dec.truncate(9);         // the draft t[9] was rejected
  EXPECT_TRUE(bitwise_equal(dec.draft(t[10]), fresh_draft(9, t[10])));
  EXPECT_TRUE(bitwise_equal(dec.draft(t[11]), fresh_draft(9, t[11])));  // same position, another next token
  dec.truncate(5);
  dec.feed({t[0], t[1]});  // different tokens at positions 5, 6
  Decoder other(m, 12);
  other.feed({t[0], t[1], t[2], t[3], t[4], t[0], t[1]});
  EXPECT_TRUE(bitwise_equal(dec.draft(t[2]), other.draft(t[2])));
}

// ---- speculative decoding -------------------------------------------------------------------------------

// Speculative output equals plain output token for token, greedy and sampled (temperature 0.8, top-k 20,
// top-p 0.9), several seeds, with eos stops; on a random model (drafts mostly rejected) and on the cyclic
// model (drafts mostly accepted).
TEST(SamplerSpeculative, IdenticalToPlainGreedyAndSampled) {
  const Model<float> random_model(config_preset("tiny"), 15);
  const std::vector<int> prompt = {3, 17, 42, 8, 55};
  int drafted = 0, accepted = 0;
  for (const Model<float>* m : {&random_model, &cyclic_model()}) {
    for (uint64_t seed : {1, 2, 3}) {
      for (const SampleOptions& o : {sampled(seed, 40), greedy(40)}) {
        // without eos (all max_new_tokens), then with an eos that stops plain decoding after its 11th token
        const int stop = generate_ids(*m, prompt, o, -1, false).tokens.at(10);
        for (int eos : {-1, stop}) {
          const SampleResult plain = generate_ids(*m, prompt, o, eos, false);
          const SampleResult spec = generate_ids(*m, prompt, o, eos, true);
          EXPECT_EQ(spec.tokens, plain.tokens) << "seed " << seed << " temperature " << o.temperature << " eos " << eos;
          if (eos < 0) {
            EXPECT_EQ(int(plain.tokens.size()), o.max_new_tokens);
          } else {  // stopped right after the first eos
            EXPECT_EQ(plain.tokens.back(), eos);
            EXPECT_EQ(std::count(plain.tokens.begin(), plain.tokens.end(), eos), 1);
          }
          EXPECT_EQ(plain.drafted, 0);
          if (plain.tokens.size() >= 2) {
            EXPECT_GT(spec.drafted, 0);
          }
          EXPECT_LE(spec.accepted, spec.drafted);
          drafted += spec.drafted;
          accepted += spec.accepted;
        }
      }
    }
  }
  // both paths exercised: the cyclic model's drafts are mostly right, the random model's mostly wrong
  EXPECT_GT(accepted, drafted / 4) << accepted << " of " << drafted;
  EXPECT_LT(accepted, drafted) << accepted << " of " << drafted;
}

TEST(SamplerSpeculative, CyclicModelContinuesTheCycleAndAcceptsMostDrafts) {
  const SampleResult r = generate_ids(cyclic_model(), {kCycle[0], kCycle[1], kCycle[2]}, greedy(30), -1, true);
  ASSERT_EQ(r.tokens.size(), 30u);
  for (size_t i = 0; i < r.tokens.size(); ++i) EXPECT_EQ(r.tokens[i], kCycle[(i + 3) % kCycle.size()]) << i;
  EXPECT_GE(r.accepted * 10, r.drafted * 9) << r.accepted << " of " << r.drafted;
  EXPECT_LT(r.drafted, 20);  // 30 tokens in well under 30 feeds
}

// ---- sampling ---------------------------------------------------------------------------------------------

TEST(SamplerSampling, DeterministicPerSeedAndSeedsDiffer) {
  Model<float> m(config_preset("tiny"), 17);
  SampleOptions o = sampled(5, 30);
  o.temperature = 1.0;
  const std::vector<int> prompt = {1, 2, 3};
  const auto a = generate_ids(m, prompt, o, -1, false).tokens;
  EXPECT_EQ(generate_ids(m, prompt, o, -1, false).tokens, a);
  o.seed = 6;
  EXPECT_NE(generate_ids(m, prompt, o, -1, false).tokens, a);
}

namespace {

// A batch of B CPU decoders in lockstep: a test double of the GPU decoder's batch for the shared decoding loop.
class BatchOfDecoders : public TokenDecoder {
 public:
  BatchOfDecoders(const Model<float>& m, int B) : V_(m.config().vocab_size) {
    for (int b = 0; b < B; ++b) decs_.push_back(std::make_unique<Decoder>(m, m.config().max_position_embeddings));
  }
  int batch() const override { return int(decs_.size()); }
  int pos() const override { return decs_[0]->pos(); }
  int max_len() const override { return decs_[0]->max_len(); }
  void reset() override {
    for (auto& d : decs_) d->reset();
  }
  const float* feed(const std::vector<int>& tokens, int n, int last) override {
    out_.clear();
    for (size_t b = 0; b < decs_.size(); ++b) {
      const auto& l = decs_[b]->feed(std::vector<int>(tokens.begin() + b * n, tokens.begin() + (b + 1) * n));
      out_.insert(out_.end(), l.end() - size_t(last) * V_, l.end());
    }
    return out_.data();
  }
  void truncate(int p) override {
    for (auto& d : decs_) d->truncate(p);
  }
  int draft(int) override { throw UserError("no draft in a batch"); }

 private:
  int V_;
  std::vector<std::unique_ptr<Decoder>> decs_;
  std::vector<float> out_;
};

}  // namespace

// --num-samples: the decoding loop over a batch (9 samples: the host draws with several threads) gives sample i what
// a single run with the seed sample_seed(seed, i) gives, through re-fills (83 tokens > 64 positions) and eos stops;
// sample 0 uses the seed itself.
TEST(SamplerBatch, BatchLoopEqualsSingleRunsWithTheirStreams) {
  const Model<float> m(config_preset("tiny"), 23);
  const ModelConfig& c = m.config();
  const SampleOptions o = sampled(31, 80);
  const int eos = 7, N = 9;
  BatchOfDecoders dec(m, N);
  const std::vector<SampleResult> all = decode_samples(dec, c.vocab_size, c.max_position_embeddings, {3, 17, 42}, o,
                                                       eos, false);
  ASSERT_EQ(int(all.size()), N);
  int ended = 0, refilled = 0;
  for (int i = 0; i < N; ++i) {
    SampleOptions oi = o;
    oi.seed = sample_seed(o.seed, i);
    const SampleResult one = generate_ids(m, {3, 17, 42}, oi, eos, false);
    EXPECT_EQ(all[i].tokens, one.tokens) << "sample " << i;
    EXPECT_EQ(all[i].refills, one.refills) << "sample " << i;
    ended += all[i].tokens.back() == eos;
    refilled += one.refills > 0;
  }
  EXPECT_GT(refilled, 0);
  EXPECT_EQ(sample_seed(o.seed, 0), o.seed);
  EXPECT_NE(sample_seed(o.seed, 1), sample_seed(o.seed, 2));
  RecordProperty("samples_ended_by_eos", ended);
  EXPECT_THROW(decode_samples(dec, c.vocab_size, c.max_position_embeddings, {3}, o, eos, true), UserError);
}

TEST(SamplerSampling, TopKOneAndTinyTopPAreGreedy) {
  Model<float> m(config_preset("tiny"), 19);
  const std::vector<int> prompt = {4, 5, 6, 7};
  const auto ref = generate_ids(m, prompt, greedy(25), -1, false).tokens;
  SampleOptions k1 = sampled(7, 25);
  k1.temperature = 1.5;
  k1.top_k = 1;
  k1.top_p = 1.0;
  EXPECT_EQ(generate_ids(m, prompt, k1, -1, false).tokens, ref);
  SampleOptions p0 = sampled(8, 25);
  p0.temperature = 1.5;
  p0.top_k = 0;
  p0.top_p = 1e-9;
  EXPECT_EQ(generate_ids(m, prompt, p0, -1, true).tokens, ref);
  // top_k = V is no cut at all
  SampleOptions all = sampled(9, 25), kv = all;
  all.top_k = 0;
  kv.top_k = m.config().vocab_size;
  EXPECT_EQ(generate_ids(m, prompt, all, -1, false).tokens, generate_ids(m, prompt, kv, -1, false).tokens);
}

// Frequencies of sample_token over 20000 draws against the exact top-k / top-p distribution (4.5 standard
// deviations: sd <= sqrt(0.25 / 20000) = 0.0035), and the one-draw-per-token rule.
TEST(SamplerSampling, TopKTopPTemperatureDistributionAndOneDrawPerToken) {
  const std::vector<float> logits = {1.0f, 3.0f, -2.0f, 2.0f, 0.0f};
  auto frequencies = [&](const SampleOptions& o) {
    Rng rng(99);
    std::map<int, double> f;
    for (int i = 0; i < 20000; ++i) f[sample_token(logits.data(), 5, o, rng)] += 1.0 / 20000;
    return f;
  };
  SampleOptions o;
  o.temperature = 0.5;
  o.top_k = 3;  // tokens 1, 3, 0 with weights exp(l / 0.5)
  const double w1 = std::exp(6.0), w3 = std::exp(4.0), w0 = std::exp(2.0), z = w1 + w3 + w0;
  auto f = frequencies(o);
  EXPECT_EQ(f.size(), 3u);
  EXPECT_NEAR(f[1], w1 / z, 0.016);
  EXPECT_NEAR(f[3], w3 / z, 0.016);
  EXPECT_NEAR(f[0], w0 / z, 0.016);
  o.top_p = 0.95;  // p1 = 0.867 < 0.95 <= p1 + p3 = 0.984: tokens 1 and 3, renormalised
  f = frequencies(o);
  EXPECT_EQ(f.size(), 2u);
  EXPECT_NEAR(f[1], w1 / (w1 + w3), 0.016);
  // exactly one uniform draw per sampled token, none when greedy
  Rng a(3), b(3);
  sample_token(logits.data(), 5, o, a);
  b.uniform();
  EXPECT_EQ(a.next_u64(), b.next_u64());
  o.temperature = 0;
  EXPECT_EQ(sample_token(logits.data(), 5, o, a), 1);
  EXPECT_EQ(a.next_u64(), b.next_u64());
}

// ---- bad input ----------------------------------------------------------------------------------------------

TEST(SamplerErrors, BadOptionsPromptsAndCallsAreUserErrors) {
  const ModelConfig c = config_preset("tiny");  // 64 positions, vocabulary 61
  Model<float> m(c, 23);
  const std::vector<int> prompt = {1, 2};
  auto bad = [&](auto edit) {
    SampleOptions o;
    edit(o);
    return o;
  };
  for (const SampleOptions& o :
       {bad([](SampleOptions& o) { o.temperature = -0.1; }), bad([](SampleOptions& o) { o.temperature = NAN; }),
        bad([](SampleOptions& o) { o.top_k = -1; }), bad([](SampleOptions& o) { o.top_p = 0; }),
        bad([](SampleOptions& o) { o.top_p = 1.5; }), bad([](SampleOptions& o) { o.max_new_tokens = 0; }),
        bad([](SampleOptions& o) { o.max_new_tokens = kMaxNewTokens + 1; })})
    EXPECT_THROW(generate_ids(m, prompt, o, -1, false), UserError);
  SampleOptions ok;
  ok.max_new_tokens = 63;  // 2 + 63 > 64 positions: generation goes on past them (the window rule)
  EXPECT_EQ(int(generate_ids(m, prompt, ok, -1, true).tokens.size()), 63);
  ok.max_new_tokens = 5;
  EXPECT_THROW(generate_ids(m, {}, ok, -1, false), UserError);
  EXPECT_THROW(generate_ids(m, {1, 61}, ok, -1, false), UserError);
  ModelConfig no_mtp = c;
  no_mtp.num_nextn_predict_layers = 0;
  Model<float> plain_only(no_mtp, 24);
  EXPECT_NO_THROW(generate_ids(plain_only, prompt, ok, -1, false));
  EXPECT_THROW(generate_ids(plain_only, prompt, ok, -1, true), UserError);
  // the decoder: capacity beyond the RoPE table (the message names both), overflow, bad calls
  try {
    Decoder too_long(m, 65);
    ADD_FAILURE() << "max_len 65 > 64 positions accepted";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("65"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("64"), std::string::npos) << e.what();
  }
  EXPECT_THROW(Decoder(m, 0), UserError);
  Decoder dec(m, 4);
  EXPECT_THROW(dec.draft(1), UserError);  // nothing fed
  EXPECT_THROW(dec.feed({}), UserError);
  EXPECT_THROW(dec.feed({-1}), UserError);
  dec.feed({1, 2, 3});
  EXPECT_THROW(dec.feed({4, 5}), UserError);  // 5 positions > max_len 4
  EXPECT_THROW(dec.draft(61), UserError);
  EXPECT_THROW(dec.truncate(4), UserError);
  EXPECT_THROW(dec.normed_hidden(3), UserError);
  Decoder no_draft(plain_only, 4);
  no_draft.feed({1});
  EXPECT_THROW(no_draft.draft(1), UserError);
}

// ---- text in, text out ------------------------------------------------------------------------------------

TEST(SamplerText, GenerateFromTextWithATokenizer) {
  const data::Tokenizer& tok = word_tokenizer();
  ModelConfig c = config_preset("tiny");
  c.vocab_size = tok.vocab_size();
  Model<float> m(c, 25);
  SampleOptions o = sampled(3, 20);
  o.prompt = "love in the night\n";
  const SampleComparison both = generate_both(m, tok, o);
  EXPECT_TRUE(both.identical);
  EXPECT_EQ(both.plain.tokens, both.speculative.tokens);
  EXPECT_EQ(both.plain.text, tok.decode(both.plain.tokens));
  EXPECT_EQ(both.speculative.text, both.plain.text);
  EXPECT_EQ(both.plain.prompt_tokens, int(tok.encode(o.prompt).size()));
  EXPECT_GT(both.speculative.drafted, 0);
  EXPECT_GT(both.speedup, 0);
  EXPECT_GT(both.plain.tokens_per_s, 0);
  if (!both.plain.tokens.empty() && both.plain.tokens.back() == tok.eos_id()) {
    EXPECT_LE(int(both.plain.tokens.size()), o.max_new_tokens);
  } else {
    EXPECT_EQ(int(both.plain.tokens.size()), o.max_new_tokens);
  }
  o.prompt = "";
  EXPECT_THROW(generate(m, tok, o, false), UserError);
  ModelConfig other = config_preset("tiny");  // vocabulary 61 != the tokenizer's 300
  Model<float> mismatch(other, 26);
  o.prompt = "love";
  EXPECT_THROW(generate(mismatch, tok, o, false), UserError);
}

// ---- generation past the model's positions (the window rule of sampler.h) -----------------------------------

namespace {

// The tiny preset with another number of positions (odd: P - K = 19, K = 18).
Model<float> tiny_with_positions(int P, uint64_t seed) {
  ModelConfig c = config_preset("tiny");
  c.max_position_embeddings = P;
  c.validate();
  return Model<float>(c, seed);
}

// The rule, written out on its own: the text index of the window's first token when token i is fed.
int window_start(int i, int P) {
  const int K = P / 2;
  return i < P ? 0 : i - K - (i - P) % (P - K);
}

// The re-fills a generation of max_new tokens after a prompt of n tokens (n <= P) makes: every fed index
// i in [n, n + max_new - 2] (the last new token is never fed) at which the window start moves.
int refills_by_the_rule(int n, int max_new, int P) {
  int count = 0;
  for (int i = std::max(n, 1); i <= n + max_new - 2; ++i) count += window_start(i, P) != window_start(i - 1, P);
  return count;
}

}  // namespace

// More new tokens than the model has positions: all of them come out, with the re-fills the rule names.
TEST(SamplerWindow, GeneratesMoreTokensThanPositions) {
  const Model<float> m64(config_preset("tiny"), 31), m37 = tiny_with_positions(37, 32);
  for (const Model<float>* m : {&m64, &m37}) {
    const int P = m->config().max_position_embeddings;
    for (const SampleOptions& o : {greedy(200), sampled(4, 200)}) {
      const SampleResult r = generate_ids(*m, {3, 17, 42, 8, 55}, o, -1, false);
      EXPECT_EQ(int(r.tokens.size()), 200);
      EXPECT_EQ(r.window, P);
      EXPECT_EQ(r.prompt_cropped, 0);
      EXPECT_EQ(r.refills, refills_by_the_rule(5, 200, P)) << "P " << P;
      EXPECT_GE(r.refills, 200 / P);
    }
  }
}

// Every new token is the one a fresh decoder fed exactly the rule's window (text tokens window_start(i) .. i)
// gives, drawn in order from one Rng: a replay of the whole generation, greedy and sampled (temperature 1, no cut,
// so that any other window would soon change a draw), for P = 64 and 37 and a prompt that ends at the window's end.
TEST(SamplerWindow, TokensAfterARefillEqualAFreshDecoderFedTheLastKTokens) {
  const Model<float> m64(config_preset("tiny"), 33), m37 = tiny_with_positions(37, 34);
  for (const Model<float>* m : {&m64, &m37}) {
    const int P = m->config().max_position_embeddings, V = m->config().vocab_size;
    for (int n : {5, P}) {
      SampleOptions o = sampled(6, 2 * P + 11);
      o.temperature = 1.0;
      o.top_k = 0;
      o.top_p = 1.0;
      for (const SampleOptions& opt : {o, greedy(2 * P + 11)}) {
        const std::vector<int> prompt = random_tokens(n, V, 35);
        const SampleResult r = generate_ids(*m, prompt, opt, -1, false);
        ASSERT_GT(r.refills, 1);
        std::vector<int> text = prompt;
        text.insert(text.end(), r.tokens.begin(), r.tokens.end());
        Rng rng(opt.seed);
        for (int i = n - 1; i + 1 < int(text.size()); ++i) {  // token i+1 from the window ending at token i
          const int b = i < n ? 0 : window_start(i, P);
          Decoder fresh(*m, P);
          const std::vector<float>& l = fresh.feed(std::vector<int>(text.begin() + b, text.begin() + i + 1));
          ASSERT_EQ(sample_token(l.data() + size_t(i - b) * V, V, opt, rng), text[i + 1])
              << "P " << P << ", prompt " << n << ", temperature " << opt.temperature << ": token " << i + 1
              << " (window " << b << ".." << i << ")";
        }
      }
    }
  }
}

// Speculative == plain token for token across several re-fills: greedy and sampled, prompts that end anywhere
// relative to the window's end (the draft's two-token chunk then often does not fit), eos stops, on the random
// model (P 64 and 37) and the cyclic one (drafts mostly accepted, so accepted chunks run up to the window's end).
TEST(SamplerWindow, SpeculativeEqualsPlainAcrossRefills) {
  const Model<float> random64(config_preset("tiny"), 36), random37 = tiny_with_positions(37, 37);
  int drafted = 0, accepted = 0;
  for (const Model<float>* m : {&random64, &random37, &cyclic_model()}) {
    const int P = m->config().max_position_embeddings;
    for (int n : {5, P - 2, P - 1, P, P + 9}) {
      std::vector<int> prompt;
      for (int i = 0; i < n; ++i) prompt.push_back(kCycle[i % kCycle.size()]);
      for (const SampleOptions& o : {greedy(3 * P), sampled(7, 3 * P), sampled(8, 3 * P)}) {
        const SampleResult plain = generate_ids(*m, prompt, o, -1, false);
        const SampleResult spec = generate_ids(*m, prompt, o, -1, true);
        EXPECT_EQ(spec.tokens, plain.tokens) << "P " << P << ", prompt " << n << ", temperature " << o.temperature;
        EXPECT_EQ(spec.refills, plain.refills);
        EXPECT_GE(plain.refills, 2);
        drafted += spec.drafted;
        accepted += spec.accepted;
        // with an eos that stops plain decoding after a re-fill
        const int eos = plain.tokens.at(2 * P);
        const std::vector<int> a = generate_ids(*m, prompt, o, eos, false).tokens;
        EXPECT_EQ(generate_ids(*m, prompt, o, eos, true).tokens, a);
        EXPECT_EQ(a.back(), eos);
      }
    }
  }
  EXPECT_GT(accepted, drafted / 4) << accepted << " of " << drafted;
  EXPECT_LT(accepted, drafted) << accepted << " of " << drafted;
}

// A prompt longer than the window keeps its last P tokens, says so (and the printed sample carries the note); the
// output is that of the cropped prompt.
TEST(SamplerWindow, LongPromptIsCroppedToItsLastPositions) {
  const Model<float> m(config_preset("tiny"), 38);
  const std::vector<int> prompt = random_tokens(100, m.config().vocab_size, 39);
  const std::vector<int> last64(prompt.end() - 64, prompt.end());
  for (bool speculative : {false, true}) {
    const SampleResult r = generate_ids(m, prompt, sampled(9, 30), -1, speculative);
    EXPECT_EQ(r.prompt_cropped, 36);
    EXPECT_EQ(r.prompt_tokens, 64);
    EXPECT_EQ(r.tokens, generate_ids(m, last64, sampled(9, 30), -1, false).tokens);
    EXPECT_EQ(generate_ids(m, last64, sampled(9, 30), -1, false).prompt_cropped, 0);
    const std::string printed = format_sample("a long prompt", r, -1);
    EXPECT_NE(printed.find("the prompt has 100 tokens, more than the model's 64 positions: it was cropped to its "
                           "last 64"), std::string::npos) << printed;
  }
}

// ---- the printed sample, prompts from a stream or a file -----------------------------------------------------

// "(end of song)" closes the printed sample exactly when the last new token is the eos.
TEST(SamplerText, EndOfSongNoteExactlyWhenTheLastTokenIsEos) {
  const int eos = 2;
  SampleResult r;
  r.window = 64;
  r.tokens = {5, 7, eos};
  r.text = "and the river";
  const std::string note = "(end of song)";
  auto ends_with = [](const std::string& s, const std::string& end) {
    return s.size() >= end.size() && s.compare(s.size() - end.size(), end.size(), end) == 0;
  };
  EXPECT_TRUE(ends_with(format_sample("Love", r, eos), "Love" + r.text + "\n" + note + "\n"));
  r.text = "and the river\n";  // a text that ends a line: the note follows on the next
  EXPECT_TRUE(ends_with(format_sample("Love", r, eos), "Love" + r.text + note + "\n"));
  r.tokens = {5, eos, 7};  // an eos that did not stop generation (stop_at_eos off), or no eos at all
  EXPECT_EQ(format_sample("Love", r, eos).find(note), std::string::npos);
  r.tokens = {5, 7};
  EXPECT_EQ(format_sample("Love", r, eos).find(note), std::string::npos);
  EXPECT_EQ(format_sample("Love", r, -1).find(note), std::string::npos);
  r.tokens.clear();
  EXPECT_EQ(format_sample("Love", r, eos).find(note), std::string::npos);
  // the header counts the re-fills; a real stop at eos from the generator gets the note
  r.tokens = {5, 7};
  r.refills = 3;
  EXPECT_NE(format_sample("Love", r, eos).find("3 re-fills of the 64-position window from its last 32 tokens"),
            std::string::npos);
  const SampleResult g = generate_ids(cyclic_model(), {kCycle[0], kCycle[1]}, greedy(10), kCycle[4], false);
  ASSERT_EQ(g.tokens.back(), kCycle[4]);
  EXPECT_TRUE(ends_with(format_sample("x", g, kCycle[4]), note + "\n"));
}

// The line loop: blank lines (empty, spaces, tabs, a lone '\r') skipped, '\r\n' accepted, the last line without
// a newline read, line numbers counted over every line, and each prompt handed over before the next line is read.
TEST(SamplerPrompts, LineLoopSkipsBlankLinesAndHandsOverEachLineAsItIsRead) {
  std::istringstream in("love\n\n  \t\r\nnight rain\r\n\nlast one");
  std::vector<std::pair<std::string, int>> got;
  std::vector<std::streamoff> read_so_far;
  const int n = for_each_prompt_line(in, [&](const std::string& text, int line) {
    got.emplace_back(text, line);
    read_so_far.push_back(in.tellg());
  });
  EXPECT_EQ(n, 3);
  const std::vector<std::pair<std::string, int>> want = {{"love", 1}, {"night rain", 4}, {"last one", 6}};
  EXPECT_EQ(got, want);
  ASSERT_EQ(read_so_far.size(), 3u);
  EXPECT_EQ(read_so_far[0], 5);   // just past "love\n": the rest is not read yet
  EXPECT_EQ(read_so_far[1], 23);  // just past "night rain\r\n"
  std::istringstream empty("");
  EXPECT_EQ(for_each_prompt_line(empty, [](const std::string&, int) { FAIL() << "no line to hand over"; }), 0);
}

TEST(SamplerPrompts, PromptFileReadsItsLinesAndNamesTheFileAndLineOfABadOne) {
  const data::Tokenizer& tok = word_tokenizer();
  test::TempDir dir;
  EXPECT_EQ(read_prompt_file(dir.file("p.txt", "love\n\nnight rain\r\n  \nhome"), tok),
            (std::vector<std::string>{"love", "night rain", "home"}));
  auto expect_error = [&](const std::string& path, const std::vector<std::string>& fragments) {
    try {
      read_prompt_file(path, tok);
      ADD_FAILURE() << path << " accepted";
    } catch (const UserError& e) {
      for (const auto& f : fragments) EXPECT_NE(std::string(e.what()).find(f), std::string::npos) << e.what();
    }
  };
  expect_error(dir.sub("missing.txt"), {"missing.txt"});
  expect_error(dir.path, {dir.path});  // a folder
  expect_error(dir.file("blank.txt", "\n  \n\t\n"), {"blank.txt", "no prompt"});
  expect_error(dir.file("utf8.txt", "love\n\nrain \xff\xfe\n"), {"utf8.txt", "line 3", "UTF-8"});
  expect_error(dir.file("reserved.txt", "love\nrain \xEE\x80\x80\n"), {"reserved.txt", "line 2", "reserved"});
  expect_error(dir.file("nul.txt", std::string("love\nra\0in\n", 11)), {"nul.txt", "line 2"});
}

// ---- a checkpoint folder that carries its tokenizer ----------------------------------------------------------

namespace {

// Token files of the word texts as prepare would write them (each text encoded, then eos).
data::Prepared word_data(const data::Tokenizer& tok) {
  data::Prepared p;
  p.info.vocab_size = tok.vocab_size();
  p.info.eos_id = tok.eos_id();
  auto split = [&](const std::vector<std::string>& texts, std::vector<uint16_t>& tokens, data::SplitStats& s,
                   const char* file) {
    s.file = file;
    for (const auto& t : texts) {
      for (int id : tok.encode(t)) tokens.push_back(uint16_t(id));
      tokens.push_back(uint16_t(tok.eos_id()));
      s.songs += 1;
      s.lines += data::count_lines(t);
      s.bytes += int64_t(t.size());
    }
    s.tokens = int64_t(tokens.size());
  };
  split(word_texts(60), p.train, p.info.train, "train.bin");
  split(word_texts(12, 60), p.val, p.info.val, "val.bin");
  return p;
}

TrainConfig few_steps(int64_t steps) {
  TrainConfig c;
  c.batch = 2;
  c.seq_len = 16;
  c.max_steps = steps;
  c.warmup_steps = 1;
  c.eval_every = 2;
  c.lr = 1e-2;
  return c;
}

std::string file_bytes(const std::string& path) { return read_file(path, "test file"); }

}  // namespace

// A run whose folder holds the data's tokenizer (as the trainer's caller leaves it) saves it into every
// checkpoint; a copy of best alone, with no run or data folder around it, samples. A tokenizer of another
// vocabulary is a UserError naming both sizes; a folder without its own copy falls back to the run folder's
// (older checkpoints), and with neither it is a UserError; checkpoints with and without the file resume.
TEST(SamplerCheckpoint, CopiedBestFolderAloneIsEnoughToSample) {
  const data::Tokenizer& tok = word_tokenizer();
  const data::Prepared data = word_data(tok);
  const ModelConfig mc = run_model_config("tiny", tok.vocab_size(), 16);
  test::TempDir runs, elsewhere;
  const std::string run = runs.sub("run");
  std::filesystem::create_directories(run);
  tok.save(run + "/tokenizer.model");
  std::ostringstream log;
  {
    auto backend = make_cpu_backend(mc, 41);
    train(*backend, data, few_steps(4), run, false, log);
  }
  for (const char* name : {"best", "last"})
    EXPECT_EQ(file_bytes(checkpoint_dir(run, name) + "/tokenizer.model"), file_bytes(run + "/tokenizer.model"));
  // 1) best alone, copied two levels down a folder that holds nothing else
  const std::string copy = elsewhere.sub("a/b/best");
  std::filesystem::create_directories(elsewhere.sub("a/b"));
  std::filesystem::copy(checkpoint_dir(run, "best"), copy, std::filesystem::copy_options::recursive);
  const Checkpoint ck = load_checkpoint(copy);
  Model<float> model(ck.config, 0);
  model.load_tensor_map(ck.tensors);
  const SampleTokenizer st = load_sample_tokenizer(copy, "", model.config().vocab_size);
  EXPECT_EQ(st.path, copy + "/tokenizer.model");
  EXPECT_NE(st.source.find("checkpoint's own"), std::string::npos) << st.source;
  SampleOptions o = sampled(3, 12);
  o.prompt = "love in the night";
  const SampleResult r = generate(model, st.tok, o, false);
  EXPECT_FALSE(r.tokens.empty());
  EXPECT_EQ(r.text, tok.decode(r.tokens));
  // 2) a tokenizer of another vocabulary in the folder
  const data::Tokenizer other = data::Tokenizer::train(word_texts(60, 7), 320);
  ASSERT_NE(other.vocab_size(), tok.vocab_size());
  other.save(copy + "/tokenizer.model");
  try {
    load_sample_tokenizer(copy, "", model.config().vocab_size);
    ADD_FAILURE() << "a tokenizer of another vocabulary accepted";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find(std::to_string(other.vocab_size())), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(std::to_string(tok.vocab_size())), std::string::npos) << e.what();
  }
  // 3) an older folder without its own copy: the run folder's, else a UserError
  std::filesystem::remove(copy + "/tokenizer.model");
  EXPECT_THROW(load_sample_tokenizer(copy, "", model.config().vocab_size), UserError);
  tok.save(elsewhere.sub("a/tokenizer.model"));  // <run> of <run>/b/best
  const SampleTokenizer fallback = load_sample_tokenizer(copy + "/", "", model.config().vocab_size);
  EXPECT_EQ(fallback.path, elsewhere.sub("a/tokenizer.model"));
  EXPECT_NE(fallback.source.find("run folder"), std::string::npos) << fallback.source;
  // 4) resume from a checkpoint with the file, then from one without it: both load, and the save puts it back
  {
    auto backend = make_cpu_backend(mc, 99);
    train(*backend, data, few_steps(6), run, true, log);
  }
  std::filesystem::remove(checkpoint_dir(run, "last") + "/tokenizer.model");
  {
    auto backend = make_cpu_backend(mc, 98);
    const TrainResult again = train(*backend, data, few_steps(8), run, true, log);
    EXPECT_EQ(again.steps_done, 8);
  }
  EXPECT_EQ(file_bytes(checkpoint_dir(run, "last") + "/tokenizer.model"), file_bytes(run + "/tokenizer.model"));
}
