#include "decode_matmul.h"

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include "dispatch.h"
#include "products.h"

namespace t5kernels {

namespace {

// Workers that wait for a job and take its tasks one at a time, as does the calling thread. The caller waits only for
// tasks begun, never for a worker that has not woken yet (on a busy machine it may not run for a while): a job's
// tasks are claimed from one counter tagged with the job's number, so a late worker cannot claim a later job's task.
// One job runs at a time: callers on other threads (each MLX stream evaluates on its own) wait for the pool.
class ThreadPool {
 public:
  explicit ThreadPool(int threads) {
    for (int i = 1; i < threads; i++) {
      workers_.emplace_back([this] { work(); });
    }
  }

  int size() const {
    return int(workers_.size()) + 1;
  }

  void run(int tasks, const std::function<void(int)>& task) {
    if (workers_.empty() || tasks <= 1) {
      for (int i = 0; i < tasks; i++) {
        task(i);
      }
      return;
    }
    std::lock_guard<std::mutex> one_job(run_mutex_);
    uint64_t job;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job = ++job_;
      task_ = &task;
      tasks_ = tasks;
      done_.store(0);
      ticket_.store(tag(job) << 32);
      published_.store(job);
    }
    wake_.notify_all();
    run_tasks(job, &task, tasks);
    spin_while([&] { return done_.load() != tasks; });
    std::unique_lock<std::mutex> lock(mutex_);
    finished_.wait(lock, [&] { return done_.load() == tasks; });
  }

  // The number of jobs run so far; setting it lets a test cross the tag's wrap at 2^32 jobs.
  uint64_t jobs() {
    std::lock_guard<std::mutex> lock(mutex_);
    return job_;
  }
  void set_jobs(uint64_t jobs) {
    std::lock_guard<std::mutex> one_job(run_mutex_);
    std::lock_guard<std::mutex> lock(mutex_);
    job_ = jobs;
    tasks_ = 0;  // workers that wake for it find nothing to claim
    published_.store(jobs);
  }

 private:
  // The ticket's high 32 bits: the job's number modulo 2^32.
  static uint64_t tag(uint64_t job) {
    return job & 0xffffffff;
  }

  // Claim and run tasks of `job` while it has some left.
  void run_tasks(uint64_t job, const std::function<void(int)>* task, int tasks) {
    while (true) {
      uint64_t ticket = ticket_.load();
      do {
        if ((ticket >> 32) != tag(job) || int(ticket & 0xffffffff) >= tasks) {
          return;
        }
      } while (!ticket_.compare_exchange_weak(ticket, ticket + 1));
      (*task)(int(ticket & 0xffffffff));
      if (done_.fetch_add(1) + 1 == tasks) {
        std::lock_guard<std::mutex> lock(mutex_);  // so that the caller cannot miss the notification
        finished_.notify_one();
      }
    }
  }

  // Waits while busy() holds, for at most kSpinMicroseconds, without sleeping: a decode step's products follow one
  // another within microseconds, and a thread put to sleep takes tens of them to wake (the caller then does the
  // whole job alone). busy() is asked after every pause, the clock every kChecksPerClock: asked once per 64 pauses
  // (a few microseconds on this project's AMD EPYC), a worker found a job of a few microseconds' tasks mostly done,
  // and the demo main model's verification of 8 tokens took 0.68-0.98 ms against 0.56-0.57 (of 11: 0.84-1.15 against
  // 0.76-0.77; two runs each, in turn; one token within noise).
  template <class F>
  static void spin_while(F&& busy) {
    constexpr int kSpinMicroseconds = 200, kChecksPerClock = 64;
    const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicroseconds);
    while (true) {
      for (int i = 0; i < kChecksPerClock; i++) {
        if (!busy()) {
          return;
        }
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#else
        std::this_thread::yield();
#endif
      }
      if (std::chrono::steady_clock::now() > until) {
        return;
      }
    }
  }

