// The scheduler behind tfk_cuda_emu.h: blocks one after another, a block's threads as fibers
// (ucontext) on the calling OS thread, switched only at barriers. See the header for what is checked.
#include "tfk_cuda_emu.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define __SANITIZE_ADDRESS__ 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
// TFKERNELS_CUDA_EMU_SANITIZE=address: AddressSanitizer checks every global-memory access of the
// kernels against torch's allocations. It has to be told when the stack changes under it (the
// fiber switches below), and a fiber stack that is reused holds the redzones of frames that never
// returned, which must be cleared.
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define TFK_ASAN 1
#else
#define TFK_ASAN 0
#endif

#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace tfk_emu {

uint3 g_threadIdx{0, 0, 0}, g_blockIdx{0, 0, 0};
dim3 g_blockDim, g_gridDim;

namespace {

constexpr size_t kStack = 256 * 1024;  // per fiber; the kernels' register arrays are at most a few KiB
constexpr size_t kCanary = 256;        // bytes checked past the end of dynamic shared memory
constexpr unsigned char kCanaryByte = 0xA5;

enum class State { Ready, WaitBlock, WaitWarp, Done };

void fiber_entry();

#if defined(__x86_64__)
// A fiber switch is a function call that saves the callee-saved registers (and the SSE/x87 control
// words) on the old stack and returns on the new one: no system call, unlike swapcontext, which
// saves the signal mask each time (that made many-block launches ~10x slower).
extern "C" void tfk_emu_switch(void** save_sp, void* new_sp);
asm(R"(
  .text
  .globl tfk_emu_switch
  .type tfk_emu_switch, @function
tfk_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size tfk_emu_switch, .-tfk_emu_switch
  .section .note.GNU-stack,"",@progbits
  .text
)");

struct Context {
  void* sp = nullptr;
  const void* bottom = nullptr;  // the stack, for AddressSanitizer's fiber annotations
  size_t size = 0;
  // a fresh fiber: a frame that tfk_emu_switch "returns" into fiber_entry with an aligned stack
  void make(char* stack, size_t size) {
    bottom = stack;
    this->size = size;
#if TFK_ASAN
    ASAN_UNPOISON_MEMORY_REGION(stack, size);
#endif
    uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + size) & ~static_cast<uintptr_t>(15);
    auto* p = reinterpret_cast<uint64_t*>(top);
    *--p = 0;                                             // fiber_entry's (never used) return address
    *--p = reinterpret_cast<uint64_t>(&fiber_entry);      // popped by ret: 16-byte aligned slot
    for (int i = 0; i < 6; ++i) *--p = 0;                 // rbp rbx r12 r13 r14 r15
    uint32_t csr[2];
    asm volatile("stmxcsr %0" : "=m"(csr[0]));
    asm volatile("fnstcw %0" : "=m"(*reinterpret_cast<uint16_t*>(&csr[1])));
    *--p = (static_cast<uint64_t>(csr[1] & 0xffffu) << 32) | csr[0];
    sp = p;
  }
};
inline void raw_switch(Context& from, Context& to) { tfk_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
  const void* bottom = nullptr;
  size_t size = 0;
  void make(char* stack, size_t size) {
    bottom = stack;
    this->size = size;
#if TFK_ASAN
    ASAN_UNPOISON_MEMORY_REGION(stack, size);
#endif
    getcontext(&uc);
    uc.uc_stack.ss_sp = stack;
    uc.uc_stack.ss_size = size;
    uc.uc_link = nullptr;
    makecontext(&uc, fiber_entry, 0);
  }
};
inline void raw_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// `exiting`: `from` is a fiber that is never resumed
inline void switch_to(Context& from, Context& to, bool exiting = false) {
#if TFK_ASAN
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(exiting ? nullptr : &fake_stack, to.bottom, to.size);
  raw_switch(from, to);
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#else
  (void)exiting;
  raw_switch(from, to);
#endif
}

// One cp.async: `bytes` from src (nullptr: zero-fill) to dst, done when a wait_group covers it.
struct Copy {
  void* dst;
  const void* src;
  int bytes;
};

struct Fiber {
  Context ctx;
  uint3 tid;
  int linear = 0;
  State state = State::Ready;
  unsigned wait_gen = 0;
  std::vector<Copy> open;                 // cp.async issued since the last commit_group
  std::vector<std::vector<Copy>> groups;  // committed groups, oldest first
};

