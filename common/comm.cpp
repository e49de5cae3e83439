// comm.h's host group (the CPU emulation of N ranks), and the NCCL entry points of a build without NCCL.
#include "common/comm.h"

#include <fmt/format.h>

#include <condition_variable>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>

#include "common/errors.h"

namespace dsv3 {
namespace {

// What the ranks of one group share: a barrier that can be aborted, and each rank's published buffers.
struct Shared {
  explicit Shared(int n) : size(n), ptrs(size_t(n)), counts(size_t(n)) {}
  const int size;
  std::mutex mu;
  std::condition_variable cv;
  int arrived = 0;
  int64_t generation = 0;
  bool aborted = false;
  std::vector<const void*> ptrs;              // rank i's buffer in the current call
  std::vector<const int64_t*> counts;         // rank i's counts in the current call (all_to_all)

  // Every rank waits here until all have arrived; throws when the group was aborted.
  void barrier() {
    std::unique_lock<std::mutex> lock(mu);
    if (aborted) throw std::runtime_error("host group: aborted (another rank failed)");
    const int64_t gen = generation;
    if (++arrived == size) {
      arrived = 0;
      ++generation;
      cv.notify_all();
      return;
    }
    cv.wait(lock, [&] { return generation != gen || aborted; });
    if (generation == gen) throw std::runtime_error("host group: aborted (another rank failed)");
  }
  void abort() {
    std::lock_guard<std::mutex> lock(mu);
    aborted = true;
    cv.notify_all();
  }
};

class HostMember final : public Communicator {
 public:
  HostMember(std::shared_ptr<Shared> s, int rank) : s_(std::move(s)), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return s_->size; }
  std::string describe() const override { return fmt::format("host group rank {} of {}", rank_, s_->size); }
  bool on_device() const override { return false; }

  void all_reduce_mean(float* data, size_t n) override {
    reduce(data, n, [](float* dst, const float* src, size_t m) {
      for (size_t i = 0; i < m; ++i) dst[i] += src[i];
    });
    const float inv = 1.f / float(s_->size);
    for (size_t i = 0; i < n; ++i) data[i] *= inv;
  }
  void all_reduce_sum(int* data, size_t n) override {
    reduce(data, n, [](int* dst, const int* src, size_t m) {
      for (size_t i = 0; i < m; ++i) dst[i] += src[i];
    });
  }
  void all_reduce_host(double* data, size_t n) override {
    reduce(data, n, [](double* dst, const double* src, size_t m) {
      for (size_t i = 0; i < m; ++i) dst[i] += src[i];
    });
  }

  void all_to_all(const float* send, const int64_t* send_counts, float* recv, const int64_t* recv_counts,
                  int64_t width) override {
    s_->ptrs[size_t(rank_)] = send;
    s_->counts[size_t(rank_)] = send_counts;
    s_->barrier();
    // peer p's block for this rank starts after what p sends to ranks < rank_
    int64_t at = 0;
    for (int p = 0; p < s_->size; ++p) {
      const int64_t* pc = s_->counts[size_t(p)];
      require(pc[rank_] == recv_counts[p], "all_to_all: rank {} sends {} rows to rank {}, which expects {}", p,
              pc[rank_], rank_, recv_counts[p]);
      int64_t off = 0;
      for (int q = 0; q < rank_; ++q) off += pc[q];
      const float* src = static_cast<const float*>(s_->ptrs[size_t(p)]) + off * width;
      std::memcpy(recv + at * width, src, size_t(recv_counts[p] * width) * sizeof(float));
      at += recv_counts[p];
    }
    s_->barrier();  // the peers' send buffers stay valid until every rank has read them
  }
  void all_to_all_counts(const int64_t* send, int64_t* recv, int64_t width) override {
    s_->counts[size_t(rank_)] = send;
    s_->barrier();
    for (int p = 0; p < s_->size; ++p)
      for (int64_t j = 0; j < width; ++j) recv[p * width + j] = s_->counts[size_t(p)][rank_ * width + j];
    s_->barrier();
  }

  void abort() { s_->abort(); }

 private:
  // Publishes data, waits for every rank, sums the ranks' buffers in rank order into a private copy (every rank the
  // same sum in the same order), waits until every rank has read, then writes the copy back.
  template <typename T, typename Add>
  void reduce(T* data, size_t n, Add add) {
    s_->ptrs[size_t(rank_)] = data;
    s_->barrier();
    std::vector<T> sum(static_cast<const T*>(s_->ptrs[0]), static_cast<const T*>(s_->ptrs[0]) + n);
    for (int p = 1; p < s_->size; ++p) add(sum.data(), static_cast<const T*>(s_->ptrs[size_t(p)]), n);
    s_->barrier();
    std::copy(sum.begin(), sum.end(), data);
  }

  std::shared_ptr<Shared> s_;
  int rank_;
};

}  // namespace

std::vector<std::unique_ptr<Communicator>> make_host_group(int size) {
  require(size >= 1, "host group: size must be >= 1, got {}", size);
  auto shared = std::make_shared<Shared>(size);
  std::vector<std::unique_ptr<Communicator>> out;
  for (int r = 0; r < size; ++r) out.push_back(std::make_unique<HostMember>(shared, r));
  return out;
}

void abort_host_group(Communicator& member) {
  if (auto* m = dynamic_cast<HostMember*>(&member)) m->abort();
}

void run_host_group(int size, const std::function<void(int, Communicator&)>& fn) {
  auto group = make_host_group(size);
  std::vector<std::exception_ptr> errors(static_cast<size_t>(size));
  std::vector<std::thread> threads;
  for (int r = 0; r < size; ++r)
    threads.emplace_back([&, r] {
      try {
        fn(r, *group[size_t(r)]);
      } catch (...) {
        errors[size_t(r)] = std::current_exception();
        abort_host_group(*group[size_t(r)]);
      }
    });
  for (auto& t : threads) t.join();
  // the first rank's own failure, not the "aborted" of the ranks it woke
  for (const auto& e : errors)
    if (e) {
      try {
        std::rethrow_exception(e);
      } catch (const std::runtime_error& x) {
        if (std::string(x.what()).rfind("host group: aborted", 0) == 0) continue;
        throw;
      }
    }
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);
}

#ifndef DSV3_HAVE_NCCL
bool nccl_built() { return false; }
std::string nccl_new_id() {
  throw UserError("this build has no NCCL (CMake did not find nccl.h and libnccl, or DSV3_NCCL=OFF): several GPUs "
                  "need it; install NCCL (it comes with the CUDA installation or the libnccl-dev package) and rebuild");
}
std::unique_ptr<Communicator> make_nccl_communicator(int, int, const std::string&) {
  nccl_new_id();  // throws
  return nullptr;
}
#endif

}  // namespace dsv3
