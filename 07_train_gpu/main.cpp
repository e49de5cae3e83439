// 07_train_gpu: the lyrics model, end to end. Subcommands:
//   (none)   the main job: prepare the data if needed, train (the GPU "lyrics" run, or without a GPU a tiny model
//            on the CPU), then sample lyrics from the best checkpoint and print them
//   prepare  corpus -> tokenizer -> token files (<out>/data)
//   train    train a model on prepared data into a run folder (<out>/run); --resume continues it
//   sample   lyrics from a checkpoint: prompt, temperature, top-k, top-p; --speculative compares MTP drafting
//   bench    training steps of a preset on random tokens: tokens/s, MFU, peak memory (JSON line)
// --check: a small, fast version of the whole pipeline on the CPU (the CI test); exits 1 when a check fails.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <atomic>
#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstring>
#include <ctime>
#include <optional>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>

#include "07_train_gpu/bench.h"
#include "07_train_gpu/launch.h"
#include "07_train_gpu/corpus.h"
#include "07_train_gpu/data.h"
#include "07_train_gpu/run_checkpoint.h"
#include "07_train_gpu/sampler.h"
#ifdef DSV3_HAVE_CUDA
#include "07_train_gpu/sampler_gpu.h"
#endif
#include "07_train_gpu/train.h"
#include "common/cli.h"
#include "common/device.h"
#include "common/diag.h"
#include "common/errors.h"
#include "common/gemm.h"

using namespace dsv3;
using namespace dsv3::data;
namespace fs = std::filesystem;

