// The team of threads that runs one layer's sequence, each thread owning a block of rows (examples): the barrier at
// batch-normalized steps, the buffers through which the threads exchange column sums, and how a team is formed
// (its row split, and its fallback to one thread when it mostly waits).
#pragma once

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <utility>
#include <vector>

#include "common.h"

namespace rbn {

// Seconds each thread of the current call has waited at barriers (a team has at most 64 threads).
constexpr int64_t kMaxTeam = 64;
inline double barrier_wait[kMaxTeam];

// The barrier between the threads of a team at batch-normalized steps. A waiter spins for at most spin_seconds
// (a healthy wait is about a microsecond: the team works in lockstep), then sleeps on a futex until the last thread
// arrives. The spin is bounded by the clock, not by a count of pause instructions: a pause takes 10 cycles on some
// CPUs and 140 on others, and 4096 of them were up to 200 us. OpenMP's own barrier spins far longer. When another
// process keeps a core busy, a thread of the team is descheduled for whole time slices; a waiter that keeps spinning
// holds the one core the late thread could run on, and every one of the thousands of barriers of a step pays for it.
// Sleeping frees the core, so the scheduler can run the late thread there at once.
inline std::atomic<double> spin_seconds{1e-5};

struct TeamBarrier {
  std::atomic<int64_t> arrived{0};
  std::atomic<uint32_t> phase{0};  // 32 bits: then std::atomic::wait is a futex on the variable itself (Linux)
  int64_t size = 1;

  void wait() {
    const uint32_t current = phase.load(std::memory_order_acquire);
    if (arrived.fetch_add(1, std::memory_order_acq_rel) + 1 == size) {
      arrived.store(0, std::memory_order_relaxed);
      phase.store(current + 1, std::memory_order_release);
      phase.notify_all();
      return;
    }
    const double deadline = seconds() + spin_seconds.load(std::memory_order_relaxed);
    for (int spin = 1; phase.load(std::memory_order_acquire) == current; ++spin) {
#if defined(__x86_64__)
      __builtin_ia32_pause();
#endif
      if (spin % 16 == 0 && seconds() > deadline) {
        while (phase.load(std::memory_order_acquire) == current) phase.wait(current, std::memory_order_acquire);
        return;
      }
    }
  }
};

// The threads of one call and the buffers through which they exchange column sums. The rows are cut into `blocks`
// fixed by the number of threads asked for, not by the number that runs: each block keeps its own partial sums, in
// `slots` arrays of (blocks, width) each, twice (alternating timesteps, so that a fast thread never overwrites sums
// a slow one is still reading), and the sums are combined in block order. A thread runs one block, or several
// consecutive ones when fewer threads run than were asked for (the fallback below, OMP_THREAD_LIMIT), and the
// numbers are the same bits either way: only the number of threads asked for, and the data, decide them.
template <typename T>
struct Team {
  int64_t size = 1;                      // threads (they meet at the barrier)
  int64_t blocks = 1;                    // blocks of rows, each with its own partial sums
  int64_t width = 0;
  T* buffer = nullptr;
  const int64_t* starts = nullptr;       // (blocks + 1) first row of each block
  const int64_t* first_block = nullptr;  // (size + 1) first block of each thread
  TeamBarrier* sync = nullptr;

  RBN_INLINE void barrier(int64_t id) const {
    if (size == 1) return;
    const double start = seconds();
    sync->wait();
    barrier_wait[id] += seconds() - start;
  }
  RBN_INLINE T* slot(int64_t t, int64_t index, int64_t block) const {
    return buffer + (((t & 1) * 8 + index) * blocks + block) * width;
  }
  // body(block, r0, r1) for each block of thread `id`, rows [r0, r1) relative to the thread's first row.
  template <typename Body>
  RBN_INLINE void for_each_block(int64_t id, const Body& body) const {
    const int64_t b0 = starts[first_block[id]];
    for (int64_t k = first_block[id]; k < first_block[id + 1]; ++k) body(k, starts[k] - b0, starts[k + 1] - b0);
  }
};

// out = sum over the blocks of their partial sums (slot of timestep t), in block order.
template <typename T>
RBN_INLINE void combine(const Team<T>& team, int64_t t, int64_t index, int64_t n, T* out) {
  fill(out, n, T(0));
  for (int64_t k = 0; k < team.blocks; ++k) {
    const T* part = team.slot(t, index, k);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] += part[j];
  }
}


// Rows [b0, b1) of each of `threads` parts: contiguous blocks of examples.
inline std::vector<std::pair<int64_t, int64_t>> split_rows(int64_t threads, int64_t B) {
  const int64_t n = std::max<int64_t>(1, std::min({threads, B, kMaxTeam}));
  std::vector<std::pair<int64_t, int64_t>> parts;
  for (int64_t k = 0; k < n; ++k) parts.emplace_back(B * k / n, B * (k + 1) / n);
  return parts;
}