  void work() {
    uint64_t seen = 0;
    while (true) {
      const std::function<void(int)>* task;
      int tasks;
      spin_while([&] { return published_.load() == seen; });
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return job_ != seen; });
        seen = job_;
        task = task_;
        tasks = tasks_;
      }
      run_tasks(seen, task, tasks);
    }
  }

  std::vector<std::thread> workers_;
  std::mutex run_mutex_;  // held by the caller for a whole job
  std::mutex mutex_;
  std::condition_variable wake_, finished_;
  const std::function<void(int)>* task_ = nullptr;
  int tasks_ = 0;
  std::atomic<int> done_{0};
  uint64_t job_ = 0;
  std::atomic<uint64_t> published_{0};  // job_, readable without the mutex
  std::atomic<uint64_t> ticket_{0};
};

// The CPUs this process may run on: its affinity mask, and a cgroup's CPU quota (a container's limit) if lower.
int available_cpus() {
  int cpus = std::max(1u, std::thread::hardware_concurrency());
#ifdef __linux__
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    cpus = std::max(1, CPU_COUNT(&set));
  }
#endif
  double quota = 0, period = 0;
  if (std::FILE* f = std::fopen("/sys/fs/cgroup/cpu.max", "r")) {  // cgroup v2: "max 100000" or "200000 100000"
    if (std::fscanf(f, "%lf %lf", &quota, &period) != 2) {
      quota = 0;
    }
    std::fclose(f);
  } else if (std::FILE* f = std::fopen("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "r")) {  // cgroup v1, -1: none
    if (std::fscanf(f, "%lf", &quota) != 1) {
      quota = 0;
    }
    std::fclose(f);
    if (std::FILE* g = std::fopen("/sys/fs/cgroup/cpu/cpu.cfs_period_us", "r")) {
      if (std::fscanf(g, "%lf", &period) != 1) {
        period = 0;
      }
      std::fclose(g);
    }
  }
  if (quota > 0 && period > 0) {
    cpus = std::min(cpus, std::max(1, int(std::ceil(quota / period))));
  }
  return cpus;
}

int configured_threads() {
  if (const char* value = std::getenv("T5_KERNEL_THREADS")) {
    int threads = std::atoi(value);
    if (threads > 0) {
      return threads;
    }
  }
  return available_cpus();
}

ThreadPool& pool() {
  // Never destroyed: its workers sleep until the process exits.
  static ThreadPool* instance = new ThreadPool(configured_threads());
  return *instance;
}

const char* const kIsaNames[] = {"portable", "avx2", "avx512"};

bool isa_available(Isa isa) {
  return isa == kPortable || (isa == kAvx2 && cpu_has_avx2()) || (isa == kAvx512 && cpu_has_avx512());
}

// The instruction set new products run on: the best this CPU has unless set_kernel_isa chose another.
std::atomic<int>& current_isa() {
  static std::atomic<int> isa{cpu_has_avx512() ? kAvx512 : cpu_has_avx2() ? kAvx2 : kPortable};
  return isa;
}

}  // namespace

WeightType weight_type(mx::Dtype dtype) {
  if (dtype == mx::float32) {
    return kFloat32;
  }
  if (dtype == mx::bfloat16) {
    return kBFloat16;
  }
  if (dtype == mx::float16) {
    return kFloat16;
  }
  throw std::invalid_argument("decode_matmul: weights must be float32, bfloat16 or float16");
}

