#include "batch_rows.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "dispatch.h"

namespace t5kernels {

namespace {

void check(bool ok, const char* what) {
  if (!ok) {
    throw std::invalid_argument(std::string("batch_rows: ") + what);
  }
}

// Row `row` of `in` (B, H, P, d), every head, into row `at` of `out` (R, H, width, d), zeros past P.
void copy_row(const mx::array& in, int row, mx::array& out, int at) {
  const int H = out.shape(1), width = out.shape(2), d = out.shape(3), P = in.shape(2);
  const auto& s = in.strides();
  const float* source = in.data<float>() + row * s[0];
  float* target = out.data<float>() + size_t(at) * H * width * d;
  for (int h = 0; h < H; h++, target += size_t(width) * d) {
    const float* head = source + h * s[1];
    if (s[3] == 1 && s[2] == d) {
      std::memcpy(target, head, size_t(P) * d * sizeof(float));
    } else {
      for (int p = 0; p < P; p++) {
        for (int i = 0; i < d; i++) {
          target[size_t(p) * d + i] = head[p * s[2] + i * s[3]];
        }
      }
    }
    std::fill(target + size_t(P) * d, target + size_t(width) * d, 0.0f);
  }
}

}  // namespace

std::vector<mx::array> batch_rows(const std::vector<mx::array>& arrays, const std::vector<int>& rows,
                                  const std::vector<mx::array>& appended, int width, mx::StreamOrDevice s) {
  check(!arrays.empty(), "at least one array");
  check(appended.empty() || appended.size() == arrays.size(), "one appended array per array, or none");
  std::vector<mx::Shape> shapes;
  std::vector<mx::array> inputs = arrays;
  inputs.insert(inputs.end(), appended.begin(), appended.end());
  for (size_t j = 0; j < arrays.size(); j++) {
    const mx::array& a = arrays[j];
    check(a.ndim() == 4 && a.dtype() == mx::float32, "arrays must be (B, H, P, d) float32");
    check(a.shape(2) <= width, "width must be at least every array's P");
    for (int row : rows) {
      check(row >= 0 && row < a.shape(0), "a row must be a row of the arrays");
    }
    int count = int(rows.size());
    if (!appended.empty()) {
      const mx::array& b = appended[j];
      check(b.ndim() == 4 && b.dtype() == mx::float32 && b.shape(1) == a.shape(1) && b.shape(3) == a.shape(3),
            "an appended array must be (B2, H, P2, d) float32 with its array's H and d");
      check(b.shape(2) <= width, "width must be at least every appended array's P");
      count += b.shape(0);
    }
    shapes.push_back({count, a.shape(1), width, a.shape(3)});
  }
  auto stream = mx::to_stream(s);
  auto primitive = std::make_shared<BatchRows>(stream, rows, width, !appended.empty());
  return mx::array::make_arrays(std::move(shapes), std::vector<mx::Dtype>(arrays.size(), mx::float32), primitive,
                                inputs);
}

void BatchRows::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  dispatch(stream(), inputs, outputs, [inputs, outputs, rows = rows_, appending = appending_]() mutable {
    const size_t count = outputs.size();
    for (size_t j = 0; j < count; j++) {
      for (size_t i = 0; i < rows.size(); i++) {
        copy_row(inputs[j], rows[i], outputs[j], int(i));
      }
      if (appending) {
        const mx::array& more = inputs[count + j];
        for (int i = 0; i < more.shape(0); i++) {
          copy_row(more, i, outputs[j], int(rows.size()) + i);
        }
      }
    }
  });
}

void BatchRows::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("BatchRows runs on the CPU only");
}

}  // namespace t5kernels
