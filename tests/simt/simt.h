// A CPU executor for this project's CUDA kernels: the names of csrc/common/device.cuh (PTX wrappers,
// dynamic shared memory, launch) implemented in host C++, so that a kernel source compiles with g++ and
// runs its own index arithmetic, pipeline and synchronisation on a machine without a GPU.
//
// Model:
//   * Blocks run one after another; the threads of a block are host threads (std::thread), so nothing
//     orders them but __syncthreads and the warp-collective instructions, as on the GPU. Built with
//     -fsanitize=thread, a missing __syncthreads between two threads' shared-memory accesses is reported
//     as a data race; built with -fsanitize=address, an out-of-bounds global or shared access is.
//   * cp.async: the source is read at issue; the 16 bytes land in shared memory at the cp.async.wait_group
//     that retires their group (late_copies), and until then the destination holds 0xFF bytes (poison:
//     NaN as a half, -1 as a word). A read of a stage before its wait_group, or a refill of a slot that a
//     slower thread is still reading, therefore gives wrong numbers, and under ThreadSanitizer both the
//     poison write at issue and the data write at landing are checked against the other threads.
//   * ldmatrix.x4 and mma.m16n8k16 gather the 32 lanes' operands through a per-warp exchange and hand each
//     lane exactly the registers the PTX ISA's fragment layouts give it; the products are summed in double
//     and rounded to float once per mma. A warp whose lanes reach different collectives, or a collective
//     after some lanes exited, fails with a message.
//   * Shared memory starts as 0xFF bytes (uninitialised), is sized exactly as launched (so ASan sees an
//     overrun), and a launch asking for more than 48 KB without the opt-in attribute fails, as on the GPU.
//   * A barrier that some threads never reach fails as a deadlock after Options::deadlock_seconds.
//   * Memory access accounting (stats()): for every warp-wide cp.async (grouped by the site the kernel
//     names in the call, as the GPU groups lanes by instruction) the global bytes asked for against the 32-byte sectors touched, and the
//     shared-memory wavefronts its 16-byte stores need; for every ldmatrix, its wavefronts; for every plain
//     load or store through grace_kernels::mem, its sectors (global) or bank wavefronts (shared). These
//     count what the access pattern costs on NVIDIA's memory system; they are not timings.
// Limits: warp-collective exchanges order the lanes of one warp (the GPU does not promise that for
// ordinary memory), so a race between two lanes of one warp can go unreported; blocks never overlap, so
// races between blocks are not modelled; floating-point results match the GPU's to rounding, not bits.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <vector_functions.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// CUDA's qualifiers mean nothing on the host (the CUDA headers would turn them into unknown attributes).
#undef __device__
#undef __global__
#undef __launch_bounds__
#define __device__
#define __global__
#define __launch_bounds__(...)

namespace simt {

// Reports and aborts; the first thread to fail speaks, the others wait for the abort.
[[noreturn]] inline void fail(const char* fmt, ...) {
  static std::mutex first;
  first.lock();
  std::va_list args;
  va_start(args, fmt);
  std::fputs("simt: ", stderr);
  std::vfprintf(stderr, fmt, args);
  std::fputc('\n', stderr);
  va_end(args);
  std::fflush(stderr);
  std::abort();
}

struct Options {
  bool late_copies = true;     // cp.async lands at its wait_group (else at issue)
  bool poison = true;          // with late_copies: 0xFF in the destination from issue until landing
  unsigned seed = 0;           // the order blocks run in (0: grid order)
  int deadlock_seconds = 120;  // a barrier waited on longer than this is a deadlock
};

inline Options& options() {
  static Options o;
  return o;
}

// A reusable barrier over a fixed set of threads, of which some may leave (exit) along the way; leaving
// threads stop being waited for, as exited threads stop counting for bar.sync on the GPU.
class Barrier {
 public:
  explicit Barrier(int count) : expected_(count) {}

  void arrive_and_wait(const char* what) {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_;
    if (++arrived_ == expected_) {
      release();
      return;
    }
    const auto timeout = std::chrono::seconds(options().deadlock_seconds);
    if (!cv_.wait_for(lock, timeout, [&] { return generation_ != generation; })) {
      fail("deadlock at %s: %d of %d threads arrived, the others never came", what, arrived_, expected_);
    }
  }