// A barrier: `alive` threads take part; when the last arrives, `gen` moves on and frees the waiters.
struct Barrier {
  int alive = 0, arrived = 0;
  unsigned gen = 0;
  void release_if_complete() {
    if (arrived > 0 && arrived == alive) {
      arrived = 0;
      ++gen;
    }
  }
};

struct Warp : Barrier {
  uint64_t post[2][32] = {};  // shuffles alternate between the two, so one barrier per shuffle suffices
  int parity[32] = {};
  const void* table[32] = {};  // ldmatrix / mma: each lane's address or fragment, read between two barriers
};

struct Block : Barrier {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  Context main;
  Fiber* cur = nullptr;
  const std::function<void()>* body = nullptr;
};

Block* g_block = nullptr;
void* g_smem = nullptr;
size_t g_smem_bytes = 0;
// bytes the launch's cp.async copies read from global memory (zero fills read nothing): what the
// trace reports, so tests can see which tiles a kernel loads
uint64_t g_cp_async_bytes = 0;
std::mutex g_launch_mutex;  // one launch at a time: the globals above belong to it

cudaError_t g_error = cudaSuccess;  // sticky until cudaGetLastError, as a launch error is
std::string g_message;
std::mutex g_error_mutex;

std::map<const void*, int>& func_smem() {
  static std::map<const void*, int> m;
  return m;
}

void yield() {
  Block& b = *g_block;
  switch_to(b.cur->ctx, b.main);
}

void fiber_entry() {
  Block& b = *g_block;
#if TFK_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &b.main.bottom, &b.main.size);  // the launching thread's stack
#endif
  (*b.body)();
  Fiber& f = *b.cur;
  if (!f.open.empty() || !f.groups.empty()) set_error(cudaErrorLaunchFailure, "cp.async copies still in flight at thread exit");
  f.state = State::Done;
  // an exited thread no longer counts at the barriers (the hardware's rule for exited threads)
  --b.alive;
  b.release_if_complete();
  Warp& w = b.warps[f.linear / 32];
  --w.alive;
  w.release_if_complete();
  switch_to(f.ctx, b.main, /*exiting=*/true);  // never resumed
}

bool runnable(const Block& b, const Fiber& f) {
  switch (f.state) {
    case State::Ready: return true;
    case State::WaitBlock: return b.gen != f.wait_gen;
    case State::WaitWarp: return b.warps[f.linear / 32].gen != f.wait_gen;
    default: return false;
  }
}

std::string describe(const LaunchCfg& c) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "grid (%u, %u, %u), block (%u, %u, %u), %zu bytes of dynamic shared memory",
                c.grid.x, c.grid.y, c.grid.z, c.block.x, c.block.y, c.block.z, c.smem);
  return buf;
}

void fail(cudaError_t err, const std::string& msg) {
  std::lock_guard<std::mutex> lock(g_error_mutex);
  if (g_error == cudaSuccess) {
    g_error = err;
    g_message = msg;
  }
}

}  // namespace

void set_error(cudaError_t err, const char* what) {
  char buf[96];
  std::snprintf(buf, sizeof buf, " (block (%u, %u, %u), thread (%u, %u, %u))", g_blockIdx.x, g_blockIdx.y,
                g_blockIdx.z, g_threadIdx.x, g_threadIdx.y, g_threadIdx.z);
  fail(err, std::string(what) + buf);
}

int lane_id() { return g_block->cur->linear & 31; }

namespace {
void arrive(Barrier& bar, State wait) {
  if (++bar.arrived == bar.alive) {  // the last to arrive releases the others and goes on
    bar.arrived = 0;
    ++bar.gen;
    return;
  }
  Fiber& f = *g_block->cur;
  f.state = wait;
  f.wait_gen = bar.gen;
  yield();
}
}  // namespace

void syncthreads() { arrive(*g_block, State::WaitBlock); }

void syncwarp() { arrive(g_block->warps[g_block->cur->linear / 32], State::WaitWarp); }

