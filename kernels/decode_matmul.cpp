#include "decode_matmul.h"

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "products.h"

namespace t5kernels {

namespace {

// Workers that wait for a job and take its tasks one at a time, as does the calling thread. The caller waits only for
// tasks begun, never for a worker that has not woken yet (on a busy machine it may not run for a while): a job's
// tasks are claimed from one counter tagged with the job's number, so a late worker cannot claim a later job's task.
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
    uint64_t job;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job = ++job_;
      task_ = &task;
      tasks_ = tasks;
      done_ = 0;
      ticket_.store(job << 32);
    }
    wake_.notify_all();
    run_tasks(job, &task, tasks);
    std::unique_lock<std::mutex> lock(mutex_);
    finished_.wait(lock, [&] { return done_ == tasks; });
  }

 private:
  // Claim and run tasks of `job` while it has some left.
  void run_tasks(uint64_t job, const std::function<void(int)>* task, int tasks) {
    while (true) {
      uint64_t ticket = ticket_.load();
      do {
        if ((ticket >> 32) != job || int(ticket & 0xffffffff) >= tasks) {
          return;
        }
      } while (!ticket_.compare_exchange_weak(ticket, ticket + 1));
      (*task)(int(ticket & 0xffffffff));
      std::lock_guard<std::mutex> lock(mutex_);
      if (++done_ == tasks) {
        finished_.notify_one();
      }
    }
  }

  void work() {
    uint64_t seen = 0;
    while (true) {
      const std::function<void(int)>* task;
      int tasks;
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
  std::mutex mutex_;
  std::condition_variable wake_, finished_;
  const std::function<void(int)>* task_ = nullptr;
  int tasks_ = 0;
  int done_ = 0;
  uint64_t job_ = 0;
  std::atomic<uint64_t> ticket_{0};
};

int configured_threads() {
  if (const char* value = std::getenv("T5_KERNEL_THREADS")) {
    int threads = std::atoi(value);
    if (threads > 0) {
      return threads;
    }
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

ThreadPool& pool() {
  // Never destroyed: its workers sleep until the process exits.
  static ThreadPool* instance = new ThreadPool(configured_threads());
  return *instance;
}

bool use_avx2() {
  static const bool avx2 = cpu_has_avx2() && std::getenv("T5_KERNEL_PORTABLE") == nullptr;
  return avx2;
}

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

// x (M, K) of any float dtype and strides -> float32, rows ldx apart.
// Where row m of x, an (..., K) array read as (rows, K), starts: its leading indices taken from m, last one first.
int64_t row_offset(const mx::array& x, int64_t m) {
  int64_t offset = 0;
  for (int d = int(x.ndim()) - 2; d >= 0; d--) {
    offset += (m % x.shape(d)) * x.strides()[d];
    m /= x.shape(d);
  }
  return offset;
}

std::vector<float> x_as_float(const mx::array& x, int ldx) {
  const int K = x.shape(-1), M = int(x.size() / K);
  const int64_t col_stride = x.strides().back();
  std::vector<float> out(size_t(M) * ldx);
  const WeightType type = weight_type(x.dtype());
  for (int m = 0; m < M; m++) {
    float* row = out.data() + size_t(m) * ldx;
    const int64_t start = row_offset(x, m);
    if (type == kFloat32 && col_stride == 1) {
      std::memcpy(row, x.data<float>() + start, K * sizeof(float));
      continue;
    }
    for (int k = 0; k < K; k++) {
      row[k] = load_scalar(x.data<void>(), start + k * col_stride, type);
    }
  }
  return out;
}

void store_output(const std::vector<float>& values, mx::array& out) {
  if (out.dtype() == mx::bfloat16) {
    auto* data = out.data<mx::bfloat16_t>();
    for (size_t i = 0; i < values.size(); i++) {
      data[i] = mx::bfloat16_t(values[i]);
    }
  } else {
    auto* data = out.data<mx::float16_t>();
    for (size_t i = 0; i < values.size(); i++) {
      data[i] = mx::float16_t(values[i]);
    }
  }
}

// Column ranges per task, aligned to the float kernel's tiles of 4 columns: several per thread, so that a thread the
// machine does not run for a while holds up little.
template <class F>
void over_columns(int N, F&& columns) {
  constexpr int kTasksPerThread = 4, kMinColumns = 32;
  const int tiles = (N + 3) / 4;
  const int tasks = std::max(1, std::min(pool().size() * kTasksPerThread, tiles / (kMinColumns / 4)));
  const int per_task = (tiles + tasks - 1) / tasks;
  pool().run(tasks, [&](int t) {
    const int n0 = std::min(N, t * per_task * 4), n1 = std::min(N, (t + 1) * per_task * 4);
    if (n0 < n1) {
      columns(n0, n1);
    }
  });
}

void run_product(const mx::array& x_in, const mx::array& w, const mx::array* scales, const mx::array* biases,
                 int group_size, int bits, mx::array& out) {
  // x (..., K) and out (..., N), both read as rows.
  const int K = x_in.shape(-1), M = int(x_in.size() / K), N = out.shape(-1);
  // Rows of x 64 bytes more than a multiple of 8 floats apart: rows a power of two apart would fall into the same
  // L1 cache sets and evict each other when many rows pass over the same weights.
  const int ldx = (K + 7) / 8 * 8 + 16;
  const std::vector<float> x_copy = x_as_float(x_in, ldx);
  const float* x = x_copy.data();
  std::vector<float> out_copy;
  float* y = nullptr;
  if (out.dtype() == mx::float32) {
    y = out.data<float>();
  } else {
    out_copy.resize(size_t(M) * N);
    y = out_copy.data();
  }
  const bool avx2 = use_avx2();
  if (bits == 0) {
    for (int r = 0; r < M; r += kMaxRows) {
      FloatProduct p{x + size_t(r) * ldx, ldx, std::min(kMaxRows, M - r), K, w.data<void>(), weight_type(w.dtype()),
                     y + size_t(r) * N, N};
      over_columns(N, [&](int n0, int n1) {
        avx2 ? float_columns_avx2(p, n0, n1) : float_columns_portable(p, n0, n1);
      });
    }
  } else {
    std::vector<float> x_words, x_sums;
    if (avx2) {
      x_words.resize(size_t(M) * ldx);
      x_sums.resize(size_t(M) * ldx);
      prepare_quant_x(x, ldx, M, K, bits, group_size, x_words.data(), x_sums.data());
    }
    for (int r = 0; r < M; r += kMaxRows) {
      QuantProduct p{x + size_t(r) * ldx, ldx, std::min(kMaxRows, M - r), K, w.data<uint32_t>(), scales->data<void>(),
                     biases->data<void>(), weight_type(scales->dtype()), group_size, bits, y + size_t(r) * N, N,
                     avx2 ? x_words.data() + size_t(r) * ldx : nullptr,
                     avx2 ? x_sums.data() + size_t(r) * ldx : nullptr};
      over_columns(N, [&](int n0, int n1) {
        avx2 ? quant_columns_avx2(p, n0, n1) : quant_columns_portable(p, n0, n1);
      });
    }
  }
  if (out.dtype() != mx::float32) {
    store_output(out_copy, out);
  }
}

}  // namespace

std::string kernel_isa() {
  return use_avx2() ? "avx2" : "portable";
}

int kernel_threads() {
  return pool().size();
}

mx::array decode_matmul(const mx::array& x, const mx::array& w, const std::optional<mx::array>& scales,
                        const std::optional<mx::array>& biases, int group_size, int bits, mx::StreamOrDevice s) {
  if (x.ndim() < 1 || w.ndim() != 2) {
    throw std::invalid_argument("decode_matmul: x must be (..., K) and w 2-D");
  }
  const bool quantized = scales.has_value();
  const int K = x.shape(-1);
  const int N = w.shape(0);
  if (!mx::issubdtype(x.dtype(), mx::floating)) {
    throw std::invalid_argument("decode_matmul: x must be floating point");
  }
  mx::Dtype out_dtype = x.dtype();
  std::vector<mx::array> inputs;
  if (quantized) {
    if (!biases || (bits != 4 && bits != 8) || (group_size != 32 && group_size != 64 && group_size != 128)) {
      throw std::invalid_argument("decode_matmul: affine quantization with bits 4/8 and group size 32/64/128 only");
    }
    if (w.dtype() != mx::uint32 || K % group_size || w.shape(1) != K * bits / 32 ||
        scales->shape() != mx::Shape{N, K / group_size} || biases->shape() != scales->shape()) {
      throw std::invalid_argument("decode_matmul: quantized weight, scales or biases do not match x");
    }
    out_dtype = mx::promote_types(out_dtype, scales->dtype());
    inputs = {w, *scales, *biases};
  } else {
    if (w.shape(1) != K) {
      throw std::invalid_argument("decode_matmul: x and w do not share K");
    }
    out_dtype = mx::promote_types(out_dtype, w.dtype());
    inputs = {w};
    bits = 0;
    group_size = 0;
  }
  weight_type(out_dtype);  // float32, bfloat16 or float16
  auto stream = mx::to_stream(s);
  // A copy only where x's dtype differs from the result's (MLX promotes the same way); weights stay as they are. x
  // keeps its shape and strides, and the result its leading dimensions: no reshapes around the product, which would
  // each cost an operation of scheduling in a decode step.
  inputs.insert(inputs.begin(), mx::astype(x, out_dtype, stream));
  auto out_shape = x.shape();
  out_shape.back() = N;
  return mx::array(out_shape, out_dtype, std::make_shared<DecodeMatmul>(stream, group_size, bits), inputs);
}

void DecodeMatmul::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  for (size_t i = 1; i < inputs.size(); i++) {
    if (!inputs[i].flags().row_contiguous) {
      throw std::invalid_argument("decode_matmul: weights must be row-contiguous");
    }
  }
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& input : inputs) {
    encoder.set_input_array(input);
  }
  encoder.set_output_array(out);
  encoder.dispatch([inputs, out, group_size = group_size_, bits = bits_]() mutable {
    const mx::array* scales = inputs.size() > 2 ? &inputs[2] : nullptr;
    const mx::array* biases = inputs.size() > 3 ? &inputs[3] : nullptr;
    run_product(inputs[0], inputs[1], scales, biases, group_size, bits, out);
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
  return group_size_ == o.group_size_ && bits_ == o.bits_;
}

}  // namespace t5kernels
