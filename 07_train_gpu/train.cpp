// Stage 07's trainer (train.h): schedule, batches, validation, diagnostics, the training loop; it saves and resumes
// through run_checkpoint.h. Nothing here knows which device holds the model: every model operation goes through
// the Backend.
#include "07_train_gpu/train.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <numeric>
#include <optional>
#include <sstream>

#include "04_aux_loss/aux_loss.h"
#include "07_train_gpu/run_checkpoint.h"
#include "common/diag.h"
#include "common/errors.h"
#include "common/rng.h"
#include "common/safetensors.h"

namespace dsv3 {

namespace fs = std::filesystem;

// ---- config and schedule ------------------------------------------------------------------------------------

// Each message names the command-line flag and the field (trainer_state.json's train_config holds the fields).
void TrainConfig::validate() const {
  auto at_least = [](auto v, auto lo, const char* name) {
    require(v >= lo, "{} must be >= {}, got {}", name, lo, v);
  };
  at_least(batch, 1, "--batch (batch)");
  at_least(seq_len, 1, "--seq-len (seq_len)");
  at_least(max_steps, int64_t(1), "--steps (max_steps)");
  // far above any run here; keeps step * batch * seq_len (tokens seen) and the schedule's arithmetic in range
  require(max_steps <= int64_t(1e12), "--steps (max_steps) must be <= 1e12, got {}", max_steps);
  require(batch <= (1 << 20) && seq_len <= (1 << 20), "--batch and --seq-len (batch, seq_len) must be <= 2^20, got "
          "{} and {}", batch, seq_len);
  require(std::isfinite(lr) && lr > 0, "--lr (lr) must be a positive number, got {}", lr);
  require(min_lr_ratio >= 0 && min_lr_ratio <= 1, "--min-lr-ratio (min_lr_ratio) must be in [0, 1], got {}",
          min_lr_ratio);
  require(warmup_steps >= 0 && warmup_steps <= max_steps, "--warmup (warmup_steps) must be in [0, --steps = {}], "
          "got {}", max_steps, warmup_steps);
  require(std::isfinite(weight_decay) && weight_decay >= 0, "--weight-decay (weight_decay) must be >= 0, got {}",
          weight_decay);
  require(beta1 >= 0 && beta1 < 1, "train config: beta1 must be in [0, 1), got {}", beta1);
  require(beta2 >= 0 && beta2 < 1, "train config: beta2 must be in [0, 1), got {}", beta2);
  require(std::isfinite(grad_clip) && grad_clip >= 0, "train config: grad_clip must be >= 0 (0 = off), got {}",
          grad_clip);
  at_least(eval_every, 1, "--eval-every (eval_every)");
  at_least(log_every, 1, "train config: log_every");
  at_least(ckpt_every, 0, "train config: ckpt_every");
  at_least(patience, 0, "--patience (patience)");
  require(std::isfinite(max_minutes) && max_minutes >= 0, "--max-minutes (max_minutes) must be >= 0 (0 = off), got "
          "{}", max_minutes);
}

Backend::StepPlan plan_step(const TrainConfig& c, int64_t step, int64_t update) {
  Backend::StepPlan p;
  p.opt.lr = float(lr_at(c, step));
  p.opt.beta1 = float(c.beta1);
  p.opt.beta2 = float(c.beta2);
  p.opt.weight_decay = float(c.weight_decay);
  p.grad_clip = c.grad_clip;
  p.update = update;
  return p;
}

void apply_update(Backend& b, const TrainConfig& c, int64_t step, double grad_norm, int64_t update) {
  const Backend::StepPlan p = plan_step(c, step, update);
  b.step(p.opt, clip_scale(p.grad_clip, grad_norm), update);
}

double lr_at(const TrainConfig& c, int64_t step) {
  step = std::max<int64_t>(step, 1);
  if (step <= c.warmup_steps) return c.lr * double(step) / double(c.warmup_steps);
  const double lo = c.lr * c.min_lr_ratio;
  const int64_t decay_steps = c.max_steps - c.warmup_steps;
  if (step >= c.max_steps || decay_steps <= 0) return lo;
  const double progress = double(step - c.warmup_steps) / double(decay_steps);  // (0, 1)
  return lo + (c.lr - lo) * 0.5 * (1.0 + std::cos(M_PI * progress));
}

// ---- batches ------------------------------------------------------------------------------------------------

Batcher::Batcher(const std::vector<uint16_t>& tokens, int B, int T, uint64_t seed)
    : tokens_(&tokens), B_(B), seq_(T), seed_(seed) {
  require(B >= 1 && T >= 1, "batcher: batch and seq_len must be >= 1, got {} and {}", B, T);
  require(int64_t(tokens.size()) >= int64_t(T) + 1,
          "the train split has {} tokens, fewer than one window of seq_len + 1 = {}: use a smaller seq_len or more "
          "data", tokens.size(), int64_t(T) + 1);
}

std::vector<int64_t> Batcher::epoch_starts(int64_t epoch) const {
  // 1) the epoch's own stream: the seed and the epoch number mixed (Rng's splitmix64 spreads it further)
  Rng rng(seed_ ^ (0x9E3779B97F4A7C15ull * (uint64_t(epoch) + 1)));
  // 2) the offset; o < n - T keeps at least one window
  const int64_t n = int64_t(tokens_->size()), T = seq_;
  const int64_t o = int64_t(rng.below(uint64_t(std::min(T, n - T))));
  const int64_t W = (n - 1 - o) / T;  // windows o + i*T .. o + i*T + T that end inside the split
  std::vector<int64_t> starts(static_cast<size_t>(W));
  for (int64_t i = 0; i < W; ++i) starts[size_t(i)] = o + i * T;
  // 3) Fisher-Yates
  for (int64_t i = W - 1; i > 0; --i) std::swap(starts[size_t(i)], starts[size_t(rng.below(uint64_t(i) + 1))]);
  return starts;
}

void Batcher::set_state(const BatcherState& s) {
  require(s.epoch >= 0 && s.cursor >= 0, "batcher state: epoch {} / cursor {} must be >= 0", s.epoch, s.cursor);
  const auto starts = epoch_starts(s.epoch);
  require(s.cursor <= int64_t(starts.size()), "batcher state: cursor {} is past the {} windows of epoch {}", s.cursor,
          starts.size(), s.epoch);
  state_ = s;
  cached_epoch_ = s.epoch;
  starts_ = starts;
}

std::vector<int> Batcher::next() {
  std::vector<int> out;
  out.reserve(size_t(B_) * (seq_ + 1));
  for (int b = 0; b < B_; ++b) {
    if (cached_epoch_ != state_.epoch) {
      starts_ = epoch_starts(state_.epoch);
      cached_epoch_ = state_.epoch;
    }
    if (state_.cursor == int64_t(starts_.size())) {  // epoch done: the batch runs on into the next one
      ++state_.epoch;
      state_.cursor = 0;
      starts_ = epoch_starts(state_.epoch);
      cached_epoch_ = state_.epoch;
    }
    const int64_t s = starts_[size_t(state_.cursor++)];
    out.insert(out.end(), tokens_->begin() + s, tokens_->begin() + s + seq_ + 1);
  }
  return out;
}

// ---- validation ---------------------------------------------------------------------------------------------

ValResult evaluate(Backend& backend, const std::vector<uint16_t>& val, int B, int T, const data::DataInfo& info,
                   Communicator* comm) {
  require(B >= 1 && T >= 1, "evaluate: batch and seq_len must be >= 1, got {} and {}", B, T);
  const int64_t W = int64_t(val.size()) > T ? (int64_t(val.size()) - 1) / T : 0;
  require(W >= 1, "the validation split has {} tokens, fewer than one window of seq_len + 1 = {}: use a smaller "
          "seq_len or a larger --val-fraction", val.size(), int64_t(T) + 1);
  require(info.val.tokens > 0 && info.val.bytes > 0, "data.json: the val split has {} tokens and {} bytes; bits per "
          "byte needs both > 0", info.val.tokens, info.val.bytes);
  // Every window of a depth has the same number of targets (T for the main model, T-k for MTP depth k), so the
  // mean over all targets is the window-weighted mean of the batch means.
  const int rank = comm ? comm->rank() : 0, ranks = comm ? comm->size() : 1;
  double ce_sum = 0;
  std::vector<double> mtp_sum(size_t(backend.config().num_nextn_predict_layers), 0.0);
  std::vector<int> tokens;
  for (int64_t j0 = 0; j0 < W; j0 += B) {
    // this rank's windows of the round [j0, j0 + t): a share of ceil(t / ranks); a rank whose share is empty (the
    // last round) runs window j0 and counts nothing, so that every rank makes the same forward calls (an
    // expert-parallel forward is a collective)
    const int64_t t = std::min<int64_t>(B, W - j0), share = (t + ranks - 1) / ranks;
    const int64_t lo = std::min(t, rank * share), hi = std::min(t, lo + share);
    const int b = int(std::max<int64_t>(hi - lo, 1));
    const int64_t first = hi > lo ? j0 + lo : j0;
    tokens.clear();
    for (int64_t j = first; j < first + b; ++j)
      tokens.insert(tokens.end(), val.begin() + j * T, val.begin() + j * T + T + 1);
    const double ce = backend.evaluate(tokens, b, T).ce;
    if (hi == lo) continue;
    ce_sum += ce * b;
    const auto mtp = backend.mtp_losses();
    for (size_t k = 0; k < mtp.size() && k < mtp_sum.size(); ++k) mtp_sum[k] += mtp[k] * b;
  }
  if (comm) {
    std::vector<double> sums = {ce_sum};
    sums.insert(sums.end(), mtp_sum.begin(), mtp_sum.end());
    comm->all_reduce_host(sums.data(), sums.size());
    ce_sum = sums[0];
    std::copy(sums.begin() + 1, sums.end(), mtp_sum.begin());
  }
  ValResult r;
  r.ce = ce_sum / double(W);
  for (double s : mtp_sum) r.mtp.push_back(s / double(W));
  r.tokens = W * T;
  r.bits_per_byte = r.ce / std::log(2.0) * (double(info.val.tokens) / double(info.val.bytes));
  return r;
}

// ---- diagnostics CSVs ---------------------------------------------------------------------------------------
namespace {

std::string num(double x) { return fmt::format("{:.9g}", x); }
std::string num(int64_t x) { return std::to_string(x); }

// A CSV file appended row by row (flushed each time, so a crash keeps what was written). Started afresh, or on
// resume kept up to the rows whose step (first column) is <= keep_step.
class CsvLog {
 public:
  CsvLog(const std::string& path, const std::vector<std::string>& header, bool resume, int64_t keep_step)
      : path_(path), ncols_(header.size()) {
    std::string head;
    for (size_t i = 0; i < header.size(); ++i) head += (i ? "," : "") + header[i];
    std::string kept = head + "\n";
    if (resume && fs::exists(path)) {
      std::istringstream in(read_file(path, "diagnostics file"));
      std::string line;
      if (std::getline(in, line) && line == head)
        while (std::getline(in, line))
          if (!line.empty() && std::strtoll(line.c_str(), nullptr, 10) <= keep_step) kept += line + "\n";
    }
    write_file_atomic(path, kept);
    f_.open(path, std::ios::app);
    require(f_.good(), "cannot append to '{}'", path);
  }
  void row(const std::vector<std::string>& cells) {
    require(cells.size() == ncols_, "CSV '{}': row has {} cells, header has {}", path_, cells.size(), ncols_);
    for (size_t i = 0; i < cells.size(); ++i) f_ << (i ? "," : "") << cells[i];
    f_ << "\n" << std::flush;
    require(f_.good(), "writing '{}' failed (disk full?)", path_);
  }

