// The example programs' backbone cache (examples/common/backbones.hpp): a matching file is loaded, any change of
// version, settings or file contents is detected and reported, and cached weights load into the models.
#include <gtest/gtest.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "../examples/common/backbones.hpp"

using namespace mixpeft;
using namespace mixpeft::examples;

namespace {

const std::filesystem::path data_dir = std::filesystem::path(__FILE__).parent_path().parent_path() / "data";

class BackbonesCache : public ::testing::Test {
 protected:
  // The tiny models train fastest on one thread (OpenMP start-up dominates their small GEMMs).
  static void SetUpTestSuite() {
#ifdef _OPENMP
    omp_set_num_threads(1);
#endif
  }
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("mixpeft_backbones_" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()));
    std::filesystem::remove_all(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  // Obtains the backbones and returns the log.
  std::string obtain(const BackboneSettings& s, bool retrain = false) {
    std::ostringstream log;
    last_.emplace(Backbones::obtain(s, dir_, data_dir, log, retrain));
    return log.str();
  }
  std::filesystem::path file(const BackboneSettings& s) const { return dir_ / (s.name + ".safetensors"); }

  // Every base weight of a Llama built from s.llm after load_into.
  std::map<std::string, Tensor<float>> llm_weights(const BackboneSettings& s) {
    Rng rng(123);
    Llama<float> llm(s.llm, rng);
    last_->load_into(llm);
    std::map<std::string, Tensor<float>> out;
    ParameterList<float> list;
    llm.collect_base_parameters(list);
    for (const auto& ref : list) out.emplace(ref.name, ref.param->value);
    return out;
  }

  std::filesystem::path dir_;
  std::optional<Backbones> last_;
};

TEST_F(BackbonesCache, SecondRunLoadsTheSameWeights) {
  const BackboneSettings s = BackboneSettings::tiny();
  const std::string first = obtain(s);
  EXPECT_FALSE(last_->from_cache());
  EXPECT_NE(first.find("no cache"), std::string::npos) << first;
  EXPECT_TRUE(std::filesystem::exists(file(s)));
  const auto trained = llm_weights(s);
  const PretrainStats stats = last_->stats();
  EXPECT_GT(stats.llm_loss_first, 0.0);
  EXPECT_GT(stats.vit_loss_first, 0.0);

  const std::string second = obtain(s);
  EXPECT_TRUE(last_->from_cache()) << second;
  EXPECT_NE(second.find("loaded"), std::string::npos) << second;
  EXPECT_EQ(last_->stats().llm_loss_last, stats.llm_loss_last);
  EXPECT_EQ(last_->stats().vit_heldout_accuracy, stats.vit_heldout_accuracy);
  const auto loaded = llm_weights(s);
  ASSERT_EQ(loaded.size(), trained.size());
  for (const auto& [name, value] : trained) EXPECT_EQ(loaded.at(name), value) << name;

  obtain(s, /*retrain=*/true);
  EXPECT_FALSE(last_->from_cache());
}

TEST_F(BackbonesCache, ChangedSettingsAreNamedAndRetrained) {
  BackboneSettings s = BackboneSettings::tiny();
  obtain(s);
  s.llm_recipe.steps = 4;
  s.vit.mlp_dim = 24;
  const std::string log = obtain(s);
  EXPECT_FALSE(last_->from_cache());
  EXPECT_NE(log.find("llm_recipe.steps = 3 (now 4)"), std::string::npos) << log;
  EXPECT_NE(log.find("vit.mlp_dim = 32 (now 24)"), std::string::npos) << log;
  obtain(s);
  EXPECT_TRUE(last_->from_cache());

  // Which [cls] tokens a consumer takes changes no weight: the cache still matches.
  s.vit.take_every = 2;
  s.vit.norm_taken = true;
  s.llm_recipe.log_every = 7;
  obtain(s);
  EXPECT_TRUE(last_->from_cache());
}

TEST_F(BackbonesCache, OtherFormatVersionIsRetrained) {
  const BackboneSettings s = BackboneSettings::tiny();
  obtain(s);
  {  // rewrite the file with format_version 0
    const SafetensorsFile f(file(s));
    std::map<std::string, Tensor<float>> tensors;
    for (const auto& name : f.names()) tensors.emplace(name, f.read<float>(name));
    Metadata m = f.metadata();
    m["format_version"] = "0";
    save_safetensors(file(s).string() + ".tmp", tensors, DType::F32, m);
  }
  std::filesystem::rename(file(s).string() + ".tmp", file(s));
  const std::string log = obtain(s);
  EXPECT_FALSE(last_->from_cache());
  EXPECT_NE(log.find("format version 0 (now " + std::to_string(backbone_format_version) + ")"), std::string::npos)
      << log;
}

TEST_F(BackbonesCache, CorruptOrForeignFilesAreRetrained) {
  const BackboneSettings s = BackboneSettings::tiny();
  std::filesystem::create_directories(dir_);
  std::ofstream(file(s)) << "not a safetensors file";
  std::string log = obtain(s);
  EXPECT_FALSE(last_->from_cache());
  EXPECT_NE(log.find("unusable"), std::string::npos) << log;

  // A valid safetensors file without the backbone metadata.
  save_safetensors(file(s), std::map<std::string, Tensor<float>>{{"x", zeros<float>({2})}});
  log = obtain(s);
  EXPECT_FALSE(last_->from_cache());
  EXPECT_NE(log.find("not a backbone file"), std::string::npos) << log;
  obtain(s);
  EXPECT_TRUE(last_->from_cache());
}

TEST_F(BackbonesCache, ModelsThatDisagreeWithTheSettingsThrow) {
  const BackboneSettings s = BackboneSettings::tiny();
  obtain(s);
  Rng rng(1);
  auto wider = s.llm;
  wider.dim = 32;
  wider.n_heads = 2;
  Llama<float> llm(wider, rng);
  EXPECT_THROW(last_->load_into(llm), ShapeError);
  auto deeper = s.vit;
  deeper.n_layers = 4;
  ClipVit<float> vit(deeper, rng);
  EXPECT_THROW(last_->load_into(vit), ConfigError);
  // A ViT with fewer blocks (LLaVA's feature_layer) takes the blocks it has.
  auto shallower = s.vit;
  shallower.n_layers = 1;
  ClipVit<float> first_block(shallower, rng);
  EXPECT_NO_THROW(last_->load_into(first_block));
}

}  // namespace
