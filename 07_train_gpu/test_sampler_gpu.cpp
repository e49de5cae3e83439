// Tests of stage 07's GPU sampler (sampler_gpu.h), against the CPU sampler and against itself: the GPU decoder's
// logits and MTP draft logits against the CPU Decoder's (teacher-forced, fp32 tolerance), a chunk of two bitwise
// equal to two single steps (with and without CUDA graphs), GPU speculative decoding identical to plain GPU
// decoding (greedy and temperature 0.8), a batch of N samples bitwise equal to N single runs, and generation past
// the window (re-fills) on the GPU. Suites start with Cuda: without a GPU they skip, visibly.
// Models: stage 06's tiny preset (layer 0 dense, layer 1 MoE, one MoE MTP module) with random weights, a variant
// (no q compression, softmax router, YaRN), one with 37 positions, and the tiny model trained on a cyclic sequence
// (most drafts accepted).
#include <algorithm>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "06_full_model/model.h"
#include "07_train_gpu/backend.h"
#include "07_train_gpu/sampler.h"
#include "07_train_gpu/train.h"
#include "common/compare.h"
#include "common/rng.h"
#include "common/testing.h"
#include "07_train_gpu/test_support.h"
#ifdef DSV3_HAVE_CUDA
#include "07_train_gpu/sampler_gpu.h"
#endif

using namespace dsv3;

#ifdef DSV3_HAVE_CUDA
namespace {

using test::random_tokens;
using test::tiny_variant;

using test::bitwise_equal;
using test::cyclic_model;
using test::kCycle;

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

// Decoding on the GPU through the shared loop: batch 1 unless the decoder says otherwise.
std::vector<SampleResult> gpu_samples(GpuDecoder& dec, const Model<float>& m, const std::vector<int>& prompt,
                                      const SampleOptions& o, int eos, bool speculative, int first = 0) {
  const ModelConfig& c = m.config();
  return decode_samples(dec, c.vocab_size, c.max_position_embeddings, prompt, o, eos, speculative, first);
}

}  // namespace

// Teacher-forced: every position's logits, and the MTP draft logits after each chunk, of the GPU decoder equal the
// CPU Decoder's to fp32 rounding (sums of at most 2D terms in another order, through 2-3 layers: kReductionTol).
TEST(CudaSamplerDecoder, LogitsAndDraftMatchTheCpuDecoder) {
  DSV3_REQUIRE_GPU();
  for (const ModelConfig& c : {config_preset("tiny"), tiny_variant()}) {
    const Model<float> m(c, 7);
    const int V = c.vocab_size;
    const std::vector<int> tokens = random_tokens(23, V, 8);
    const std::vector<int> sizes = {5, 1, 2, 1, 3, 2, 1, 8};
    Decoder cpu(m, c.max_position_embeddings);
    GpuDecoder gpu(m, 1);
    size_t at = 0;
    for (int n : sizes) {
      const std::vector<int> chunk(tokens.begin() + at, tokens.begin() + at + n);
      const std::vector<float>& want = cpu.feed(chunk);
      const float* got = gpu.feed(chunk, n, n);
      EXPECT_CLOSE(compare(std::vector<float>(got, got + size_t(n) * V), want, kReductionTol),
                   "logits of the chunk at " + std::to_string(at));
      at += n;
      const int next = tokens[at % tokens.size()];
      const std::vector<float>& dw = cpu.draft(next);
      const int d = gpu.draft(next);
      EXPECT_CLOSE(compare(gpu.draft_logits(), dw, kReductionTol), "draft logits at " + std::to_string(at));
      EXPECT_EQ(d, int(std::max_element(dw.begin(), dw.end()) - dw.begin()));
    }
    EXPECT_EQ(gpu.pos(), cpu.pos());
  }
}

