// Stage 07's run checkpoint (run_checkpoint.h): trainer_state.json written and validated, the folder saved with an
// atomic swap, and read back with every file checked against the run before anything is loaded.
#include "07_train_gpu/run_checkpoint.h"

#include <fmt/format.h>

#include <algorithm>
#include <filesystem>
#include <optional>
#include <nlohmann/json.hpp>

#include "06_full_model/checkpoint.h"
#include "06_full_model/model_config.h"
#include "common/diag.h"
#include "common/errors.h"
#include "common/finite.h"
#include "common/json_field.h"
#include "common/safetensors.h"

namespace dsv3 {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

json config_json(const TrainConfig& c) {
  return {{"batch", c.batch},
          {"seq_len", c.seq_len},
          {"max_steps", c.max_steps},
          {"lr", c.lr},
          {"min_lr_ratio", c.min_lr_ratio},
          {"warmup_steps", c.warmup_steps},
          {"weight_decay", c.weight_decay},
          {"beta1", c.beta1},
          {"beta2", c.beta2},
          {"grad_clip", c.grad_clip},
          {"eval_every", c.eval_every},
          {"log_every", c.log_every},
          {"ckpt_every", c.ckpt_every},
          {"seed", c.seed},
          {"patience", c.patience},
          {"max_minutes", c.max_minutes}};
}

TrainConfig config_from_json(const json& j, const std::string& where) {
  TrainConfig c;
  c.batch = json_field<int>(j, "batch", where);
  c.seq_len = json_field<int>(j, "seq_len", where);
  c.max_steps = json_field<int64_t>(j, "max_steps", where);
  c.lr = json_field<double>(j, "lr", where);
  c.min_lr_ratio = json_field<double>(j, "min_lr_ratio", where);
  c.warmup_steps = json_field<int64_t>(j, "warmup_steps", where);
  c.weight_decay = json_field<double>(j, "weight_decay", where);
  c.beta1 = json_field<double>(j, "beta1", where);
  c.beta2 = json_field<double>(j, "beta2", where);
  c.grad_clip = json_field<double>(j, "grad_clip", where);
  c.eval_every = json_field<int>(j, "eval_every", where);
  c.log_every = json_field<int>(j, "log_every", where);
  c.ckpt_every = json_field<int>(j, "ckpt_every", where);
  c.seed = json_field<uint64_t>(j, "seed", where);
  c.patience = json_field<int>(j, "patience", where);
  c.max_minutes = json_field<double>(j, "max_minutes", where);
  try {
    c.validate();
  } catch (const UserError& e) {
    throw UserError(fmt::format("{}: {}", where, e.what()));
  }
  return c;
}

std::string state_to_json(const TrainerState& s) {
  json j;
  j["format_version"] = kTrainerStateVersion;
  j["step"] = s.step;
  j["updates"] = s.updates;
  j["batcher"] = {{"epoch", s.batcher.epoch}, {"cursor", s.batcher.cursor}};
  j["best"] = {{"step", s.best_step}};
  if (s.best_step >= 0) {
    j["best"]["val_ce"] = s.best_val_ce;
    j["best"]["val_bpb"] = s.best_val_bpb;
  }
  j["evals_since_best"] = s.evals_since_best;
  j["last_eval_step"] = s.last_eval_step;
  j["train_ce_sum"] = s.train_ce_sum;  // doubles are written with 17 digits: they read back bitwise
  j["train_ce_count"] = s.train_ce_count;
  j["skipped_steps"] = s.skipped_steps;
  j["elapsed_s"] = s.elapsed_s;
  j["train_config"] = config_json(s.config);
  j["data"] = {{"vocab_size", s.vocab_size},   {"train_tokens", s.train_tokens}, {"val_tokens", s.val_tokens},
               {"train_bytes", s.train_bytes}, {"val_bytes", s.val_bytes}};
  return j.dump(2) + "\n";
}

TrainerState state_from_json(const std::string& text, const std::string& where) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {  // parse_error, and out_of_range for a number like 1e400
    throw UserError(fmt::format("{}: not valid JSON ({}); the checkpoint is damaged", where, e.what()));
  }
  require(j.is_object(), "{}: expected a JSON object", where);
  const int version = json_field<int>(j, "format_version", where);
  require(version == kTrainerStateVersion, "{}: format_version {} is not the {} this build reads", where, version,
          kTrainerStateVersion);
  TrainerState s;
  s.step = json_field<int64_t>(j, "step", where);
  s.updates = json_field<int64_t>(j, "updates", where);
  const auto b = json_field<json>(j, "batcher", where);
  s.batcher.epoch = json_field<int64_t>(b, "epoch", where + " batcher");
  s.batcher.cursor = json_field<int64_t>(b, "cursor", where + " batcher");
  const auto best = json_field<json>(j, "best", where);
  s.best_step = json_field<int64_t>(best, "step", where + " best");
  if (s.best_step >= 0) {
    s.best_val_ce = json_field<double>(best, "val_ce", where + " best");
    s.best_val_bpb = json_field<double>(best, "val_bpb", where + " best");
  }
  s.evals_since_best = json_field<int64_t>(j, "evals_since_best", where);
  s.last_eval_step = json_field<int64_t>(j, "last_eval_step", where);
  s.train_ce_sum = json_field<double>(j, "train_ce_sum", where);
  s.train_ce_count = json_field<int64_t>(j, "train_ce_count", where);
  s.skipped_steps = json_field<int64_t>(j, "skipped_steps", where);
  s.elapsed_s = json_field<double>(j, "elapsed_s", where);
  s.config = config_from_json(json_field<json>(j, "train_config", where), where + " train_config");
  const auto d = json_field<json>(j, "data", where);
  s.vocab_size = json_field<int>(d, "vocab_size", where + " data");
  s.train_tokens = json_field<int64_t>(d, "train_tokens", where + " data");
  s.val_tokens = json_field<int64_t>(d, "val_tokens", where + " data");
  s.train_bytes = json_field<int64_t>(d, "train_bytes", where + " data");
  s.val_bytes = json_field<int64_t>(d, "val_bytes", where + " data");
  // every field in its range, and the counters consistent with each other and with the run's own config
  auto check = [&where](bool ok, const std::string& what) {
    require(ok, "{}: {}; the checkpoint is damaged (resume from another one, or start a new run)", where, what);
  };
  check(s.step >= 0 && s.step <= s.config.max_steps,
        fmt::format("step {} is outside [0, max_steps = {}] of the run it belongs to", s.step, s.config.max_steps));
  check(s.updates >= 0 && s.skipped_steps >= 0 && s.updates + s.skipped_steps == s.step,
        fmt::format("updates {} + skipped steps {} must make the step {}", s.updates, s.skipped_steps, s.step));
  check(s.best_step >= -1 && s.best_step <= s.step, fmt::format("best step {} is outside [-1, {}]", s.best_step,
                                                                s.step));
  check(s.best_step < 0 || (s.best_val_ce >= 0 && s.best_val_bpb >= 0),
        fmt::format("best val ce {} / bpb {} must be >= 0", s.best_val_ce, s.best_val_bpb));
  check(s.last_eval_step >= 0 && s.last_eval_step <= s.step,
        fmt::format("last eval step {} is outside [0, {}]", s.last_eval_step, s.step));
  check(s.evals_since_best >= 0 && s.evals_since_best <= s.step,
        fmt::format("evals since best {} is outside [0, {}]", s.evals_since_best, s.step));
  check(s.train_ce_count >= 0 && s.train_ce_count <= s.step && s.train_ce_sum >= 0,
        fmt::format("train ce sum {} over {} steps is not a sum of losses of step {}", s.train_ce_sum,
                    s.train_ce_count, s.step));
  check(s.elapsed_s >= 0, fmt::format("elapsed time {} s is negative", s.elapsed_s));
  check(s.batcher.epoch >= 0 && s.batcher.epoch <= s.step * int64_t(s.config.batch) && s.batcher.cursor >= 0 &&
            s.batcher.cursor <= s.train_tokens,
        fmt::format("batcher position (epoch {}, cursor {}) is beyond what {} steps of {} windows over {} train "
                    "tokens can reach", s.batcher.epoch, s.batcher.cursor, s.step, s.config.batch, s.train_tokens));
  check(s.vocab_size > 0 && s.train_tokens > 0 && s.val_tokens > 0 && s.train_bytes > 0 && s.val_bytes > 0,
        "its data counts must be positive");
  return s;
}