namespace {

// SIGINT, SIGTERM (what schedulers send) and SIGHUP stop a training run after its step: it evaluates, saves and
// exits with 128 + the signal's number. A second signal is not caught: it ends the program at once.
std::atomic<bool> g_stop{false};
volatile std::sig_atomic_t g_signal = 0;
constexpr int kStopSignals[] = {SIGINT, SIGTERM, SIGHUP};

// Several GPUs (launch.h): this process's place in a launched group (rank 0 of 1 when not launched).
Launch g_launch;
bool g_expert_parallel = false;  // --expert-parallel: the routed experts split across the launched ranks
bool leader() { return g_launch.rank == 0; }
extern "C" void on_stop_signal(int sig) {
  g_signal = sig;
  g_stop = true;
  for (const int s : kStopSignals) std::signal(s, SIG_DFL);
}

// The most samples of a prompt (--num-samples): the GPU decoder keeps (B, 64, V) logits in device and pinned host
// memory for its prefill pieces, 256 MiB at B = 256 for the lyrics model.
constexpr int kMaxSamples = 256;

// The three fixed prompts of the README's samples.
const std::vector<std::string> kPrompts = {"I walked along the river", "O LORD, my heart", "Love is"};

void print_data_table(const Prepared& p) {
  Table t({"split", "songs", "lines", "bytes", "tokens", "bytes/token"});
  for (const auto* s : {&p.info.train, &p.info.val}) {
    t.add_row({s == &p.info.train ? "train" : "val", std::to_string(s->songs), std::to_string(s->lines),
               std::to_string(s->bytes), std::to_string(s->tokens),
               fmt::format("{:.3f}", double(s->bytes) / double(s->tokens))});
  }
  t.print();
  Table src({"source", "songs", "bytes"});
  for (const auto& s : p.info.sources) src.add_row({s.name, std::to_string(s.songs), std::to_string(s.bytes)});
  src.print();
}

// Round trips a reader can trust: decode(encode(song)) == song for every song given, and the token files
// read back from disk equal what was written.
int check_round_trips(const std::string& dir, const Prepared& written, const std::vector<Song>& songs) {
  int failures = 0;
  auto check = [&](bool ok, const std::string& what) {
    std::cout << fmt::format("  [{}] {}\n", ok ? "ok" : "FAIL", what);
    failures += !ok;
  };
  const Tokenizer tok = Tokenizer::load(dir + "/tokenizer.model");
  size_t bad = 0;
  for (const auto& s : songs) bad += tok.decode(tok.encode(s.text)) != s.text;
  check(bad == 0, fmt::format("decode(encode(song)) == song for {} songs ({} differ)", songs.size(), bad));
  const std::string nl = "one line\ntwo  lines\n\nand a stanza, café 😀\n";
  check(tok.decode(tok.encode(nl)) == nl, "round trip of text with newlines, double spaces and non-ASCII (byte fallback)");
  const auto ids = tok.encode("a\nb");
  check(ids.size() == 3 && tok.piece(ids[1]) == kNewlineSymbol, "a newline is one token of its own");
  const Prepared back = load_prepared(dir);
  check(back.train == written.train && back.val == written.val, "token files read back equal what was written");
  size_t songs_in_val = 0;
  for (auto t : back.val) songs_in_val += t == back.info.eos_id;
  check(int64_t(songs_in_val) == back.info.val.songs, fmt::format("val.bin holds {} eos = songs in data.json", songs_in_val));
  return failures;
}

// Songs for a small --check run without the Debian packages: made-up lines over a small word list.
std::vector<Song> generated_songs() {
  const char* words[] = {"love", "night", "river", "shine", "heart", "road", "home", "rain", "song", "light", "O", "LORD"};
  std::vector<Song> songs;
  for (int i = 0; i < 120; ++i) {
    std::string t;
    for (int l = 0; l < 6; ++l)
      for (int w = 0; w < 7; ++w) t += std::string(w ? " " : (l ? "\n" : "")) + words[(i * 5 + l * 7 + w * w * 3) % 12];
    songs.push_back({t, "generated"});
  }
  return songs;
}

struct PrepareArgs {
  PrepareOptions opt;
  std::vector<std::string> lyrics;
  std::string data;  // the folder to write; default <out>/data, or <out>/data-<first lyrics file's name> with --lyrics
  bool no_default = false, dump = false;
};

// The folder prepare writes: --data, else <out>/data for the default corpus alone, else a folder named for the
// first lyrics file, so that preparing your own songs never replaces the default corpus.
std::string prepare_folder(const PrepareArgs& a, const std::string& out) {
  if (!a.data.empty()) return a.data;
  if (a.lyrics.empty()) return out + "/data";
  std::string stem = fs::path(a.lyrics.front()).stem().string();
  for (char& ch : stem)
    if (!std::isalnum(static_cast<unsigned char>(ch)) && ch != '-' && ch != '_') ch = '_';
  return out + "/data-" + (stem.empty() ? std::string("lyrics") : stem);
}

// A folder that already holds prepared data is rebuilt only from the same sources (prepare again with other
// options); data of other sources is never replaced: the message names the flag that picks another folder.
void refuse_other_data(const std::string& dir, const std::vector<Song>& songs) {
  if (!fs::exists(dir + "/data.json")) return;
  std::vector<std::string> now, before;
  for (const auto& s : songs)
    if (std::find(now.begin(), now.end(), s.source) == now.end()) now.push_back(s.source);
  std::string listed;
  try {
    for (const auto& s : read_data_info(dir).sources) before.push_back(s.name), listed += (listed.empty() ? "" : ", ") + s.name;
  } catch (const UserError&) {
    listed = "unreadable data.json";
  }
  std::sort(now.begin(), now.end());
  std::sort(before.begin(), before.end());
  require(now == before, "{} already holds prepared data of other songs ({}): give another folder with --data, or "
          "delete that folder first", dir, listed);
}

// Builds the corpus and writes <data_dir>. check: every 4th song, vocab 512, generated songs when the Debian
// packages are missing. Returns the failed round-trip checks.
int do_prepare(PrepareArgs a, const std::string& data_dir, bool check, Prepared* out = nullptr) {
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<Song> songs;
  if (check && !a.no_default && !default_sources_available()) {
    std::cout << "default corpus unavailable (install fortunes and bible-kjv: scripts/setup.sh); checking on generated songs\n";
    songs = generated_songs();
    a.no_default = true;
  }
  if (!a.no_default) songs = load_default_corpus();
  for (const auto& f : a.lyrics) {
    const auto mine = read_lyrics_file(f);
    std::cout << fmt::format("{}: {} song{}{}\n", f, mine.size(), mine.size() == 1 ? "" : "s",
                             mine.size() == 1 ? " (no line holding only '%', which ends a song)" : "");
    songs.insert(songs.end(), mine.begin(), mine.end());
  }
  require(!songs.empty(), "no songs: give --lyrics files or drop --no-default-corpus");
  if (!check) refuse_other_data(data_dir, songs);
  if (check) {
    std::vector<Song> subset;
    for (size_t i = 0; i < songs.size(); i += 4) subset.push_back(songs[i]);
    songs = subset;
    a.opt.vocab_size = 512;
  }
  const Prepared p = prepare_data(songs, a.opt, data_dir);
  if (a.dump) {
    std::string all;
    for (const auto& s : songs) all += s.text + "\n%\n";
    write_file_atomic(data_dir + "/songs.txt", all);
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::cout << fmt::format("prepared {} songs, vocab {} in {:.1f} s -> {}\n", songs.size(), p.info.vocab_size, secs, data_dir);
  if (!a.opt.tokenizer.empty())
    std::cout << fmt::format("(the tokenizer is {}, reused: a model trained with it can start from its weights, "
                             "train --init-from)\n", a.opt.tokenizer);
  else if (p.info.vocab_size < a.opt.vocab_size)
    std::cout << fmt::format("(the tokenizer has {} pieces, not the {} asked for: this corpus has no more pairs to "
                             "merge; the model's vocabulary follows the data)\n", p.info.vocab_size, a.opt.vocab_size);
  print_data_table(p);
  const int failures = check_round_trips(data_dir, p, songs);
  if (out) *out = p;
  return failures;
}

struct TrainArgs {
  std::string data, run, preset, device = "auto", precision = "bf16", init_from;
  bool resume = false;
  TrainConfig cfg;
  uint64_t model_seed = 1234;
};

// The schedule that comes with the cpu preset: 8 x 128 tokens a step, a few epochs of the default corpus.
const TrainConfig kCpuSchedule = [] {
  TrainConfig c;
  c.batch = 8;
  c.seq_len = 128;
  c.max_steps = 500;
  c.warmup_steps = 25;
  c.lr = 3e-3;
  c.weight_decay = 0.1;
  c.eval_every = 50;
  c.patience = 0;
  return c;
}();

// Copies the schedule fields of `from` whose flags the user did not type into `to` (cmd: the train subcommand,
// whose count() says what was typed; nullptr: nothing typed, as in the main job).
void take_schedule(TrainConfig& to, const TrainConfig& from, const CLI::App* cmd) {
  auto unset = [&](const char* flag) { return cmd == nullptr || cmd->count(flag) == 0; };
  if (unset("--batch")) to.batch = from.batch;
  if (unset("--seq-len")) to.seq_len = from.seq_len;
  if (unset("--steps")) to.max_steps = from.max_steps;
  if (unset("--warmup")) to.warmup_steps = from.warmup_steps;
  if (unset("--lr")) to.lr = from.lr;
  if (unset("--min-lr-ratio")) to.min_lr_ratio = from.min_lr_ratio;
  if (unset("--weight-decay")) to.weight_decay = from.weight_decay;
  if (unset("--eval-every")) to.eval_every = from.eval_every;
  if (unset("--patience")) to.patience = from.patience;
}

// --resume: the run goes on with its own model (the checkpoint's config.json) and, for the flags not given, its
// own schedule (trainer_state.json); a flag given changes it, and the trainer prints each change.
void continue_with_run_settings(TrainArgs& a, const CLI::App* cmd) {
  // the first copy whose config.json and trainer_state.json read, newest first (a damaged newest copy is skipped
  // here as train()'s resume skips it; when none reads, train() names the damage)
  std::vector<std::string> candidates;
  for (const char* name : {"last", "best"}) {
    const std::string d = checkpoint_dir(a.run, name);
    if (const auto newest = newest_complete_checkpoint(d)) candidates.push_back(*newest);
    for (const char* suffix : {"", ".old", ".tmp"}) candidates.push_back(d + suffix);
  }
  TrainConfig saved;
  bool found = false;
  for (const std::string& d : candidates) {
    try {
      if (!fs::is_directory(d)) continue;
      load_config(d + "/config.json");
      saved = read_trainer_state(d).config;
      if (a.preset.empty()) a.preset = d;
      found = true;
      break;
    } catch (const UserError&) {
    } catch (const fs::filesystem_error&) {
    }
  }
  if (!found) return;  // the caller picks the default preset; train()'s resume names what is missing or damaged
  take_schedule(a.cfg, saved, cmd);
}

// A short run (--steps below ten times the warm-up) without --warmup warms up over its first tenth, said once.
void fit_warmup(TrainArgs& a, const CLI::App* cmd, std::ostream& out) {
  if ((cmd && cmd->count("--warmup")) || a.cfg.warmup_steps * 10 <= a.cfg.max_steps) return;
  const int64_t w = a.cfg.max_steps / 10;
  out << fmt::format("(warm-up {} -> {} steps: a run of {} steps warms up over its first tenth; --warmup sets it)\n",
                     a.cfg.warmup_steps, w, a.cfg.max_steps);
  a.cfg.warmup_steps = w;
}

std::unique_ptr<Backend> make_backend(const TrainArgs& a, const ModelConfig& c) {
  const bool gpu = a.device == "cuda" || (a.device == "auto" && gpu_available());
  require(a.device == "auto" || a.device == "cuda" || a.device == "cpu", "--device must be auto, cuda or cpu (got '{}')",
          a.device);
  const Precision p = parse_precision(a.precision);  // an unknown precision is an error on the CPU too
  if (gpu && g_expert_parallel) {  // expert parallel exchanges rows on the grouped expert path
    DeviceOptions o = device_options(p, c);
    o.experts = MoeExperts::Grouped;
    return make_cuda_backend(c, a.model_seed, o);
  }
  if (gpu) return make_cuda_backend(c, a.model_seed, p);
  if (p != Precision::FP32) std::cout << "(the CPU path trains in fp32)\n";
  return make_cpu_backend(c, a.model_seed);
}

// The main job starts a fresh run each time; an earlier run folder is kept, renamed <run>.<date-time> (nothing
// is ever deleted). The train subcommand does not do this: it refuses a folder that holds a run (use --resume or
// another --run).
void keep_previous_run(const std::string& run) {
  if (!fs::exists(run)) return;
  const std::time_t now = std::time(nullptr);
  char stamp[32];
  std::strftime(stamp, sizeof stamp, "%Y%m%d-%H%M%S", std::localtime(&now));
  std::string kept = run + "." + stamp;
  for (int i = 2; fs::exists(kept); ++i) kept = run + "." + stamp + "-" + std::to_string(i);
  fs::rename(run, kept);
  std::cout << fmt::format("(the previous run in {} is kept as {})\n", run, kept);
}

// Host memory a CPU training run needs, about: weights, gradients and two moments (16 bytes a parameter), the
// activations kept for the backward pass, dominated by the logits and their gradients of the main head and each
// MTP depth (measured on the tiny preset: about 86 KB a token at vocab 4096, depth 1), and a fixed base.
uint64_t cpu_train_bytes(const ModelConfig& c, const ParamBreakdown& pb, int batch, int seq_len) {
  const double params = double(pb.main_total + pb.mtp_total);
  const double per_token = 4.0 * c.vocab_size * (3 + 2 * c.num_nextn_predict_layers) +
                           4.0 * c.hidden_size * 64 * (c.num_hidden_layers + c.num_nextn_predict_layers);
  return uint64_t(16 * params + per_token * double(batch) * seq_len) + (uint64_t(256) << 20);
}

// A checkpoint folder as the trainer leaves it: <dir>, or the newest complete of <dir>.old/<dir>.tmp when a save
// was interrupted between its renames (run_checkpoint.h).
std::string checkpoint_to_read(const std::string& dir) {
  const std::string d = resolve_checkpoint(dir);
  if (d != dir) std::cout << fmt::format("(reading {}: {} is missing or older, a save was interrupted)\n", d, dir);
  return d;
}

// --init-from: a trained model's checkpoint to start from (weights only: new optimizer state, step 0, this run's
// schedule). Its config is the model's; the data must be tokenized with the tokenizer it was trained with.
Checkpoint checkpoint_for_init(const TrainArgs& a, const Prepared& data, std::ostream& out) {
  require(!a.resume, "--init-from starts a new run from a checkpoint's weights and --resume continues a run: give "
          "one of them");
  require(a.preset.empty(), "--preset and --init-from both choose the model: the checkpoint's config.json decides, "
          "drop --preset");
  const std::string dir = checkpoint_to_read(a.init_from);
  Checkpoint ck = load_checkpoint(dir);
  const std::string data_tok = a.data + "/" + data.info.tokenizer;
  // the checkpoint's own tokenizer copy, else its run folder's (run_checkpoint.h)
  if (const auto ck_tok = checkpoint_tokenizer(dir))
    require(read_file(ck_tok->path, "tokenizer model") == read_file(data_tok, "tokenizer model"), "the data in {} was "
            "tokenized with another tokenizer than {}'s model: prepare it with that model's tokenizer (07_train_gpu "
            "prepare --tokenizer {} ...)", a.data, a.init_from, ck_tok->path);
  else
    out << fmt::format("(no tokenizer.model in {} or its run folder: only the vocabulary sizes are compared)\n",
                       a.init_from);
  require(ck.config.vocab_size == data.info.vocab_size, "{} has vocabulary {}, the data in {} {}: prepare the data "
          "with the model's tokenizer (prepare --tokenizer)", a.init_from, ck.config.vocab_size, a.data,
          data.info.vocab_size);
  require(a.cfg.seq_len <= kMaxPositions, "--seq-len {} is longer than this implementation supports (at most {} "
          "positions)", a.cfg.seq_len, kMaxPositions);
  ck.config.max_position_embeddings = std::max(ck.config.max_position_embeddings, a.cfg.seq_len);
  ck.config.validate();
  out << fmt::format("starting from the weights of {} (new optimizer state and schedule)\n", dir);
  return ck;
}

TrainResult do_train(const TrainArgs& a, const Prepared& data, std::ostream& out) {
  std::optional<Checkpoint> init;
  if (!a.init_from.empty()) init = checkpoint_for_init(a, data, out);
  const ModelConfig c = init ? init->config : run_model_config(a.preset, data.info.vocab_size, a.cfg.seq_len);
  const ParamBreakdown pb = count_params(c);
  {  // the kernels index one step's activations with int: the widest per-token row times the tokens must fit
    const int64_t widest = std::max({int64_t(c.vocab_size), int64_t(4) * c.hidden_size,
                                     int64_t(c.num_attention_heads) * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim),
                                     int64_t(c.num_experts_per_tok) * c.moe_intermediate_size, int64_t(c.intermediate_size)});
    const int64_t tokens = int64_t(a.cfg.batch) * a.cfg.seq_len;
    require(tokens * widest <= INT32_MAX, "batch {} x seq_len {} = {} tokens a step is more than this implementation "
            "indexes (at most {} for this model): reduce --batch or --seq-len", a.cfg.batch, a.cfg.seq_len, tokens,
            INT32_MAX / widest);
  }
  const bool gpu = a.device == "cuda" || (a.device == "auto" && gpu_available());
  if (!gpu) {  // refused before allocating: an overcommitted allocation would be killed later, without a message
    const uint64_t need = cpu_train_bytes(c, pb, a.cfg.batch, a.cfg.seq_len), have = available_host_bytes();
    require(have == 0 || need <= have, "training on the CPU needs about {:.2f} GiB (batch {} x seq_len {} x vocab {}), "
            "this machine has {:.2f} GiB available: reduce --batch or --seq-len", double(need) / (1 << 30),
            a.cfg.batch, a.cfg.seq_len, c.vocab_size, double(have) / (1 << 30));
  }
  std::unique_ptr<Communicator> comm;  // a launched rank's group (declared first: it outlives the backend)
  if (g_launch.launched()) {
    require(gpu, "--gpus: several GPUs train on the GPU (--device {} was given)", a.device);
    comm = rank_communicator(g_launch);
  }
  auto backend = make_backend(a, c);
  if (init) backend->load_weights(init->tensors);
  const auto names = config_preset_names();
  const std::string model = init ? "from " + a.init_from
                            : std::find(names.begin(), names.end(), a.preset) != names.end() ? "preset " + a.preset
                                                                                              : "config " + a.preset;
  out << fmt::format("model: {} | {:.2f} M parameters ({:.2f} M active per token, {:.2f} M in MTP) | {}{}\n", model,
                     (pb.main_total + pb.mtp_total) / 1e6, pb.main_active / 1e6, pb.mtp_total / 1e6,
                     backend->describe(),
                     comm ? fmt::format(" | {} on {} GPUs ({})", g_expert_parallel ? "data + expert parallel"
                                                                                 : "data parallel",
                                        comm->size(), comm->describe())
                          : "");
  out << fmt::format("data: {} train / {} val tokens, vocab {} | batch {} x {} | {} steps, lr {:g}, warm-up {}\n",
                     data.info.train.tokens, data.info.val.tokens, data.info.vocab_size, a.cfg.batch, a.cfg.seq_len,
                     a.cfg.max_steps, a.cfg.lr, a.cfg.warmup_steps);
  // the run folder is self-contained: the tokenizer travels with the checkpoints
  // (never replaced: a folder that already holds a run keeps its own, and the trainer refuses other data)
  // load_prepared has checked the data's tokenizer; a run folder's own copy must be the same file
  const std::string data_tok = a.data + "/" + data.info.tokenizer, run_tok = a.run + "/tokenizer.model";
  if (leader()) {  // several GPUs: rank 0 alone writes into the run folder
    fs::create_directories(a.run);
    if (fs::exists(run_tok))
      require(read_file(run_tok, "tokenizer model") == read_file(data_tok, "tokenizer model"), "{} differs from the "
              "data's tokenizer {}: this run was prepared with other data", run_tok, data_tok);
    else
      fs::copy_file(data_tok, run_tok);
  }
  TrainHooks hooks;
  hooks.plots_script = std::string(DSV3_STAGE_DIR) + "/plots.gp";
  hooks.stop = &g_stop;
  hooks.comm = comm.get();
  hooks.expert_parallel = g_expert_parallel;
  for (const int s : kStopSignals) std::signal(s, on_stop_signal);
  const TrainResult r = train(*backend, data, a.cfg, a.run, a.resume, out, hooks);
  for (const int s : kStopSignals) std::signal(s, SIG_DFL);
  out << fmt::format(
      "done: {} steps ({}) in {:.1f} s | best val {:.4f} nats/token = {:.4f} bits/byte at step {} | {:.0f} tokens/s\n",
      r.steps_done, r.stop_reason, r.elapsed_s, r.best_val_ce, r.best_val_bpb, r.best_step, r.tokens_per_s);
  return r;
}

// After a training run: 0, or 128 + the number of the signal that stopped it (the checkpoint is saved).
int stopped_by_signal(const std::string& run) {
  if (g_signal == 0) return 0;
  std::cout << fmt::format("stopped by signal {} ({}): the last checkpoint is saved; continue with `07_train_gpu "
                           "train --run {} --resume`\n", int(g_signal), strsignal(g_signal), run);
  return 128 + int(g_signal);
}

struct SampleArgs {
  std::string checkpoint, tokenizer, prompt_file, device = "auto", gpu_decode = "full";
  std::vector<std::string> prompts;  // --prompt; none: prompt_file, interactive, or kPrompts
  SampleOptions opt;
  int num_samples = 1;
  bool speculative = false, interactive = false, print_ids = false;
};

Model<float> load_model(const std::string& dir) {
  const Checkpoint ck = load_checkpoint(checkpoint_to_read(dir));
  Model<float> m(ck.config, 0);
  m.load_tensor_map(ck.tensors);
  return m;
}

// The tokenizer of a checkpoint: --tokenizer, else the (resolved) checkpoint folder's own copy, else its run
// folder's (<run>/checkpoints/<name>/../..).
SampleTokenizer tokenizer_for(const SampleArgs& a, const Model<float>& model) {
  return load_sample_tokenizer(resolve_checkpoint(a.checkpoint), a.tokenizer, model.config().vocab_size);
}

// The decoders of one `sample` run. CPU: sampler.h's Decoder, one sample at a time (sample i from the stream
// sample_seed(seed, i)). GPU (sampler_gpu.h): one decoder for the batch of --num-samples and one of batch 1 for
// speculative decoding, made once; a short warm-up captures their CUDA graphs before anything is timed, and every
// prompt replays them.
class Samplers {
 public:
  // path: the GPU decoder's (--gpu-decode: v1, fused or full; sampler_gpu.h).
  Samplers(const Model<float>& m, bool gpu, int num_samples, bool speculative, const std::string& path)
      : model_(m), gpu_(gpu), n_(num_samples) {
#ifdef DSV3_HAVE_CUDA
    if (!gpu_) return;
    const GpuDecodePath p = parse_gpu_decode_path(path);
    batch_ = std::make_unique<GpuDecoder>(m, n_, true, p);
    if (n_ > 1 && speculative) one_ = std::make_unique<GpuDecoder>(m, 1, true, p);
    const int V = m.config().vocab_size, P = m.config().max_position_embeddings;
    for (double temperature : {0.8, 0.0}) {  // both sampling modes' graphs (greedy ones differ on the path full)
      SampleOptions w;
      w.max_new_tokens = 8;
      w.temperature = temperature;
      decode_samples(*batch_, V, P, {0}, w, -1, false);
      if (speculative) decode_samples(single(), V, P, {0}, w, -1, true);
    }
    single().reset_timing();
#else
    (void)speculative;
    (void)path;
#endif
  }
  bool gpu() const { return gpu_; }
  // GPU: the mean call times of the batch-1 decoder since the last call (plain steps, verifies of two, MTP drafts;
  // host-timed up to each call's synchronisation), then reset; empty on the CPU or when one kind is missing.
  std::string timing_note() {
#ifdef DSV3_HAVE_CUDA
    if (!gpu_) return "";
    GpuDecoder& d = single();
    const GpuDecoder::Timing t = d.timing();
    d.reset_timing();
    if (!t.steps || !t.verifies || !t.drafts) return "";
    const double step = 1e3 * t.step_ms / t.steps, verify = 1e3 * t.verify_ms / t.verifies;
    const double draft = 1e3 * t.draft_ms / t.drafts;
    // a speculative step: one verify, and a draft call unless the draft was folded into the verify before
    const double spec = 1e3 * (t.verify_ms + t.draft_ms) / t.verifies;
    return fmt::format("GPU calls (mean, --gpu-decode {}): plain step {:.0f} us ({}x), verify of two {:.0f} us ({}x), "
                       "MTP draft {:.0f} us ({}x; {} more folded into the verify before): a speculative step costs "
                       "{:.2f} plain steps\n",
                       gpu_decode_path_name(d.path()), step, t.steps, verify, t.verifies, draft, t.drafts, t.folded,
                       spec / step);
#else
    return "";
#endif
  }
  // The --num-samples samples of o.prompt, decoded plainly: one batch on the GPU, one by one on the CPU.
  std::vector<SampleResult> batch(const Tokenizer& tok, const SampleOptions& o) {
#ifdef DSV3_HAVE_CUDA
    if (gpu_) return decode_samples(*batch_, model_.config(), tok, o, false);
#endif
    std::vector<SampleResult> rs;
    for (int i = 0; i < n_; ++i) rs.push_back(one(tok, o, i, false));
    return rs;
  }
  // Sample i alone (batch 1), plainly or speculatively: the two runs of the comparison.
  SampleResult one(const Tokenizer& tok, const SampleOptions& o, int i, bool speculative) {
#ifdef DSV3_HAVE_CUDA
    if (gpu_) return decode_samples(single(), model_.config(), tok, o, speculative, i).front();
#endif
    SampleOptions oi = o;
    oi.seed = sample_seed(o.seed, i);  // = sample i of o.seed's streams
    return generate(model_, tok, oi, speculative);
  }