 private:
  std::string path_;
  size_t ncols_;
  std::ofstream f_;
};

std::string fmt_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "-";
  const int64_t t = int64_t(std::llround(s));
  if (t >= 3600) return fmt::format("{}h{:02}m", t / 3600, (t % 3600) / 60);
  if (t >= 60) return fmt::format("{}m{:02}s", t / 60, t % 60);
  return fmt::format("{}s", t);
}

std::string fmt_rate(double x) {
  if (x >= 1e6) return fmt::format("{:.2f}M", x / 1e6);
  if (x >= 1e3) return fmt::format("{:.0f}k", x / 1e3);
  return fmt::format("{:.0f}", x);
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t m = v.size() / 2;
  return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

// The progress line: rewritten in place on a terminal, else printed as lines; other lines first end it.
class Progress {
 public:
  Progress(std::ostream& out, bool tty) : out_(out), tty_(tty) {}
  void status(const std::string& line) {
    if (tty_) {
      out_ << "\r" << line << std::string(line.size() < width_ ? width_ - line.size() : 0, ' ') << std::flush;
      width_ = line.size();
      open_ = true;
    } else {
      out_ << line << "\n" << std::flush;
    }
  }
  void line(const std::string& text) {
    end_status();
    out_ << text << "\n" << std::flush;
  }
  void end_status() {
    if (open_) out_ << "\n";
    open_ = false;
    width_ = 0;
  }
  bool tty() const { return tty_; }

 private:
  std::ostream& out_;
  bool tty_;
  bool open_ = false;
  size_t width_ = 0;
};

constexpr int kMaxBadSteps = 5;  // consecutive non-finite steps before training is declared diverged

}  // namespace

// ---- the run ------------------------------------------------------------------------------------------------
namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// One call of train(): the state, the files and the per-step work, in the order a step does them.
class Run {
 public:
  Run(Backend& backend, const data::Prepared& data, const TrainConfig& cfg, const std::string& run_dir, bool resume,
      std::ostream& out, const TrainHooks& hooks)
      : backend_(backend), data_(data), cfg_(cfg), mc_(backend.config()), out_(out), hooks_(hooks),
        last_dir_(checkpoint_dir(run_dir, "last")), best_dir_(checkpoint_dir(run_dir, "best")),
        batcher_(data.train, cfg.batch, cfg.seq_len, cfg.seed),
        progress_(out, hooks.tty >= 0 ? hooks.tty == 1 : (&out == &std::cout && ::isatty(STDOUT_FILENO))),
        rank_(hooks.comm ? hooks.comm->rank() : 0), ranks_(hooks.comm ? hooks.comm->size() : 1) {
    start_state(run_dir, resume);
    batcher_.set_state(st_.batcher);
    if (leader()) {
      ensure_dir(run_dir + "/checkpoints");
      open_logs(run_dir, resume);
    }
    first_step_ = st_.step;
    elapsed_before_ = st_.elapsed_s;
    res_.stop_reason = "max_steps";
  }