  void leave() {
    std::lock_guard<std::mutex> lock(mutex_);
    --expected_;
    if (arrived_ > 0 && arrived_ == expected_) release();
  }

 private:
  void release() {
    arrived_ = 0;
    ++generation_;
    cv_.notify_all();
  }

  std::mutex mutex_;
  std::condition_variable cv_;
  int expected_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
};

struct Warp {
  // One lane's side of a warp-collective instruction. Two sets, used alternately: a lane can write set p
  // again only after every lane has passed the next collective, by when all reads of set p are done.
  struct Slot {
    unsigned seq = ~0u;  // the lane's count of collectives so far: equal across a converged warp
    const char* op = nullptr;
    const void* addr = nullptr;
    uint32_t regs[6] = {};
  };
  Barrier barrier{32};
  Slot slots[2][32];
  long ldmatrix_instructions = 0, ldmatrix_wavefronts = 0;  // written by lane 0 only
  std::atomic<bool> exited[32] = {};
};

// One lane's cp.async, logged for the access accounting (in its thread's log: the lane is the log's index % 32).
struct CopyRecord {
  const char* site;  // the access site the kernel names (a string literal)
  unsigned count;    // how many times this lane has issued from that site before: with the site, the instruction
  uintptr_t global;  // 0 when src-size is 0 (nothing read)
  ptrdiff_t shared;  // offset in the block's shared memory
};

// One lane's plain load or store through grace_kernels::mem (in its thread's log, as CopyRecord).
struct AccessRecord {
  const char* site;
  unsigned count;
  bool store;
  bool shared;
  uintptr_t address;  // shared: offset in the block's shared memory
  int bytes;
};

struct Block {
  Block(dim3 grid_dim, dim3 block_dim, dim3 block_idx, int smem_size, int threads)
      : grid(grid_dim), dim(block_dim), index(block_idx), smem_bytes(smem_size), barrier(threads), copies(threads), accesses(threads) {
    smem.reset(new int4[std::max(smem_size, 16) / 16]);
    std::memset(static_cast<void*>(smem.get()), 0xFF, std::max(smem_size, 16));
    for (int w = 0; w < (threads + 31) / 32; ++w) warps.push_back(std::make_unique<Warp>());
  }
  dim3 grid, dim, index;
  std::unique_ptr<int4[]> smem;
  int smem_bytes;
  Barrier barrier;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<std::vector<CopyRecord>> copies;  // per thread
  std::vector<std::vector<AccessRecord>> accesses;  // per thread
};

struct CopySiteStats {
  long instructions = 0;     // warp-wide instructions
  long bytes = 0;            // global bytes asked for
  long sectors = 0;          // distinct 32-byte global sectors touched, per instruction
  long smem_wavefronts = 0;  // shared-memory wavefronts of the 16-byte stores
  long smem_ideal = 0;       // one per 8 active lanes: what a conflict-free pattern needs
};

struct AccessSiteStats {
  bool store = false, shared = false;
  long instructions = 0;  // warp-wide instructions
  long bytes = 0;         // bytes asked for
  long sectors = 0;       // global: distinct 32-byte sectors touched, per instruction
  long wavefronts = 0;    // shared: bank wavefronts
  long ideal = 0;         // shared: one per phase of active lanes (conflict-free)
};

struct Stats {
  std::map<std::string, CopySiteStats> cp_async;  // by site name
  std::map<std::string, AccessSiteStats> plain;   // grace_kernels::mem loads and stores, by site name
  long ldmatrix_instructions = 0, ldmatrix_wavefronts = 0;
};

// Summed over every block run so far. Updated between blocks only, by the launching thread.
inline Stats& stats() {
  static Stats st;
  return st;
}

// Wavefronts of one phase of shared-memory accesses of `bytes` each at the given offsets: each of the 32
// banks (4-byte words, word w in bank w % 32) serves one distinct word per wavefront; lanes reading the
// same word share it.
inline int phase_wavefronts(const std::vector<ptrdiff_t>& offsets, int bytes = 16) {
  std::map<int, std::vector<ptrdiff_t>> by_bank;
  for (ptrdiff_t o : offsets) {
    for (ptrdiff_t word = o / 4; word <= (o + bytes - 1) / 4; ++word) {
      auto& v = by_bank[static_cast<int>(word % 32)];
      if (std::find(v.begin(), v.end(), word) == v.end()) v.push_back(word);
    }
  }
  size_t worst = 0;
  for (const auto& [bank, words] : by_bank) worst = std::max(worst, words.size());
  return static_cast<int>(worst);
}

// Lanes a shared-memory access of `bytes` serves per phase: the 128 bytes the banks deliver at once.
inline int lanes_per_phase(int bytes) { return std::clamp(128 / std::max(bytes, 4), 8, 32); }

// A block's per-thread log regrouped into warp instructions: (warp, site, count) -> (lane, record) of the
// lanes that issued that instruction.
template <typename Record>
std::map<std::tuple<int, std::string_view, unsigned>, std::vector<std::pair<int, const Record*>>> by_instruction(
    const std::vector<std::vector<Record>>& per_thread) {
  std::map<std::tuple<int, std::string_view, unsigned>, std::vector<std::pair<int, const Record*>>> instructions;
  for (size_t t = 0; t < per_thread.size(); ++t) {
    for (const Record& r : per_thread[t]) {
      instructions[{static_cast<int>(t / 32), r.site, r.count}].emplace_back(static_cast<int>(t % 32), &r);
    }
  }
  return instructions;
}

// Adds a finished block's logged accesses (cp.async, plain, ldmatrix) to stats().
inline void account_copies(const Block& b) {
  for (const auto& [key, lanes] : by_instruction(b.copies)) {
    CopySiteStats& site = stats().cp_async[std::string(std::get<1>(key))];
    ++site.instructions;
    std::vector<uintptr_t> sectors;
    std::vector<ptrdiff_t> phases[4];
    for (const auto& [lane, r] : lanes) {
      if (r->global != 0) {
        site.bytes += 16;
        if (std::find(sectors.begin(), sectors.end(), r->global / 32) == sectors.end()) sectors.push_back(r->global / 32);
      }
      phases[lane / 8].push_back(r->shared);
    }
    site.sectors += static_cast<long>(sectors.size());
    for (const auto& phase : phases) {
      if (phase.empty()) continue;
      site.smem_wavefronts += phase_wavefronts(phase);
      ++site.smem_ideal;
    }
  }
  for (const auto& [key, lanes] : by_instruction(b.accesses)) {
    AccessSiteStats& site = stats().plain[std::string(std::get<1>(key))];
    const AccessRecord& first = *lanes.front().second;
    site.store = first.store;
    site.shared = first.shared;
    ++site.instructions;
    std::vector<uintptr_t> sectors;
    std::map<int, std::vector<ptrdiff_t>> phases;
    for (const auto& [lane, r] : lanes) {
      site.bytes += r->bytes;
      if (r->shared) {
        phases[lane / lanes_per_phase(r->bytes)].push_back(static_cast<ptrdiff_t>(r->address));
        continue;
      }
      for (uintptr_t s = r->address / 32; s <= (r->address + r->bytes - 1) / 32; ++s) {
        if (std::find(sectors.begin(), sectors.end(), s) == sectors.end()) sectors.push_back(s);
      }
    }
    site.sectors += static_cast<long>(sectors.size());
    for (const auto& [phase, offsets] : phases) {
      site.wavefronts += phase_wavefronts(offsets, first.bytes);
      ++site.ideal;
    }
  }
  for (const auto& w : b.warps) {
    stats().ldmatrix_instructions += w->ldmatrix_instructions;
    stats().ldmatrix_wavefronts += w->ldmatrix_wavefronts;
  }
}

struct PendingCopy {
  void* dst;
  alignas(16) unsigned char bytes[16];
};

struct Thread {
  Thread(Block* b, dim3 i, int l, int w) : block(b), index(i), lane(l), warp(w) {}
  Block* block;
  dim3 index;
  int lane, warp;
  unsigned collectives = 0;
  std::map<std::string_view, unsigned> copies_from;    // cp.async issued so far, per site
  std::map<std::string_view, unsigned> accesses_from;  // grace_kernels::mem accesses so far, per site
  std::vector<PendingCopy> open;                   // issued since the last commit_group
  std::deque<std::vector<PendingCopy>> committed;  // committed groups, oldest first
};

inline thread_local Thread* current = nullptr;

inline Thread& self() {
  if (current == nullptr) fail("a device function was called outside a kernel launch");
  return *current;
}

inline void check_aligned(const void* p, uintptr_t alignment, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % alignment != 0) {
    fail("%s: address %p is not %d-byte aligned", what, p, static_cast<int>(alignment));
  }
}