// The first key path where two JSON values differ ("" when equal).
bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string first_difference(const json& a, const json& b, const std::string& path = "") {
  if (a.is_object() && b.is_object()) {
    for (const auto& [k, v] : a.items()) {
      if (!b.contains(k)) return path + k;
      const std::string d = first_difference(v, b.at(k), path + k + ".");
      if (!d.empty()) return d;
    }
    for (const auto& [k, v] : b.items())
      if (!a.contains(k)) return path + k;
    return "";
  }
  return a == b ? "" : (path.empty() ? "(value)" : path.substr(0, path.size() - 1));
}

}  // namespace

std::string checkpoint_dir(const std::string& run_dir, const std::string& name) {
  return run_dir + "/checkpoints/" + name;
}

std::string run_tokenizer_path(const std::string& checkpoint_dir) {
  fs::path p(checkpoint_dir);
  if (!p.has_filename()) p = p.parent_path();  // a trailing '/'
  return (p.parent_path().parent_path() / kTokenizerFile).string();
}

std::optional<CheckpointTokenizer> checkpoint_tokenizer(const std::string& dir) {
  std::error_code ec;
  const std::string own = (fs::path(dir) / kTokenizerFile).string(), run = run_tokenizer_path(dir);
  if (fs::exists(own, ec)) return CheckpointTokenizer{own, true};  // whatever it is: its loader names the problem
  if (fs::exists(run, ec)) return CheckpointTokenizer{run, false};
  return std::nullopt;
}