// The exactness speculative decoding rests on: a chunk of two gives bitwise the logits of two single steps, with
// CUDA graphs (replayed at every position) and without, and graphs equal plain launches bitwise.
TEST(CudaSamplerDecoder, ChunkOfTwoIsBitwiseTwoSingleStepsWithAndWithoutGraphs) {
  DSV3_REQUIRE_GPU();
  for (const ModelConfig& c : {config_preset("tiny"), tiny_variant()}) {
    const Model<float> m(c, 9);
    const int V = c.vocab_size;
    const std::vector<int> tokens = random_tokens(31, V, 10);
    std::vector<std::vector<float>> runs;
    for (bool graphs : {true, false})
      for (int chunk : {1, 2}) {
        GpuDecoder dec(m, 1, graphs);
        std::vector<float> all;
        const float* l = dec.feed({tokens[0]}, 1, 1);
        all.insert(all.end(), l, l + V);
        for (size_t at = 1; at < tokens.size(); at += chunk) {
          l = dec.feed(std::vector<int>(tokens.begin() + at, tokens.begin() + at + chunk), chunk, chunk);
          all.insert(all.end(), l, l + size_t(chunk) * V);
        }
        EXPECT_EQ(dec.graph_captures(), graphs ? (chunk == 1 ? 1 : 2) : 0);
        runs.push_back(all);
      }
    for (size_t i = 1; i < runs.size(); ++i)
      EXPECT_TRUE(bitwise_equal(runs[i], runs[0]))
          << "run " << i << " (graphs " << (i < 2) << ", chunk " << (i % 2 + 1) << ") differs from single steps";
  }
}

// GPU speculative decoding is plain GPU decoding, token for token, greedy and sampled (temperature 0.8), on a
// random model (drafts mostly rejected) and the cyclic one (mostly accepted).
TEST(CudaSamplerSpeculative, IdenticalToPlainGreedyAndSampled) {
  DSV3_REQUIRE_GPU();
  const Model<float> random(config_preset("tiny"), 11);
  for (const Model<float>* m : {&random, &cyclic_model()}) {
    GpuDecoder dec(*m, 1);
    for (const SampleOptions& o : {greedy(40), sampled(5, 40), sampled(6, 40)}) {
      const SampleResult plain = gpu_samples(dec, *m, {3, 17, 42}, o, -1, false).front();
      const SampleResult spec = gpu_samples(dec, *m, {3, 17, 42}, o, -1, true).front();
      EXPECT_EQ(plain.tokens, spec.tokens) << "temperature " << o.temperature;
      EXPECT_GT(spec.drafted, 0);
      if (m != &random && o.temperature == 0) {
        EXPECT_GT(spec.accepted * 2, spec.drafted);
      }
    }
    EXPECT_LE(dec.graph_captures(), 7);  // feed n = 1, 2 for logits and for greedy tokens, n = 2 with the folded
                                         // draft; draft m = 1, 2 (sampler_gpu.h)
  }
}

// GPU and CPU decoding agree: the cyclic model's greedy continuation token for token (its logits have clear
// winners, so fp32 rounding cannot flip a choice), plain and speculative.
TEST(CudaSamplerSpeculative, GreedyContinuationEqualsTheCpuSampler) {
  DSV3_REQUIRE_GPU();
  const Model<float>& m = cyclic_model();
  GpuDecoder dec(m, 1);
  for (bool speculative : {false, true}) {
    const SampleResult cpu = generate_ids(m, {3, 17, 42}, greedy(30), -1, speculative);
    const SampleResult gpu = gpu_samples(dec, m, {3, 17, 42}, greedy(30), -1, speculative).front();
    EXPECT_EQ(gpu.tokens, cpu.tokens);
    EXPECT_EQ(gpu.accepted, cpu.accepted);
  }
}

// --num-samples: a batch of N samples is bitwise N single runs (sample i alone with its stream), an ended sample
// (eos) included; sample 0 uses the seed itself.
TEST(CudaSamplerBatch, BatchOfNEqualsNSingleRuns) {
  DSV3_REQUIRE_GPU();
  const Model<float> m(config_preset("tiny"), 13);
  const int N = 9, eos = 7;  // >= 8: the host draws with several threads
  GpuDecoder batch(m, N), one(m, 1);
  const SampleOptions o = sampled(21, 50);
  const std::vector<SampleResult> all = gpu_samples(batch, m, {3, 17, 42, 8}, o, eos, false);
  ASSERT_EQ(int(all.size()), N);
  int ended = 0;
  for (int i = 0; i < N; ++i) {
    const SampleResult alone = gpu_samples(one, m, {3, 17, 42, 8}, o, eos, false, i).front();
    EXPECT_EQ(all[i].tokens, alone.tokens) << "sample " << i;
    ended += all[i].tokens.back() == eos;
  }
  SampleOptions o0 = o;
  o0.seed = sample_seed(o.seed, 3);
  EXPECT_EQ(gpu_samples(one, m, {3, 17, 42, 8}, o0, eos, false).front().tokens, all[3].tokens)
      << "sample i is sample 0 of the seed sample_seed(seed, i)";
  RecordProperty("samples_ended_by_eos", ended);
}