  TrainResult run() {
    if (st_.step >= cfg_.max_steps)
      progress_.line(fmt::format("step {} >= max_steps {}: nothing to train (raise max_steps to go on)", st_.step,
                                 cfg_.max_steps));
    while (st_.step < cfg_.max_steps) {
      const StepRecord rec = train_step();
      const auto counts = backend_.expert_counts();  // this step's routing, before validation routes other tokens
      log_step(rec, counts);
      bool stop = stop_requested();
      const bool at_end = stop || rec.step == cfg_.max_steps;
      bool val_finite = true;
      if (rec.step % cfg_.eval_every == 0 || at_end) {
        log_expert_load(rec.step, counts);
        val_finite = validate(rec.step);
        if (!stop && patience_ran_out()) stop = true;
      }
      const int every = cfg_.ckpt_every > 0 ? cfg_.ckpt_every : cfg_.eval_every;
      if (at_end || stop || rec.step % every == 0) save_last(val_finite);
      show_progress(rec, at_end || stop);
      if (stop) break;
    }
    progress_.end_status();
    return finish();
  }

 private:
  // 1) fresh (the run folder must hold no checkpoint) or from the last checkpoint
  void start_state(const std::string& run_dir, bool resume) {
    if (resume) {
      const Resumed r = resume_run_checkpoint(run_dir, backend_, data_.info);
      st_ = r.state;
      for (const std::string& note : r.notes) out_ << "resume: " << note << "\n";
      for (const std::string& change : resume_config_changes(st_.config, cfg_)) out_ << change << "\n";
      out_ << fmt::format("resumed {} at step {} ({} updates, best val ce {} at step {})\n", r.dir, st_.step,
                          st_.updates,
                          st_.best_step >= 0 ? fmt::format("{:.4f}", st_.best_val_ce) : "-", st_.best_step);
    } else {
      // a complete checkpoint (any of last/best and their .old/.tmp) must be resumed; an incomplete .tmp, left by
      // a run killed while writing its first checkpoint, is not one (the next save replaces it)
      for (const auto& d : {last_dir_, best_dir_}) {
        const auto found = newest_complete_checkpoint(d);
        const std::string shown = found ? *found : fs::exists(d) ? d : d + ".old";
        require(!found && !fs::exists(d) && !fs::exists(d + ".old"), "the run folder already holds a checkpoint "
                "({}): add --resume to continue it, or give another folder with --run", shown);
      }
      st_.vocab_size = data_.info.vocab_size;
      st_.train_tokens = data_.info.train.tokens;
      st_.val_tokens = data_.info.val.tokens;
      st_.train_bytes = data_.info.train.bytes;
      st_.val_bytes = data_.info.val.bytes;
    }
    st_.config = cfg_;
  }