namespace {
// The swap that makes the complete <dir>.tmp the checkpoint: at every moment one of <dir>, <dir>.old, <dir>.tmp is a
// complete checkpoint, and the newest complete one is the newest checkpoint (resolve_checkpoint).
void swap_in(const std::string& dir) {
  const std::string tmp = dir + ".tmp", old = dir + ".old";
  if (fs::exists(dir)) {
    remove_or_throw(old);
    rename_or_throw(dir, old);
  }
  rename_or_throw(tmp, dir);
  fsync_path(fs::path(dir).parent_path().string());
  remove_or_throw(old);
}
}  // namespace

bool save_run_checkpoint(const std::string& dir, const Backend& backend, const TrainerState& state) {
  const std::string tmp = dir + ".tmp";
  // 0) never write a checkpoint that holds a NaN or an infinity: the previous one stays
  const TensorMap weights = backend.weights(), moments = backend.optimizer_state();
  for (const TensorMap* m : {&weights, &moments})
    for (const auto& [name, v] : *m)
      if (first_non_finite(v.data(), int64_t(v.size())) >= 0) return false;
  // 1) the complete checkpoint in <dir>.tmp; each writer fsyncs its file and the folder; trainer_state.json is
  //    written last, so a <dir>.tmp that holds it is complete
  remove_or_throw(tmp);
  ensure_dir(tmp);
  save_checkpoint(tmp, backend.config(), weights, DType::F32);
  SafetensorsWriter w;
  for (const auto& [name, v] : moments) w.add_f32(name, {int64_t(v.size())}, v.data());
  w.set_metadata("format", "nano-dsv3 AdamW moments (exp_avg, exp_avg_sq) per model.py tensor");
  w.write(tmp + "/optimizer.safetensors");
  std::error_code ec;
  if (const std::string tok = run_tokenizer_path(dir); fs::exists(tok, ec))
    write_file_atomic(tmp + "/" + kTokenizerFile, read_file(tok, "tokenizer model"));
  write_file_atomic(tmp + "/trainer_state.json", state_to_json(state));
  fsync_path(tmp);
  // 2) the swap
  swap_in(dir);
  return true;
}