 private:
  const Model<float>& model_;
  bool gpu_;
  int n_;
#ifdef DSV3_HAVE_CUDA
  std::unique_ptr<GpuDecoder> batch_, one_;
  GpuDecoder& single() { return one_ ? *one_ : *batch_; }
#endif
};

// Speculative against plain decoding, summed over the prompts compared (the "overall" line).
struct SpeculativeTotals {
  int prompts = 0, tokens = 0, drafted = 0, accepted = 0;
  double plain_s = 0, spec_s = 0;
};

// The line after a sample's text: how long the host spent choosing tokens (sample_token on the copied logits).
std::string sampling_note(const SampleResult& r) {
  return fmt::format("(host sampling: {:.1f} ms of {:.1f} ms)\n", 1e3 * r.sampling_seconds, 1e3 * r.seconds);
}

// One prompt: its samples printed, or (compare) each sample decoded both ways with the speculative table. False
// when speculative decoding did not reproduce plain decoding.
bool sample_prompt(Samplers& sm, const Tokenizer& tok, const SampleOptions& opt, bool compare, int num_samples,
                   SpeculativeTotals& totals, bool print_ids) {
  if (!compare) {
    const std::vector<SampleResult> rs = sm.batch(tok, opt);
    if (print_ids)  // for outside checks (check_generate.py): the prompt's ids and each sample's new ids
      for (const SampleResult& r : rs)
        std::cout << fmt::format("ids: {} | {}\n", fmt::join(tok.encode(opt.prompt), " "), fmt::join(r.tokens, " "));
    if (rs.size() == 1) {
      std::cout << format_sample(opt.prompt, rs[0], tok.eos_id()) << (sm.gpu() ? sampling_note(rs[0]) : "")
                << std::flush;
      return true;
    }
    size_t tokens = 0;
    for (size_t i = 0; i < rs.size(); ++i) {
      std::cout << fmt::format("(sample {} of {}: random stream sample_seed({}, {}))\n", i, rs.size(), opt.seed, i)
                << format_sample(opt.prompt, rs[i], tok.eos_id());
      tokens += rs[i].tokens.size();
    }
    const double s = sm.gpu() ? rs[0].seconds : 0;
    double cpu_s = 0;
    for (const auto& r : rs) cpu_s += r.seconds;
    const double secs = sm.gpu() ? s : cpu_s;
    std::cout << fmt::format("{} samples ({}): {} new tokens in {:.3f} s, {:.0f} tokens/s in all{}\n", rs.size(),
                             sm.gpu() ? "one batch on the GPU" : "one by one on the CPU", tokens, secs,
                             secs > 0 ? tokens / secs : 0.0,
                             sm.gpu() ? fmt::format(" (host sampling {:.1f} ms)", 1e3 * rs[0].sampling_seconds) : "")
              << std::flush;
    return true;
  }
  bool identical = true;
  for (int i = 0; i < num_samples; ++i) {
    SampleComparison c;
    sm.timing_note();  // starts the call times afresh
    c.plain = sm.one(tok, opt, i, false);
    c.speculative = sm.one(tok, opt, i, true);
    c.speedup = c.speculative.seconds > 0 ? c.plain.seconds / c.speculative.seconds : 0;
    c.identical = c.plain.tokens == c.speculative.tokens;
    if (num_samples > 1) std::cout << fmt::format("(sample {} of {})\n", i, num_samples);
    std::cout << format_sample(opt.prompt, c.plain, tok.eos_id());
    const double rate = c.speculative.drafted ? double(c.speculative.accepted) / c.speculative.drafted : 0.0;
    Table t({"decoding", "new tokens", "seconds", "tokens/s", "drafts", "accepted", "acceptance"});
    t.add_row({"plain", std::to_string(c.plain.tokens.size()), fmt::format("{:.3f}", c.plain.seconds),
               fmt::format("{:.0f}", c.plain.tokens_per_s), "-", "-", "-"});
    t.add_row({"speculative (MTP)", std::to_string(c.speculative.tokens.size()),
               fmt::format("{:.3f}", c.speculative.seconds), fmt::format("{:.0f}", c.speculative.tokens_per_s),
               std::to_string(c.speculative.drafted), std::to_string(c.speculative.accepted),
               fmt::format("{:.1f}%", 100 * rate)});
    t.print();
    std::cout << fmt::format("speculative speed-up {:.2f}x; output identical to plain decoding: {}\n", c.speedup,
                             c.identical ? "yes" : "NO") << sm.timing_note() << std::flush;
    identical = identical && c.identical;
    ++totals.prompts;
    totals.tokens += int(c.plain.tokens.size());
    totals.drafted += c.speculative.drafted;
    totals.accepted += c.speculative.accepted;
    totals.plain_s += c.plain.seconds;
    totals.spec_s += c.speculative.seconds;
  }
  return identical;
}

// The overall line of --speculative over several comparisons.
void print_speculative_totals(const SpeculativeTotals& t) {
  if (t.prompts < 2) return;
  const double acc = t.drafted ? double(t.accepted) / t.drafted : 0.0;
  std::cout << fmt::format("speculative overall ({} runs, {} tokens): acceptance {:.1f}%, plain {:.0f} tokens/s, "
                           "speculative {:.0f} tokens/s, speed-up {:.2f}x (0.9 x (1 + acceptance) = {:.2f})\n",
                           t.prompts, t.tokens, 100 * acc, t.plain_s > 0 ? t.tokens / t.plain_s : 0.0,
                           t.spec_s > 0 ? t.tokens / t.spec_s : 0.0, t.spec_s > 0 ? t.plain_s / t.spec_s : 0.0,
                           0.9 * (1 + acc));
}

// The prompts come from one place: --prompt (repeatable), --prompt-file or --interactive (standard input);
// none of them: the three fixed prompts.
void check_prompt_flags(const SampleArgs& a) {
  require(!(a.interactive && !a.prompt_file.empty()), "--interactive reads the prompts from standard input and "
          "--prompt-file from a file: give one of them");
  require(!(a.interactive && !a.prompts.empty()), "--interactive reads the prompts from standard input: drop "
          "--prompt, or drop --interactive");
  require(!(!a.prompt_file.empty() && !a.prompts.empty()), "--prompt-file and --prompt both give the prompts: "
          "give one of them");
}

// Samples every prompt; with speculative, decodes the first one (with --interactive: every one) also
// speculatively and prints the comparison. --interactive reads `in` line by line and answers each line as it
// arrives. Returns false when speculative decoding did not reproduce plain decoding.
bool do_sample(const SampleArgs& a, std::istream& in = std::cin) {
  check_prompt_flags(a);
  validate_sample_options(a.opt);
  require(a.device == "auto" || a.device == "cuda" || a.device == "cpu", "--device must be auto, cuda or cpu (got '{}')",
          a.device);
  require(a.num_samples >= 1 && a.num_samples <= kMaxSamples, "--num-samples must be in [1, {}], got {}", kMaxSamples,
          a.num_samples);
  const bool gpu = a.device == "cuda" || (a.device == "auto" && gpu_available());
  require(!gpu || gpu_available(), "--device cuda: {}; use --device cpu", gpu_description());
  const Model<float> model = load_model(a.checkpoint);
  const SampleTokenizer st = tokenizer_for(a, model);
  const Tokenizer& tok = st.tok;
  require(!a.speculative || model.config().num_nextn_predict_layers > 0,
          "sample: speculative decoding drafts with the MTP module, and this model has none "
          "(num_nextn_predict_layers = 0)");
  require(a.gpu_decode == "v1" || a.gpu_decode == "fused" || a.gpu_decode == "full",
          "--gpu-decode must be v1, fused or full (got '{}')", a.gpu_decode);
  Samplers sm(model, gpu, a.num_samples, a.speculative, a.gpu_decode);
  std::cout << fmt::format("sampling from {} ({}, latent KV cache, absorbed MLA) | temperature {:g}, top-k {}, "
                           "top-p {:g}, seed {}{}\ntokenizer: {} ({})\n",
                           a.checkpoint, gpu ? "GPU: " + gpu_description() + ", fp32, CUDA graphs, --gpu-decode " + a.gpu_decode : "CPU",
                           a.opt.temperature, a.opt.top_k, a.opt.top_p, a.opt.seed,
                           a.num_samples > 1 ? fmt::format(", {} samples per prompt", a.num_samples) : "", st.path,
                           st.source);
  SampleOptions o = a.opt;
  SpeculativeTotals totals;
  if (a.interactive) {
    std::cout << "(interactive: one prompt per line; the end of input, Ctrl-D, ends)\n" << std::flush;
    bool ok = true;
    const int n = for_each_prompt_line(in, [&](const std::string& text, int line) {
      validate_text(text, fmt::format("standard input line {}", line));
      o.prompt = text;
      ok = sample_prompt(sm, tok, o, a.speculative, a.num_samples, totals, a.print_ids) && ok;
    });
    std::cout << fmt::format("(end of input: {} prompt{})\n", n, n == 1 ? "" : "s");
    print_speculative_totals(totals);
    return ok;
  }
  std::vector<std::string> prompts = a.prompts;
  if (!a.prompt_file.empty())
    prompts = read_prompt_file(a.prompt_file, tok);
  else if (prompts.empty())
    prompts = kPrompts;
  for (size_t i = 0; i < prompts.size(); ++i)  // not echoed: it may not be printable
    validate_text(prompts[i], prompts.size() == 1 ? "--prompt" : fmt::format("--prompt number {}", i + 1));
  bool ok = true;
  for (size_t i = 0; i < prompts.size(); ++i) {
    o.prompt = prompts[i];
    // the CPU compares the first prompt (a comparison costs two CPU decodes); the GPU every one
    ok = sample_prompt(sm, tok, o, a.speculative && (gpu || i == 0), a.num_samples, totals, a.print_ids) && ok;
  }
  print_speculative_totals(totals);
  return ok;
}

struct EvalArgs {
  std::string checkpoint, data, device = "auto", precision = "fp32";
  int batch = 8;
};

// The validation loss of a checkpoint on a prepared data folder, as the trainer measures it (train.h's
// evaluate(): every window of seq_len + 1 tokens of val.bin, strided by seq_len, at the seq_len the checkpoint
// was trained with). The last line is JSON (check_transformers.py --ours reads it).
void do_eval(const EvalArgs& a) {
  const Checkpoint ck = load_checkpoint(checkpoint_to_read(a.checkpoint));
  const TrainerState st = read_trainer_state(a.checkpoint);
  const Prepared data = load_prepared(a.data);
  require(data.info.vocab_size == ck.config.vocab_size, "eval: the data in {} has vocabulary {}, the checkpoint {}: "
          "give the --data folder the model was trained on", a.data, data.info.vocab_size, ck.config.vocab_size);
  TrainArgs ta;
  ta.device = a.device;
  ta.precision = a.precision;
  auto backend = make_backend(ta, ck.config);
  backend->load_weights(ck.tensors);
  const ValResult v = evaluate(*backend, data.val, a.batch, st.config.seq_len, data.info);
  std::string mtp;
  for (size_t k = 0; k < v.mtp.size(); ++k) mtp += fmt::format(", \"val_mtp_d{}\": {:.8f}", k + 1, v.mtp[k]);
  std::cout << fmt::format("{} on {} ({}): val ce {:.6f} nats/token = {:.6f} bits/byte over {} tokens "
                           "(windows of {} + 1)\n", a.checkpoint, a.data, backend->describe(), v.ce, v.bits_per_byte,
                           v.tokens, st.config.seq_len);
  std::cout << fmt::format("{{\"val_ce\": {:.8f}, \"val_bpb\": {:.8f}, \"tokens\": {}, \"seq_len\": {}{}, "
                           "\"device\": \"{}\"}}\n", v.ce, v.bits_per_byte, v.tokens, st.config.seq_len, mtp,
                           backend->describe());
}

struct GradsArgs {
  std::string checkpoint, data, out, device = "cpu", precision = "fp32";
  int batch = 2, seq_len = 32;
  TrainConfig steps;  // max_steps > 0: that many optimizer steps on the same windows (steps.json, final.safetensors)
};

// grads: one forward and backward of a checkpoint on the first `batch` windows of the validation split, written
// for the PyTorch oracle (torch_reference.py oracle DIR, DIR = --dump): DIR/config.json and model.safetensors (the weights),
// tokens.bin (int32, batch x (seq_len + 1)), losses.json (the loss parts) and grads.safetensors (the gradient of the
// total loss of every parameter by Hugging Face name; the MoE biases, which have none, hold zeros).
int run_grads_command(const GradsArgs& a) {
  const Checkpoint ck = load_checkpoint(checkpoint_to_read(a.checkpoint));
  const Prepared data = load_prepared(a.data);
  require(data.info.vocab_size == ck.config.vocab_size, "grads: the data in {} has vocabulary {}, the checkpoint {}: "
          "give the --data folder the model was trained on", a.data, data.info.vocab_size, ck.config.vocab_size);
  require(a.seq_len <= kMaxPositions, "--seq-len {} is longer than this implementation supports", a.seq_len);
  ModelConfig c = ck.config;
  c.max_position_embeddings = std::max(c.max_position_embeddings, a.seq_len);
  const int64_t need = int64_t(a.batch) * a.seq_len + 1;
  require(int64_t(data.val.size()) >= need, "grads: the validation split has {} tokens, {} x {} windows need {}: "
          "reduce --batch or --seq-len", data.val.size(), a.batch, a.seq_len, need);
  std::vector<int> tokens;  // window b: val[b*T .. b*T + T]
  for (int b = 0; b < a.batch; ++b)
    for (int t = 0; t <= a.seq_len; ++t) tokens.push_back(int(data.val[size_t(b) * a.seq_len + t]));
  TrainArgs ta;
  ta.device = a.device;
  ta.precision = a.precision;
  auto backend = make_backend(ta, c);
  backend->load_weights(ck.tensors);
  ModelLosses l = backend->forward_backward(tokens, a.batch, a.seq_len);
  const std::vector<double> mtp = backend->mtp_losses();
  TensorMap grads = backend->gradients();
  for (const TensorSpec& sp : checkpoint_specs(c))  // the biases: zeros, so that the file has the weights' layout
    if (sp.mirror_of.empty() && !grads.count(sp.name)) grads[sp.name] = std::vector<float>(size_t(sp.numel()), 0.f);

  save_checkpoint(a.out, c, ck.tensors);
  const std::string tmp = a.out + "/grads.tmp";
  save_checkpoint(tmp, c, grads);
  fs::rename(tmp + "/model.safetensors", a.out + "/grads.safetensors");
  fs::remove_all(tmp);
  std::string bytes(tokens.size() * 4, '\0');
  for (size_t i = 0; i < tokens.size(); ++i)
    for (int k = 0; k < 4; ++k) bytes[4 * i + size_t(k)] = char((uint32_t(tokens[i]) >> (8 * k)) & 0xff);
  write_file_atomic(a.out + "/tokens.bin", bytes);
  std::string depths;
  for (size_t k = 0; k < mtp.size(); ++k) depths += fmt::format("{}{:.10g}", k ? ", " : "", mtp[k]);
  const std::string json = fmt::format(
      "{{\"B\": {}, \"T\": {}, \"ce\": {:.10g}, \"mtp\": {:.10g}, \"mtp_depths\": [{}], \"balance\": {:.10g}, "
      "\"total\": {:.10g}, \"mtp_lambda\": {:.10g}, \"aux_alpha\": {:.10g}, \"device\": \"{}\"}}\n",
      a.batch, a.seq_len, l.ce, l.mtp, depths, l.balance, l.total(), c.training.mtp_lambda, c.training.aux_alpha,
      backend->describe());
  write_file_atomic(a.out + "/losses.json", json);
  std::cout << fmt::format("{} ({}): {} windows of {} + 1 validation tokens -> {}\n{}", a.checkpoint,
                           backend->describe(), a.batch, a.seq_len, a.out, json);
  if (a.steps.max_steps == 0) return 0;

  // --steps N: train()'s step (norm, clipping, AdamW at lr_at(s), the bias update) N times on these windows
  TrainConfig cfg = a.steps;
  cfg.batch = a.batch;
  cfg.seq_len = a.seq_len;
  cfg.validate();
  std::string records;
  for (int64_t s = 1; s <= cfg.max_steps; ++s) {
    if (s > 1) l = backend->forward_backward(tokens, a.batch, a.seq_len);
    const double norm = backend->grad_norm();
    require(std::isfinite(l.total()) && std::isfinite(norm), "grads: step {} is not finite (loss {}, norm {})", s,
            l.total(), norm);
    apply_update(*backend, cfg, s, norm, s);
    records += fmt::format("{}    {{\"step\": {}, \"lr\": {:.10g}, \"ce\": {:.10g}, \"mtp\": {:.10g}, \"balance\": "
                           "{:.10g}, \"total\": {:.10g}, \"grad_norm\": {:.10g}}}", s > 1 ? ",\n" : "", s,
                           double(float(lr_at(cfg, s))), l.ce, l.mtp, l.balance, l.total(), norm);
  }
  const std::string steps_json = fmt::format(
      "{{\"steps\": {}, \"config\": {{\"lr\": {:.10g}, \"min_lr_ratio\": {:.10g}, \"warmup_steps\": {}, "
      "\"max_steps\": {}, \"weight_decay\": {:.10g}, \"beta1\": {:.10g}, \"beta2\": {:.10g}, \"grad_clip\": {:.10g}}},\n"
      "  \"records\": [\n{}\n  ]}}\n", cfg.max_steps, cfg.lr, cfg.min_lr_ratio, cfg.warmup_steps, cfg.max_steps,
      cfg.weight_decay, cfg.beta1, cfg.beta2, cfg.grad_clip, records);
  write_file_atomic(a.out + "/steps.json", steps_json);
  save_checkpoint(tmp, c, backend->weights());
  fs::rename(tmp + "/model.safetensors", a.out + "/final.safetensors");
  fs::remove_all(tmp);
  std::cout << fmt::format("{} optimizer steps on these windows -> {}/steps.json, final.safetensors\n", cfg.max_steps,
                           a.out);
  return 0;
}

// --check: the whole pipeline, small: data (check mode), 60 CPU steps of the tiny preset with a resume in the
// middle, sampling twice with one seed, speculative == plain.
int run_check(const std::string& out, PrepareArgs pa) {
  int failures = do_prepare(pa, out + "/data", true);
  auto check = [&](bool ok, const std::string& what) {
    std::cout << fmt::format("  [{}] {}\n", ok ? "ok" : "FAIL", what);
    failures += !ok;
  };
  const Prepared data = load_prepared(out + "/data");
  TrainArgs a;
  a.data = out + "/data";
  a.run = out + "/check_run";
  fs::remove_all(a.run);  // the check's own scratch run
  a.device = "cpu";
  a.precision = "fp32";
  a.preset = "tiny";
  a.cfg.batch = 8;
  a.cfg.lr = 3e-3;
  a.cfg.weight_decay = 0.1;
  a.cfg.patience = 0;
  a.cfg.seq_len = 32;
  a.cfg.max_steps = 30;
  a.cfg.warmup_steps = 5;
  a.cfg.eval_every = 10;
  std::ostringstream log1, log2;
  const TrainResult first = do_train(a, data, log1);  // 30 steps
  a.resume = true;
  a.cfg.max_steps = 60;
  const TrainResult second = do_train(a, data, log2);  // resumed to 60
  std::cout << log1.str() << log2.str();
  const auto& h1 = first.history;
  const auto& h2 = second.history;
  check(h1.size() == 30 && h2.size() == 30, "30 steps, then 30 more after a resume");
  double early = 0, late = 0;
  for (int i = 0; i < 5; ++i) early += h1[i].losses.ce / 5, late += h2[25 + i].losses.ce / 5;
  check(late < early - 0.5, fmt::format("train loss falls: first 5 steps {:.3f} -> last 5 {:.3f}", early, late));
  check(std::isfinite(second.best_val_ce), fmt::format("validation ran: best {:.3f} nats/token", second.best_val_ce));
  SampleArgs s;
  s.checkpoint = checkpoint_dir(a.run, "best");
  s.prompts = {"love"};
  s.opt.max_new_tokens = 24;
  s.opt.seed = 7;
  const Model<float> model = load_model(s.checkpoint);
  const Tokenizer tok = tokenizer_for(s, model).tok;
  SampleOptions o = s.opt;
  o.prompt = "love";
  const SampleResult r1 = generate(model, tok, o, false), r2 = generate(model, tok, o, false);
  check(r1.tokens == r2.tokens && !r1.tokens.empty(), "sampling is deterministic for a seed");
  const SampleComparison c = generate_both(model, tok, o);
  check(c.identical, fmt::format("speculative decoding == plain decoding ({} of {} drafts accepted)", c.speculative.accepted,
                                 c.speculative.drafted));
  std::cout << fmt::format("sample: love{}\n", r1.text);
  std::cout << (failures ? fmt::format("{} check(s) FAILED\n", failures) : "all checks passed\n");
  return failures ? 1 : 0;
}

// prepare: the corpus, the tokenizer and the token files into data_dir, with the round-trip checks.
int run_prepare_command(const PrepareArgs& pa, const std::string& data_dir, const std::string& out) {
  const int failures = do_prepare(pa, data_dir, false);
  if (failures == 0 && data_dir != out + "/data") {
    std::string name = fs::path(data_dir).filename().string();
    if (name.rfind("data-", 0) == 0) name = name.substr(5);
    std::cout << fmt::format("next: 07_train_gpu --out {} train --data {} --run {}/run-{}\n", out, data_dir, out, name);
  }
  std::cout << (failures ? fmt::format("{} check(s) FAILED\n", failures) : "all checks passed\n");
  return failures ? 1 : 0;
}

// train: the preset defaults to lyrics on a GPU, cpu (with its schedule) without one; a short run fits its warm-up.
int run_train_command(TrainArgs ta, const CLI::App* cmd, int gpus, char** argv) {
  const bool gpu = ta.device == "cuda" || (ta.device == "auto" && gpu_available());
  if (ta.device == "auto" && !gpu) std::cout << fmt::format("{}: training on the CPU\n", gpu_description());
  if (ta.resume) continue_with_run_settings(ta, cmd);
  if (ta.preset.empty() && ta.init_from.empty()) ta.preset = gpu ? "lyrics" : "cpu";
  if (!ta.resume) {
    if (ta.preset == "cpu") take_schedule(ta.cfg, kCpuSchedule, cmd);  // the cpu preset brings its schedule
    fit_warmup(ta, cmd, std::cout);
  }
  if (gpus > 0 && !g_launch.launched()) {  // several GPUs (or --nccl): this process launches the ranks and waits
    require(ta.device != "cpu", "--gpus {}: several GPUs train on the GPU, not with --device cpu", gpus);
    require(ta.cfg.batch % gpus == 0, "--batch {} is not a multiple of --gpus {}: every GPU takes batch / GPUs "
            "windows of each batch", ta.cfg.batch, gpus);
    return launch_ranks(gpus, argv);
  }
  do_train(ta, load_prepared(ta.data), std::cout);
  return stopped_by_signal(ta.run);
}

// bench: training steps of a preset on random tokens on the GPU; a table, then the result as a JSON line, also
// appended to <out>/bench.jsonl.
// experts: "auto" (the precision's choice, device_options()), "grouped" or "segmented": compares the two paths.
int run_bench_command(BenchOptions b, const std::string& precision, const std::string& experts,
                      const DemoOptions& opt, int gpus, char** argv) {
  b.seed = opt.seed;
  if (gpus > 0 && !g_launch.launched() && b.write_config.empty()) return launch_ranks(gpus, argv);
  const Precision prec = parse_precision(precision);
  const ModelConfig c = config_preset(b.preset);
  if (!b.write_config.empty()) {  // the peer's input (scripts/bench_vs_torch.sh): the preset's config.json, nothing else
    write_file_atomic(b.write_config, config_to_json_text(c));
    std::cout << fmt::format("wrote {} (preset {})\n", b.write_config, b.preset);
    return 0;
  }
  DeviceOptions o = device_options(prec, c);
  if (experts != "auto") o.experts = parse_moe_experts(experts);
  if (g_expert_parallel) o.experts = MoeExperts::Grouped;  // the path that exchanges rows
  if (b.attention == "materialized") o.attention = MlaConfig::Attention::Materialized;
  if (b.attention == "fused") o.attention = MlaConfig::Attention::Fused;
#ifdef DSV3_HAVE_CUDA
  cuda::set_bf16_gemm(b.bf16_gemm == "fast16bf" ? cuda::Bf16Gemm::Fast16bf : cuda::Bf16Gemm::Bf16Copies);
#endif
  std::unique_ptr<Communicator> comm;  // a launched rank: data parallel, every GPU at the bench's batch
  if (g_launch.launched()) comm = rank_communicator(g_launch);
  auto backend = make_cuda_backend(c, opt.seed, o);
  std::cout << backend->describe() << (comm ? " | " + comm->describe() : "") << "\n";
  backend->set_communicator(comm.get(), g_expert_parallel);
  b.seed += uint64_t(g_launch.rank);  // each rank its own random tokens
  BenchResult r = run_bench(*backend, b);
  backend->set_communicator(nullptr);
  r.gpus = g_launch.ranks;
  r.tokens_per_s *= g_launch.ranks;  // the group's tokens: every rank trains b.batch windows a step (MFU: per GPU)
  r.precision = precision_name(prec);
  MlaConfig attn = c.mla();
  attn.matmul = o.matmul;
  attn.attention = o.attention;
  r.attention = attn.fused_attention() ? "fused" : "materialized";
  Table t({"preset", "precision", "GPUs", "batch x T", "CUDA graph", "attention", "step ms", "tokens/s", "MFU",
           "peak GiB"});
  t.add_row({r.preset, r.precision, std::to_string(r.gpus), fmt::format("{} x {}", r.batch, r.seq_len), r.cuda_graph ? "yes" : "no", r.attention,
             fmt::format("{:.2f}", r.step_ms), fmt::format("{:.0f}", r.tokens_per_s), fmt::format("{:.2f}%", 100 * r.mfu),
             fmt::format("{:.2f}", r.peak_mem_gib)});
  t.print();
  std::cout << fmt::format("FLOPs/token {:.4g} (active matmul params {:.4g}); loss {:.3f} -> {:.3f}\n",
                           r.flops_per_token, r.params_active, r.loss_first, r.loss_last);
  if (r.ep_exchange_ms > 0)
    std::cout << fmt::format("expert parallel, per MoE layer and step (forward + backward): all-to-all {:.3f} ms, "
                             "experts' products {:.3f} ms\n", r.ep_exchange_ms, r.ep_compute_ms);
  if (!r.phase_ms.empty()) {
    Table ph({"phase", "median ms"});
    for (const auto& p : r.phase_ms) ph.add_row({p.first, fmt::format("{:.3f}", p.second)});
    ph.print();
  }
  std::cout << r.json() << "\n";
  if (!leader()) return 0;
  ensure_dir(opt.out);
  std::ofstream(opt.out + "/bench.jsonl", std::ios::app) << r.json() << "\n";  // one line per run, appended
  return 0;
}

// The main job (no subcommand): data (once), the default run (the GPU lyrics run, else the CPU fallback), samples
// from its best checkpoint and a speculative-decoding comparison.
int run_main_job(TrainArgs ta, const PrepareArgs& pa, const SampleArgs& sa, const std::string& data_dir, int gpus,
                 char** argv) {
  if (g_launch.launched()) {  // a rank of the launch below: the training run only (the launcher prepared the data)
    ta.preset = "lyrics";
    do_train(ta, load_prepared(data_dir), std::cout);
    return stopped_by_signal(ta.run);
  }
  if (!fs::exists(data_dir + "/data.json")) {
    const int failures = do_prepare(pa, data_dir, false);
    require(failures == 0, "data preparation failed its checks");
  } else {
    std::cout << fmt::format("using the prepared data in {} (07_train_gpu prepare rebuilds it)\n", data_dir);
  }
  const Prepared data = load_prepared(data_dir);
  if (gpu_available() && ta.device != "cpu") {
    ta.preset = "lyrics";
    std::cout << fmt::format("GPU: {} -> the lyrics run\n", gpu_description());
  } else {
    ta.preset = "cpu";
    take_schedule(ta.cfg, kCpuSchedule, nullptr);
    ta.device = "cpu";
    ta.precision = "fp32";
    std::cout << fmt::format(
        "\n{}: training the cpu preset on the CPU (about 10 minutes on 2 cores; README, \"Without a GPU\").\n"
        "The full run (the lyrics preset, bf16, about 75 s on an H200) needs an NVIDIA GPU.\n\n",
        gpu_description());
  }
  keep_previous_run(ta.run);
  if (gpus > 0) {  // several GPUs (or --nccl): the ranks train, then this process samples
    require(ta.device != "cpu", "--gpus {}: several GPUs train on the GPU (the main job found none)", gpus);
    require(ta.cfg.batch % gpus == 0, "the lyrics run's batch {} is not a multiple of --gpus {}", ta.cfg.batch, gpus);
    if (const int code = launch_ranks(gpus, argv)) return code;
  } else {
    do_train(ta, data, std::cout);
    if (const int code = stopped_by_signal(ta.run)) return code;
  }
  const bool sampled = do_sample(sa);
  // speculative decoding against plain decoding, greedy on a fixed prompt: the acceptance rate of the MTP draft
  SampleArgs spec = sa;
  spec.prompts = {"The LORD is my shepherd"};
  spec.opt.temperature = 0;
  spec.opt.max_new_tokens = 120;
  spec.speculative = true;
  std::cout << "\nMTP speculative decoding (greedy):\n";
  return sampled && do_sample(spec) ? 0 : 1;
}

std::string preset_list() {
  std::string names;
  for (const auto& n : config_preset_names()) names += (names.empty() ? "" : ", ") + n;
  return names;
}

void add_train_options(CLI::App* cmd, TrainArgs& a) {
  const TrainConfig& c = a.cfg;  // the defaults shown are the lyrics run's; the cpu preset brings its own schedule
  const TrainConfig& cpu = kCpuSchedule;
  auto dflt = [](auto gpu_value, auto cpu_value) {
    return fmt::format("[default {}; cpu preset {}]", gpu_value, cpu_value);
  };
  cmd->add_option("--data", a.data, "prepared data folder [default <out>/data]");
  cmd->add_option("--run", a.run, "run folder: diagnostics, plots, checkpoints [default <out>/run]");
  cmd->add_option("--preset", a.preset, "model preset (" + preset_list() + ") or a config.json path [default lyrics "
                  "with a GPU, cpu without; with --resume the run's own model]");
  cmd->add_option("--init-from", a.init_from, "start from this checkpoint's weights (its model; data prepared with "
                  "its tokenizer: prepare --tokenizer); new optimizer state and schedule");
  cmd->add_option("--device", a.device, "auto (the GPU when there is one), cuda or cpu")->capture_default_str();
  cmd->add_option("--precision", a.precision, "bf16 or fp32 (GPU; the CPU trains in fp32)")->capture_default_str();
  cmd->add_option("--steps", a.cfg.max_steps, "training steps " + dflt(c.max_steps, cpu.max_steps))
      ->check(CLI::PositiveNumber);
  cmd->add_option("--batch", a.cfg.batch, "windows per step " + dflt(c.batch, cpu.batch))->check(CLI::PositiveNumber);
  cmd->add_option("--seq-len", a.cfg.seq_len, "tokens per window " + dflt(c.seq_len, cpu.seq_len))
      ->check(CLI::PositiveNumber);
  cmd->add_option("--lr", a.cfg.lr, "peak learning rate " + dflt(c.lr, cpu.lr))->check(CLI::PositiveNumber);
  cmd->add_option("--min-lr-ratio", a.cfg.min_lr_ratio, "final learning rate / peak")->capture_default_str();
  cmd->add_option("--warmup", a.cfg.warmup_steps, "linear warm-up steps " + dflt(c.warmup_steps, cpu.warmup_steps) +
                  "; a run shorter than 10 x warm-up without this flag warms up over its first tenth")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--weight-decay", a.cfg.weight_decay, "AdamW weight decay, matrices only " +
                  dflt(c.weight_decay, cpu.weight_decay))->check(CLI::NonNegativeNumber);
  cmd->add_option("--eval-every", a.cfg.eval_every, "validate and checkpoint every this many steps " +
                  dflt(c.eval_every, cpu.eval_every))->check(CLI::PositiveNumber);
  cmd->add_option("--patience", a.cfg.patience, "stop after this many evaluations without a new best, 0: off " +
                  dflt(c.patience, cpu.patience));
  cmd->add_option("--max-minutes", a.cfg.max_minutes, "stop cleanly after this long (0: off)")->capture_default_str();
  cmd->add_option("--model-seed", a.model_seed, "seed of the initial weights")->check(unsigned_integer())
      ->capture_default_str();
  cmd->add_flag("--resume", a.resume, "continue the run in --run from its last checkpoint, with its model and, for "
                "the flags not given, its schedule");
}