  void open_logs(const std::string& run_dir, bool resume) {
    std::vector<std::string> train_cols = {"step", "lr", "loss", "ce", "mtp"}, val_cols = {"step", "val_ce", "val_bpb"};
    for (int k = 1; k <= depth(); ++k) {
      train_cols.push_back(fmt::format("mtp_d{}", k));
      val_cols.push_back(fmt::format("val_mtp_d{}", k));
    }
    train_cols.insert(train_cols.end(), {"balance", "grad_norm", "maxvio"});
    if (mtp_is_moe()) train_cols.push_back("maxvio_mtp");
    train_cols.insert(train_cols.end(), {"tokens_per_s", "elapsed_s"});
    val_cols.insert(val_cols.end(), {"train_ce", "best"});
    train_csv_.emplace(run_dir + "/train.csv", train_cols, resume, st_.step);
    val_csv_.emplace(run_dir + "/val.csv", val_cols, resume, st_.step);
    load_csv_.emplace(run_dir + "/expert_load.csv", std::vector<std::string>{"step", "layer", "expert", "load"},
                      resume, st_.step);
  }

  // 2) one step: batch, forward + backward, norm; clip and update, or skip a non-finite step
  StepRecord train_step() {
    const int64_t step = st_.step + 1;
    lr_ = lr_at(cfg_, step);
    std::vector<int> tokens = batcher_.next();
    const int b = cfg_.batch / ranks_;  // this rank's share of the batch: rows [rank * b, rank * b + b)
    if (ranks_ > 1) {
      const size_t row = size_t(cfg_.seq_len) + 1;
      tokens = std::vector<int>(tokens.begin() + std::ptrdiff_t(size_t(rank_) * b * row),
                                tokens.begin() + std::ptrdiff_t(size_t(rank_ + 1) * b * row));
    }
    const auto t0 = Clock::now();
    StepRecord rec;
    rec.step = step;
    const Backend::StepResult r = backend_.train_step(tokens, b, cfg_.seq_len, plan_step(cfg_, step, st_.updates + 1));
    rec.losses = r.losses;
    rec.grad_norm = r.grad_norm;
    rec.skipped = r.skipped;
    if (!rec.skipped) {
      ++st_.updates;
      bad_in_a_row_ = 0;
      st_.train_ce_sum += rec.losses.ce;
      ++st_.train_ce_count;
    } else {
      ++bad_in_a_row_;
      ++st_.skipped_steps;
    }
    step_times_.push_back(seconds_since(t0));
    st_.step = step;
    st_.batcher = batcher_.state();
    res_.history.push_back(rec);
    return rec;
  }

