// Stage 07's launcher (launch.h): fork + exec of this program once per GPU, then wait.
#include "07_train_gpu/launch.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <thread>
#include <vector>

#include "common/device.h"
#include "common/errors.h"

namespace dsv3 {
namespace {

constexpr int kMaxRanks = 64;
constexpr int kGraceSeconds = 5;  // after one rank fails, how long the others may take to end on their own

// The launcher's children, for the signal handler (kill is async-signal-safe).
pid_t g_children[kMaxRanks];
volatile std::sig_atomic_t g_nchildren = 0;
volatile std::sig_atomic_t g_forwarded = 0;
constexpr int kForwarded[] = {SIGINT, SIGTERM, SIGHUP};

extern "C" void forward_signal(int sig) {
  if (g_forwarded) return;  // once: a rank's second signal would end it without saving
  g_forwarded = sig;
  for (int i = 0; i < g_nchildren; ++i)
    if (g_children[i] > 0) kill(g_children[i], sig);
}

int parse_int(const char* text, const char* name, int lo, int hi) {
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(text, &end, 10);
  require(end != text && *end == '\0' && errno == 0 && v >= lo && v <= hi, "{}='{}' must be an integer in [{}, {}]",
          name, text, lo, hi);
  return int(v);
}

// The exit code a wait status stands for: the exit code, or 128 + the signal that ended the process.
int code_of(int status) { return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status); }

}  // namespace

Launch launch_from_env() {
  Launch l;
  const char* rank = std::getenv("DSV3_RANK");
  const char* ranks = std::getenv("DSV3_RANKS");
  const char* id = std::getenv("DSV3_NCCL_ID");
  if (!rank && !ranks && !id) return l;
  require(rank && ranks && id && *id, "DSV3_RANK, DSV3_RANKS and DSV3_NCCL_ID are set by the launcher together (the "
          "environment holds only some of them): unset them, and use --gpus N");
  l.ranks = parse_int(ranks, "DSV3_RANKS", 1, kMaxRanks);
  l.rank = parse_int(rank, "DSV3_RANK", 0, l.ranks - 1);
  l.nccl_id = id;
  return l;
}

void enter_rank(const Launch& l) {
  use_gpu(l.rank);
  if (l.rank > 0) {
    const int null = ::open("/dev/null", O_WRONLY);
    if (null >= 0) {
      std::cout.flush();
      ::dup2(null, STDOUT_FILENO);
      ::close(null);
    }
  }
}

std::unique_ptr<Communicator> rank_communicator(const Launch& l) {
  return make_nccl_communicator(l.rank, l.ranks, l.nccl_id);
}

int requested_gpus(int flag) {
  if (flag > 0) return flag;
  require(flag == -1, "--gpus must be >= 1, got {}", flag);
  const char* env = std::getenv("DSV3_GPUS");
  return env && *env ? parse_int(env, "DSV3_GPUS", 1, kMaxRanks) : 1;
}

void check_can_launch(int ranks) {
  require(ranks >= 1 && ranks <= kMaxRanks, "--gpus {}: between 1 and {}", ranks, kMaxRanks);
  require(nccl_built(), "--gpus {} needs NCCL, which this build lacks (CMake did not find nccl.h and libnccl, or "
          "DSV3_NCCL=OFF): install NCCL and rebuild, or train on one GPU", ranks);
  const int have = gpu_count();
  require(have >= ranks, "--gpus {}: this machine has {} usable GPU{} ({})", ranks, have, have == 1 ? "" : "s",
          gpu_description());
}