namespace {

// The step of a complete checkpoint folder (a folder with a valid trainer_state.json: it is written last), or
// nothing.
std::optional<int64_t> complete_step(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec) || !fs::is_regular_file(dir + "/trainer_state.json", ec)) return std::nullopt;
  try {
    const std::string path = dir + "/trainer_state.json";
    return state_from_json(read_file(path, "trainer state", kMaxJsonBytes), path).step;
  } catch (const UserError&) {
    return std::nullopt;
  }
}

}  // namespace

std::optional<std::string> newest_complete_checkpoint(const std::string& dir) {
  std::optional<std::string> best;
  int64_t best_step = -1;
  for (const std::string& d : {dir, dir + ".old", dir + ".tmp"})  // on equal steps the earlier name wins
    if (const auto step = complete_step(d); step && *step > best_step) {
      best = d;
      best_step = *step;
    }
  return best;
}

std::string resolve_checkpoint(const std::string& dir) {
  if (const auto d = newest_complete_checkpoint(dir)) return *d;
  if (fs::is_directory(dir)) return dir;  // no trainer state (e.g. a stage 06 checkpoint): its loader says what
  throw UserError(fmt::format("no checkpoint at '{}' (nor a complete '{}.old' or '{}.tmp')", dir, dir, dir));
}

TrainerState read_trainer_state(const std::string& dir) {
  const std::string path = resolve_checkpoint(dir) + "/trainer_state.json";
  return state_from_json(read_file(path, "trainer state", kMaxJsonBytes), path);
}

namespace {

// load_run_checkpoint of exactly the folder d.
TrainerState load_folder(const std::string& d, Backend& backend, const data::DataInfo& info) {
  // 1) the trainer state, and that it was trained on this data
  const std::string state_path = d + "/trainer_state.json";
  const TrainerState st = state_from_json(read_file(state_path, "trainer state", kMaxJsonBytes), state_path);
  require(st.vocab_size == info.vocab_size && st.train_tokens == info.train.tokens &&
              st.val_tokens == info.val.tokens && st.train_bytes == info.train.bytes && st.val_bytes == info.val.bytes,
          "{}: the checkpoint was trained on other data (vocab {}, {} train / {} val tokens; this data: vocab {}, "
          "{} / {}): resume with the data it was trained on, or start a new run",
          state_path, st.vocab_size, st.train_tokens, st.val_tokens, info.vocab_size, info.train.tokens,
          info.val.tokens);
  // 2) the model: config.json must describe the backend's model; model.safetensors is validated by stage 06
  const Checkpoint ck = load_checkpoint(d);
  const std::string diff =
      first_difference(json::parse(config_to_json_text(ck.config)), json::parse(config_to_json_text(backend.config())));
  require(diff.empty(), "{}/config.json: the checkpoint's model differs from this run's model in '{}': build the "
          "model from this config.json to resume", d, diff);
  // 3) the moments: exactly the backend's tensors, each of its size
  const std::string opt_path = d + "/optimizer.safetensors";
  const SafetensorsFile f(opt_path);
  TensorMap moments;
  for (const auto& [name, v] : backend.optimizer_state()) {
    require(f.has(name), "{}: tensor '{}' is missing", opt_path, name);
    std::vector<float> m = f.read_f32(name, {int64_t(v.size())});
    require_finite(m, fmt::format("{}: tensor '{}'", opt_path, name));
    if (ends_with(name, ".exp_avg_sq"))
      for (size_t i = 0; i < m.size(); ++i)
        require(m[i] >= 0, "{}: tensor '{}' holds a negative second moment ({}) at element {}: AdamW's exp_avg_sq "
                "is never negative", opt_path, name, m[i], i);
    moments[name] = std::move(m);
  }
  for (const auto& t : f.tensors())
    require(moments.count(t.name), "{}: unexpected tensor '{}' for this model", opt_path, t.name);
  // 4) everything checked: load
  backend.load_weights(ck.tensors);
  backend.load_optimizer_state(moments);
  return st;
}

}  // namespace