uint64_t warp_exchange(uint64_t mine, int src_lane) {
  Block& b = *g_block;
  const int lane = b.cur->linear & 31;
  Warp& w = b.warps[b.cur->linear / 32];
  // A lane writes buffer k again only two shuffles later, after the barrier of the shuffle in
  // between, which every lane passes only once it has read buffer k.
  const int k = w.parity[lane];
  w.parity[lane] ^= 1;
  w.post[k][lane] = mine;
  syncwarp();  // every lane has posted
  return w.post[k][src_lane & 31];
}

void* dynamic_smem() { return g_smem; }

// ------------------------------------------------------------------ sm_80 warp-level instructions

namespace {
bool in_smem(const void* p, size_t bytes) {
  const auto a = reinterpret_cast<uintptr_t>(p), base = reinterpret_cast<uintptr_t>(g_smem);
  return a >= base && a + bytes <= base + g_smem_bytes;
}

float half_bits_to_f32(uint32_t h, bool bf16) {
  return bf16 ? bf16_to_f32(static_cast<uint16_t>(h)) : f16_to_f32(static_cast<uint16_t>(h));
}

// Every lane posts a pointer, then reads the others'; the caller ends with syncwarp() (after which
// a lane may post again: everyone has read).
// An instruction newer than the emulated GPU (TFKERNELS_CUDA_EMU_CC): the launch fails, as with an
// illegal instruction.
bool needs_arch(int cc, const char* what) {
  if (compute_capability() >= cc) return true;
  set_error(cudaErrorLaunchFailure, what);
  return false;
}

const void* const* warp_table(const void* mine) {
  Warp& w = g_block->warps[g_block->cur->linear / 32];
  w.table[g_block->cur->linear & 31] = mine;
  syncwarp();
  return w.table;
}

uint16_t u16(const void* row, int i) { return static_cast<const uint16_t*>(row)[i]; }
}  // namespace

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8j..8j+7 address the eight 16-byte rows of
// matrix j. Lane l receives in r[j] row l/4, columns 2(l%4) and 2(l%4)+1 of matrix j, or with
// .trans the transposed elements: rows 2(l%4) and 2(l%4)+1 of column l/4.
void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
  needs_arch(75, "ldmatrix: needs an sm_75 GPU");
  if ((reinterpret_cast<uintptr_t>(row) & 15u) != 0 || !in_smem(row, 16))
    set_error(cudaErrorLaunchFailure, "ldmatrix: row address not 16-byte aligned or not in shared memory");
  const int lane = lane_id(), g = lane / 4, t = lane % 4;
  const void* const* rows = warp_table(row);
  uint32_t out[4];
  for (int j = 0; j < 4; ++j) {
    const void* r0 = trans ? rows[8 * j + 2 * t] : rows[8 * j + g];
    const void* r1 = trans ? rows[8 * j + 2 * t + 1] : r0;
    if (!in_smem(r0, 16) || !in_smem(r1, 16)) {  // the owning lane has reported it; read nothing
      out[j] = 0;
      continue;
    }
    const uint32_t lo = trans ? u16(r0, g) : u16(r0, 2 * t), hi = trans ? u16(r1, g) : u16(r0, 2 * t + 1);
    out[j] = lo | (hi << 16);
  }
  syncwarp();
  for (int j = 0; j < 4; ++j) r[j] = out[j];
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: D = A B + C with the fragment layouts of the
// PTX ISA (csrc/mma.cuh lists them); products are exact in fp32 and summed in fp32.
void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  struct Frag {
    uint32_t a[4], b[2];
  };
  needs_arch(80, "mma.sync m16n8k16 (f16/bf16): needs an sm_80 GPU");
  const Frag mine{{a[0], a[1], a[2], a[3]}, {b0, b1}};
  const int lane = lane_id(), g = lane / 4, t = lane % 4;
  const void* const* all = warp_table(&mine);
  auto elem = [bf16](uint32_t reg, int k) { return half_bits_to_f32(k % 2 ? reg >> 16 : reg & 0xffffu, bf16); };
  auto A = [&](int row, int k) {
    return elem(static_cast<const Frag*>(all[4 * (row % 8) + (k % 8) / 2])->a[row / 8 + 2 * (k / 8)], k);
  };
  auto B = [&](int k, int n) { return elem(static_cast<const Frag*>(all[4 * n + (k % 8) / 2])->b[k / 8], k); };
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * t + e % 2;
    float s = c[e];
    for (int k = 0; k < 16; ++k) s = std::fma(A(row, k), B(k, col), s);
    out[e] = s;
  }
  syncwarp();
  for (int e = 0; e < 4; ++e) c[e] = out[e];
}