namespace {

// A float product's weights: float32, bfloat16 or float16 (N, K), or packed (is_packed_dtype), their shape (N, K) too.
WeightType float_weight_type(mx::Dtype dtype) {
  if (is_packed_dtype(dtype)) {
    return dtype == mx::uint16 ? kPackedBFloat16 : kPackedFloat32;
  }
  return weight_type(dtype);
}

// Where row m of x, an (..., K) array read as (rows, K), starts: its leading indices taken from m, last one first.
int64_t row_offset(const mx::array& x, int64_t m) {
  int64_t offset = 0;
  for (int d = int(x.ndim()) - 2; d >= 0; d--) {
    offset += (m % x.shape(d)) * x.strides()[d];
    m /= x.shape(d);
  }
  return offset;
}

// Rows [r0, r0 + rows) of x (..., K) read as (M, K), of any float dtype and strides (negative too) -> float32, rows
// ldx apart.
void x_rows_as_float(const mx::array& x, int r0, int rows, int ldx, float* out) {
  const int K = x.shape(-1);
  const int64_t col_stride = x.strides().back();
  const WeightType type = weight_type(x.dtype());
  const char* base = static_cast<const char*>(x.data<void>());
  for (int m = 0; m < rows; m++) {
    float* row = out + size_t(m) * ldx;
    const int64_t first = row_offset(x, r0 + m);
    if (type == kFloat32 && col_stride == 1) {
      std::memcpy(row, x.data<float>() + first, K * sizeof(float));
      continue;
    }
    for (int k = 0; k < K; k++) {
      // The element's address with signed arithmetic: load_scalar's index is unsigned.
      row[k] = load_scalar(base + (first + k * col_stride) * int64_t(x.itemsize()), 0, type);
    }
  }
}

// Rows of float32 results -> out's rows [r0, r0 + rows) in bfloat16 or float16.
void store_rows(const float* values, int r0, int rows, mx::array& out) {
  const size_t N = out.shape(-1), begin = size_t(r0) * N, count = size_t(rows) * N;
  if (out.dtype() == mx::bfloat16) {
    auto* data = out.data<mx::bfloat16_t>() + begin;
    for (size_t i = 0; i < count; i++) {
      data[i] = mx::bfloat16_t(values[i]);
    }
  } else {
    auto* data = out.data<mx::float16_t>() + begin;
    for (size_t i = 0; i < count; i++) {
      data[i] = mx::float16_t(values[i]);
    }
  }
}

// A product reading fewer bytes of weights than this (times its rows) runs on the calling thread: waking the others
// and waiting for them costs more than they save, and a thread left idle builds the next step. Every one-row product
// of the demo pair (the largest, its head, 393 KB in bfloat16): regular decoding of its held-out sentences 9.3-10.4 ms
// a prompt against 12.4-13.9 shared among two threads, main.py's defaults 5.4-5.8 against 6.1-7.2.
constexpr double kSmallProductBytes = 5e5;
// The same for a step computed at once (ComputedAtOnce): no host builds beside it, so the pool's other threads only
// help. The demo draft's greedy drafting of 16 tokens in one call: 27-29 us a token at 1e5, 32-33 at 5e5 (three runs
// each, in turn).
constexpr double kSmallProductBytesAtOnce = 1e5;

thread_local bool t_at_once = false;

// Fewer values of x than this are quantized for the integer kernels on the calling thread.
constexpr double kSmallQuantizedValues = 1e5;

// Set while a task of products_in_one_job runs: its products are the thread's alone.
thread_local bool t_products_alone = false;

// Column ranges per task, aligned to the kernels' tiles (`tile` columns: 4, or a packed block): several per thread, so
// that a thread the machine does not run for a while holds up little; one task (on the calling thread) for a product
// too small to share, or one computed within a task of products_in_one_job.
template <class F>
void over_columns(int N, F&& columns, int tile = 4, bool small = false) {
  constexpr int kTasksPerThread = 4, kMinColumns = 32;
  const int tiles = (N + tile - 1) / tile, per_thread = tiles / std::max(1, kMinColumns / tile);
  const int tasks =
      small || t_products_alone ? 1 : std::max(1, std::min(pool().size() * kTasksPerThread, per_thread));
  const int per_task = (tiles + tasks - 1) / tasks;
  pool().run(tasks, [&](int t) {
    const int n0 = std::min(N, t * per_task * tile), n1 = std::min(N, (t + 1) * per_task * tile);
    if (n0 < n1) {
      columns(n0, n1);
    }
  });
}

// The rows of one pass over the weights: M rows in passes of at most kMaxRows, as even as they go (18 rows as 9 and 9,
// not 16 and a 2-row pass that reads every weight again for little work). The demo main model's 17-token
// verification: 1.10-1.17 ms against 1.22-1.41 in 16 + 1 (18 tokens: 1.18-1.23 against 1.25-1.51; three runs each, in
// turn); 20 or more rows within noise.
inline int row_block(int M) {
  const int passes = (M + kMaxRows - 1) / kMaxRows;
  return (M + passes - 1) / std::max(1, passes);
}

// Columns [n0, n1) for every row block, in stretches of columns whose weights fit in L2, so that all the rows of a
// long input pass over each stretch while it is there: the weights come from memory once per product.
template <class F>
void over_row_blocks(int M, int n0, int n1, int column_bytes, F&& rows_columns, int tile = 4) {
  const int stretch = std::max(tile, (256 * 1024 / std::max(1, column_bytes)) / tile * tile);
  const int block = row_block(M);
  for (int a = n0; a < n1; a += stretch) {
    const int b = std::min(n1, a + stretch);
    for (int r = 0; r < M; r += block) {
      rows_columns(r, std::min(block, M - r), a, b);
    }
  }
}

// Every (row block, column range) of an (M rows) x (N columns) product as tasks of the pool: over_columns, each range
// over_row_blocks; `tile` for both.
template <class F>
void over_tiles(int M, int N, int column_bytes, F&& rows_columns, int tile = 4) {
  over_columns(
      N, [&](int n0, int n1) { over_row_blocks(M, n0, n1, column_bytes, rows_columns, tile); }, tile,
      double(M) * N * column_bytes < (t_at_once ? kSmallProductBytesAtOnce : kSmallProductBytes));
}

void float_product(Isa isa, const float* x, int ldx, const uint16_t* x_bf16, int M, int K, const mx::array& w,
                   float* y, int N) {
  const WeightType wtype = float_weight_type(w.dtype());
  const int column_bytes = K * (wtype == kFloat32 || wtype == kPackedFloat32 ? 4 : 2);
  // Packed weights: tasks of whole tiles as the AVX-512 kernel takes them (one row then has four chains of
  // multiply-adds to overlap, not one).
  const int tile = !is_packed(wtype) ? 4 : kPackColumns * packed_blocks(row_block(M));
  over_tiles(
      M, N, column_bytes,
      [&](int r, int rows, int a, int b) {
        FloatProduct p{x + size_t(r) * ldx, ldx, rows, K, w.data<void>(), wtype, y + size_t(r) * N, N,
                       x_bf16 ? x_bf16 + size_t(r) * ldx : nullptr};
        if (isa == kAvx512) {
          float_columns_avx512(p, a, b);
        } else if (isa == kAvx2) {
          float_columns_avx2(p, a, b);
        } else {
          float_columns_portable(p, a, b);
        }
      },
      tile);
}

// Packed quantized weights (products.h): each group's sum of x, then tiles of whole blocks of columns, as packed float
// weights go; on the AVX-512 kernel, else the portable one (the AVX2 kernels read MLX's layout only).
void packed_quant_product(Isa isa, const float* x, int ldx, int M, int K, const mx::array& w, const mx::array& scales,
                          const mx::array& biases, int group_size, int bits, float* y, int N) {
  std::vector<float> x_sums(size_t(M) * ldx);
  group_sums(x, ldx, M, K, group_size, x_sums.data());
  const int tile = kPackColumns * packed_blocks(row_block(M));
  over_tiles(
      M, N, K * bits / 8,
      [&](int r, int rows, int a, int b) {
        QuantProduct p{x + size_t(r) * ldx, ldx, rows, K, w.data<uint32_t>(), scales.data<void>(), biases.data<void>(),
                       weight_type(scales.dtype()), group_size, bits, y + size_t(r) * N, N, nullptr,
                       x_sums.data() + size_t(r) * ldx};
        isa == kAvx512 ? packed_quant_columns_avx512(p, a, b) : packed_quant_columns_portable(p, a, b);
      },
      tile);
}

void quant_product(Isa isa, const float* x, int ldx, int M, int K, const mx::array& w, const mx::array& scales,
                   const mx::array& biases, int group_size, int bits, float* y, int N) {
  if (is_packed_quant(w)) {
    return packed_quant_product(isa, x, ldx, M, K, w, scales, biases, group_size, bits, y, N);
  }
  std::vector<float> x_words, x_sums;
  const bool avx2 = isa != kPortable;  // AVX-512 takes the AVX2 kernel for float activations
  if (avx2) {
    x_words.resize(size_t(M) * ldx);
    x_sums.resize(size_t(M) * ldx);
    prepare_quant_x(x, ldx, M, K, bits, group_size, x_words.data(), x_sums.data());
  }
  over_tiles(M, N, K * bits / 8, [&](int r, int rows, int a, int b) {
    QuantProduct p{x + size_t(r) * ldx, ldx, rows, K, w.data<uint32_t>(), scales.data<void>(), biases.data<void>(),
                   weight_type(scales.dtype()), group_size, bits, y + size_t(r) * N, N,
                   avx2 ? x_words.data() + size_t(r) * ldx : nullptr,
                   avx2 ? x_sums.data() + size_t(r) * ldx : nullptr};
    avx2 ? quant_columns_avx2(p, a, b) : quant_columns_portable(p, a, b);
  });
}

}  // namespace