void add_sample_options(CLI::App* cmd, SampleArgs& s) {
  cmd->add_option("--checkpoint", s.checkpoint, "checkpoint folder (default <out>/run/checkpoints/best); a copied "
                  "folder alone is enough: it carries its tokenizer");
  cmd->add_option("--tokenizer", s.tokenizer, "tokenizer.model (default: the checkpoint folder's own copy, else its "
                  "run folder's)");
  cmd->add_option("--prompt", s.prompts, "prompt text (repeatable; default three fixed prompts)");
  cmd->add_option("--prompt-file", s.prompt_file, "prompts from this file, one per line (blank lines skipped); not "
                  "with --prompt or --interactive");
  cmd->add_flag("--interactive", s.interactive, "prompts from standard input, one per line, each sampled as it "
                "arrives, until the end of input (Ctrl-D); not with --prompt or --prompt-file");
  cmd->add_option("--temperature", s.opt.temperature, "0 = greedy")->capture_default_str();
  cmd->add_option("--top-k", s.opt.top_k, "keep the k most likely tokens (0 = off)")->capture_default_str();
  cmd->add_option("--top-p", s.opt.top_p, "nucleus probability (1 = off)")->capture_default_str();
  cmd->add_option("--max-new-tokens", s.opt.max_new_tokens, fmt::format("tokens to generate, at most {}; past the "
                  "model's positions the cache is re-filled from the last half of them", kMaxNewTokens))
      ->capture_default_str();
  cmd->add_flag("--speculative", s.speculative, "also decode the first prompt (with --interactive or on the GPU: "
                "every prompt) with MTP drafts and compare (acceptance, tokens/s, speed-up)");
  cmd->add_option("--device", s.device, "auto (the GPU when there is one), cuda or cpu")->capture_default_str();
  cmd->add_option("--gpu-decode", s.gpu_decode, "the GPU decoder's path: v1 (the first version), fused (version 2 "
                  "of the kernels) or full (fused, greedy tokens chosen on the GPU, the MTP draft folded into the "
                  "verify); all give the same tokens")->capture_default_str();
  cmd->add_flag("--print-ids", s.print_ids, "also print each prompt's token ids and the new ids (\"ids: PROMPT | NEW\"), "
                "for 07_train_gpu/check_generate.py");
  cmd->add_option("--num-samples", s.num_samples, fmt::format("samples of each prompt, at most {}; sample i draws "
                  "from the random stream sample_seed(seed, i) (sample 0: the seed itself); the GPU decodes them as "
                  "one batch", kMaxSamples))
      ->capture_default_str();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Stage 07: prepare the lyrics corpus, train the full DeepSeek-V3-style model, sample lyrics", "07_train_gpu"};
  DemoOptions opt;
  add_demo_options(app, opt, "out/07_train_gpu");
  app.require_subcommand(0, 1);
  app.fallthrough();  // --out, --seed and --check work after the subcommand too (the subcommands inherit this)
  int gpus_flag = -1;  // -1: not given
  bool nccl_flag = false;
  app.add_option("--gpus", gpus_flag, "GPUs to train on, one process each (data parallel through NCCL; train, bench "
                 "and the main job) [default: DSV3_GPUS, else 1]");
  app.add_flag("--nccl", nccl_flag, "take the multi-GPU path (launcher, NCCL) even with one GPU: a check of that path");
  app.add_flag("--expert-parallel", g_expert_parallel, "with --gpus N: also split the routed experts of every MoE "
               "layer across the GPUs, tokens exchanged by all-to-all (experts on the grouped path; README)");

  PrepareArgs pa;
  auto* prepare = app.add_subcommand("prepare", "build the corpus, train the tokenizer, write <out>/data");
  prepare->add_option("--vocab", pa.opt.vocab_size, "SentencePiece BPE vocabulary size")
      ->check(CLI::Range(300, 65535))
      ->capture_default_str();
  prepare->add_option("--val-fraction", pa.opt.val_fraction, "share of songs in the validation split")
      ->check(CLI::Range(0.01, 0.5))
      ->capture_default_str();
  prepare->add_option("--lyrics", pa.lyrics, "your own lyrics files (UTF-8; a line holding only % ends a song, a "
                      "blank line is a stanza break)")->check(CLI::ExistingFile);
  prepare->add_option("--data", pa.data, "folder to write [default <out>/data; with --lyrics <out>/data-<file name>]");
  prepare->add_option("--tokenizer", pa.opt.tokenizer, "reuse this tokenizer.model instead of training one (to "
                      "fine-tune a model trained with it: train --init-from)")->check(CLI::ExistingFile);
  prepare->add_flag("--no-default-corpus", pa.no_default, "use only the --lyrics files");
  prepare->add_flag("--dump-text", pa.dump, "also write the cleaned songs to <out>/data/songs.txt");

  TrainArgs ta;
  auto* train_cmd = app.add_subcommand("train", "train on prepared data (GPU when present, else CPU)");
  add_train_options(train_cmd, ta);

  SampleArgs sa;
  sa.opt.top_k = 50;
  sa.opt.top_p = 0.95;
  auto* sample = app.add_subcommand("sample", "sample lyrics from a checkpoint (GPU when present, else CPU; latent KV "
                                    "cache)");
  add_sample_options(sample, sa);

  EvalArgs ea;
  auto* eval = app.add_subcommand("eval", "validation loss of a checkpoint on prepared data (as the trainer reports it)");
  eval->add_option("--checkpoint", ea.checkpoint, "checkpoint folder (default <out>/run/checkpoints/best)");
  eval->add_option("--data", ea.data, "prepared data folder (default <out>/data)");
  eval->add_option("--device", ea.device, "auto, cuda or cpu")->capture_default_str();
  eval->add_option("--precision", ea.precision, "fp32 or bf16 (GPU)")->capture_default_str();
  eval->add_option("--batch", ea.batch, "windows per forward")->check(CLI::PositiveNumber)->capture_default_str();

  GradsArgs ga;
  auto* grads = app.add_subcommand("grads", "one training step's loss parts and gradients of a checkpoint, for the "
                                   "PyTorch oracle (torch_reference.py oracle DIR)");
  grads->add_option("--checkpoint", ga.checkpoint, "checkpoint folder [default <out>/run/checkpoints/best]");
  grads->add_option("--data", ga.data, "prepared data folder: the first windows of its validation split [default "
                    "<out>/data]");
  grads->add_option("--dump", ga.out, "folder to write (config.json, model.safetensors, tokens.bin, losses.json, "
                    "grads.safetensors)")->required();
  grads->add_option("--device", ga.device, "cpu or cuda")->capture_default_str();
  grads->add_option("--precision", ga.precision, "fp32 or bf16 (GPU)")->capture_default_str();
  grads->add_option("--batch", ga.batch, "windows")->check(CLI::Range(1, 1 << 16))->capture_default_str();
  grads->add_option("--seq-len", ga.seq_len, "tokens per window")->check(CLI::Range(1, 1 << 16))->capture_default_str();
  ga.steps.max_steps = 0;
  ga.steps.warmup_steps = 2;
  ga.steps.lr = 1e-3;
  ga.steps.weight_decay = 0.1;
  grads->add_option("--steps", ga.steps.max_steps, "then this many optimizer steps on the same windows (steps.json, "
                    "final.safetensors; 0: none)")->check(CLI::Range(0, 100000))->capture_default_str();
  grads->add_option("--lr", ga.steps.lr, "peak learning rate of those steps")->check(CLI::PositiveNumber)
      ->capture_default_str();
  grads->add_option("--warmup", ga.steps.warmup_steps, "their warm-up steps")->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  grads->add_option("--weight-decay", ga.steps.weight_decay, "their AdamW weight decay")
      ->check(CLI::NonNegativeNumber)->capture_default_str();

  BenchOptions bopt;
  std::string bench_precision = "bf16";
  auto* bench = app.add_subcommand("bench", "time training steps of a preset on random tokens (GPU)");
  bench->add_option("--preset", bopt.preset, "model preset")->capture_default_str();
  bench->add_option("--batch", bopt.batch, "sequences per step")->check(CLI::PositiveNumber)->capture_default_str();
  bench->add_option("--seq-len", bopt.seq_len, "tokens per sequence")->check(CLI::PositiveNumber)->capture_default_str();
  bench->add_option("--steps", bopt.steps, "timed steps after the warm-up")->check(CLI::PositiveNumber)->capture_default_str();
  bench->add_option("--warmup", bopt.warmup, "untimed steps first")->check(CLI::NonNegativeNumber)->capture_default_str();
  bench->add_option("--precision", bench_precision, "fp32 or bf16")->capture_default_str();
  bench->add_option("--write-config", bopt.write_config, "write the preset's config.json to this file and exit (the "
                    "PyTorch peer's input: torch_reference.py bench)");
  bench->add_flag("--exchange-timing", bopt.exchange_timing, "with --expert-parallel: also time the row exchanges "
                  "(all-to-all) and the experts' products of each MoE layer (waits on the GPU around each)");
  bench->add_flag("--phases", bopt.phases, "also print the median time of each phase of forward and backward (runs "
                  "the step as plain calls, not as a CUDA graph)");
  bool no_graph = false;
  bench->add_flag("--no-graph", no_graph, "run each step as plain calls instead of replaying one captured CUDA graph");
  std::string bench_experts = "auto";
  bench->add_option("--moe-experts", bench_experts, "routed experts' path: auto (bf16: hopper on a 9.0 GPU, else "
                    "segmented, where the shapes allow), grouped, segmented or hopper")->capture_default_str();
  bench->add_option("--bf16-gemm", bopt.bf16_gemm, "how bf16 cuBLAS products run: fast16bf (cuBLAS reads the "
                    "fp32 operands) or copies (bf16 copies of the operands first: slower, common/gemm.h)")
      ->check(CLI::IsMember({"copies", "fast16bf"}))
      ->capture_default_str();
  bench->add_option("--attention", bopt.attention, "attention kernels: auto (fused under bf16 where the head dims "
                    "fit), materialized (T x T scores in memory, version 1) or fused (02_mla/attention_fused.cu)")
      ->check(CLI::IsMember({"auto", "materialized", "fused"}))
      ->capture_default_str();

  return run_main(app, argc, argv, [&] {
    g_launch = launch_from_env();
    if (g_launch.launched()) enter_rank(g_launch);  // its GPU, before any other CUDA call
    else std::cout << fmt::format("{}\nseed {}\n", command_line(argc, argv), opt.seed);
    const int gpus = requested_gpus(gpus_flag);
    const int launch = gpus > 1 || nccl_flag ? gpus : 0;  // > 0: ranks to launch (or, in a rank, that were)
    require(!g_expert_parallel || launch > 0, "--expert-parallel splits the experts across GPUs: give --gpus N (N > "
            "1; or --nccl to try it on one GPU)");
    require(launch == 0 || *bench || *train_cmd || !(opt.check || *prepare || *sample || *eval || *grads),
            "--gpus {} / --nccl: several GPUs serve train, bench and the main job, not this command", gpus);
    const std::string data_dir = opt.out + "/data";
    if (ta.data.empty()) ta.data = data_dir;
    if (ta.run.empty()) ta.run = opt.out + "/run";
    if (sa.checkpoint.empty()) sa.checkpoint = checkpoint_dir(opt.out + "/run", "best");
    if (ea.checkpoint.empty()) ea.checkpoint = checkpoint_dir(opt.out + "/run", "best");
    if (ea.data.empty()) ea.data = data_dir;
    sa.opt.seed = opt.seed;
    ta.cfg.seed = opt.seed;
    pa.opt.seed = opt.seed;
    if (opt.check) return run_check(opt.out, pa);

    if (*prepare) return run_prepare_command(pa, prepare_folder(pa, opt.out), opt.out);
    if (*bench) {
      bopt.cuda_graph = !no_graph;
      return run_bench_command(bopt, bench_precision, bench_experts, opt, launch, argv);
    }
    if (*grads) {
      if (ga.checkpoint.empty()) ga.checkpoint = checkpoint_dir(opt.out + "/run", "best");
      if (ga.data.empty()) ga.data = data_dir;
      return run_grads_command(ga);
    }
    if (*sample) return do_sample(sa) ? 0 : 1;
    if (*eval) {
      do_eval(ea);
      return 0;
    }
    if (*train_cmd) return run_train_command(ta, train_cmd, launch, argv);
    return run_main_job(ta, pa, sa, data_dir, launch, argv);
  });
}