inline void check_shared(const void* p, int bytes, const char* what) {
  const Block& b = *self().block;
  const auto* base = reinterpret_cast<const char*>(b.smem.get());
  const auto* q = static_cast<const char*>(p);
  if (q < base || q + bytes > base + b.smem_bytes) {
    fail("%s: %d bytes at shared offset %td are outside the block's %d bytes of dynamic shared memory", what,
         bytes, q - base, b.smem_bytes);
  }
}

// The calling lane's view of one warp-collective instruction.
class Exchange {
 public:
  explicit Exchange(const char* op) : t_(self()), w_(*t_.block->warps[t_.warp]), seq_(t_.collectives++) {
    mine().seq = seq_;
    mine().op = op;
  }

  Warp::Slot& mine() { return w_.slots[seq_ & 1][t_.lane]; }
  const Warp::Slot& lane(int l) const { return w_.slots[seq_ & 1][l]; }

  // Every lane has deposited its operands (and all 32 are at this same instruction). A lane that exited
  // before it left an older seq behind (the barrier stopped waiting for it); one that exits after it
  // cannot have overwritten its slot.
  void sync() {
    const char* op = mine().op;
    w_.barrier.arrive_and_wait(op);
    for (int l = 0; l < 32; ++l) {
      const Warp::Slot& other = lane(l);
      if (other.seq != seq_ && w_.exited[l]) {
        fail("%s in warp %d: lane %d has exited (warp-collectives need all 32 lanes)", op, t_.warp, l);
      }
      if (other.seq != seq_ || std::strcmp(other.op, op) != 0) {
        fail("divergent warp %d: lane %d is at %s while lane %d is at %s", t_.warp, t_.lane, op, l,
             other.op == nullptr ? "(none yet)" : other.op);
      }
    }
  }

