// Stage 07: the trainer. Device-independent: it drives a Backend (backend.h: the CPU reference or the GPU) and
// owns everything around the model: the learning-rate schedule, the batches, validation, gradient clipping,
// checkpoints (resumable bitwise on the CPU backend), the diagnostics CSVs, the progress line and the plots.
//
// A run folder <run>/ holds:
//   train.csv, val.csv, expert_load.csv   diagnostics, appended as the run goes (columns below)
//   *.png                                 plots.gp's rendering of them at the end
//   checkpoints/last, checkpoints/best    config.json + model.safetensors (stage 06, F32, loads in transformers),
//                                         optimizer.safetensors (AdamW moments), trainer_state.json (run_checkpoint.h)
//
// Shapes: B batch (windows per step), T seq_len; a window is T+1 consecutive tokens (inputs t_0..t_{T-1},
// targets t_1..t_T).
#pragma once

#include <atomic>
#include <cstdint>
#include <iosfwd>
#include <string>
#include <vector>

#include "07_train_gpu/backend.h"
#include "07_train_gpu/data.h"

namespace dsv3 {

// Every knob of a run. Defaults: the lyrics run on the GPU (chosen by the runs compared in the README: on this
// small corpus small batches, short windows and strong weight decay generalise best; early stopping keeps the best).
struct TrainConfig {
  int batch = 8;                // B windows per step
  int seq_len = 128;            // T
  int64_t max_steps = 800;
  double lr = 1.5e-3;           // peak learning rate
  double min_lr_ratio = 0.1;    // the cosine ends at lr * min_lr_ratio at max_steps
  int64_t warmup_steps = 50;
  double weight_decay = 3.0;    // AdamW, decoupled (lr * wd per step), matrices only (decays() in common/param_list.h)
  double beta1 = 0.9, beta2 = 0.95;
  double grad_clip = 1.0;       // clip the global gradient norm to this; 0 = off
  int eval_every = 20;          // validation (and the last checkpoint) every this many steps, and at the end
  int log_every = 1;            // progress line refresh on a terminal (see train())
  int ckpt_every = 0;           // > 0: save the last checkpoint every this many steps instead of at eval points
  uint64_t seed = 1234;         // batch order (the model's init seed is the backend's)
  int patience = 5;             // > 0: stop after this many evaluations without a new best val ce; 0 = off
  double max_minutes = 0;       // > 0: stop cleanly (evaluate, save) once this call has run this long

  // UserError naming the first bad field.
  void validate() const;
};

// Learning rate of step (1 .. max_steps): linear warm-up lr/warmup .. lr over steps 1..warmup_steps, then a
// cosine from lr down to lr * min_lr_ratio at max_steps (and that value after it).
double lr_at(const TrainConfig& c, int64_t step);

// One update as train() makes it after a forward + backward: the gradient scaled to at most grad_clip in norm, AdamW
// at lr_at(c, step), then the bias update (Backend::step). update: the updates so far plus one (Adam's count).
void apply_update(Backend& b, const TrainConfig& c, int64_t step, double grad_norm, int64_t update);
// What Backend::train_step needs for that update: AdamW at lr_at(c, step), the clipping threshold, Adam's count.
Backend::StepPlan plan_step(const TrainConfig& c, int64_t step, int64_t update);

// ---- batches ----------------------------------------------------------------------------------------------
// Windows of T+1 tokens from the train split. Epoch e: a random offset o in [0, min(T, n-T)), windows starting
// at o + i*T (every one that fits: consecutive windows share one token, so every token after o is a target
// at most once, and all but the last < T+o tokens are), in an order shuffled by Fisher-Yates with an Rng seeded
// from (seed, e). A batch takes the next B windows and runs on into the next epoch when one ends; windows cross
// song boundaries (the eos token between songs is an ordinary target).
struct BatcherState {
  int64_t epoch = 0;
  int64_t cursor = 0;  // windows of this epoch already handed out
};

class Batcher {
 public:
  // UserError when the split is shorter than one window (T+1 tokens) or B, T < 1.
  Batcher(const std::vector<uint16_t>& tokens, int B, int T, uint64_t seed);

  std::vector<int> next();  // (B, T+1) token ids, row-major
  BatcherState state() const { return state_; }
  void set_state(const BatcherState& s);  // UserError when cursor is outside the epoch
  // The window start positions of an epoch, in the order they are handed out.
  std::vector<int64_t> epoch_starts(int64_t epoch) const;