bool has_integer_products(int isa) {
  return isa == kPortable || (isa == kAvx512 && cpu_has_avx512_vnni());
}

namespace {

// x's rows quantized per group for the integer kernels (with AVX-512, q in the packed 4-bit kernel's order where
// `packed_nibbles`): q's rows ldq apart, zero past K; each group's scale and sum of x in rows lds apart. Long inputs
// are quantized on every thread, in blocks of rows (a 510-token prompt's rows for t5-11b's feed-forward output, 65536
// wide: 2-5 ms so). q is not cleared first: its pages are first written by the thread that quantizes them.
struct QuantizedX {
  int ldq, lds;
  std::unique_ptr<int8_t[]> q;
  std::vector<float> scales, sums;

  QuantizedX(Isa isa, const float* x, int ldx, int M, int K, int group_size, bool packed_nibbles)
      : ldq((K + 127) / 128 * 128 + 128),  // rows not a power of two apart (see run_product)
        lds(K / group_size + 16),
        q(new int8_t[size_t(M) * ldq]),
        scales(size_t(M) * lds),
        sums(size_t(M) * lds) {
    constexpr int kRowsPerTask = 8;
    const int tasks = (M + kRowsPerTask - 1) / kRowsPerTask;
    const bool alone = t_products_alone || double(M) * K < kSmallQuantizedValues;
    auto rows = [&](int t) {
      const int m0 = t * kRowsPerTask, m1 = std::min(M, m0 + kRowsPerTask);
      const float* xm = x + size_t(m0) * ldx;
      int8_t* qm = q.get() + size_t(m0) * ldq;
      float *scale_rows = scales.data() + size_t(m0) * lds, *sum_rows = sums.data() + size_t(m0) * lds;
      if (isa == kAvx512) {
        quantize_rows_avx512(xm, ldx, m1 - m0, K, group_size, qm, ldq, scale_rows, sum_rows, lds, packed_nibbles);
      } else {
        quantize_rows(xm, ldx, m1 - m0, K, group_size, qm, ldq, scale_rows, sum_rows, lds);
      }
      for (int m = m0; m < m1; m++) {
        std::memset(q.get() + size_t(m) * ldq + K, 0, ldq - K);
      }
    };
    if (alone) {
      for (int t = 0; t < tasks; t++) {
        rows(t);
      }
    } else {
      pool().run(tasks, rows);
    }
  }
};

}  // namespace