  // 3) train.csv; a skipped step's warning, and the divergence stop
  void log_step(const StepRecord& rec, const std::vector<std::vector<int>>& counts) {
    const std::vector<double> mtp = backend_.mtp_losses();
    const ModelLosses& L = rec.losses;
    std::vector<std::string> row = {num(rec.step), num(lr_), num(L.total()), num(L.ce), num(L.mtp)};
    for (int k = 0; k < depth(); ++k) row.push_back(num(k < int(mtp.size()) ? mtp[size_t(k)] : NAN));
    row.insert(row.end(), {num(L.balance), num(rec.grad_norm), num(mean_maxvio(counts, 0, mc_.num_hidden_layers))});
    if (mtp_is_moe()) row.push_back(num(mean_maxvio(counts, mc_.num_hidden_layers, int(counts.size()))));
    row.insert(row.end(), {num(tokens_per_step() / step_times_.back()), num(elapsed())});
    if (train_csv_) train_csv_->row(row);
    if (!rec.skipped) return;
    progress_.line(fmt::format("step {}: non-finite loss ({}) or gradient norm ({}): update skipped ({} in a row, "
                               "{} in total)", rec.step, L.total(), rec.grad_norm, bad_in_a_row_, st_.skipped_steps));
    if (bad_in_a_row_ >= kMaxBadSteps)
      throw UserError(fmt::format(
          "training diverged: {} steps in a row (up to step {}) had a non-finite loss or gradient norm; the last good "
          "checkpoint ({}) is untouched: lower the learning rate (lr {:.3g}) or lengthen the warm-up",
          bad_in_a_row_, rec.step, fs::exists(last_dir_) ? last_dir_ : "none saved yet", cfg_.lr));
  }