// cp.async.cg.shared.global (16 bytes, zero-filled when !valid): queued on the issuing thread, and
// done by the cp.async.wait_group that covers its group.
void cp_async(void* dst, const void* src, int bytes, bool valid) {
  if (!needs_arch(80, "cp.async: needs an sm_80 GPU")) return;
  if ((reinterpret_cast<uintptr_t>(dst) & 15u) != 0 || !in_smem(dst, bytes) ||
      (valid && (reinterpret_cast<uintptr_t>(src) & 15u) != 0)) {
    set_error(cudaErrorLaunchFailure, "cp.async: destination not 16-byte aligned shared memory, or source not 16-byte aligned");
    return;
  }
  g_block->cur->open.push_back(Copy{dst, valid ? src : nullptr, bytes});
  if (valid) g_cp_async_bytes += static_cast<uint64_t>(bytes);
}

void cp_async_commit() {
  Fiber& f = *g_block->cur;
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}

void cp_async_wait(int pending) {
  Fiber& f = *g_block->cur;
  while (static_cast<int>(f.groups.size()) > pending) {
    for (const Copy& c : f.groups.front()) {
      if (c.src)
        std::memcpy(c.dst, c.src, c.bytes);
      else
        std::memset(c.dst, 0, c.bytes);
    }
    f.groups.erase(f.groups.begin());
  }
}

int smem_optin() {
  const char* env = std::getenv("TFKERNELS_CUDA_EMU_SMEM");
  const int v = env ? std::atoi(env) : 0;
  return v > 0 ? v : 232448;  // H100: 227 KiB
}

int compute_capability() {
  const char* env = std::getenv("TFKERNELS_CUDA_EMU_CC");
  const int v = env ? std::atoi(env) : 0;
  return v > 0 ? v : 90;
}

void set_func_smem(const void* func, int bytes) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  func_smem()[func] = bytes;
}