void int_product(int isa_number, const float* x, int ldx, int M, int K, const uint32_t* w, const void* scales,
                 const void* biases, WeightType stype, int group_size, int bits, float* y, int N, int32_t* dots) {
  const Isa isa = Isa(isa_number);
  QuantizedX qx(isa, x, ldx, M, K, group_size, false);
  const int ldq = qx.ldq, lds = qx.lds, groups = K / group_size;
  std::unique_ptr<int8_t[]>& q = qx.q;
  const std::vector<float>&x_scales = qx.scales, &x_sums = qx.sums;
  std::vector<float> x_lanes;
  int ldl = 0;
  if (isa == kAvx512) {
    if (bits == 4) {
      std::unique_ptr<int8_t[]> ordered(new int8_t[size_t(M) * ldq]());
      order_for_nibbles(q.get(), ldq, M, K, ordered.get());
      q.swap(ordered);
    }
    ldl = lane_scales(nullptr, lds, M, K, ldq, bits, group_size, nullptr);
    x_lanes.resize(size_t(M) * ldl);
    lane_scales(x_scales.data(), lds, M, K, ldq, bits, group_size, x_lanes.data());
  }
  over_tiles(M, N, K * bits / 8, [&](int r, int rows, int a, int b) {
    IntProduct p{q.get() + size_t(r) * ldq, ldq, x_scales.data() + size_t(r) * lds,
                 x_sums.data() + size_t(r) * lds, lds, rows, K, w, scales, biases, stype, group_size, bits,
                 dots ? nullptr : y + size_t(r) * N, N, dots ? dots + size_t(r) * N * groups : nullptr,
                 isa == kAvx512 ? x_lanes.data() + size_t(r) * ldl : nullptr, ldl};
    isa == kAvx512 ? int_columns_avx512(p, a, b) : int_columns_portable(p, a, b);
  });
}