  // With a group, every rank's wish is summed, so all stop at the same step (a rank that stopped alone would
  // leave the others waiting in the next step's all-reduce).
  bool stop_requested() {
    double want[2] = {hooks_.stop && hooks_.stop->load() ? 1.0 : 0.0,
                      cfg_.max_minutes > 0 && seconds_since(t_start_) >= cfg_.max_minutes * 60 ? 1.0 : 0.0};
    if (hooks_.comm) hooks_.comm->all_reduce_host(want, 2);
    if (want[0] > 0) {
      res_.stop_reason = "stopped";
      return true;
    }
    if (want[1] > 0) {
      res_.stop_reason = "max_minutes";
      return true;
    }
    return false;
  }

  // MaxVio of layers [l0, l1), averaged over those that are MoE layers (0 when none is).
  static double mean_maxvio(const std::vector<std::vector<int>>& counts, int l0, int l1) {
    double sum = 0;
    int n = 0;
    for (int l = l0; l < l1 && l < int(counts.size()); ++l)
      if (!counts[size_t(l)].empty()) {
        sum += max_violation(counts[size_t(l)].data(), int(counts[size_t(l)].size()));
        ++n;
      }
    return n ? sum / n : 0.0;
  }
  bool mtp_is_moe() const { return depth() > 0 && mc_.is_moe_layer(mc_.num_hidden_layers); }

  // 4) expert_load.csv: each MoE layer's share of routed slots per expert in this step's batch (layer L + k is
  //    MTP module k's block, the checkpoint's numbering)
  void log_expert_load(int64_t step, const std::vector<std::vector<int>>& counts) {
    for (size_t l = 0; l < counts.size(); ++l) {
      const int64_t slots = std::accumulate(counts[l].begin(), counts[l].end(), int64_t(0));
      for (size_t e = 0; e < counts[l].size() && load_csv_; ++e)
        load_csv_->row({num(step), num(int64_t(l)), num(int64_t(e)),
                        num(double(counts[l][e]) / double(std::max<int64_t>(slots, 1)))});
    }
  }

  // 5) validation: val.csv, the eval line, the best checkpoint. Returns whether the val loss is finite.
  bool validate(int64_t step) {
    const ValResult v = evaluate(backend_, data_.val, cfg_.batch, cfg_.seq_len, data_.info, hooks_.comm);
    const bool finite = std::isfinite(v.ce);
    const double train_ce = st_.train_ce_count ? st_.train_ce_sum / double(st_.train_ce_count) : NAN;
    const bool best = finite && bad_in_a_row_ == 0 && v.ce < st_.best_val_ce;
    std::vector<std::string> row = {num(step), num(v.ce), num(v.bits_per_byte)};
    for (int k = 0; k < depth(); ++k) row.push_back(num(k < int(v.mtp.size()) ? v.mtp[size_t(k)] : NAN));
    row.insert(row.end(), {num(train_ce), num(int64_t(best))});
    if (val_csv_) val_csv_->row(row);
    std::string mtp_text;
    for (size_t k = 0; k < v.mtp.size(); ++k) mtp_text += fmt::format(" | mtp d{} {:.4f}", k + 1, v.mtp[k]);
    progress_.line(fmt::format("eval step {} | val ce {:.4f} | {:.4f} bpb{} | train ce {:.4f}{}", step, v.ce,
                               v.bits_per_byte, mtp_text, train_ce, best ? " | new best" : ""));
    val_text_ = fmt::format("{:.3f} ({:.2f} bpb)", v.ce, v.bits_per_byte);
    res_.final_train_ce = train_ce;
    st_.train_ce_sum = 0;
    st_.train_ce_count = 0;
    st_.last_eval_step = step;
    if (best) {
      st_.best_val_ce = v.ce;
      st_.best_val_bpb = v.bits_per_byte;
      st_.best_step = step;
      st_.evals_since_best = 0;
      save(best_dir_);  // when refused, trainer_state.json of the next last checkpoint still names this step as
                        // best; `sample` then reads the best folder as it is (the previous best)
    } else {
      ++st_.evals_since_best;
    }
    if (!finite) progress_.line(fmt::format("step {}: the validation loss is not finite", step));
    return finite;
  }