 private:
  Thread& t_;
  Warp& w_;
  unsigned seq_;
};

inline void cp_async(void* dst, const void* src, bool valid, const char* site) {
  Thread& t = self();
  check_shared(dst, 16, "cp.async destination");
  check_aligned(dst, 16, "cp.async destination");
  t.block->copies[t.warp * 32 + t.lane].push_back({site, t.copies_from[site]++, valid ? reinterpret_cast<uintptr_t>(src) : 0,
                                                  static_cast<char*>(dst) - reinterpret_cast<char*>(t.block->smem.get())});
  PendingCopy c{dst, {}};
  if (valid) {
    check_aligned(src, 16, "cp.async source");
    std::memcpy(c.bytes, src, 16);
  }
  if (!options().late_copies) {
    std::memcpy(dst, c.bytes, 16);
    return;
  }
  if (options().poison) std::memset(dst, 0xFF, 16);
  t.open.push_back(c);
}

// A plain access through grace_kernels::mem: logged for the accounting, bounds-checked if shared.
inline void log_access(const void* p, int bytes, bool store, const char* site) {
  Thread& t = self();
  const auto* base = reinterpret_cast<const char*>(t.block->smem.get());
  const auto* q = static_cast<const char*>(p);
  const bool shared = q >= base && q < base + std::max(t.block->smem_bytes, 16);
  if (shared) check_shared(p, bytes, store ? "shared store" : "shared load");
  check_aligned(p, static_cast<uintptr_t>(bytes), store ? "store" : "load");
  t.block->accesses[t.warp * 32 + t.lane].push_back(
      {site, t.accesses_from[site]++, store, shared,
       shared ? static_cast<uintptr_t>(q - base) : reinterpret_cast<uintptr_t>(p), bytes});
}

inline void cp_async_commit() {
  Thread& t = self();
  t.committed.push_back(std::move(t.open));
  t.open.clear();
}