int launch_ranks(int ranks, char** argv) {
  check_can_launch(ranks);
  const std::string id = nccl_new_id();
  std::cout << fmt::format("launching {} rank{} (one process per GPU, NCCL; NCCL_NVLS_ENABLE=0)\n", ranks,
                           ranks == 1 ? "" : "s")
            << std::flush;
  std::cerr.flush();
  const pid_t launcher = getpid();
  // Each rank's environment, built before any fork: this process has threads (the CUDA driver's, NCCL's bootstrap
  // root, which the ranks connect to), so a child may only make async-signal-safe calls until it execs.
  std::vector<std::vector<std::string>> envs(static_cast<size_t>(ranks));
  for (int r = 0; r < ranks; ++r) {
    for (char** e = environ; *e; ++e) {
      const std::string kv = *e;
      const std::string key = kv.substr(0, kv.find('='));
      if (key != "DSV3_RANK" && key != "DSV3_RANKS" && key != "DSV3_NCCL_ID" && key != "NCCL_NVLS_ENABLE")
        envs[size_t(r)].push_back(kv);
    }
    envs[size_t(r)].push_back("DSV3_RANK=" + std::to_string(r));
    envs[size_t(r)].push_back("DSV3_RANKS=" + std::to_string(ranks));
    envs[size_t(r)].push_back("DSV3_NCCL_ID=" + id);
    envs[size_t(r)].push_back("NCCL_NVLS_ENABLE=0");
  }
  std::vector<std::vector<char*>> envp(static_cast<size_t>(ranks));
  for (int r = 0; r < ranks; ++r) {
    for (auto& kv : envs[size_t(r)]) envp[size_t(r)].push_back(kv.data());
    envp[size_t(r)].push_back(nullptr);
  }
  const std::string cannot = "launcher: cannot start a rank (exec of /proc/self/exe failed)\n";
  for (const int s : kForwarded) std::signal(s, forward_signal);
  g_nchildren = 0;
  for (int r = 0; r < ranks; ++r) {
    const pid_t pid = fork();
    if (pid < 0) {
      const int err = errno;
      for (int i = 0; i < g_nchildren; ++i) kill(g_children[i], SIGKILL);
      throw std::runtime_error(fmt::format("launcher: fork failed: {}", std::strerror(err)));
    }
    if (pid == 0) {  // the rank: its own process group, SIGTERM when the launcher dies, then this program again
      setpgid(0, 0);
      prctl(PR_SET_PDEATHSIG, SIGTERM);
      if (getppid() != launcher) _exit(128 + SIGTERM);  // the launcher died before prctl took effect
      for (const int s : kForwarded) signal(s, SIG_DFL);
      execve("/proc/self/exe", argv, envp[size_t(r)].data());
      const ssize_t ignored = write(STDERR_FILENO, cannot.data(), cannot.size());
      (void)ignored;
      _exit(127);
    }
    g_children[r] = pid;
    g_nchildren = r + 1;
  }

  int first_failure = 0, running = ranks;
  bool failed = false;
  auto deadline = std::chrono::steady_clock::time_point::max();
  while (running > 0) {
    int status = 0;
    const pid_t pid = waitpid(-1, &status, failed ? WNOHANG : 0);
    if (pid < 0) {
      if (errno == EINTR) continue;  // a forwarded signal
      break;
    }
    if (pid == 0) {  // WNOHANG and nothing ended: after the grace period, the stragglers are killed
      if (std::chrono::steady_clock::now() >= deadline) {
        for (int i = 0; i < ranks; ++i)
          if (g_children[i] > 0) kill(g_children[i], SIGKILL);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      continue;
    }
    int r = 0;
    while (r < ranks && g_children[r] != pid) ++r;
    if (r == ranks) continue;
    g_children[r] = 0;
    --running;
    const int code = code_of(status);
    if (code != 0 && !failed) {
      failed = true;
      first_failure = code;
      if (running > 0 && !(g_forwarded && code == 128 + g_forwarded)) {
        std::cerr << fmt::format("launcher: rank {} ended with code {}; ending the other ranks (in {} s at most)\n",
                                 r, code, kGraceSeconds);
        deadline = std::chrono::steady_clock::now() + std::chrono::seconds(kGraceSeconds);
      } else {
        deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);  // stopping: they are saving
      }
    }
  }
  for (const int s : kForwarded) std::signal(s, SIG_DFL);
  g_nchildren = 0;
  return failed ? first_failure : 0;
}

}  // namespace dsv3
