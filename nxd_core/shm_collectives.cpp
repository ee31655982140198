// All-reduce and all-gather for a tensor parallel group whose ranks all run on this host, on CPU,
// through one shared-memory segment per group.
//
// Why hand-written: gloo over TCP loopback costs ~0.5 ms per call, and a decode step makes two
// all-reduces per layer; copying a few KB through shared memory and spinning on a flag costs
// microseconds. The Python side (shm_ops.py, shm_group.py) defines the op schemas, builds this
// file and creates the segment; this file holds the data path.
//
// Segment layout: a header, then per rank two flags (arrived, reduced) on their own cache lines,
// then per rank two data buffers (alternating by step parity: a rank may write step k+1 while a
// slower peer still reads step k). Every call is one or more steps (chunks of at most one buffer);
// a step's flags carry the step number, so no flag is ever reset.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <Python.h>
#include <torch/library.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
static inline void cpu_relax() { _mm_pause(); }
#else
static inline void cpu_relax() {}
#endif

namespace {

constexpr uint64_t kMagic = 0x31306d687364786eULL;
constexpr int kMaxRanks = 256;
constexpr size_t kHeaderBytes = 4096;

// Waiting: spin this long (a peer in step is microseconds away), then sched_yield (with more
// ranks than cores the peer we wait for needs our core), then sleep, doubling up to kMaxSleep
// (a peer that computes for long must not lose its core to us).
constexpr auto kSpin = std::chrono::microseconds(50);
constexpr auto kYield = std::chrono::milliseconds(5);
constexpr long kMinSleepNs = 20000, kMaxSleepNs = 500000;
// How often a waiting rank checks that the ranks it waits for are alive, and the abort flag.
constexpr auto kPeerCheck = std::chrono::milliseconds(100);
// Reductions of up to this many bytes per step: every rank sums every buffer (one wait).
// Larger ones: each rank sums its slice, then all copy the slices (two waits, less traffic).
constexpr int64_t kNaiveReduceBytes = 256 << 10;

struct alignas(64) Flag {
  std::atomic<uint64_t> step;
  int64_t bytes[2];  // by step parity: the whole call's bytes and kind, to catch ranks that disagree
};

struct Header {
  uint64_t magic;
  int64_t world;
  int64_t buffer_bytes;
  std::atomic<int32_t> aborted;  // set by the rank that found a dead or missing peer: the others stop too
  int32_t abort_rank;
  char abort_reason[512];
};

enum Kind : int64_t { kAllReduce = 1, kAllGather = 2 };

struct Comm {
  std::string group, segment;
  int rank = 0, world = 0;
  int64_t buffer_bytes = 0;
  double timeout_s = 30.0;
  std::vector<int64_t> pids;  // empty: peers' pids are not visible here (another pid namespace)
  void* base = nullptr;
  size_t length = 0;
  Header* header = nullptr;
  Flag* arrived = nullptr;
  Flag* reduced = nullptr;
  char* data = nullptr;
  uint64_t step = 0;
  std::string broken;  // non-empty after a failed collective: the group's steps are out of line
  std::mutex mutex;

  char* buffer(int r, uint64_t s) const { return data + (size_t(r) * 2 + (s & 1)) * size_t(buffer_bytes); }
  ~Comm() {
    if (base != nullptr) munmap(base, length);
  }
};

std::mutex registry_mutex;
std::unordered_map<std::string, std::shared_ptr<Comm>> registry;

std::shared_ptr<Comm> find(const std::string& group) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto it = registry.find(group);
  return it == registry.end() ? nullptr : it->second;
}

// The op may be called from Python with the GIL held: waiting without it keeps the worker's
// heartbeat thread (and any other thread) running.
struct GilReleased {
  PyThreadState* state = nullptr;
  GilReleased() {
    if (Py_IsInitialized() && PyGILState_Check()) state = PyEval_SaveThread();
  }
  ~GilReleased() {
    if (state != nullptr) PyEval_RestoreThread(state);
  }
};