// A team over the rows of a batch together with the storage its `Team` points into (so it is neither copied nor
// moved): the blocks (split for the `asked` threads), the rows of each of the `size` threads that run (whole
// blocks), the exchange buffers (16 slots of (blocks, width)) and the barrier.
template <typename T>
struct TeamOverRows {
  std::vector<std::pair<int64_t, int64_t>> parts;  // rows of each thread
  std::vector<T> exchange;
  std::vector<int64_t> starts, first_block;
  TeamBarrier sync;
  Team<T> team;

  TeamOverRows(int64_t asked, int64_t size, int64_t B, int64_t width) {
    const auto blocks = split_rows(asked, B);
    team.blocks = static_cast<int64_t>(blocks.size());
    team.size = std::max<int64_t>(1, std::min(size, team.blocks));
    team.width = width;
    for (const auto& block : blocks) starts.push_back(block.first);
    starts.push_back(B);
    for (int64_t id = 0; id <= team.size; ++id) first_block.push_back(team.blocks * id / team.size);
    for (int64_t id = 0; id < team.size; ++id) parts.emplace_back(starts[first_block[id]], starts[first_block[id + 1]]);
    exchange.assign(16 * team.blocks * width, T(0));
    team.buffer = exchange.data();
    team.starts = starts.data();
    team.first_block = first_block.data();
    sync.size = team.size;
    team.sync = &sync;
  }
  TeamOverRows(const TeamOverRows&) = delete;
  TeamOverRows& operator=(const TeamOverRows&) = delete;
};

// When the threads of a team spent more than half of a call waiting for each other at barriers, the team ran slower
// than one thread would have: the machine has fewer cores free than the team has threads (another process holds a
// core; every thread of a parallel sweep asks for all of them). A barrier cannot fix that: a waiter that spins
// holds a core, one that sleeps waits for the scheduler to give one back, thousands of times per sequence. So the
// next calls run on one thread, for a number of calls that doubles while it recurs (4 up to 256), and then the team
// is tried again. The numbers do not change: the one thread runs every block of the team, with the team's sums.
inline std::atomic<bool> team_fallback{true};
inline std::atomic<int64_t> solo_calls_left{0}, solo_calls_next{4};

inline int64_t team_threads(int64_t threads) {
  if (threads <= 1 || !team_fallback.load()) return threads;
  if (solo_calls_left.load() <= 0) return threads;
  solo_calls_left.fetch_sub(1);
  return 1;
}

// Whether the next call's team runs on one thread.
inline bool team_is_solo() { return team_fallback.load() && solo_calls_left.load() > 0; }
// The threads that run a call's work outside its team (copies, products over the sequence): one while the team
// does, else those asked for.
inline int64_t team_running(int64_t threads) { return team_is_solo() ? 1 : threads; }

inline void record_team(int64_t size, double elapsed) {
  if (size <= 1 || !team_fallback.load()) return;
  double waited = 0;
  for (int64_t id = 0; id < size; ++id) waited += barrier_wait[id];
  if (waited / size > 0.5 * elapsed) {
    const int64_t calls = solo_calls_next.load();
    solo_calls_left.store(calls);
    solo_calls_next.store(std::min<int64_t>(2 * calls, 256));
  } else {
    solo_calls_next.store(4);
  }
}

// Runs body(rows, id) on every thread of an OpenMP team over the B rows, for as many threads as asked where the
// runtime gives them. It may give fewer (OMP_THREAD_LIMIT, a call from inside another parallel region,
// omp_set_dynamic): a team split for more threads than it has would leave rows unwritten and its barrier waiting
// forever. Then no thread starts, and the same blocks are shared again among the threads obtained, down to one,
// which every runtime gives. Returns the team that ran, for its size and split.
template <typename T, typename Body>
std::unique_ptr<TeamOverRows<T>> run_team(int64_t threads, int64_t B, int64_t width, const Body& body) {
  for (int64_t size = team_threads(threads);;) {
    auto rows = std::make_unique<TeamOverRows<T>>(threads, size, B, width);
    size = rows->team.size;
    std::atomic<int64_t> obtained{size};
    const double start = seconds();
#pragma omp parallel num_threads(size)
    {
      const int64_t n = omp_get_num_threads();
      if (n == size) {
        body(*rows, static_cast<int64_t>(omp_get_thread_num()));
      } else {
        obtained.store(n, std::memory_order_relaxed);
      }
    }
    if (obtained.load() == size) {
      record_team(size, seconds() - start);
      return rows;
    }
    size = obtained.load();
  }
}


}  // namespace rbn