// Past the model's positions on the GPU: every token comes out, the re-fills are the CPU sampler's, speculative
// equals plain across them, and the cyclic model's greedy text equals the CPU's.
TEST(CudaSamplerWindow, GenerationPastTheWindowRefillsAsTheCpuSampler) {
  DSV3_REQUIRE_GPU();
  ModelConfig c = config_preset("tiny");
  c.max_position_embeddings = 37;
  c.validate();
  const Model<float> m37(c, 32);
  for (const Model<float>* m : {&m37, &cyclic_model()}) {
    GpuDecoder dec(*m, 1);
    for (const SampleOptions& o : {greedy(150), sampled(4, 150)}) {
      const SampleResult plain = gpu_samples(dec, *m, {3, 17, 42, 8, 55}, o, -1, false).front();
      const SampleResult spec = gpu_samples(dec, *m, {3, 17, 42, 8, 55}, o, -1, true).front();
      const SampleResult cpu = generate_ids(*m, {3, 17, 42, 8, 55}, o, -1, false);
      EXPECT_EQ(int(plain.tokens.size()), 150);
      EXPECT_EQ(plain.refills, cpu.refills);
      EXPECT_GT(plain.refills, 0);
      EXPECT_EQ(spec.tokens, plain.tokens);
      if (m == &cyclic_model() && o.temperature == 0) {
        EXPECT_EQ(plain.tokens, cpu.tokens);
      }
    }
  }
  // a prompt longer than the window is cropped to its last P tokens, as on the CPU
  GpuDecoder dec(m37, 1);
  const std::vector<int> long_prompt = random_tokens(50, c.vocab_size, 3);
  const SampleResult r = gpu_samples(dec, m37, long_prompt, greedy(5), -1, false).front();
  EXPECT_EQ(r.prompt_cropped, 13);
  EXPECT_EQ(r.prompt_tokens, 37);
}

// The oracle of version 2 (sampler_gpu.h, GpuDecodePath): path Fused gives version 1's logits and MTP draft logits
// BITWISE (every fused kernel keeps version 1's products in version 1's order), teacher-forced over chunks of several
// sizes, one longer than a prefill piece and an MTP catch-up of more than one piece (after a reset), with graphs and
// without. Path Full differs from Fused only in where greedy tokens are chosen (the next test).
TEST(CudaSamplerPaths, FusedKernelsGiveVersion1LogitsBitwise) {
  DSV3_REQUIRE_GPU();
  ModelConfig longer = config_preset("tiny");
  longer.max_position_embeddings = 160;  // room for a chunk of more than kPrefillPiece tokens
  longer.validate();
  for (const ModelConfig& c : {config_preset("tiny"), tiny_variant(), longer}) {
    const Model<float> m(c, 7);
    const int V = c.vocab_size, P = c.max_position_embeddings;
    const std::vector<int> tokens = random_tokens(P, V, 8);
    std::vector<int> sizes = {5, 1, 2, 1, 3, 2, 1, 8};
    if (P > 2 * kPrefillPiece) sizes.push_back(kPrefillPiece + 9);
    GpuDecoder v1(m, 1, true, GpuDecodePath::V1), fused(m, 1, true, GpuDecodePath::Fused),
        plain(m, 1, false, GpuDecodePath::Fused);
    auto check = [&](const std::vector<int>& schedule, const std::string& what) {
      size_t at = 0;
      for (int n : schedule) {
        const std::vector<int> chunk(tokens.begin() + at, tokens.begin() + at + n);
        const float* a = v1.feed(chunk, n, 1);
        const std::vector<float> want(a, a + V);
        for (GpuDecoder* d : {&fused, &plain}) {
          const float* b = d->feed(chunk, n, 1);
          EXPECT_TRUE(bitwise_equal(std::vector<float>(b, b + V), want))
              << what << ": logits after the chunk at " << at << " (graphs " << (d == &fused) << ")";
        }
        at += n;
        const int next = tokens[at % tokens.size()];
        const int dv = v1.draft(next);
        for (GpuDecoder* d : {&fused, &plain}) {
          EXPECT_EQ(d->draft(next), dv) << what << ": draft at " << at;
          EXPECT_TRUE(bitwise_equal(d->draft_logits(), v1.draft_logits())) << what << ": draft logits at " << at;
        }
      }
    };
    check(sizes, "first pass");
    for (GpuDecoder* d : {&v1, &fused, &plain}) d->reset();  // the MTP stream catches up over everything at once
    int total = 0;
    for (int n : sizes) total += n;
    check({total}, "after a reset");
  }
}