cudaError_t launch(const LaunchCfg& cfg, const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  const dim3 g = cfg.grid, bd = cfg.block;
  const uint64_t threads = static_cast<uint64_t>(bd.x) * bd.y * bd.z;
  // the device's launch limits (compute capability 9.0)
  if (threads == 0 || threads > 1024 || bd.x > 1024 || bd.y > 1024 || bd.z > 64 || g.x == 0 || g.y == 0 ||
      g.z == 0 || g.x > 2147483647u || g.y > 65535 || g.z > 65535) {
    fail(cudaErrorInvalidConfiguration, "invalid launch configuration: " + describe(cfg));
    return cudaErrorInvalidConfiguration;
  }
  if (cfg.smem > 48 * 1024) {
    const auto it = func_smem().find(cfg.func);
    const int allowed = it == func_smem().end() ? 48 * 1024 : it->second;
    if (cfg.smem > static_cast<size_t>(allowed) || cfg.smem > static_cast<size_t>(smem_optin())) {
      fail(cudaErrorInvalidValue, "too much dynamic shared memory (more than 48 KiB needs cudaFuncSetAttribute, "
                                  "at most the opt-in limit " + std::to_string(smem_optin()) + "): " + describe(cfg));
      return cudaErrorInvalidValue;
    }
  }
  const char* trace = std::getenv("TFKERNELS_CUDA_EMU_TRACE");
  const bool tracing = trace && *trace && *trace != '0';
  if (tracing) std::fprintf(stderr, "tfk_emu launch: %s\n", describe(cfg).c_str());
  g_cp_async_bytes = 0;
  const int n = static_cast<int>(threads);
  std::vector<unsigned char> smem(cfg.smem + kCanary + 128);
  unsigned char* smem_base = smem.data() + (128 - reinterpret_cast<uintptr_t>(smem.data()) % 128) % 128;
  std::unique_ptr<char[]> stacks(new char[kStack * n]);
  Block b;
  b.fibers.resize(n);
  b.body = &body;
  g_block = &b;
  g_smem = smem_base;
  g_smem_bytes = cfg.smem;
  g_gridDim = g;
  g_blockDim = bd;
  std::string error;
  for (unsigned bz = 0; bz < g.z && error.empty(); ++bz)
    for (unsigned by = 0; by < g.y && error.empty(); ++by)
      for (unsigned bx = 0; bx < g.x && error.empty(); ++bx) {
        g_blockIdx = uint3{bx, by, bz};
        std::memset(smem_base, 0xff, cfg.smem);  // NaN in fp32/fp16/bf16: shared memory is never zeroed
        std::memset(smem_base + cfg.smem, kCanaryByte, kCanary);
#if TFK_ASAN
        ASAN_POISON_MEMORY_REGION(smem_base + cfg.smem, kCanary);  // under ASan, reads past the end fail too
#endif
        b.warps.assign((n + 31) / 32, Warp{});
        b.alive = n;
        b.arrived = 0;
        for (int t = 0; t < n; ++t) {
          Fiber& f = b.fibers[t];
          f.linear = t;
          f.tid = uint3{t % bd.x, (t / bd.x) % bd.y, t / (bd.x * bd.y)};
          f.state = State::Ready;
          f.open.clear();
          f.groups.clear();
          ++b.warps[t / 32].alive;
          f.ctx.make(stacks.get() + kStack * t, kStack);
        }
        // round-robin: each fiber runs until it waits at a barrier or ends
        for (;;) {
          bool progress = false, pending = false;
          for (Fiber& f : b.fibers) {
            if (f.state == State::Done) continue;
            pending = true;
            if (!runnable(b, f)) continue;
            f.state = State::Ready;
            b.cur = &f;
            g_threadIdx = f.tid;
            switch_to(b.main, f.ctx);
            progress = true;
          }
          if (!pending) break;
          if (!progress) {
            int wb = 0, ww = 0;
            for (const Fiber& f : b.fibers) {
              wb += f.state == State::WaitBlock;
              ww += f.state == State::WaitWarp;
            }
            error = "deadlock: not every thread reached the same barrier (" + std::to_string(wb) +
                    " threads wait at __syncthreads, " + std::to_string(ww) + " at a warp collective) in block (" +
                    std::to_string(bx) + ", " + std::to_string(by) + ", " + std::to_string(bz) + "): " + describe(cfg);
            break;
          }
        }
#if TFK_ASAN
        ASAN_UNPOISON_MEMORY_REGION(smem_base + cfg.smem, kCanary);
#endif
        for (size_t i = 0; i < kCanary && error.empty(); ++i)
          if (smem_base[cfg.smem + i] != kCanaryByte)
            error = "write past the end of dynamic shared memory (byte " + std::to_string(cfg.smem + i) +
                    ") in block (" + std::to_string(bx) + ", " + std::to_string(by) + ", " + std::to_string(bz) +
                    "): " + describe(cfg);
      }
  g_block = nullptr;
  g_smem = nullptr;
  if (tracing) std::fprintf(stderr, "tfk_emu cp.async: %llu bytes read\n", static_cast<unsigned long long>(g_cp_async_bytes));
  if (!error.empty()) {
    fail(cudaErrorLaunchFailure, error);
    return cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}

}  // namespace tfk_emu

cudaError_t cudaGetLastError() {
  std::lock_guard<std::mutex> lock(tfk_emu::g_error_mutex);
  const cudaError_t e = tfk_emu::g_error;
  tfk_emu::g_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() {
  std::lock_guard<std::mutex> lock(tfk_emu::g_error_mutex);
  return tfk_emu::g_error;
}

const char* cudaGetErrorString(cudaError_t err) {
  // the emulator's message for the error just taken (a thread-local copy, so the pointer stays valid)
  thread_local std::string s;
  std::lock_guard<std::mutex> lock(tfk_emu::g_error_mutex);
  switch (err) {
    case cudaSuccess: s = "no error"; break;
    case cudaErrorInvalidValue: s = "invalid argument"; break;
    case cudaErrorInvalidConfiguration: s = "invalid configuration argument"; break;
    case cudaErrorLaunchFailure: s = "unspecified launch failure"; break;
    default: s = "error " + std::to_string(static_cast<int>(err)); break;
  }
  if (err != cudaSuccess && !tfk_emu::g_message.empty()) s += " [emulator: " + tfk_emu::g_message + "]";
  return s.c_str();
}

cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = 132; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = tfk_emu::smem_optin(); return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = tfk_emu::compute_capability() / 10; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = tfk_emu::compute_capability() % 10; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