inline void cp_async_wait(int pending) {
  Thread& t = self();
  while (static_cast<int>(t.committed.size()) > pending) {
    for (const PendingCopy& c : t.committed.front()) std::memcpy(c.dst, c.bytes, 16);
    t.committed.pop_front();
  }
}

template <typename T>
float element(uint32_t reg, int half) {
  const auto bits = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xFFFF);
  if constexpr (std::is_same_v<T, __half>) {
    __half_raw raw;
    raw.x = bits;
    return __half2float(__half(raw));
  } else {
    const uint32_t wide = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &wide, 4);
    return f;
  }
}

inline std::map<const void*, int>& smem_opt_in() {
  static std::map<const void*, int> limits;
  return limits;
}

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

// Runs body() as every thread of every block of the grid.
template <typename Body>
void run_grid(dim3 grid, dim3 block, int smem_bytes, Body body) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (threads <= 0 || threads > 1024) fail("launch: %d threads per block", threads);
  std::vector<dim3> order;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) order.emplace_back(x, y, z);
  if (options().seed != 0) std::shuffle(order.begin(), order.end(), std::mt19937(options().seed));
  for (const dim3& index : order) {
    Block b(grid, block, index, smem_bytes, threads);
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int i = 0; i < threads; ++i) {
      pool.emplace_back([&b, &body, &block, i] {
        Thread t(&b, dim3(i % block.x, i / block.x % block.y, i / (block.x * block.y)), i % 32, i / 32);
        current = &t;
        body();
        if (!t.open.empty() || !t.committed.empty()) {
          fail("thread %d of block (%u, %u, %u) exited with cp.async copies never waited for", i, b.index.x,
               b.index.y, b.index.z);
        }
        b.warps[t.warp]->exited[t.lane] = true;
        b.warps[t.warp]->barrier.leave();
        b.barrier.leave();
        current = nullptr;
      });
    }
    for (std::thread& th : pool) th.join();
    account_copies(b);
  }
}

}  // namespace simt

// ---------------------------------------------------------------------------------------------------
// The names kernels use (csrc/common/device.cuh), on the host.

#define threadIdx (::simt::self().index)
#define blockIdx (::simt::self().block->index)
#define blockDim (::simt::self().block->dim)
#define gridDim (::simt::self().block->grid)

inline void __syncthreads() { ::simt::self().block->barrier.arrive_and_wait("__syncthreads"); }

inline int min(int a, int b) { return a < b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }

// Device-only in cuda_fp16.h. Through double: exact for the dequantization's operands (small integers
// and powers of two), correctly rounded up to a double rounding in general.
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
  auto one = [](__half x, __half y, __half z) {
    return __double2half(static_cast<double>(__half2float(x)) * __half2float(y) + __half2float(z));
  };
  return __halves2half2(one(__low2half(a), __low2half(b), __low2half(c)),
                        one(__high2half(a), __high2half(b), __high2half(c)));
}