TrainerState load_run_checkpoint(const std::string& dir, Backend& backend, const data::DataInfo& info) {
  return load_folder(resolve_checkpoint(dir), backend, info);
}

namespace {
// After a resume loaded `loaded`, one of base, base.tmp, base.old: finish the save that a kill interrupted (its
// swap, repeated from wherever it stopped), so that base is the loaded checkpoint and no .tmp or .old is
// left. Without it a kill inside the run's last save left its .old (and .tmp) for good: the resumed run has no
// step left to save again. A loaded .old (the newer copies are damaged) is left as it is. Returns the folder the
// checkpoint now lives in.
std::string finish_interrupted_save(const std::string& base, const std::string& loaded, std::vector<std::string>& notes) {
  const std::string tmp = base + ".tmp", old = base + ".old";
  std::error_code ec;
  if (loaded == tmp) {
    swap_in(base);
    notes.push_back(fmt::format("finished the interrupted save: {} is now {}", tmp, base));
    return base;
  }
  if (loaded == base) {
    for (const std::string& d : {tmp, old})
      if (fs::exists(d, ec)) {
        remove_or_throw(d);
        notes.push_back(fmt::format("removed {} (an older or incomplete copy of {})", d, base));
      }
  }
  return loaded;
}
}  // namespace

Resumed resume_run_checkpoint(const std::string& run_dir, Backend& backend, const data::DataInfo& info) {
  Resumed r;
  for (const char* name : {"last", "best"}) {
    const std::string base = checkpoint_dir(run_dir, name);
    // every copy that holds a trainer_state.json (written last, atomically: a copy without one is an
    // interrupted write); an unreadable one is damage, refused by name
    std::vector<std::pair<int64_t, std::string>> copies;
    for (const std::string& d : {base, base + ".old", base + ".tmp"}) {
      std::error_code ec;
      // <base> is only ever made by renaming a complete .tmp: without its state it is damaged
      require(d != base || !fs::exists(d, ec) || fs::exists(d + "/trainer_state.json", ec),
              "{}/trainer_state.json is missing: the checkpoint is damaged", d);
      if (!fs::exists(d + "/trainer_state.json", ec)) continue;
      const std::string path = d + "/trainer_state.json";
      copies.emplace_back(state_from_json(read_file(path, "trainer state", kMaxJsonBytes), path).step, d);
    }
    if (copies.empty()) {
      r.notes.push_back(fmt::format("no complete {} checkpoint", name));
      continue;
    }
    std::stable_sort(copies.begin(), copies.end(), [](const auto& x, const auto& y) { return x.first > y.first; });
    // the newest that loads: a damaged .tmp or .old (say, a file lost after its trainer state was written)
    // gives way to the next copy, with a note naming it
    std::string newest_error;
    for (const auto& [step, d] : copies) {
      try {
        r.state = load_folder(d, backend, info);
        r.dir = finish_interrupted_save(base, d, r.notes);
        return r;
      } catch (const UserError& e) {
        if (newest_error.empty()) newest_error = e.what();
        r.notes.push_back(fmt::format("skipped {}: {}", d, e.what()));
      }
    }
    throw UserError(newest_error);
  }
  throw UserError(fmt::format("--resume: no checkpoint to resume in {} (no complete last or best checkpoint, nor "
                              "their .old/.tmp): train without --resume to start this run", run_dir + "/checkpoints"));
}

std::vector<std::string> resume_config_changes(const TrainConfig& saved, const TrainConfig& now) {
  const json was = config_json(saved), is = config_json(now);
  for (const char* fixed : {"batch", "seq_len", "seed"})
    require(was[fixed] == is[fixed], "resume: {} was {} in this run and is {} now; it fixes the order of the "
            "batches, so it cannot change (start a new run instead)", fixed, was[fixed].dump(), is[fixed].dump());
  std::vector<std::string> changes;
  for (const auto& [k, v] : was.items())
    if (v != is[k]) changes.push_back(fmt::format("resume: {} {} -> {}", k, v.dump(), is[k].dump()));
  return changes;
}

}  // namespace dsv3