 private:
  const std::vector<uint16_t>* tokens_;
  int B_, seq_;
  uint64_t seed_;
  BatcherState state_;
  int64_t cached_epoch_ = -1;
  std::vector<int64_t> starts_;  // epoch_starts(cached_epoch_)
};

// ---- validation -------------------------------------------------------------------------------------------
struct ValResult {
  double ce = 0;             // nats per target token, main model
  double bits_per_byte = 0;  // ce / ln 2 * (val tokens / val bytes)
  std::vector<double> mtp;   // cross-entropy of each MTP depth
  int64_t tokens = 0;        // targets evaluated
};
// The val split cut into consecutive non-overlapping windows (window j = tokens j*T .. j*T+T, so each token is a
// target once; the tail that does not fill a window is dropped), B windows per forward (the last batch smaller),
// the loss averaged over every target. bits/byte uses data.json's counts: the eos tokens between songs count as
// tokens but have no bytes (data.h's convention). Deterministic. UserError when val is shorter than one window.
// comm (data parallel): each batch of B windows is shared out (ceil(B / size) windows a rank, as the training
// batches are) and the sums combined with all_reduce_host, so every rank returns the same result, equal to one
// rank's up to the order of the sums; every rank makes the same forward calls (expert parallel needs it).
ValResult evaluate(Backend& backend, const std::vector<uint16_t>& val, int B, int T, const data::DataInfo& info,
                   Communicator* comm = nullptr);

// ---- the run ----------------------------------------------------------------------------------------------
struct StepRecord {
  int64_t step = 0;
  ModelLosses losses;
  double grad_norm = 0;
  bool skipped = false;  // non-finite loss or gradient norm: no update
};

struct TrainResult {
  int64_t steps_done = 0;  // the run's step count at the end (a resumed run counts from its start)
  double best_val_ce = 0, best_val_bpb = 0;
  int64_t best_step = -1;
  double final_train_ce = 0;  // mean train ce since the evaluation before the last one (val.csv's last train_ce)
  double tokens_per_s = 0;    // median over this call's steps after the first 3
  double elapsed_s = 0;       // of every call of the run
  int64_t skipped_steps = 0;
  std::string stop_reason;          // "max_steps", "patience", "max_minutes", "stopped"
  std::vector<StepRecord> history;  // this call's steps
};

// What is not a training knob.
struct TrainHooks {
  std::string plots_script;                 // plots.gp to render into the run folder at the end ("": none)
  const std::atomic<bool>* stop = nullptr;  // when it becomes true (e.g. on SIGINT): stop after the step, saving
  int tty = -1;                             // progress line rewritten in place: 1 yes, 0 no, -1 when out is a terminal
  // Data parallel (README "Several GPUs"): this process's rank of the group; nullptr: alone. Every rank calls
  // train() with the same arguments: each takes its batch / size windows of every batch (rank r the r-th share),
  // the backend averages the gradients (Backend::set_communicator), validation is dealt out (evaluate), and the
  // decisions that end a run (signal, max_minutes) are agreed, so every rank takes the same steps. Rank 0 alone
  // prints, writes the CSVs, the checkpoints and the plots; the others write nothing. --batch must be a multiple of
  // the group's size. Resuming works with any group size (the batches are the whole batch's, as one rank takes them).
  Communicator* comm = nullptr;
  // With comm: also split the MoE layers' routed experts across the group (Backend::set_communicator).
  bool expert_parallel = false;
};

// Trains from step 1 (resume=false: the run folder must not hold a checkpoint yet) or from
// <run>/checkpoints/last (resume=true: batch, seq_len and seed must equal the saved ones; other fields may change
// and are listed). Per step: lr_at, the next batch, forward+backward, gradient norm; a non-finite loss or norm
// skips the update with a warning, 5 in a row throw UserError("training diverged ...") with the last good
// checkpoint untouched; otherwise clip (scale = grad_clip / norm when above) and step the optimizer.
// Every eval_every steps and at the end: validation, val.csv, expert_load.csv, the best checkpoint on a new best
// val ce, the last checkpoint (or every ckpt_every steps). Progress goes to out: one line per log point,
// rewritten with '\r' on a terminal (every log_every steps), else a new line every max(log_every, eval_every/5)
// steps; evaluations and warnings on their own lines.
TrainResult train(Backend& backend, const data::Prepared& data, const TrainConfig& cfg, const std::string& run_dir,
                  bool resume, std::ostream& out, const TrainHooks& hooks = {});

// The model of a run: a preset name (stage 06's config_preset) or a config.json path (or a folder holding one),
// vocab_size set from the data (a config.json that disagrees is a UserError), max_position_embeddings raised to
// at least seq_len.
ModelConfig run_model_config(const std::string& preset_or_path, int vocab_size, int seq_len);

}  // namespace dsv3