void packed_int_product(int isa_number, const float* x, int ldx, int M, int K, const mx::array& w,
                        const mx::array& scales, const mx::array& biases, int group_size, int bits, float* y, int N,
                        int32_t* dots) {
  const Isa isa = Isa(isa_number);
  const bool avx512 = isa == kAvx512;
  const QuantizedX qx(isa, x, ldx, M, K, group_size, avx512 && bits == 4);
  const int ldq = qx.ldq, lds = qx.lds, groups = K / group_size;
  over_tiles(
      M, N, K * bits / 8,
      [&](int r, int rows, int a, int b) {
        IntProduct p{qx.q.get() + size_t(r) * ldq, ldq, qx.scales.data() + size_t(r) * lds,
                     qx.sums.data() + size_t(r) * lds, lds, rows, K, w.data<uint32_t>(), scales.data<void>(),
                     biases.data<void>(), weight_type(scales.dtype()), group_size, bits,
                     dots ? nullptr : y + size_t(r) * N, N,
                     dots ? dots + size_t(r) * N * groups : nullptr, nullptr, 0};
        avx512 ? packed_int_columns_avx512(p, a, b) : packed_int_columns_portable(p, a, b);
      },
      4 * kPackColumns);
}

namespace {

// x's rows times a quantized weight, MLX's or packed: int8 activations where asked and the instruction set has
// integer products, else float ones.
void quantized_rows(Isa isa, bool integer, const float* x, int ldx, int M, int K, const mx::array& w,
                    const mx::array& scales, const mx::array& biases, int group_size, int bits, float* y, int N) {
  if (!integer || !has_integer_products(isa)) {
    quant_product(isa, x, ldx, M, K, w, scales, biases, group_size, bits, y, N);
  } else if (is_packed_quant(w)) {
    packed_int_product(isa, x, ldx, M, K, w, scales, biases, group_size, bits, y, N, nullptr);
  } else {
    int_product(isa, x, ldx, M, K, w.data<uint32_t>(), scales.data<void>(), biases.data<void>(),
                weight_type(scales.dtype()), group_size, bits, y, N, nullptr);
  }
}

}  // namespace

void product_rows(int isa, bool integer, const float* x, int ldx, int M, int K, const mx::array& w,
                  const mx::array* scales, const mx::array* biases, int group_size, int bits, float* y, int N) {
  if (bits == 0) {
    float_product(Isa(isa), x, ldx, nullptr, M, K, w, y, N);
  } else {
    quantized_rows(Isa(isa), integer, x, ldx, M, K, w, *scales, *biases, group_size, bits, y, N);
  }
}

void pool_run(int tasks, const std::function<void(int)>& task) {
  pool().run(tasks, task);
}

ComputedAtOnce::ComputedAtOnce() : outer(t_at_once) {
  t_at_once = true;
}
ComputedAtOnce::~ComputedAtOnce() {
  t_at_once = outer;
}

void products_in_one_job(int count, const std::function<void(int)>& products) {
  pool().run(count, [&](int i) {
    const bool outer = t_products_alone;
    t_products_alone = true;
    products(i);
    t_products_alone = outer;
  });
}

int current_kernel_isa() {
  return current_isa().load();
}

bool is_packed_dtype(mx::Dtype dtype) {
  return dtype == mx::uint16 || dtype == mx::uint32;
}

bool is_packed_quant(const mx::array& w) {
  return w.dtype() == mx::uint8;
}

