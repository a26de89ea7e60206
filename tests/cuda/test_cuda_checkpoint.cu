// Checkpoints of device optimizers (cuda/checkpoint.cuh): a run saved and resumed on the GPU continues bit for bit
// (float, and bf16 with its fp32 master weights); the files move between the backends (a CPU float checkpoint into
// float and bf16 device models, a bf16 device checkpoint into the CPU); a bad file changes nothing;
// Trainer<float, Cuda>::save / resume. Skips without a CUDA device.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "mixpeft/cuda/backend.cuh"
#include "mixpeft/cuda/checkpoint.cuh"
#include "mixpeft/train/adamw.hpp"
#include "mixpeft/train/checkpoint.hpp"
#include "mixpeft/train/trainer.hpp"
#include "cuda_test_support.cuh"

namespace mixpeft::cuda_test {
namespace {

namespace fs = std::filesystem;

class CudaCheckpointFiles : public CudaTest {
 protected:
  void SetUp() override {
    CudaTest::SetUp();
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() / mixpeft::detail::concat("mixpeft_cuda_ckpt_", info->name(), "_", ::getpid());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path path(const std::string& name) const { return dir_ / name; }
  fs::path dir_;
};

// Three parameters on either backend, with values from `seed`: a decayed matrix, an undecayed bias, a frozen one.
template <class T, class Backend>
struct Toy {
  std::vector<Parameter<T, Backend>> p;