namespace grace_kernels::ptx {

// The emulation has no L2: the policy is a token.
inline uint64_t evict_first_policy() { return 1; }

// The site names the kernel passes group the lanes into warp instructions for the access accounting.
inline void cp_async(void* smem, const void* gmem, bool valid, const char* site) {
  simt::cp_async(smem, gmem, valid, site);
}
inline void cp_async_policy(void* smem, const void* gmem, uint64_t, const char* site) {
  simt::cp_async(smem, gmem, true, site);
}
inline void cp_async_commit() { simt::cp_async_commit(); }

template <int kPending>
void cp_async_wait() {
  simt::cp_async_wait(kPending);
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  simt::check_shared(smem, 16, "ldmatrix");
  simt::check_aligned(smem, 16, "ldmatrix row");
  simt::Exchange ex("ldmatrix.x4");
  ex.mine().addr = smem;
  ex.sync();
  const int lane = simt::self().lane;
  if (lane == 0) {  // one phase per matrix: its eight row addresses
    simt::Warp& w = *simt::self().block->warps[simt::self().warp];
    const auto* base = reinterpret_cast<const char*>(simt::self().block->smem.get());
    ++w.ldmatrix_instructions;
    for (int i = 0; i < 4; ++i) {
      std::vector<ptrdiff_t> rows;
      for (int l = 8 * i; l < 8 * i + 8; ++l) rows.push_back(static_cast<const char*>(ex.lane(l).addr) - base);
      w.ldmatrix_wavefronts += simt::phase_wavefronts(rows);
    }
  }
  // Register i is matrix i, whose rows lanes 8 i .. 8 i + 7 addressed; this lane gets row lane / 4,
  // elements 2 (lane % 4) and 2 (lane % 4) + 1.
  for (int i = 0; i < 4; ++i) {
    std::memcpy(&r[i], static_cast<const char*>(ex.lane(8 * i + lane / 4).addr) + 4 * (lane % 4), 4);
  }
}

template <typename T>
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  simt::Exchange ex(std::is_same_v<T, __half> ? "mma.m16n8k16.f16" : "mma.m16n8k16.bf16");
  std::copy(a, a + 4, ex.mine().regs);
  ex.mine().regs[4] = b0;
  ex.mine().regs[5] = b1;
  ex.sync();
  // PTX ISA fragments, g = lane / 4, t = lane % 4: A register (r / 8) + 2 (k / 8) of lane 4 (r % 8) + (k % 8) / 2
  // holds A[r][k] in half k % 2; B register 4 + k / 8 of lane 4 n + (k % 8) / 2 holds B[k][n]; C/D element i
  // is row g + 8 (i / 2), column 2 t + i % 2.
  auto A = [&](int r, int k) { return simt::element<T>(ex.lane(4 * (r % 8) + (k % 8) / 2).regs[r / 8 + 2 * (k / 8)], k % 2); };
  auto B = [&](int k, int n) { return simt::element<T>(ex.lane(4 * n + (k % 8) / 2).regs[4 + k / 8], k % 2); };
  const int lane = simt::self().lane, g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
    double sum = 0.0;
    for (int k = 0; k < 16; ++k) sum += static_cast<double>(A(row, k)) * B(k, col);
    c[i] = static_cast<float>(static_cast<double>(c[i]) + sum);
  }
}

// The generic truth table: bit i of kLut is the result for a = bit 2 of i, b = bit 1, c = bit 0.
template <int kLut>
uint32_t lop3(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d = 0;
  for (int i = 0; i < 8; ++i) {
    if ((kLut >> i) & 1) d |= ((i & 4) ? a : ~a) & ((i & 2) ? b : ~b) & ((i & 1) ? c : ~c);
  }
  return d;
}

}  // namespace grace_kernels::ptx

namespace grace_kernels::mem {

template <typename T>
T load(const T* p, const char* site) {
  simt::log_access(p, sizeof(T), false, site);
  return *p;
}

template <typename T>
void store(T* p, const T& v, const char* site) {
  simt::log_access(p, sizeof(T), true, site);
  *p = v;
}

}  // namespace grace_kernels::mem

namespace grace_kernels::rt {

template <typename T>
T* dynamic_smem() {
  return reinterpret_cast<T*>(simt::self().block->smem.get());
}

template <typename... KArgs>
cudaError_t set_max_dynamic_smem(void (*kernel)(KArgs...), int bytes) {
  // The largest opt-in of the architectures built for: 227 KB on sm_90, 163 KB on sm_80.
  constexpr int kSm80Limit = 163 * 1024;
  if (bytes > kSm80Limit) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(simt::launch_mutex());
  simt::smem_opt_in()[reinterpret_cast<const void*>(kernel)] = bytes;
  return cudaSuccess;
}

template <typename... KArgs, typename... Args>
cudaError_t launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, int smem_bytes, cudaStream_t, Args&&... args) {
  {
    std::lock_guard<std::mutex> lock(simt::launch_mutex());
    const auto it = simt::smem_opt_in().find(reinterpret_cast<const void*>(kernel));
    const int limit = it == simt::smem_opt_in().end() ? 48 * 1024 : std::max(48 * 1024, it->second);
    if (smem_bytes > limit) return cudaErrorInvalidValue;
  }
  simt::run_grid(grid, block, smem_bytes, [&] { kernel(args...); });
  return cudaSuccess;
}

}  // namespace grace_kernels::rt
