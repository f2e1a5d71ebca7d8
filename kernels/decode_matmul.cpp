#include "decode_matmul.h"

#include <atomic>
#include <condition_variable>
#include <cstdlib>
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

// Workers that wait for a job, run their share of its tasks and report back; the calling thread takes tasks too.
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
    {
      std::lock_guard<std::mutex> lock(mutex_);
      task_ = &task;
      tasks_ = tasks;
      next_.store(0);
      busy_ = int(workers_.size());
      generation_++;
    }
    wake_.notify_all();
    take_tasks();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return busy_ == 0; });
    task_ = nullptr;
  }

 private:
  void take_tasks() {
    for (int i = next_.fetch_add(1); i < tasks_; i = next_.fetch_add(1)) {
      (*task_)(i);
    }
  }

  void work() {
    uint64_t seen = 0;
    while (true) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
      }
      take_tasks();
      std::lock_guard<std::mutex> lock(mutex_);
      if (--busy_ == 0) {
        done_.notify_one();
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* task_ = nullptr;
  int tasks_ = 0;
  std::atomic<int> next_{0};
  int busy_ = 0;
  uint64_t generation_ = 0;
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

// x (M, K) of any float dtype and strides -> contiguous float32.
std::vector<float> x_as_float(const mx::array& x) {
  const int M = x.shape(0), K = x.shape(1);
  const int64_t row_stride = x.strides()[0], col_stride = x.strides()[1];
  std::vector<float> out(size_t(M) * K);
  const WeightType type = weight_type(x.dtype());
  for (int m = 0; m < M; m++) {
    for (int k = 0; k < K; k++) {
      out[size_t(m) * K + k] = load_scalar(x.data<void>(), m * row_stride + k * col_stride, type);
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

// Column ranges per task: a few per thread, aligned to the float kernel's tiles of 4 columns.
template <class F>
void over_columns(int N, F&& columns) {
  const int threads = pool().size();
  const int tiles = (N + 3) / 4;
  const int tasks = std::min(tiles, threads);
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
  const int M = x_in.shape(0), K = x_in.shape(1), N = out.shape(1);
  std::vector<float> x_copy;
  const float* x = nullptr;
  if (x_in.dtype() == mx::float32 && x_in.flags().row_contiguous) {
    x = x_in.data<float>();
  } else {
    x_copy = x_as_float(x_in);
    x = x_copy.data();
  }
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
      FloatProduct p{x + size_t(r) * K, std::min(kMaxRows, M - r), K, w.data<void>(), weight_type(w.dtype()),
                     y + size_t(r) * N, N};
      over_columns(N, [&](int n0, int n1) {
        avx2 ? float_columns_avx2(p, n0, n1) : float_columns_portable(p, n0, n1);
      });
    }
  } else {
    std::vector<float> x_words, x_sums;
    if (avx2) {
      x_words.resize(size_t(M) * K);
      x_sums.resize(size_t(M) * K / (32 / bits));
      prepare_quant_x(x, M, K, bits, x_words.data(), x_sums.data());
    }
    for (int r = 0; r < M; r += kMaxRows) {
      QuantProduct p{x + size_t(r) * K, std::min(kMaxRows, M - r), K, w.data<uint32_t>(), scales->data<void>(),
                     biases->data<void>(), weight_type(scales->dtype()), group_size, bits, y + size_t(r) * N, N,
                     avx2 ? x_words.data() + size_t(r) * K : nullptr,
                     avx2 ? x_sums.data() + size_t(r) * K / (32 / bits) : nullptr};
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
  // A copy only where x's dtype differs from the result's (MLX promotes the same way); weights stay as they are.
  auto x2 = mx::reshape(mx::astype(x, out_dtype, stream), {-1, K}, stream);
  inputs.insert(inputs.begin(), x2);
  auto out_shape = x.shape();
  out_shape.back() = N;
  auto out = mx::array({x2.shape(0), N}, out_dtype, std::make_shared<DecodeMatmul>(stream, group_size, bits), inputs);
  return mx::reshape(out, out_shape, stream);
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
  return {{inputs[0].shape(0), inputs[1].shape(0)}};
}

bool DecodeMatmul::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const DecodeMatmul&>(other);
  return group_size_ == o.group_size_ && bits_ == o.bits_;
}

}  // namespace t5kernels
