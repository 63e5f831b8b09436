// C++ unit test of the CPU dequantize_nf4 kernel through the dispatcher (so the schema registration is exercised
// too): nibble order, the NF4 table, plain and double-quantized absmax, a partial last block and an odd element
// count, against an element-by-element float32 evaluation. Exits non-zero on the first failure.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>
#include <optional>
#include <vector>

namespace {

int failures = 0;

const float kNf4[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
                        -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
                        0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
                        0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

using Op = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                const std::optional<at::Tensor>&, int64_t, int64_t, double, at::Tensor&);

c10::TypedOperatorHandle<Op> op() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("fastsft::dequantize_nf4", "").typed<Op>();
}

void expect_equal(const at::Tensor& got, const at::Tensor& want, const char* what) {
  if (!got.equal(want)) {
    const int64_t bad = got.ne(want).sum().item<int64_t>();
    std::printf("FAIL %s: %lld elements differ\n", what, static_cast<long long>(bad));
    ++failures;
  } else {
    std::printf("ok   %s\n", what);
  }
}

void run_case(int64_t n, int64_t blocksize, bool nested, at::ScalarType dtype) {
  const int64_t bytes = (n + 1) / 2, blocks = (n + blocksize - 1) / blocksize;
  at::Tensor packed = at::randint(0, 256, {bytes}, at::kByte);
  at::Tensor code = at::from_blob(const_cast<float*>(kNf4), {16}, at::kFloat).clone();
  std::vector<float> scale(blocks);
  at::Tensor absmax;
  std::optional<at::Tensor> absmax2, code2;
  const float offset = 0.25f;
  const int64_t bs2 = 7;  // any nested block size works; bitsandbytes uses 256
  if (nested) {
    absmax = at::randint(0, 256, {blocks}, at::kByte);
    absmax2 = at::rand({(blocks + bs2 - 1) / bs2}, at::kFloat) + 0.5;
    code2 = at::linspace(-1.0, 1.0, 256, at::kFloat);
    for (int64_t b = 0; b < blocks; ++b) {
      volatile float prod = code2->data_ptr<float>()[absmax.data_ptr<uint8_t>()[b]] * absmax2->data_ptr<float>()[b / bs2];
      scale[b] = prod + offset;  // two float32 roundings, as bitsandbytes
    }
  } else {
    absmax = at::rand({blocks}, at::kFloat) * 3;
    for (int64_t b = 0; b < blocks; ++b) scale[b] = absmax.data_ptr<float>()[b];
  }
  at::Tensor want = at::empty({n}, at::kFloat);
  const uint8_t* p = packed.data_ptr<uint8_t>();
  for (int64_t j = 0; j < n; ++j) {
    const int q = j % 2 == 0 ? p[j / 2] >> 4 : p[j / 2] & 0xF;  // high nibble first
    want.data_ptr<float>()[j] = kNf4[q] * scale[j / blocksize];
  }
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(dtype));
  op().call(packed, absmax, code, absmax2, code2, blocksize, bs2, offset, out);
  char what[128];
  std::snprintf(what, sizeof what, "n=%lld blocksize=%lld nested=%d %s", static_cast<long long>(n),
                static_cast<long long>(blocksize), nested ? 1 : 0, c10::toString(dtype));
  expect_equal(out, want.to(dtype), what);
}

void nibble_order() {
  at::Tensor packed = at::zeros({16}, at::kByte);
  packed.data_ptr<uint8_t>()[0] = 0x0F;
  at::Tensor code = at::from_blob(const_cast<float*>(kNf4), {16}, at::kFloat).clone();
  at::Tensor out = at::empty({32}, at::kFloat);
  op().call(packed, at::full({1}, 2.0f), code, std::nullopt, std::nullopt, 32, 256, 0.0, out);
  const float* o = out.data_ptr<float>();
  if (o[0] != -2.0f || o[1] != 2.0f || o[2] != -2.0f) {
    std::printf("FAIL nibble order: %g %g %g\n", o[0], o[1], o[2]);
    ++failures;
  } else {
    std::printf("ok   nibble order (high first)\n");
  }
}

void bad_input() {
  at::Tensor code = at::from_blob(const_cast<float*>(kNf4), {16}, at::kFloat).clone();
  at::Tensor out = at::empty({64}, at::kFloat);
  try {
    op().call(at::zeros({31}, at::kByte), at::ones({1}), code, std::nullopt, std::nullopt, 64, 256, 0.0, out);
    std::printf("FAIL short packed accepted\n");
    ++failures;
  } catch (const c10::Error&) {
    std::printf("ok   short packed rejected\n");
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  nibble_order();
  bad_input();
  for (bool nested : {false, true}) {
    run_case(96 * 200, 64, nested, at::kFloat);
    run_case(96 * 200, 64, nested, at::kBFloat16);
    run_case(3001, 128, nested, at::kHalf);  // partial last block, odd count
    run_case(4096 * 3, 4096, nested, at::kBFloat16);
  }
  std::printf(failures ? "%d FAILED\n" : "all passed\n", failures);
  return failures ? EXIT_FAILURE : EXIT_SUCCESS;
}
