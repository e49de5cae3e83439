// 07_train_gpu, part 1: `prepare` builds the lyrics corpus, trains the SentencePiece BPE tokenizer on the
// train split and writes <out>/data/{train.bin,val.bin,tokenizer.model,data.json}, printing a table.
// --check runs a small fast version (vocab 512 on a subset) and verifies the round trips; exits 1 on failure.
// Training, sampling and the benchmark are not built yet (see README "Status").
#include <fmt/format.h>

#include <chrono>
#include <fstream>
#include <iostream>

#include "07_train_gpu/bench.h"
#include "07_train_gpu/data.h"
#include "common/cli.h"
#include "common/diag.h"
#include "common/errors.h"

using namespace dsv3;
using namespace dsv3::data;

namespace {

void print_table(const Prepared& p) {
  Table t({"split", "songs", "lines", "bytes", "tokens", "bytes/token"});
  for (const auto* s : {&p.info.train, &p.info.val}) {
    t.add_row({s == &p.info.train ? "train" : "val", std::to_string(s->songs), std::to_string(s->lines), std::to_string(s->bytes),
               std::to_string(s->tokens), fmt::format("{:.3f}", double(s->bytes) / double(s->tokens))});
  }
  t.print();
  Table src({"source", "songs", "bytes"});
  for (const auto& s : p.info.sources) src.add_row({s.name, std::to_string(s.songs), std::to_string(s.bytes)});
  src.print();
}

// Round trips a reader can trust: decode(encode(song)) == song for every song given, and the token files
// read back from disk equal what was written, song by song (eos-separated).
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

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Stage 07: lyrics corpus, SentencePiece BPE tokenizer and token files (training comes later)", "07_train_gpu"};
  DemoOptions opt;
  PrepareOptions popt;
  std::vector<std::string> lyrics;
  bool no_default = false, dump = false;
  add_demo_options(app, opt, "out/07_train_gpu");
  auto* prepare = app.add_subcommand("prepare", "build the corpus, train the tokenizer, write <out>/data (the default)");
  prepare->fallthrough();
  app.require_subcommand(0, 1);
  app.add_option("--vocab", popt.vocab_size, "SentencePiece BPE vocabulary size")->check(CLI::Range(300, 65535))->capture_default_str();
  app.add_option("--val-fraction", popt.val_fraction, "share of songs in the validation split")
      ->check(CLI::Range(0.01, 0.5))
      ->capture_default_str();
  app.add_option("--lyrics", lyrics, "your own lyrics files (UTF-8, songs separated by blank lines), added to the corpus")
      ->check(CLI::ExistingFile);
  app.add_flag("--no-default-corpus", no_default, "use only the --lyrics files");
  app.add_flag("--dump-text", dump, "also write the cleaned songs to <out>/data/songs.txt (songs separated by a line '%')");
  BenchOptions bopt;
  std::string bench_precision = "bf16";
  auto* bench = app.add_subcommand("bench", "time training steps of a preset on random tokens (GPU)");
  bench->add_option("--preset", bopt.preset, "model preset")->capture_default_str();
  bench->add_option("--batch", bopt.batch, "sequences per step")->check(CLI::PositiveNumber)->capture_default_str();
  bench->add_option("--seq-len", bopt.seq_len, "tokens per sequence")->check(CLI::PositiveNumber)->capture_default_str();
  bench->add_option("--steps", bopt.steps, "timed steps after the warm-up")->check(CLI::PositiveNumber)->capture_default_str();
  bench->add_option("--warmup", bopt.warmup, "untimed steps first")->check(CLI::NonNegativeNumber)->capture_default_str();
  bench->add_option("--precision", bench_precision, "fp32 or bf16")->capture_default_str();
  bench->add_flag("--phases", bopt.phases, "also print the median time of each phase of forward and backward");
  return run_main(app, argc, argv, [&] {
    if (*bench) {
      std::cout << fmt::format("{}\nseed {}\n", command_line(argc, argv), opt.seed);
      bopt.seed = opt.seed;
      const Precision prec = parse_precision(bench_precision);
      const ModelConfig c = config_preset(bopt.preset);
      auto backend = make_cuda_backend(c, opt.seed, prec);
      const BenchResult r0 = run_bench(*backend, bopt);
      BenchResult r = r0;
      r.precision = precision_name(prec);
      Table t({"preset", "precision", "batch x T", "step ms", "fwd+bwd ms", "optim ms", "tokens/s", "MFU", "peak GiB"});
      t.add_row({r.preset, r.precision, fmt::format("{} x {}", r.batch, r.seq_len), fmt::format("{:.2f}", r.step_ms),
                 fmt::format("{:.2f}", r.fwd_bwd_ms), fmt::format("{:.2f}", r.opt_ms), fmt::format("{:.0f}", r.tokens_per_s),
                 fmt::format("{:.2f}%", 100 * r.mfu), fmt::format("{:.2f}", r.peak_mem_gib)});
      t.print();
      std::cout << fmt::format("FLOPs/token {:.4g} (active matmul params {:.4g}); loss {:.3f} -> {:.3f}\n", r.flops_per_token,
                               r.params_active, r.loss_first, r.loss_last);
      if (!r.phase_ms.empty()) {
        Table ph({"phase", "median ms"});
        for (const auto& p : r.phase_ms) ph.add_row({p.first, fmt::format("{:.3f}", p.second)});
        ph.print();
      }
      std::cout << r.json() << "\n";
      ensure_dir(opt.out);
      std::ofstream(opt.out + "/bench.jsonl", std::ios::app) << r.json() << "\n";  // one line per run, appended
      return 0;
    }
    popt.seed = opt.seed;
    std::cout << fmt::format("{}\nseed {}\n", command_line(argc, argv), opt.seed);
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<Song> songs;
    if (opt.check && !no_default && !default_sources_available()) {
      // Without the Debian packages the check still exercises the whole pipeline, on generated songs.
      std::cout << "default corpus unavailable (install fortunes and bible-kjv: scripts/setup.sh); checking on generated songs\n";
      const char* words[] = {"love", "night", "river", "shine", "heart", "road", "home", "rain", "song", "light", "O", "LORD"};
      for (int i = 0; i < 120; ++i) {
        std::string t;
        for (int l = 0; l < 6; ++l)
          for (int w = 0; w < 7; ++w) t += std::string(w ? " " : (l ? "\n" : "")) + words[(i * 5 + l * 7 + w * w * 3) % 12];
        songs.push_back({t, "generated"});
      }
      no_default = true;
    }
    if (!no_default) songs = load_default_corpus();
    for (const auto& f : lyrics) {
      const auto mine = read_lyrics_file(f);
      songs.insert(songs.end(), mine.begin(), mine.end());
    }
    require(!songs.empty(), "no songs: give --lyrics files or drop --no-default-corpus");
    if (opt.check) {  // small and fast: every 4th song, vocab 512
      std::vector<Song> subset;
      for (size_t i = 0; i < songs.size(); i += 4) subset.push_back(songs[i]);
      songs = subset;
      popt.vocab_size = 512;
    }
    const std::string dir = opt.out + "/data";
    const Prepared p = prepare_data(songs, popt, dir);
    if (dump) {
      std::string all;
      for (const auto& s : songs) all += s.text + "\n%\n";
      data::write_file_atomic(dir + "/songs.txt", all);
    }
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::cout << fmt::format("prepared {} songs, vocab {} in {:.1f} s -> {}\n", songs.size(), p.info.vocab_size, secs, dir);
    print_table(p);
    const int failures = check_round_trips(dir, p, songs);
    std::cout << (failures ? fmt::format("{} check(s) FAILED\n", failures) : "all checks passed\n");
    if (!opt.check) std::cout << "status: training, sampling and the benchmark are not built yet (data preparation only)\n";
    return failures ? 1 : 0;
  });
}