bool process_alive(int64_t pid) {
  if (kill(pid_t(pid), 0) != 0 && errno == ESRCH) return false;
  // A killed child stays a zombie until its parent reaps it: kill(pid, 0) still succeeds.
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
  auto close = text.rfind(')');
  if (close == std::string::npos || close + 2 >= text.size()) return true;
  char state = text[close + 2];
  return state != 'Z' && state != 'X';
}

[[noreturn]] void fail(Comm& c, const std::string& reason, bool tell_peers) {
  if (tell_peers && c.header->aborted.load() == 0) {
    std::snprintf(c.header->abort_reason, sizeof(c.header->abort_reason), "%s", reason.c_str());
    c.header->abort_rank = c.rank;
    c.header->aborted.store(1, std::memory_order_release);
  }
  c.broken = reason;
  TORCH_CHECK(false, reason);
}

void check_aborted(Comm& c) {
  if (c.header->aborted.load(std::memory_order_acquire) != 0) {
    std::ostringstream why;
    why << "shared-memory collective on tensor parallel rank " << c.rank << " stopped: rank " << c.header->abort_rank
        << " reported: " << c.header->abort_reason;
    fail(c, why.str(), false);
  }
}

// Wait until every rank's flag has reached `target`.
void wait_all(Comm& c, Flag* flags, uint64_t target, const char* what) {
  int next = 0;  // ranks below `next` are known to have arrived
  auto all_ready = [&] {
    while (next < c.world && flags[next].step.load(std::memory_order_acquire) >= target) ++next;
    return next == c.world;
  };
  if (all_ready()) return;
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  for (int i = 1;; ++i) {
    if (all_ready()) return;
    cpu_relax();
    if ((i & 63) == 0 && clock::now() - start > kSpin) break;
  }
  auto last_check = start;
  long sleep_ns = kMinSleepNs;
  while (!all_ready()) {
    const auto now = clock::now();
    if (now - start < kYield) {
      sched_yield();
    } else {
      timespec pause{0, sleep_ns};
      nanosleep(&pause, nullptr);
      sleep_ns = std::min(sleep_ns * 2, kMaxSleepNs);
    }
    if (now - last_check < kPeerCheck) continue;
    last_check = now;
    check_aborted(c);
    for (int r = next; r < c.world && !c.pids.empty(); ++r) {
      if (flags[r].step.load(std::memory_order_acquire) < target && !process_alive(c.pids[r])) {
        std::ostringstream why;
        why << "tensor parallel rank " << r << " (pid " << c.pids[r] << ") exited while rank " << c.rank
            << " waited for it in a shared-memory " << what;
        fail(c, why.str(), true);
      }
    }
    const double waited = std::chrono::duration<double>(now - start).count();
    if (waited > c.timeout_s) {
      std::ostringstream why;
      why << "tensor parallel rank " << next << (c.pids.empty() ? "" : " (pid " + std::to_string(c.pids[next]) + ")")
          << " did not join a shared-memory " << what << " within " << c.timeout_s << " s (rank " << c.rank
          << " waited; the group's timeout)";
      fail(c, why.str(), true);
    }
  }
}

// Every rank must pass the same call (kind, dtype, bytes): steps would fall out of line otherwise.
void check_same_call(Comm& c, Flag* flags, uint64_t step, int64_t signature, const char* what) {
  for (int r = 0; r < c.world; ++r) {
    if (flags[r].bytes[step & 1] != signature) {
      std::ostringstream why;
      why << "ranks passed different tensors to a shared-memory " << what << ": rank " << c.rank
          << " and rank " << r << " disagree on the dtype or size";
      fail(c, why.str(), true);
    }
  }
}

// -- element types: low precision is widened to fp32, summed, rounded once ----------------------