  bool patience_ran_out() {
    if (cfg_.patience == 0 || st_.evals_since_best < cfg_.patience) return false;
    res_.stop_reason = "patience";
    progress_.line(fmt::format("no new best val ce in {} evaluations (patience): stopping", st_.evals_since_best));
    return true;
  }

  // 6) the last checkpoint, unless the model is in a non-finite streak: the last good one stays
  void save_last(bool val_finite) {
    if (bad_in_a_row_ == 0 && val_finite)
      save(last_dir_);
    else
      progress_.line(fmt::format("step {}: last checkpoint not updated (non-finite values)", st_.step));
  }

  // Returns false, keeping the previous checkpoint, when the weights or moments hold a NaN or an infinity. Rank 0
  // alone writes (every rank holds the same weights and moments).
  bool save(const std::string& dir) {
    st_.elapsed_s = elapsed();
    if (!leader()) return true;
    if (save_run_checkpoint(dir, backend_, st_)) return true;
    progress_.line(fmt::format("step {}: checkpoint {} not written: the weights or moments hold a non-finite value "
                               "(the previous one is kept)", st_.step, dir));
    return false;
  }

  void show_progress(const StepRecord& rec, bool last) {
    const int64_t every = progress_.tty() ? cfg_.log_every : std::max(cfg_.log_every, std::max(1, cfg_.eval_every / 5));
    if (rec.step % every != 0 && !last) return;
    const double per_step = seconds_since(t_start_) / double(rec.step - first_step_);  // evaluations included
    progress_.status(fmt::format("step {}/{} | ce {:.3f} | val {} | lr {:.1e} | {} tok/s | ETA {}", rec.step,
                                 cfg_.max_steps, rec.losses.ce, val_text_, lr_, fmt_rate(tokens_per_s()),
                                 fmt_duration(per_step * double(cfg_.max_steps - rec.step))));
  }

  TrainResult finish() {
    res_.steps_done = st_.step;
    res_.best_val_ce = st_.best_val_ce;
    res_.best_val_bpb = st_.best_val_bpb;
    res_.best_step = st_.best_step;
    res_.tokens_per_s = tokens_per_s();
    res_.elapsed_s = elapsed();
    res_.skipped_steps = st_.skipped_steps;
    out_ << fmt::format("done ({}) at step {}: best val ce {:.4f} ({:.4f} bpb) at step {}, {} tok/s, {} in all, {} "
                        "skipped steps\n", res_.stop_reason, res_.steps_done, res_.best_val_ce, res_.best_val_bpb,
                        res_.best_step, fmt_rate(res_.tokens_per_s), fmt_duration(res_.elapsed_s),
                        res_.skipped_steps);
    return res_;
  }

  int depth() const { return mc_.num_nextn_predict_layers; }
  bool leader() const { return rank_ == 0; }
  double tokens_per_step() const { return double(cfg_.batch) * cfg_.seq_len; }
  double elapsed() const { return elapsed_before_ + seconds_since(t_start_); }
  // Median over this call's steps after the first 3 (warm-up: allocations, caches), all of them when fewer.
  double tokens_per_s() const {
    if (step_times_.empty()) return 0;
    const size_t skip = step_times_.size() > 3 ? 3 : 0;
    return tokens_per_step() / median(std::vector<double>(step_times_.begin() + skip, step_times_.end()));
  }