namespace {

void run_product(Isa isa, bool integer, const mx::array& x_in, const mx::array& w, const mx::array* scales,
                 const mx::array* biases, int group_size, int bits, mx::array& out) {
  // x (..., K) and out (..., N), both read as rows.
  const int K = x_in.shape(-1), M = int(x_in.size() / K), N = out.shape(-1);
  // Rows of x 64 bytes more than a multiple of 8 floats apart: rows a power of two apart would fall into the same
  // L1 cache sets and evict each other when many rows pass over the same weights.
  const int ldx = (K + 7) / 8 * 8 + 16;
  const bool float_out = out.dtype() == mx::float32;
  // x (and the results unless out is float32) in float32 a chunk of rows at a time: a long prompt's x is never
  // copied whole, and each chunk's rows still pass over each stretch of weights together (over_row_blocks).
  const int chunk = std::min(M, kChunkRows);
  std::vector<float> x(size_t(chunk) * ldx), y_block(float_out ? 0 : size_t(chunk) * N);
  // bfloat16 x and weights: pairs of bfloat16 multiplied exactly where the CPU can (x is exact in bfloat16).
  const bool bf16_pairs = bits == 0 && isa == kAvx512 && x_in.dtype() == mx::bfloat16 &&
                          w.dtype() == mx::bfloat16 && cpu_has_avx512_bf16();
  std::vector<uint16_t> x_bf16(bf16_pairs ? x.size() : 0);
  for (int r = 0; r < M; r += chunk) {
    const int rows = std::min(chunk, M - r);
    x_rows_as_float(x_in, r, rows, ldx, x.data());
    float* y = float_out ? out.data<float>() + size_t(r) * N : y_block.data();
    if (bits == 0) {
      for (size_t i = 0; i < size_t(rows) * ldx && bf16_pairs; i++) {
        uint32_t value;
        std::memcpy(&value, &x[i], 4);
        x_bf16[i] = uint16_t(value >> 16);
      }
      float_product(isa, x.data(), ldx, bf16_pairs ? x_bf16.data() : nullptr, rows, K, w, y, N);
    } else {
      quantized_rows(isa, integer, x.data(), ldx, rows, K, w, *scales, *biases, group_size, bits, y, N);
    }
    if (!float_out) {
      store_rows(y_block.data(), r, rows, out);
    }
  }
}

// A weight as the kernels read it: rows one after another. Already so for a model's (evaluated) weights; a slice, a
// transpose or a pending result is copied in the graph.
mx::array row_contiguous(const mx::array& a, mx::Stream stream) {
  if (a.is_available() && a.flags().row_contiguous) {
    return a;
  }
  return mx::contiguous(a, false, stream);
}

bool is_kernel_float(mx::Dtype dtype) {
  return dtype == mx::float32 || dtype == mx::bfloat16 || dtype == mx::float16;
}

}  // namespace

std::string kernel_isa() {
  return kIsaNames[current_isa().load()];
}

std::vector<std::string> kernel_isas() {
  std::vector<std::string> names;
  for (int isa = kPortable; isa <= kAvx512; isa++) {
    if (isa_available(Isa(isa))) {
      names.push_back(kIsaNames[isa]);
    }
  }
  return names;
}

void set_kernel_isa(const std::string& name) {
  for (int isa = kPortable; isa <= kAvx512; isa++) {
    if (name == kIsaNames[isa] && isa_available(Isa(isa))) {
      current_isa().store(isa);
      return;
    }
  }
  throw std::invalid_argument("decode_matmul: instruction set '" + name + "' is not one this CPU runs");
}

std::string kernel_features() {
  const int isa = current_isa().load();
  std::string features;
  if (isa == kAvx512) {
    features += cpu_has_avx512_vnni() ? "vnni" : "";
    features += cpu_has_avx512_bf16() ? (features.empty() ? "bf16" : " bf16") : "";
  }
  return features;
}

bool integer_products() {
  return has_integer_products(current_isa().load());
}

int kernel_threads() {
  return pool().size();
}

uint64_t pool_jobs() {
  return pool().jobs();
}

void set_pool_jobs(uint64_t jobs) {
  pool().set_jobs(jobs);
}