inline float widen(at::BFloat16 v) {
  uint32_t u = uint32_t(v.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float widen(at::Half v) { return float(v); }
inline float widen(float v) { return v; }
inline double widen(double v) { return v; }
inline int64_t widen(int64_t v) { return v; }
inline int32_t widen(int32_t v) { return v; }

template <typename T>
struct Narrow {
  template <typename A>
  static T from(A a) { return T(a); }
};
template <>
struct Narrow<at::BFloat16> {
  static at::BFloat16 from(float f) {  // round to nearest even, as torch does
    uint32_t u;
    std::memcpy(&u, &f, 4);
    uint16_t bits = (u & 0x7fffffffu) > 0x7f800000u ? uint16_t(0x7fc0) : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return at::BFloat16(bits, at::BFloat16::from_bits());
  }
};

template <typename T>
using Acc = decltype(widen(T()));

enum class Op { kSum, kMax, kMin };

template <typename A>
inline A combine(Op op, A a, A b) {
  switch (op) {
    case Op::kSum: return a + b;
    case Op::kMax: return b > a ? b : a;
    default: return b < a ? b : a;
  }
}

// out[i] = in[0][i] (op) in[1][i] (op) ... in rank order, so every rank computes the same bits.
// out may be one of the inputs (each element is read before it is written).
template <typename T, Op op>
void reduce_block(T* out, const std::vector<const T*>& in, int64_t begin, int64_t end) {
  constexpr int64_t kBlock = 1024;  // a block of every input, then the next: the partial sums stay in L1
  const size_t ranks = in.size();
  Acc<T> acc[kBlock];
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t n = std::min(kBlock, end - b);
    const T* first = in[0] + b;
    for (int64_t j = 0; j < n; ++j) acc[j] = widen(first[j]);
    for (size_t r = 1; r < ranks; ++r) {
      const T* src = in[r] + b;
      for (int64_t j = 0; j < n; ++j) acc[j] = combine(op, acc[j], widen(src[j]));
    }
    T* dst = out + b;
    for (int64_t j = 0; j < n; ++j) dst[j] = Narrow<T>::from(acc[j]);
  }
}

template <typename T>
void reduce(Op op, T* out, const std::vector<const T*>& in, int64_t begin, int64_t end) {
  switch (op) {
    case Op::kSum: return reduce_block<T, Op::kSum>(out, in, begin, end);
    case Op::kMax: return reduce_block<T, Op::kMax>(out, in, begin, end);
    default: return reduce_block<T, Op::kMin>(out, in, begin, end);
  }
}

bool parse_op(const std::string& name, Op* op) {
  if (name == "sum") *op = Op::kSum;
  else if (name == "max") *op = Op::kMax;
  else if (name == "min") *op = Op::kMin;
  else return false;
  return true;
}

bool supported(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble || t == at::kLong || t == at::kInt;
}

template <typename T>
void all_reduce_typed(Comm& c, Op op, const at::Tensor& x, at::Tensor& out) {
  const int64_t numel = x.numel();
  const int64_t chunk = c.buffer_bytes / int64_t(sizeof(T));
  const int64_t signature = (x.nbytes() << 8) | (int64_t(x.scalar_type()) << 2) | kAllReduce;
  const T* src = x.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  std::vector<const T*> inputs(c.world);
  for (int64_t offset = 0; offset < numel; offset += chunk) {
    const int64_t n = std::min(chunk, numel - offset);
    check_aborted(c);  // a peer gave up on this group: our own steps would no longer line up
    const uint64_t step = ++c.step;
    T* mine = reinterpret_cast<T*>(c.buffer(c.rank, step));
    std::memcpy(mine, src + offset, size_t(n) * sizeof(T));
    c.arrived[c.rank].bytes[step & 1] = signature;
    c.arrived[c.rank].step.store(step, std::memory_order_release);
    wait_all(c, c.arrived, step, "all-reduce");
    check_same_call(c, c.arrived, step, signature, "all-reduce");
    for (int r = 0; r < c.world; ++r) inputs[r] = reinterpret_cast<const T*>(c.buffer(r, step));
    if (n * int64_t(sizeof(T)) <= kNaiveReduceBytes) {
      reduce<T>(op, dst + offset, inputs, 0, n);
      continue;
    }
    // Each rank reduces its slice into its own buffer (no other rank reads that slice there),
    // then every rank copies every slice from its owner's buffer.
    const int64_t slice = ((n + c.world - 1) / c.world + 15) / 16 * 16;
    auto bounds = [&](int r) { return std::make_pair(std::min(n, r * slice), std::min(n, (r + 1) * slice)); };
    auto [begin, end] = bounds(c.rank);
    reduce<T>(op, mine, inputs, begin, end);
    c.reduced[c.rank].step.store(step, std::memory_order_release);
    wait_all(c, c.reduced, step, "all-reduce");
    for (int r = 0; r < c.world; ++r) {
      auto [b, e] = bounds(r);
      if (e > b) std::memcpy(dst + offset + b, inputs[r] + b, size_t(e - b) * sizeof(T));
    }
  }
}

at::Tensor fallback(const char* name, std::vector<c10::IValue> stack) {
  // No shared-memory group of this name here (the group uses its backend, or the graph came from
  // a process that did): the process group's own functional collective, as mappings.py would call.
  static const auto wait = c10::Dispatcher::singleton().findSchemaOrThrow("_c10d_functional::wait_tensor", "");
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  op.callBoxed(&stack);
  std::vector<c10::IValue> waited{stack[0]};
  wait.callBoxed(&waited);
  return waited[0].toTensor();
}

at::Tensor shm_all_reduce(const at::Tensor& x, std::string reduce_op, std::string group_name) {
  auto comm = find(group_name);
  Op op;
  if (!comm || !parse_op(reduce_op, &op) || !supported(x.scalar_type())) {
    return fallback("_c10d_functional::all_reduce", {x, reduce_op, group_name});
  }
  Comm& c = *comm;
  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (input.numel() == 0) return out;
  GilReleased released;
  std::lock_guard<std::mutex> lock(c.mutex);
  TORCH_CHECK(c.broken.empty(), "this tensor parallel group's shared memory failed earlier (", c.broken, "): start a new group");
  AT_DISPATCH_SWITCH(input.scalar_type(), "shm_all_reduce",
      AT_DISPATCH_CASE(at::kFloat, [&] { all_reduce_typed<float>(c, op, input, out); })
      AT_DISPATCH_CASE(at::kBFloat16, [&] { all_reduce_typed<at::BFloat16>(c, op, input, out); })
      AT_DISPATCH_CASE(at::kHalf, [&] { all_reduce_typed<at::Half>(c, op, input, out); })
      AT_DISPATCH_CASE(at::kDouble, [&] { all_reduce_typed<double>(c, op, input, out); })
      AT_DISPATCH_CASE(at::kLong, [&] { all_reduce_typed<int64_t>(c, op, input, out); })
      AT_DISPATCH_CASE(at::kInt, [&] { all_reduce_typed<int32_t>(c, op, input, out); }));
  return out;
}

// Shards stacked along dim 0 in rank order (all_gather_into_tensor's layout).
at::Tensor shm_all_gather(const at::Tensor& x, int64_t group_size, std::string group_name) {
  auto comm = find(group_name);
  if (!comm || group_size != comm->world) {
    return fallback("_c10d_functional::all_gather_into_tensor", {x, group_size, group_name});
  }
  Comm& c = *comm;
  const at::Tensor input = x.contiguous();
  std::vector<int64_t> sizes = input.dim() == 0 ? std::vector<int64_t>{1} : input.sizes().vec();
  sizes[0] *= c.world;
  at::Tensor out = at::empty(sizes, x.options());
  const int64_t total = int64_t(input.nbytes());
  if (total == 0) return out;
  GilReleased released;
  std::lock_guard<std::mutex> lock(c.mutex);
  TORCH_CHECK(c.broken.empty(), "this tensor parallel group's shared memory failed earlier (", c.broken, "): start a new group");
  const int64_t signature = (total << 8) | (int64_t(input.scalar_type()) << 2) | kAllGather;
  const char* src = static_cast<const char*>(input.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  for (int64_t offset = 0; offset < total; offset += c.buffer_bytes) {
    const int64_t n = std::min(c.buffer_bytes, total - offset);
    check_aborted(c);
    const uint64_t step = ++c.step;
    std::memcpy(c.buffer(c.rank, step), src + offset, size_t(n));
    c.arrived[c.rank].bytes[step & 1] = signature;
    c.arrived[c.rank].step.store(step, std::memory_order_release);
    wait_all(c, c.arrived, step, "all-gather");
    check_same_call(c, c.arrived, step, signature, "all-gather");
    for (int r = 0; r < c.world; ++r) std::memcpy(dst + r * total + offset, c.buffer(r, step), size_t(n));
  }
  return out;
}

// -- the segment: created by the group's rank 0, opened by the others (shm_group.py) ---------------

size_t segment_bytes(int64_t world, int64_t buffer_bytes) {
  return kHeaderBytes + size_t(2 * world) * sizeof(Flag) + size_t(2 * world) * size_t(buffer_bytes);
}

void attach(std::string group_name, std::string segment, bool create, int64_t rank, int64_t world, int64_t buffer_bytes,
            double timeout_s, std::vector<int64_t> pids) {
  TORCH_CHECK(world >= 1 && world <= kMaxRanks && rank >= 0 && rank < world, "shm attach: bad rank ", rank, " of ", world);
  TORCH_CHECK(buffer_bytes >= 4096 && buffer_bytes % 4096 == 0, "shm attach: buffer_bytes must be a multiple of 4096");
  TORCH_CHECK(pids.empty() || int64_t(pids.size()) == world, "shm attach: one pid per rank");
  const size_t length = segment_bytes(world, buffer_bytes);
  int fd = create ? shm_open(segment.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600) : shm_open(segment.c_str(), O_RDWR, 0);
  TORCH_CHECK(fd >= 0, "shm_open(", segment, ") failed: ", std::strerror(errno));
  if (create && ftruncate(fd, off_t(length)) != 0) {
    int error = errno;
    close(fd);
    shm_unlink(segment.c_str());
    TORCH_CHECK(false, "sizing the shared-memory segment ", segment, " (", length, " bytes) failed: ", std::strerror(error));
  }
  struct stat info;
  if (fstat(fd, &info) != 0 || size_t(info.st_size) < length) {
    close(fd);
    TORCH_CHECK(false, "the shared-memory segment ", segment, " is smaller than expected");
  }
  void* base = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  int error = errno;
  close(fd);
  if (base == MAP_FAILED) {
    if (create) shm_unlink(segment.c_str());
    TORCH_CHECK(false, "mmap of the shared-memory segment ", segment, " failed: ", std::strerror(error));
  }
  auto c = std::make_shared<Comm>();
  c->group = group_name;
  c->segment = segment;
  c->rank = int(rank);
  c->world = int(world);
  c->buffer_bytes = buffer_bytes;
  c->timeout_s = timeout_s;
  c->pids = pids;
  c->base = base;
  c->length = length;
  c->header = static_cast<Header*>(base);
  c->arrived = reinterpret_cast<Flag*>(static_cast<char*>(base) + kHeaderBytes);
  c->reduced = c->arrived + world;
  c->data = reinterpret_cast<char*>(c->reduced + world);
  if (create) {  // the pages are zeros: every flag at step 0
    c->header->world = world;
    c->header->buffer_bytes = buffer_bytes;
    c->header->magic = kMagic;
  } else {
    TORCH_CHECK(c->header->magic == kMagic && c->header->world == world && c->header->buffer_bytes == buffer_bytes,
                "the shared-memory segment ", segment, " does not hold this group's layout");
  }
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry[group_name] = c;
}

void unlink_segment(std::string segment) { shm_unlink(segment.c_str()); }

void detach(std::string group_name) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry.erase(group_name);  // unmapped when no call holds it any more
}

bool attached(std::string group_name) { return find(group_name) != nullptr; }

}  // namespace

// The collectives' schemas (and fake shapes, and a fallback for other devices) are defined in
// shm_ops.py, so that a saved graph loads in any process; this library adds the CPU kernels.
TORCH_LIBRARY_IMPL(nxd, CPU, m) {
  m.impl("shm_all_reduce", &shm_all_reduce);
  m.impl("shm_all_gather", &shm_all_gather);
}

// Set-up calls, from shm_group.py only.
TORCH_LIBRARY(nxd_shm, m) {
  m.def("attach(str group_name, str segment, bool create, int rank, int world, int buffer_bytes, float timeout_s, int[] pids) -> ()", &attach);
  m.def("unlink(str segment) -> ()", &unlink_segment);
  m.def("detach(str group_name) -> ()", &detach);
  m.def("attached(str group_name) -> bool", &attached);
}
