#include "work_pool.h"

#include <algorithm>

namespace vattn {

WorkPool& WorkPool::shared() {
  static WorkPool pool;
  return pool;
}

WorkPool::~WorkPool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : helpers_) t.join();
}

void WorkPool::ensure_helpers(int count) {
  std::lock_guard<std::mutex> lk(mu_);
  while (int(helpers_.size()) < count) helpers_.emplace_back([this] { helper_loop(); });
}

void WorkPool::work(Job& job) {
  while (true) {
    const int64_t i = job.next.fetch_add(1, std::memory_order_relaxed);
    if (i >= job.n) return;
    try {
      (*job.fn)(i);
    } catch (...) {
      std::lock_guard<std::mutex> lk(job.error_mu);
      if (!job.error) job.error = std::current_exception();
    }
    job.done.fetch_add(1, std::memory_order_release);
  }
}

void WorkPool::helper_loop() {
  uint64_t seen = 0;
  while (true) {
    std::shared_ptr<Job> job;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stop_ || epoch_ != seen; });
      if (stop_) return;
      seen = epoch_;
      job = job_;
    }
    // Only as many helpers as the caller asked for take part.
    if (job && job->helpers_joined.fetch_add(1) < job->helpers_wanted) work(*job);
  }
}

void WorkPool::run(int64_t n, int threads, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  auto job = std::make_shared<Job>();
  job->n = n;
  job->fn = &fn;
  job->helpers_wanted = int(std::min<int64_t>(std::max(threads, 1) - 1, n - 1));
  if (job->helpers_wanted > 0) {
    ensure_helpers(job->helpers_wanted);
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = job;
      epoch_++;
    }
    cv_.notify_all();
  }
  work(*job);
  // Every item is claimed; wait only for those still running on a helper. A helper that
  // wakes up later finds nothing left and never touches fn.
  for (int spins = 0; job->done.load(std::memory_order_acquire) < n; ++spins)
    if (spins > 64) std::this_thread::yield();
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (job_ == job) job_.reset();
  }
  if (job->error) std::rethrow_exception(job->error);
}

}  // namespace vattn
