// A group of ranks that average, sum and exchange buffers: what stage 07's data parallelism and stage 03's expert
// parallelism need, behind one interface with two implementations.
//
//   HostGroup  (comm.cpp): N threads of one process, host buffers. The CPU emulation of N GPUs: each thread runs
//              its own model on its shard, and a reduction is a plain sum in rank order (every rank computes the
//              same sum in the same order, so all ranks hold the same bits after it, as NCCL guarantees).
//   NCCL       (comm_nccl.cpp, built when CMake finds NCCL: DSV3_HAVE_NCCL): one process per GPU, device buffers;
//              the calls are queued on the calling thread's default stream (cudaStreamPerThread, the stream every
//              kernel of the project runs on), so they order with the kernels around them and a CUDA graph can
//              capture them.
//
// Every rank calls the same collectives in the same order (the rule of NCCL; HostGroup waits for all ranks at
// each call). A rank that fails must end the group: a NCCL peer left waiting blocks forever, so stage 07's
// launcher ends every process when one fails; HostGroup::abort() wakes the threads of an emulated group.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace dsv3 {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string describe() const = 0;  // "nccl rank 1 of 4", "host group rank 0 of 2"
  // true: the buffer calls below take device pointers (NCCL); false: host pointers (HostGroup).
  virtual bool on_device() const = 0;

  // In place: the mean over ranks (the sum, then times 1/size; NCCL's ncclAvg).
  virtual void all_reduce_mean(float* data, size_t n) = 0;
  // In place: the sum over ranks.
  virtual void all_reduce_sum(int* data, size_t n) = 0;
  // Host values, whatever on_device() says; blocks until every rank has the sum.
  virtual void all_reduce_host(double* data, size_t n) = 0;
  // Brackets several buffer calls so that they are launched together (ncclGroupStart/End); no-op on the host.
  virtual void group_begin() {}
  virtual void group_end() {}
  // Expert parallel's exchange: rows of `width` floats. This rank sends send_counts[p] rows to each peer p (its
  // own included), the peers' blocks consecutive in send in peer order, and receives recv_counts[p] rows from each
  // peer into recv, in peer order. The counts must agree pairwise (what p sends to r is what r receives from p):
  // exchange them first with all_to_all_counts.
  virtual void all_to_all(const float* send, const int64_t* send_counts, float* recv, const int64_t* recv_counts,
                          int64_t width) = 0;
  // The counts' exchange (host values, `width` per peer): recv[p * width + j] = what peer p's
  // send[rank() * width + j] was. Blocking.
  virtual void all_to_all_counts(const int64_t* send, int64_t* recv, int64_t width = 1) = 0;
};

// ---- the CPU emulation: N threads of one process --------------------------------------------------------------
// The group's N communicators (rank i at [i]); each thread uses its own. If a thread fails, call abort() on its
// communicator: every call of the group, waiting or later, then throws instead of waiting for the failed rank.
std::vector<std::unique_ptr<Communicator>> make_host_group(int size);
void abort_host_group(Communicator& member);  // no-op for a communicator that is not a HostGroup member

// Runs fn(rank, comm) on `size` threads of one host group and waits for them; rethrows the first failure (after
// aborting the group, so no thread waits for a dead rank). The emulation tests' driver.
void run_host_group(int size, const std::function<void(int rank, Communicator& comm)>& fn);

// ---- NCCL ---------------------------------------------------------------------------------------------------
// Whether this build has NCCL (CMake found nccl.h and libnccl; DSV3_NCCL=ON).
bool nccl_built();
// A new group id, as text (hex), made by one process and handed to every rank (stage 07's launcher passes it in
// the environment). UserError without NCCL.
std::string nccl_new_id();
// This process's member of the group: rank of size, on the current CUDA device (cudaSetDevice before). NVLink
// multicast (NVLS) off: NCCL_NVLS_ENABLE=0 whatever the environment said (on shared hosts it can take the GPUs down).
// UserError without NCCL or for a malformed id; a NCCL failure throws std::runtime_error naming the call.
std::unique_ptr<Communicator> make_nccl_communicator(int rank, int size, const std::string& id);

}  // namespace dsv3
