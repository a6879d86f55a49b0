// A tiny fork-join pool for the attention kernel, made for shared, oversubscribed
// machines: the calling thread takes work items itself and only ever waits for items
// a helper has already claimed, never for a helper to be scheduled. (An OpenMP
// barrier waits for every thread of the team, which costs whole scheduler time
// slices when other processes hold the cores.)
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace vattn {

class WorkPool {
 public:
  WorkPool() = default;
  ~WorkPool();
  WorkPool(const WorkPool&) = delete;
  WorkPool& operator=(const WorkPool&) = delete;

  // Run fn(i) for every i in [0, n) on the caller plus up to threads - 1 helpers;
  // rethrows the first exception fn threw. Safe to call from several threads at once.
  void run(int64_t n, int threads, const std::function<void(int64_t)>& fn);

  // The process's pool: helper threads are a per-process resource, like OpenMP's.
  static WorkPool& shared();

 private:
  struct Job {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t n = 0;
    int helpers_wanted = 0;
    std::atomic<int> helpers_joined{0};
    const std::function<void(int64_t)>* fn = nullptr;
    std::mutex error_mu;
    std::exception_ptr error;
  };
  static void work(Job& job);
  void helper_loop();
  void ensure_helpers(int count);

  std::mutex mu_;
  std::condition_variable cv_;
  std::shared_ptr<Job> job_;
  uint64_t epoch_ = 0;
  bool stop_ = false;
  std::vector<std::thread> helpers_;
};

}  // namespace vattn
