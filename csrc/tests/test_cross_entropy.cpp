// C++ unit test of the CPU cross_entropy_rows kernel against ATen's log_softmax, through the dispatcher
// (so the schema registration is exercised too). Exits non-zero on the first failure.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace {

int failures = 0;

void expect_close(const at::Tensor& got, const at::Tensor& want, double tol, const char* what) {
  const double err = (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>();
  if (!(err <= tol)) {
    std::printf("FAIL %s: max abs error %.3g > %.3g\n", what, err, tol);
    ++failures;
  } else {
    std::printf("ok   %s (max abs error %.3g)\n", what, err);
  }
}

void run_case(int64_t rows, int64_t vocab, double scale, double softcap, at::ScalarType dtype) {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastsft::cross_entropy_rows", "")
                .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                    at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, int64_t, bool, bool)>();
  at::Tensor raw = at::randn({rows, vocab}, at::kDouble) * 3;
  at::Tensor labels = at::randint(0, vocab, {rows}, at::kLong);
  labels.index_put_({0}, -100);  // one ignored row
  at::Tensor logits = raw.to(dtype);
  at::Tensor z = logits.to(at::kDouble) * scale;
  if (softcap > 0) z = softcap * at::tanh(z / softcap);
  at::Tensor logp = at::log_softmax(z, 1);
  at::Tensor valid = labels.ne(-100);
  at::Tensor safe = at::where(valid, labels, at::zeros_like(labels));
  at::Tensor want_loss = -logp.gather(1, safe.unsqueeze(1)).squeeze(1) * valid;
  at::Tensor want_entropy = -(logp.exp() * logp).sum(1);
  // d loss / d raw = (softmax - onehot) * d z / d raw
  at::Tensor onehot = at::zeros_like(logp).scatter_(1, safe.unsqueeze(1), 1.0);
  at::Tensor dz = scale * (softcap > 0 ? 1 - at::pow(at::tanh(logits.to(at::kDouble) * scale / softcap), 2)
                                       : at::ones_like(z));
  at::Tensor want_grad = (logp.exp() - onehot) * dz * valid.unsqueeze(1);

  // A per-row gradient scale, as reduction='none' uses it.
  at::Tensor grad_scale = at::rand({rows}, at::kFloat) + 0.5;
  want_grad = want_grad * grad_scale.to(at::kDouble).unsqueeze(1);
  auto [loss, lse, entropy, argmax] = op.call(logits, labels, grad_scale, scale, softcap, -100, true, true);
  const double tol = dtype == at::kFloat ? 1e-4 : 2e-2;
  char what[128];
  std::snprintf(what, sizeof what, "rows=%lld vocab=%lld scale=%g softcap=%g %s", (long long)rows,
                (long long)vocab, scale, softcap, c10::toString(dtype));
  std::printf("-- %s\n", what);
  expect_close(loss, want_loss, tol * 10, "loss");
  expect_close(lse, at::logsumexp(z, 1), tol * 10, "lse");
  expect_close(entropy, want_entropy, tol * 10, "entropy");
  expect_close(logits, want_grad, tol, "gradient in place");
  if (!argmax.equal(z.argmax(1))) {
    std::printf("FAIL argmax\n");
    ++failures;
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  run_case(7, 1000, 1.0, 0.0, at::kFloat);
  run_case(5, 1001, 0.5, 30.0, at::kFloat);
  run_case(3, 32000, 1.0, 0.0, at::kBFloat16);
  run_case(4, 129, 2.0, 10.0, at::kHalf);
  std::printf(failures ? "%d FAILED\n" : "all passed\n", failures);
  return failures ? EXIT_FAILURE : EXIT_SUCCESS;
}
