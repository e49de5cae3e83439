// Tests of stage 07's sampler: the chunked absorbed MLA decode against stage 02, cached decoding against the
// full forward, chunked feeds bitwise equal to single feeds, the MTP draft against the training-time MTP
// forward, speculative == plain decoding (greedy and sampled), the sampling rules, and bad input.
// Models: the tiny preset of stage 06 (layer 0 dense, layer 1 MoE, one MoE MTP module) with random weights,
// a variant of it (no q compression, softmax router, YaRN), and the tiny model trained for a moment on a
// cyclic sequence, so that most drafts are accepted and the accept path of speculative decoding is exercised.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>

#include "05_mtp/mtp.h"
#include "06_full_model/model.h"
#include "07_train_gpu/data.h"
#include "07_train_gpu/sampler.h"
#include "common/errors.h"
#include "common/rng.h"
#include "common/testing.h"

using namespace dsv3;

namespace {

// No q compression, softmax scores without normalisation, one expert group, every layer MoE, and YaRN active
// (original context 16 < 64 positions), so the softmax scale carries YaRN's mscale.
ModelConfig tiny_variant() {
  ModelConfig c = config_preset("tiny");
  c.q_lora_rank = 0;
  c.scoring_func = "softmax";
  c.norm_topk_prob = false;
  c.n_group = 1;
  c.topk_group = 1;
  c.first_k_dense_replace = 0;
  RopeScaling y;
  y.factor = 4;
  y.original_max_position_embeddings = 16;
  y.mscale = y.mscale_all_dim = 0.7;
  c.rope_scaling = y;
  c.validate();
  return c;
}

std::vector<int> random_tokens(int n, int V, uint64_t seed) {
  Rng rng(seed);
  std::vector<int> t(n);
  for (auto& x : t) x = int(rng.below(V));
  return t;
}

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

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// The token cycle the trained model learns.
const std::vector<int> kCycle = {3, 17, 42, 8, 55, 23, 30};

// The tiny model after 150 AdamW steps on windows of a cyclic sequence (period 7, every phase): the main model
// and the MTP module both learn to continue the cycle. Trained once per test run (well under a second).
Model<float> train_cyclic_model() {
  Model<float> m(config_preset("tiny"), 21);
  const int B = 7, T = 12;
  std::vector<int> window;
  for (int b = 0; b < B; ++b)
    for (int i = 0; i <= T; ++i) window.push_back(kCycle[(b + i) % kCycle.size()]);
  auto tensors = m.tensors();
  std::vector<std::vector<float>> mom(tensors.size()), var(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    mom[i].assign(tensors[i].value->size(), 0.0f);
    var[i].assign(tensors[i].value->size(), 0.0f);
  }
  AdamWConfig opt;
  opt.lr = 1e-2f;
  for (int step = 1; step <= 150; ++step) {
    m.forward(window, B, T);
    m.backward();
    for (size_t i = 0; i < tensors.size(); ++i)
      cpu::adamw_step(tensors[i].value->data(), tensors[i].grad->data(), mom[i].data(), var[i].data(),
                      tensors[i].value->size(), step, opt, false);
  }
  return m;
}
const Model<float>& cyclic_model() {
  static const Model<float> m = train_cyclic_model();
  return m;
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
        bad([](SampleOptions& o) { o.max_new_tokens = 63; })})  // 2 + 63 > 64 positions
    EXPECT_THROW(generate_ids(m, prompt, o, -1, false), UserError);
  SampleOptions ok;
  ok.max_new_tokens = 62;  // 2 + 62 = 64 fits exactly
  EXPECT_NO_THROW(generate_ids(m, prompt, ok, -1, true));
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
  std::vector<std::string> texts;
  const char* words[] = {"love", "night", "river", "shine", "heart", "road", "home", "rain", "song", "light"};
  for (int i = 0; i < 60; ++i) {
    std::string t;
    for (int w = 0; w < 8; ++w) t += std::string(w ? " " : "") + words[(i * 7 + w * w) % 10] + (w % 4 == 3 ? "\n" : "");
    texts.push_back(t);
  }
  const data::Tokenizer tok = data::Tokenizer::train(texts, 300);
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