  explicit Toy(std::uint64_t seed, std::size_t width = 12) {
    Rng rng(seed);
    const auto values = [&](Shape shape) {
      return Backend::template from_host<T>(mixpeft::testing::random_tensor<float>(shape, rng));
    };
    p.reserve(3);
    p.emplace_back("weight", values({8, width}), true, true);
    p.emplace_back("bias", values({width}), true, false);
    p.emplace_back("frozen", values({4, 4}), false, true);
  }
  ParameterList<T, Backend> list() {
    ParameterList<T, Backend> l;
    for (auto& q : p) l.push_back({"toy." + q.name, &q});
    return l;
  }
  // The gradients of step t, the same on every backend and for every copy.
  void set_grads(std::int64_t t) {
    Rng rng(1000 + std::uint64_t(t));
    for (auto& q : p)
      if (q.trainable)
        q.grad = Backend::template from_host<T>(mixpeft::testing::random_tensor<float>(shape_of(q.value), rng));
  }
  std::vector<Tensor<float>> values() const {
    std::vector<Tensor<float>> out;
    for (const auto& q : p) {
      if constexpr (std::is_same_v<Backend, Cuda>) out.push_back(cuda::download_as<float>(q.value));
      else out.push_back(q.value);
    }
    return out;
  }
};

AdamWConfig test_config() {
  AdamWConfig c;
  c.lr = 3e-2;
  c.weight_decay = 0.1;
  return c;
}

template <class Optimizer, class Model>
void take_steps(Optimizer& opt, Model& model, std::int64_t first, std::int64_t last) {
  for (std::int64_t t = first; t < last; ++t) {
    model.set_grads(t);
    opt.step(1e-2 * double(t + 1));
  }
}

void expect_same_values(const std::vector<Tensor<float>>& got, const std::vector<Tensor<float>>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t i = 0; i < got.size(); ++i) EXPECT_TRUE(exactly_equal(got[i], want[i])) << "parameter " << i;
}

template <class T>
class CudaCheckpoint : public CudaCheckpointFiles {};
using CheckpointTypes = ::testing::Types<float, __nv_bfloat16>;
TYPED_TEST_SUITE(CudaCheckpoint, CheckpointTypes);

TYPED_TEST(CudaCheckpoint, ResumedRunContinuesBitIdentically) {
  using T = TypeParam;
  Toy<T, Cuda> straight(1);
  cuda::AdamW<T> opt(straight.list(), test_config());
  take_steps(opt, straight, 0, 3);
  Rng data(77);
  data.next_u64();
  save_checkpoint(this->path("run.safetensors"), opt, {.step = 3, .extra = {{"epoch", 2}}}, {{"data", &data}});
  take_steps(opt, straight, 3, 6);

  Toy<T, Cuda> resumed(2);  // other values: every trainable one must come from the file
  cuda::AdamW<T> opt2(resumed.list(), AdamWConfig{});
  Rng data2(5);
  const CheckpointInfo info = load_checkpoint(this->path("run.safetensors"), opt2, {{"data", &data2}});
  EXPECT_EQ(info.step, 3);
  EXPECT_EQ(info.extra["epoch"], 2);
  EXPECT_EQ(data2.next_u64(), data.next_u64());
  EXPECT_EQ(opt2.config().weight_decay, test_config().weight_decay);
  ASSERT_EQ(opt2.state().size(), 2u);
  EXPECT_EQ(opt2.state().at("toy.weight").step, 3);
  take_steps(opt2, resumed, 3, 6);
  const auto want = straight.values(), got = resumed.values();
  EXPECT_TRUE(exactly_equal(got[0], want[0]));
  EXPECT_TRUE(exactly_equal(got[1], want[1]));
  EXPECT_FALSE(exactly_equal(got[2], want[2]));  // the frozen parameter is not in the file
}

// A checkpoint before the first step holds values only; a bf16 parameter then takes its master from its value.
TYPED_TEST(CudaCheckpoint, CheckpointBeforeTheFirstStepHoldsNoMoments) {
  using T = TypeParam;
  Toy<T, Cuda> a(3);
  cuda::AdamW<T> opt(a.list(), test_config());
  save_checkpoint(this->path("fresh.safetensors"), opt);
  Toy<T, Cuda> b(4);
  cuda::AdamW<T> opt2(b.list(), test_config());
  load_checkpoint(this->path("fresh.safetensors"), opt2);
  EXPECT_TRUE(opt2.state().empty());
  take_steps(opt, a, 0, 2);
  take_steps(opt2, b, 0, 2);
  const auto want = a.values(), got = b.values();
  EXPECT_TRUE(exactly_equal(got[0], want[0]));
  EXPECT_TRUE(exactly_equal(got[1], want[1]));
}

// The file format is the CPU's: a CPU float run resumes on the device (float exactly; bf16 rounds the values and
// keeps the fp32 values as master weights), and a bf16 device run resumes on the CPU from its master weights.
TEST_F(CudaCheckpointFiles, FilesMoveBetweenTheBackends) {
  Toy<float, Cpu> cpu(5);
  AdamW<float> cpu_opt(cpu.list(), test_config());
  take_steps(cpu_opt, cpu, 0, 2);
  save_checkpoint(path("cpu.safetensors"), cpu_opt, {.step = 2});

  Toy<float, Cuda> f32(6);
  cuda::AdamW<float> f32_opt(f32.list(), AdamWConfig{});
  EXPECT_EQ(load_checkpoint(path("cpu.safetensors"), f32_opt).step, 2);
  EXPECT_TRUE(same(f32.p[0].value, cpu.p[0].value));
  EXPECT_TRUE(same(f32.p[1].value, cpu.p[1].value));
  EXPECT_TRUE(same(f32_opt.state().at("toy.weight").m, cpu_opt.state().at("toy.weight").m));
  EXPECT_TRUE(same(f32_opt.state().at("toy.bias").v, cpu_opt.state().at("toy.bias").v));
  take_steps(cpu_opt, cpu, 2, 4);
  take_steps(f32_opt, f32, 2, 4);
  EXPECT_TRUE(close(f32.p[0].value, cpu.p[0].value, 1e-6));

  Toy<__nv_bfloat16, Cuda> bf16(7);
  cuda::AdamW<__nv_bfloat16> bf16_opt(bf16.list(), AdamWConfig{});
  load_checkpoint(path("cpu.safetensors"), bf16_opt);
  const auto& master = bf16_opt.state().at("toy.weight").master;
  ASSERT_EQ(master.size(), bf16.p[0].value.size());
  cuda::DeviceTensor<__nv_bfloat16> rounded;
  cuda::convert(master, rounded);
  EXPECT_TRUE(exactly_equal(cuda::download_as<float>(bf16.p[0].value), cuda::download_as<float>(rounded)));

  take_steps(bf16_opt, bf16, 2, 3);
  save_checkpoint(path("bf16.safetensors"), bf16_opt, {.step = 3});
  Toy<float, Cpu> back(8);
  AdamW<float> back_opt(back.list(), AdamWConfig{});
  EXPECT_EQ(load_checkpoint(path("bf16.safetensors"), back_opt).step, 3);
  EXPECT_TRUE(same(bf16_opt.state().at("toy.weight").master, back.p[0].value));
  EXPECT_EQ(back_opt.state().at("toy.weight").step, 3);
}

// A checkpoint of other shapes, a missing file or a file that is no checkpoint is refused before anything changes.
TEST_F(CudaCheckpointFiles, BadFilesChangeNothing) {
  Toy<__nv_bfloat16, Cuda> wide(9, 16);
  cuda::AdamW<__nv_bfloat16> wide_opt(wide.list(), test_config());
  take_steps(wide_opt, wide, 0, 1);
  save_checkpoint(path("wide.safetensors"), wide_opt);

  Toy<__nv_bfloat16, Cuda> model(10);
  cuda::AdamW<__nv_bfloat16> opt(model.list(), test_config());
  take_steps(opt, model, 0, 1);
  const auto before = model.values();
  EXPECT_THROW(load_checkpoint(path("wide.safetensors"), opt), ShapeError);
  EXPECT_THROW(load_checkpoint(path("missing.safetensors"), opt), IoError);
  save_safetensors<float>(path("weights.safetensors"), {{"toy.weight", mixpeft::zeros<float>({8, 12})}});
  EXPECT_THROW(load_checkpoint(path("weights.safetensors"), opt), FormatError);
  expect_same_values(model.values(), before);
  EXPECT_EQ(opt.state().at("toy.weight").step, 1);
}

// Trainer<float, Cuda>: save after two steps, two more; a fresh trainer resumed from the file takes the same two.
TEST_F(CudaCheckpointFiles, TrainerSavesAndResumesOnTheDevice) {
  struct Report {
    double loss;
    std::size_t tokens;
  };
  const auto run = [](Toy<float, Cuda>& toy) {
    return [&toy](const std::int64_t& t) {
      toy.set_grads(t);
      return Report{double(t), 1};
    };
  };
  TrainerConfig config;
  config.adamw = test_config();
  config.clip_norm = 1.0;
  Toy<float, Cuda> straight(11);
  Trainer<float, Cuda> trainer(straight.list(), config);
  for (std::int64_t t = 0; t < 2; ++t) trainer.step<std::int64_t>(run(straight), std::span<const std::int64_t>(&t, 1));
  trainer.save(path("trainer.safetensors"), {}, {{"note", "two steps"}});
  for (std::int64_t t = 2; t < 4; ++t) trainer.step<std::int64_t>(run(straight), std::span<const std::int64_t>(&t, 1));

  Toy<float, Cuda> resumed(12);
  Trainer<float, Cuda> trainer2(resumed.list(), config);
  EXPECT_EQ(trainer2.resume(path("trainer.safetensors"))["note"], "two steps");
  EXPECT_EQ(trainer2.steps(), 2);
  for (std::int64_t t = 2; t < 4; ++t) trainer2.step<std::int64_t>(run(resumed), std::span<const std::int64_t>(&t, 1));
  const auto want = straight.values(), got = resumed.values();
  EXPECT_TRUE(exactly_equal(got[0], want[0]));
  EXPECT_TRUE(exactly_equal(got[1], want[1]));
}

}  // namespace
}  // namespace mixpeft::cuda_test
