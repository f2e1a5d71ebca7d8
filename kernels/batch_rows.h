// The rows of a batch's per-row arrays (each layer's cross-attention keys and values) kept and joined as one MLX
// primitive on the CPU: MLX's gathers, pads and concatenations of them were an operation each, copying at 3-4 GB/s.
#pragma once

#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace t5kernels {

namespace mx = mlx::core;

// For each of `arrays` (B, H, P, d) float32 (of any strides), one array (rows.size() + B2, H, width, d) float32: row i
// is row rows[i] of it, then come the rows of its counterpart in `appended` (B2, H, P2, d) (none where `appended` is
// empty), each row's positions past its own P zeros. width is at least P and P2.
std::vector<mx::array> batch_rows(const std::vector<mx::array>& arrays, const std::vector<int>& rows,
                                  const std::vector<mx::array>& appended, int width, mx::StreamOrDevice s = {});

class BatchRows : public mx::Primitive {
 public:
  BatchRows(mx::Stream stream, std::vector<int> rows, int width, bool appending)
      : mx::Primitive(stream), rows_(std::move(rows)), width_(width), appending_(appending) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "BatchRows";
  }

 private:
  std::vector<int> rows_;
  int width_;
  bool appending_;
};

}  // namespace t5kernels
