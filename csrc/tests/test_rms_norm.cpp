// C++ unit test of the CPU rms_norm_forward / rms_norm_backward kernels against ATen autograd in float64,
// through the dispatcher (so the schema registration is exercised too). Exits non-zero on any failure.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>
#include <optional>

namespace {

int failures = 0;

void expect_close(const at::Tensor& got, const at::Tensor& want, double tol, const char* what) {
  const double scale = std::max(1.0, want.to(at::kDouble).abs().max().item<double>());
  const double err = got.numel() ? (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>() / scale : 0.0;
  if (!(err <= tol)) {
    std::printf("FAIL %s: max error %.3g > %.3g\n", what, err, tol);
    ++failures;
  } else {
    std::printf("ok   %s (max error %.3g)\n", what, err);
  }
}

void run_case(int64_t rows, int64_t hidden, double offset, bool residual, bool weight_grad, at::ScalarType dtype) {
  auto& dispatcher = c10::Dispatcher::singleton();
  auto fwd = dispatcher.findSchemaOrThrow("fastsft::rms_norm_forward", "")
                 .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                     const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double, double)>();
  auto bwd = dispatcher.findSchemaOrThrow("fastsft::rms_norm_backward", "")
                 .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const std::optional<at::Tensor>&,
                                                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                           double, bool)>();
  const double eps = 1e-6;
  at::Tensor x = at::randn({rows, hidden}, at::kDouble).to(dtype);
  at::Tensor r = at::randn({rows, hidden}, at::kDouble).to(dtype);
  at::Tensor w = (at::randn({hidden}, at::kDouble) * 0.1 + (1.0 - offset)).to(dtype);
  at::Tensor gy = at::randn({rows, hidden}, at::kDouble).to(dtype);
  at::Tensor gs = at::randn({rows, hidden}, at::kDouble).to(dtype);

  std::optional<at::Tensor> res = residual ? std::optional<at::Tensor>(r) : std::nullopt;
  auto [y, s, rstd] = fwd.call(x, w, res, eps, offset);
  at::Tensor saved = residual ? s : x;
  std::optional<at::Tensor> grad_sum = residual ? std::optional<at::Tensor>(gs) : std::nullopt;
  auto [ds, dw] = bwd.call(gy, grad_sum, saved, w, rstd, offset, weight_grad);

  // Expected, by autograd in float64 on the (rounded) sum.
  at::Tensor sd = (residual ? (x + r) : x).to(at::kDouble).set_requires_grad(true);
  at::Tensor wd = w.to(at::kDouble).set_requires_grad(true);
  at::Tensor yd = sd * at::rsqrt(sd.pow(2).mean(-1, true) + eps) * (wd + offset);
  auto grads = torch::autograd::grad({yd}, {sd, wd}, {gy.to(at::kDouble)});
  at::Tensor want_ds = grads[0] + (residual ? gs.to(at::kDouble) : at::zeros_like(grads[0]));

  const double tol = dtype == at::kFloat ? 1e-5 : 2e-2;
  char what[160];
  std::snprintf(what, sizeof what, "rows=%lld hidden=%lld offset=%g residual=%d weight_grad=%d %s", (long long)rows,
                (long long)hidden, offset, residual, weight_grad, c10::toString(dtype));
  std::printf("-- %s\n", what);
  expect_close(y, yd.detach(), tol, "y");
  if (residual) expect_close(s, (x + r), 0.0, "x + residual (same rounding as ATen's add)");
  if (!residual && s.numel() != 0) {
    std::printf("FAIL sum output should be empty without a residual\n");
    ++failures;
  }
  expect_close(ds, want_ds, tol, "grad of the input");
  if (weight_grad) {
    expect_close(dw, grads[1], tol * 4, "grad of the weight");
  } else if (dw.numel() != 0) {
    std::printf("FAIL weight grad should be empty when not asked for\n");
    ++failures;
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  run_case(37, 96, 0.0, false, true, at::kFloat);
  run_case(130, 4001, 1.0, true, true, at::kFloat);  // several 64-row parts of the weight gradient
  run_case(5, 96, 1.0, true, false, at::kFloat);
  run_case(9, 512, 0.0, true, true, at::kBFloat16);
  run_case(4, 257, 1.0, false, true, at::kHalf);
  std::printf(failures ? "%d FAILED\n" : "all passed\n", failures);
  return failures ? EXIT_FAILURE : EXIT_SUCCESS;
}