  Backend& backend_;
  const data::Prepared& data_;
  const TrainConfig cfg_;
  const ModelConfig& mc_;
  std::ostream& out_;
  const TrainHooks& hooks_;
  const std::string last_dir_, best_dir_;
  const Clock::time_point t_start_ = Clock::now();
  Batcher batcher_;
  Progress progress_;
  std::optional<CsvLog> train_csv_, val_csv_, load_csv_;
  TrainerState st_;
  TrainResult res_;
  int64_t first_step_ = 0;
  double elapsed_before_ = 0;  // elapsed_s of the earlier calls (resume)
  int bad_in_a_row_ = 0;
  double lr_ = 0;
  std::vector<double> step_times_;  // forward + backward + update of each step of this call, seconds
  std::string val_text_ = "-";
  const int rank_, ranks_;  // data parallel: this rank and the group's size (0 and 1 alone)
};

// The run of one rank, the backend in the hooks' group for its length.
TrainResult train_rank(Backend& backend, const data::Prepared& data, const TrainConfig& cfg, const std::string& run_dir,
                       bool resume, std::ostream& out, const TrainHooks& hooks) {
  struct Group {  // the backend leaves the group however the run ends
    Backend& b;
    ~Group() { b.set_communicator(nullptr); }
  } group{backend};
  backend.set_communicator(hooks.comm, hooks.expert_parallel && hooks.comm);
  return Run(backend, data, cfg, run_dir, resume, out, hooks).run();
}

}  // namespace

TrainResult train(Backend& backend, const data::Prepared& data, const TrainConfig& cfg, const std::string& run_dir,
                  bool resume, std::ostream& out, const TrainHooks& hooks) {
  cfg.validate();
  const ModelConfig& mc = backend.config();
  require(data.info.vocab_size == mc.vocab_size, "the data's vocabulary has {} tokens but the model's vocab_size is "
          "{}: build the model config for this data (run_model_config)", data.info.vocab_size, mc.vocab_size);
  require(cfg.seq_len <= mc.max_position_embeddings, "seq_len {} exceeds the model's max_position_embeddings {}",
          cfg.seq_len, mc.max_position_embeddings);
  Communicator* comm = hooks.comm;
  if (comm) {
    require(cfg.batch % comm->size() == 0, "--batch {} is not a multiple of the {} GPUs: every GPU takes batch / GPUs "
            "windows of each batch", cfg.batch, comm->size());
    if (comm->rank() != 0) {  // only rank 0 speaks and writes
      std::ostream silent(nullptr);
      TrainHooks quiet = hooks;
      quiet.plots_script.clear();
      quiet.tty = 0;
      return train_rank(backend, data, cfg, run_dir, resume, silent, quiet);
    }
  }
  ensure_dir(run_dir);
  TrainResult res = train_rank(backend, data, cfg, run_dir, resume, out, hooks);
  if (!hooks.plots_script.empty()) render_plots(hooks.plots_script, run_dir);
  return res;
}

ModelConfig run_model_config(const std::string& preset_or_path, int vocab_size, int seq_len) {
  require(vocab_size > 0 && seq_len > 0, "run_model_config: vocab_size {} and seq_len {} must be > 0", vocab_size,
          seq_len);
  const auto presets = config_preset_names();
  ModelConfig c;
  if (std::find(presets.begin(), presets.end(), preset_or_path) != presets.end()) {
    c = config_preset(preset_or_path);
    c.vocab_size = vocab_size;
  } else {
    const std::string path = fs::is_directory(preset_or_path) ? preset_or_path + "/config.json" : preset_or_path;
    std::string names;
    for (const auto& n : presets) names += (names.empty() ? "" : ", ") + n;
    require(fs::is_regular_file(path), "model '{}' is neither a preset ({}) nor a config.json file", preset_or_path,
            names);
    c = load_config(path);
    require(c.vocab_size == vocab_size, "{}: vocab_size is {} but the data's tokenizer has {} tokens: use a config "
            "made for this data, or a preset (its vocab_size is set from the data)", path, c.vocab_size, vocab_size);
  }
  require(seq_len <= kMaxPositions, "--seq-len {} is longer than this implementation supports (at most {} positions)",
          seq_len, kMaxPositions);
  c.max_position_embeddings = std::max(c.max_position_embeddings, seq_len);
  c.validate();
  return c;
}

}  // namespace dsv3