mx::array decode_matmul(const mx::array& x, const mx::array& w, const std::optional<mx::array>& scales,
                        const std::optional<mx::array>& biases, int group_size, int bits, bool integer,
                        mx::StreamOrDevice s) {
  // Everything the kernels cannot take is refused here, when the graph is built, not on the stream's thread.
  if (x.ndim() < 1 || w.ndim() != 2) {
    throw std::invalid_argument("decode_matmul: x must be (..., K) and w 2-D");
  }
  const bool quantized = scales.has_value();
  const int K = x.shape(-1);
  const int N = w.shape(0);
  if (!is_kernel_float(x.dtype())) {
    throw std::invalid_argument("decode_matmul: x must be float32, bfloat16 or float16");
  }
  auto stream = mx::to_stream(s);
  mx::Dtype out_dtype = x.dtype();
  std::vector<mx::array> inputs;
  if (quantized) {
    if (!biases || (bits != 4 && bits != 8) || (group_size != 32 && group_size != 64 && group_size != 128)) {
      throw std::invalid_argument("decode_matmul: affine quantization with bits 4/8 and group size 32/64/128 only");
    }
    if (!is_kernel_float(scales->dtype()) || biases->dtype() != scales->dtype()) {
      throw std::invalid_argument("decode_matmul: scales and biases must share one float dtype");
    }
    const bool packed = is_packed_quant(w);
    if ((w.dtype() != mx::uint32 && !packed) || K % group_size || w.shape(1) != K * bits / (packed ? 8 : 32) ||
        scales->shape() != mx::Shape{N, K / group_size} || biases->shape() != scales->shape()) {
      throw std::invalid_argument("decode_matmul: quantized weight, scales or biases do not match x");
    }
    if (packed && N % kPackColumns) {
      throw std::invalid_argument("decode_matmul: packed quantized weights need a multiple of 16 rows");
    }
    out_dtype = mx::promote_types(out_dtype, scales->dtype());
    inputs = {row_contiguous(w, stream), row_contiguous(*scales, stream), row_contiguous(*biases, stream)};
  } else {
    const bool packed = is_packed_dtype(w.dtype());
    if (!is_kernel_float(w.dtype()) && !packed) {
      throw std::invalid_argument("decode_matmul: weights must be float32, bfloat16, float16 or packed");
    }
    if (packed && N % kPackColumns) {
      throw std::invalid_argument("decode_matmul: packed weights need a multiple of 16 rows");
    }
    if (w.shape(1) != K) {
      throw std::invalid_argument("decode_matmul: x and w do not share K");
    }
    const mx::Dtype w_dtype = !packed ? w.dtype() : w.dtype() == mx::uint16 ? mx::bfloat16 : mx::float32;
    out_dtype = mx::promote_types(out_dtype, w_dtype);
    inputs = {row_contiguous(w, stream)};
    bits = 0;
    group_size = 0;
  }
  // A copy only where x's dtype differs from the result's (MLX promotes the same way); weights stay as they are. x
  // keeps its shape and strides, and the result its leading dimensions: no reshapes around the product, which would
  // each cost an operation of scheduling in a decode step.
  inputs.insert(inputs.begin(), mx::astype(x, out_dtype, stream));
  auto out_shape = x.shape();
  out_shape.back() = N;
  auto primitive = std::make_shared<DecodeMatmul>(stream, group_size, bits, current_isa().load(), integer && quantized);
  return mx::array(out_shape, out_dtype, primitive, inputs);
}

void DecodeMatmul::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  for (size_t i = 1; i < inputs.size(); i++) {
    if (!inputs[i].flags().row_contiguous) {  // decode_matmul makes them so
      throw std::logic_error("decode_matmul: weights must be row-contiguous");
    }
  }
  dispatch(stream(), inputs, outputs, [inputs, out, group_size = group_size_, bits = bits_, isa = isa_, integer = integer_]() mutable {
    const mx::array* scales = inputs.size() > 2 ? &inputs[2] : nullptr;
    const mx::array* biases = inputs.size() > 3 ? &inputs[3] : nullptr;
    run_product(Isa(isa), integer, inputs[0], inputs[1], scales, biases, group_size, bits, out);
  });
}

void DecodeMatmul::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("DecodeMatmul runs on the CPU only");
}

std::vector<mx::Shape> DecodeMatmul::output_shapes(const std::vector<mx::array>& inputs) {
  auto shape = inputs[0].shape();
  shape.back() = inputs[1].shape(0);
  return {shape};
}

bool DecodeMatmul::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const DecodeMatmul&>(other);
  return group_size_ == o.group_size_ && bits_ == o.bits_ && isa_ == o.isa_ && integer_ == o.integer_;
}

}  // namespace t5kernels
