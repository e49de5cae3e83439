// comm.h's NCCL communicator: one process per GPU; buffer calls queued on cudaStreamPerThread (the stream of
// every kernel here, see the top CMakeLists.txt), so they order with the model's kernels and can be captured in a
// CUDA graph. Built only when CMake found NCCL (DSV3_HAVE_NCCL).
#include <cuda_runtime.h>
#include <fmt/format.h>
#include <nccl.h>

#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include "common/comm.h"
#include "common/cuda_utils.h"
#include "common/errors.h"

namespace dsv3 {
namespace {

void nccl_check(ncclResult_t r, const char* call) {
  if (r == ncclSuccess) return;
  throw std::runtime_error(fmt::format("NCCL: {} failed: {} ({})", call, ncclGetErrorString(r), ncclGetLastError(nullptr)));
}
#define NCCL_CHECK(call) nccl_check((call), #call)

class NcclMember final : public Communicator {
 public:
  NcclMember(int rank, int size, const ncclUniqueId& id) : rank_(rank), size_(size) {
    NCCL_CHECK(ncclCommInitRank(&comm_, size, id, rank));
  }
  ~NcclMember() override {
    if (comm_) ncclCommDestroy(comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string describe() const override {
    int v = 0;
    ncclGetVersion(&v);
    return fmt::format("nccl {}.{}.{} rank {} of {}", v / 10000, v / 100 % 100, v % 100, rank_, size_);
  }
  bool on_device() const override { return true; }

  void all_reduce_mean(float* data, size_t n) override {
    NCCL_CHECK(ncclAllReduce(data, data, n, ncclFloat32, ncclAvg, comm_, cudaStreamPerThread));
  }
  void all_reduce_sum(int* data, size_t n) override {
    NCCL_CHECK(ncclAllReduce(data, data, n, ncclInt32, ncclSum, comm_, cudaStreamPerThread));
  }
  void all_reduce_host(double* data, size_t n) override {
    if (scratch_.size() < n) scratch_ = DeviceBuffer<double>(n);
    CUDA_CHECK(cudaMemcpyAsync(scratch_.get(), data, n * sizeof(double), cudaMemcpyHostToDevice, cudaStreamPerThread));
    NCCL_CHECK(ncclAllReduce(scratch_.get(), scratch_.get(), n, ncclFloat64, ncclSum, comm_, cudaStreamPerThread));
    CUDA_CHECK(cudaMemcpyAsync(data, scratch_.get(), n * sizeof(double), cudaMemcpyDeviceToHost, cudaStreamPerThread));
    CUDA_CHECK(cudaStreamSynchronize(cudaStreamPerThread));
  }
  void group_begin() override { NCCL_CHECK(ncclGroupStart()); }
  void group_end() override { NCCL_CHECK(ncclGroupEnd()); }

  void all_to_all(const float* send, const int64_t* send_counts, float* recv, const int64_t* recv_counts,
                  int64_t width) override {
    NCCL_CHECK(ncclGroupStart());
    int64_t s = 0, r = 0;
    for (int p = 0; p < size_; ++p) {
      if (send_counts[p] > 0)
        NCCL_CHECK(ncclSend(send + s * width, size_t(send_counts[p] * width), ncclFloat32, p, comm_,
                            cudaStreamPerThread));
      if (recv_counts[p] > 0)
        NCCL_CHECK(ncclRecv(recv + r * width, size_t(recv_counts[p] * width), ncclFloat32, p, comm_,
                            cudaStreamPerThread));
      s += send_counts[p];
      r += recv_counts[p];
    }
    NCCL_CHECK(ncclGroupEnd());
  }
  void all_to_all_counts(const int64_t* send, int64_t* recv, int64_t width) override {
    const size_t n = size_t(size_) * size_t(width);
    if (counts_.size() < 2 * n) counts_ = DeviceBuffer<int64_t>(2 * n);
    CUDA_CHECK(cudaMemcpyAsync(counts_.get(), send, n * sizeof(int64_t), cudaMemcpyHostToDevice, cudaStreamPerThread));
    NCCL_CHECK(exchange_counts(counts_.get(), counts_.get() + n, width));
    CUDA_CHECK(cudaMemcpyAsync(recv, counts_.get() + n, n * sizeof(int64_t), cudaMemcpyDeviceToHost, cudaStreamPerThread));
    CUDA_CHECK(cudaStreamSynchronize(cudaStreamPerThread));
  }

 private:
  // `width` int64 to and from every peer, as grouped sends and receives
  ncclResult_t exchange_counts(const int64_t* send, int64_t* recv, int64_t width) {
    ncclResult_t r = ncclGroupStart();
    for (int p = 0; p < size_ && r == ncclSuccess; ++p) {
      r = ncclSend(send + p * width, size_t(width), ncclInt64, p, comm_, cudaStreamPerThread);
      if (r == ncclSuccess) r = ncclRecv(recv + p * width, size_t(width), ncclInt64, p, comm_, cudaStreamPerThread);
    }
    const ncclResult_t e = ncclGroupEnd();
    return r != ncclSuccess ? r : e;
  }

  int rank_, size_;
  ncclComm_t comm_ = nullptr;
  DeviceBuffer<double> scratch_;
  DeviceBuffer<int64_t> counts_;
};

}  // namespace

bool nccl_built() { return true; }

std::string nccl_new_id() {
  ncclUniqueId id;
  NCCL_CHECK(ncclGetUniqueId(&id));
  std::string hex;
  for (char c : id.internal) hex += fmt::format("{:02x}", static_cast<unsigned char>(c));
  return hex;
}

std::unique_ptr<Communicator> make_nccl_communicator(int rank, int size, const std::string& id_hex) {
  require(size >= 1 && rank >= 0 && rank < size, "NCCL: rank {} of {} is not a rank of the group", rank, size);
  require(id_hex.size() == 2 * NCCL_UNIQUE_ID_BYTES, "NCCL: the group id has {} hex digits, not {}", id_hex.size(),
          2 * NCCL_UNIQUE_ID_BYTES);
  ncclUniqueId id;
  for (size_t i = 0; i < NCCL_UNIQUE_ID_BYTES; ++i) {
    const std::string byte = id_hex.substr(2 * i, 2);
    require(byte.find_first_not_of("0123456789abcdef") == std::string::npos, "NCCL: the group id is not hex");
    id.internal[i] = static_cast<char>(std::stoi(byte, nullptr, 16));
  }
  setenv("NCCL_NVLS_ENABLE", "0", 1);  // NVLink multicast off, always (comm.h says why)
  return std::make_unique<NcclMember>(rank, size, id);
}

}  // namespace dsv3
