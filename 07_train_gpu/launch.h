// Stage 07's launcher for several GPUs (README "Several GPUs"): one process per GPU, all started by the process
// the user ran, which then only waits.
//
//   07_train_gpu --gpus 4 train ...        (or DSV3_GPUS=4 in the environment; the main job and bench alike)
//
// The first process makes a NCCL group id and starts `ranks` copies of itself with the same arguments, each with
// DSV3_RANK, DSV3_RANKS and DSV3_NCCL_ID in its environment; rank r uses GPU r, and ranks above 0 print nothing on
// standard output (their errors still reach standard error). Why processes and not one thread per GPU: the model
// code keeps per-process state (a cuBLAS handle per thread, kernels' shared-memory opt-ins made once, the
// stream-ordered pool of the current device), a crashing rank cannot corrupt the others, and the same program is
// what a cluster launcher (one process per GPU) would start.
//
// Ending together: a rank left waiting in a NCCL call never returns, so when one rank fails the launcher gives the
// others a few seconds to end on their own (they usually fail the same way) and then kills them; it exits with the
// failed rank's code (2 for a user error). SIGINT, SIGTERM and SIGHUP sent to the launcher are passed on to every
// rank once (the ranks agree on the step to stop at, save and exit 128 + signal, as one process does); the ranks
// run in their own process group, so a Ctrl-C at the terminal reaches them only through the launcher, and they
// receive SIGTERM if the launcher dies.
#pragma once

#include <memory>
#include <string>

#include "common/comm.h"

namespace dsv3 {

struct Launch {
  int rank = 0, ranks = 1;
  std::string nccl_id;  // empty: this process was not started by launch_ranks
  bool launched() const { return !nccl_id.empty(); }
};

// This process's place: a launched rank (the environment names it) or not. UserError for malformed values.
Launch launch_from_env();
// In a launched rank, before any other CUDA call: its GPU (rank r: device r) and, for ranks above 0, standard
// output sent to /dev/null.
void enter_rank(const Launch& l);
// The rank's NCCL communicator (make_nccl_communicator with the environment's id).
std::unique_ptr<Communicator> rank_communicator(const Launch& l);

// How many GPUs the user asked for: --gpus when given (flag != -1), else DSV3_GPUS, else 1. UserError for a value
// below 1.
int requested_gpus(int flag);
// Checks that `ranks` processes can run here: NCCL built in, that many GPUs visible. UserError naming what is missing.
void check_can_launch(int ranks);
// Starts the ranks (argv: this program's arguments, passed on unchanged) and waits for them; returns the exit code
// (0 when every rank succeeded, else the first failure's code, or 128 + the signal that ended it).
int launch_ranks(int ranks, char** argv);

}  // namespace dsv3
