// Stage 07's run checkpoint: the folder <run>/checkpoints/<name> that a resume starts from, written and read back
// with every file validated.
//
// A checkpoint folder holds:
//   config.json + model.safetensors   the model (stage 06's save_checkpoint, F32, loads in transformers)
//   optimizer.safetensors             the AdamW moments, one 1-D tensor per moment of each model tensor
//   trainer_state.json                TrainerState below (step, batcher position, best val, train config, data)
//   tokenizer.model                   the run folder's copy of the data's tokenizer, when the run folder has one:
//                                     the folder alone is enough to sample (older checkpoints lack it and still load)
// A save writes <dir>.tmp and swaps it in, so a crash at any point leaves <dir> or <dir>.old complete.
#pragma once

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "07_train_gpu/backend.h"
#include "07_train_gpu/data.h"
#include "07_train_gpu/train.h"

namespace dsv3 {

// Everything a resume needs beyond the weights and the moments (trainer_state.json).
struct TrainerState {
  int64_t step = 0;      // steps done (skipped ones included: their batch was consumed)
  int64_t updates = 0;   // AdamW updates applied (the step count of its bias correction)
  BatcherState batcher;
  double best_val_ce = std::numeric_limits<double>::infinity(), best_val_bpb = 0;
  int64_t best_step = -1;  // -1: no evaluation yet
  int64_t evals_since_best = 0, last_eval_step = 0;
  double train_ce_sum = 0;  // finite train ce since the last evaluation (val.csv's train_ce)
  int64_t train_ce_count = 0;
  int64_t skipped_steps = 0;
  double elapsed_s = 0;     // training time of every call so far
  TrainConfig config;
  // The data it was trained on; resuming on other data is refused.
  int vocab_size = 0;
  int64_t train_tokens = 0, val_tokens = 0, train_bytes = 0, val_bytes = 0;
};

constexpr int kTrainerStateVersion = 1;

// <run>/checkpoints/<name>
std::string checkpoint_dir(const std::string& run_dir, const std::string& name);

// The tokenizer file of a checkpoint folder, and of a run folder (the data's tokenizer, put there by the trainer's
// caller before the first save).
constexpr const char* kTokenizerFile = "tokenizer.model";
// <run>/tokenizer.model of a checkpoint folder <run>/checkpoints/<name> (or <name>.old, <name>.tmp).
std::string run_tokenizer_path(const std::string& checkpoint_dir);
// The tokenizer of a checkpoint folder: its own copy (own), else the run folder's (a checkpoint saved before
// checkpoints carried one); nothing when neither exists.
struct CheckpointTokenizer {
  std::string path;
  bool own = false;
};
std::optional<CheckpointTokenizer> checkpoint_tokenizer(const std::string& dir);
// Writes <dir>.tmp (every file fsynced, trainer_state.json last; tokenizer.model copied from
// run_tokenizer_path(dir) when that exists), then swaps it in: <dir> -> <dir>.old,
// <dir>.tmp -> <dir>, <dir>.old removed. A crash at any point leaves the newest checkpoint complete in one of the
// three (newest_complete_checkpoint finds it). Returns false, writing nothing, when a weight or a moment is NaN or
// infinite: the previous checkpoint stays.
bool save_run_checkpoint(const std::string& dir, const Backend& backend, const TrainerState& state);
// Of dir, dir.old and dir.tmp, the complete checkpoint (a valid trainer_state.json) with the highest step; on
// equal steps dir, then dir.old. Nothing when none is complete.
std::optional<std::string> newest_complete_checkpoint(const std::string& dir);
// The folder to read: newest_complete_checkpoint(dir), else dir itself when it is a folder (a checkpoint without
// trainer state, e.g. stage 06's); UserError when there is none.
std::string resolve_checkpoint(const std::string& dir);
// trainer_state.json of a checkpoint folder (resolved as above); UserError naming the file and the problem.
TrainerState read_trainer_state(const std::string& dir);
// Validates every file of the checkpoint (state, config = the backend's, weights, moments, same data as info)
// before loading the weights (MoE biases included) and moments into the backend. UserError naming the file.
TrainerState load_run_checkpoint(const std::string& dir, Backend& backend, const data::DataInfo& info);

// What --resume continues from: the newest copy (of last, last.old, last.tmp) that loads, or, when no last
// checkpoint was ever completed, of best. A copy whose trainer_state.json is unreadable is damage: UserError
// naming it; a copy that fails to load gives way to the next (a note says which and why); UserError when none
// loads or none exists.
// Resuming also finishes a save that a kill interrupted: a loaded <dir>.tmp is renamed to <dir> and the older
// copies are removed, as the save would have done (a loaded <dir>.old, whose newer copies are damaged, stays).
struct Resumed {
  TrainerState state;
  std::string dir;                 // the folder loaded (its name after the interrupted save was finished)
  std::vector<std::string> notes;  // copies skipped and why, the interrupted save finished
};
Resumed resume_run_checkpoint(const std::string& run_dir, Backend& backend, const data::DataInfo& info);

// A resume's train config against the saved one: UserError when batch, seq_len or seed differ (they fix the order
// of the batches); otherwise one line "resume: <field> <saved> -> <now>" per other field that changed (JSON values,
// fields in alphabetical order).
std::vector<std::string> resume_config_changes(const TrainConfig& saved, const TrainConfig& now);

}  // namespace dsv3