// Every path gives the same tokens: plain, speculative and batched, greedy and sampled, on a random model and the
// cyclic one; the path Full's greedy speculative decoding answers most drafts from the verify's graph (folded).
TEST(CudaSamplerPaths, AllPathsGiveTheSameTokens) {
  DSV3_REQUIRE_GPU();
  const Model<float> random(config_preset("tiny"), 11);
  for (const Model<float>* m : {&random, &cyclic_model()}) {
    for (const SampleOptions& o : {greedy(40), sampled(5, 40)}) {
      std::vector<int> want;
      std::vector<std::vector<int>> want_batch;
      for (GpuDecodePath path : {GpuDecodePath::V1, GpuDecodePath::Fused, GpuDecodePath::Full}) {
        const std::string what = std::string(gpu_decode_path_name(path)) + ", temperature " +
                                 std::to_string(o.temperature);
        GpuDecoder one(*m, 1, true, path), batch(*m, 9, true, path);
        const SampleResult plain = gpu_samples(one, *m, {3, 17, 42}, o, 7, false).front();
        one.reset_timing();
        const SampleResult spec = gpu_samples(one, *m, {3, 17, 42}, o, 7, true).front();
        const std::vector<SampleResult> all = gpu_samples(batch, *m, {3, 17, 42}, o, 7, false);
        if (want.empty()) {
          want = plain.tokens;
          for (const SampleResult& r : all) want_batch.push_back(r.tokens);
        }
        EXPECT_EQ(plain.tokens, want) << what;
        EXPECT_EQ(spec.tokens, want) << what << ", speculative";
        for (size_t i = 0; i < all.size(); ++i) EXPECT_EQ(all[i].tokens, want_batch[i]) << what << ", sample " << i;
        const int folded = one.timing().folded;
        if (path == GpuDecodePath::Full && o.temperature == 0) {
          EXPECT_GT(folded, 0) << "greedy speculative decoding on the path full folds its drafts";
        } else {
          EXPECT_EQ(folded, 0) << what;
        }
        EXPECT_EQ(one.greedy_on_device(false), false);  // decode_samples gave the mode back
      }
    }
  }
}

// The device's greedy choice reports a non-finite logit as sample_token does (a UserError), not a token.
TEST(CudaSamplerPaths, DeviceGreedyRefusesNonFiniteLogits) {
  DSV3_REQUIRE_GPU();
  Model<float> m(config_preset("tiny"), 12);
  for (Model<float>::Tensor& t : m.tensors())
    if (t.name == "head") std::fill(t.value->begin(), t.value->end(), std::numeric_limits<float>::quiet_NaN());
  GpuDecoder dec(m, 1, true, GpuDecodePath::Full);
  EXPECT_THROW(gpu_samples(dec, m, {3, 17}, greedy(4), -1, false), UserError);
}

TEST(CudaSamplerErrors, BadCallsAreUserErrors) {
  DSV3_REQUIRE_GPU();
  const Model<float> m(config_preset("tiny"), 15);
  GpuDecoder dec(m, 2);
  EXPECT_THROW(dec.feed({1, 2, 3}, 2, 2), UserError);  // 3 tokens for 2 sequences of 2
  EXPECT_THROW(dec.feed({1, 61}, 1, 1), UserError);    // outside the vocabulary
  EXPECT_THROW(dec.draft(1), UserError);            // batch 2 has no draft
  EXPECT_THROW(gpu_samples(dec, m, {1, 2}, greedy(4), -1, true), UserError);  // speculative needs batch 1
  ModelConfig c = config_preset("tiny");
  c.num_nextn_predict_layers = 0;
  c.validate();
  const Model<float> no_mtp(c, 16);
  GpuDecoder one(no_mtp, 1);
  one.feed({1}, 1, 1);
  EXPECT_THROW(one.draft(2), UserError);
}
#else
TEST(CudaSampler, BuiltWithoutCuda) { GTEST_SKIP() << "built without CUDA"; }
#endif
