#include <gtest/gtest.h>

#include <unistd.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "mixpeft/core/parameter.hpp"
#include "mixpeft/core/rng.hpp"
#include "mixpeft/io/atomic_file.hpp"
#include "mixpeft/io/dtype.hpp"
#include "mixpeft/io/safetensors.hpp"
#include "mixpeft/testing/gradcheck.hpp"

using namespace mixpeft;
namespace fs = std::filesystem;

namespace {

// A fresh directory per test, removed afterwards.
class TempDir : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           detail::concat("mixpeft_", info->test_suite_name(), "_", info->name(), "_", ::getpid());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path path(const std::string& name) const { return dir_ / name; }
  fs::path dir_;
};

std::string slurp(const fs::path& p) {
  const auto bytes = read_file_bytes(p);
  return std::string(bytes.begin(), bytes.end());
}

void write_raw(const fs::path& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
}

std::string u64_le(std::uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = char((v >> (8 * i)) & 0xff);
  return s;
}

// A complete safetensors file from a header text and a data buffer (header padded to 8 bytes).
std::string assemble(std::string header, const std::string& data, bool pad = true) {
  if (pad) header.append((8 - header.size() % 8) % 8, ' ');
  return u64_le(header.size()) + header + data;
}

std::string f32_bytes(std::initializer_list<float> values) {
  std::string s;
  for (float v : values) {
    const auto u = std::bit_cast<std::uint32_t>(v);
    for (int i = 0; i < 4; ++i) s += char((u >> (8 * i)) & 0xff);
  }
  return s;
}

template <class T, class U>
void expect_bitwise_equal(const Tensor<T>& a, const Tensor<U>& b) {
  ASSERT_EQ(shape_of(a), shape_of(b));
  static_assert(sizeof(T) == sizeof(U));
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(T)), 0);
}

}  // namespace

// ---- dtype conversions -------------------------------------------------------------------------------

TEST(DTypeF16, KnownBitPatterns) {
  EXPECT_EQ(float_to_f16(1.0f), 0x3c00);
  EXPECT_EQ(float_to_f16(-2.0f), 0xc000);
  EXPECT_EQ(float_to_f16(0.5f), 0x3800);
  EXPECT_EQ(float_to_f16(0.1f), 0x2e66);
  EXPECT_EQ(float_to_f16(1.0f / 3.0f), 0x3555);
  EXPECT_EQ(float_to_f16(65504.0f), 0x7bff);             // largest finite half
  EXPECT_EQ(float_to_f16(65519.996f), 0x7bff);           // just below the tie: stays finite
  EXPECT_EQ(float_to_f16(65520.0f), 0x7c00);             // tie between 65504 (odd) and 2^16: to even = Inf
  EXPECT_EQ(float_to_f16(1e10f), 0x7c00);
  EXPECT_EQ(float_to_f16(-1e10f), 0xfc00);
  EXPECT_EQ(float_to_f16(0x1p-14f), 0x0400);             // smallest normal
  EXPECT_EQ(float_to_f16(0x1p-24f), 0x0001);             // smallest subnormal
  EXPECT_EQ(float_to_f16(1023 * 0x1p-24f), 0x03ff);      // largest subnormal
  EXPECT_EQ(float_to_f16(0x1p-25f), 0x0000);             // tie between 0 and 2^-24: to even = 0
  EXPECT_EQ(float_to_f16(std::nextafter(0x1p-25f, 1.0f)), 0x0001);
  EXPECT_EQ(float_to_f16(3 * 0x1p-25f), 0x0002);         // 1.5 ulp: tie to even = 2
  EXPECT_EQ(float_to_f16(1.0f + 0x1p-11f), 0x3c00);      // tie: to even mantissa 0
  EXPECT_EQ(float_to_f16(1.0f + 3 * 0x1p-11f), 0x3c02);  // tie: to even mantissa 2
  EXPECT_EQ(float_to_f16(2047 * 0x1p-25f), 0x0400);      // subnormal rounding carries into the normal range
  EXPECT_EQ(float_to_f16(0.0f), 0x0000);
  EXPECT_EQ(float_to_f16(-0.0f), 0x8000);
  EXPECT_EQ(float_to_f16(1e-30f), 0x0000);
  EXPECT_EQ(float_to_f16(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(float_to_f16(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_EQ(float_to_f16(-std::numeric_limits<float>::infinity()), 0xfc00);
  const std::uint16_t nan = float_to_f16(std::numeric_limits<float>::quiet_NaN());
  EXPECT_EQ(nan & 0x7c00, 0x7c00);
  EXPECT_NE(nan & 0x03ff, 0);
  EXPECT_NE(float_to_f16(std::bit_cast<float>(0x7f800001u)) & 0x03ff, 0);  // signalling NaN stays NaN

  EXPECT_EQ(f16_to_float(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_float(0x3555), 0.333251953125f);
  EXPECT_EQ(f16_to_float(0x7bff), 65504.0f);
  EXPECT_EQ(f16_to_float(0x0001), 0x1p-24f);
  EXPECT_EQ(f16_to_float(0x03ff), 1023 * 0x1p-24f);
  EXPECT_EQ(f16_to_float(0x8001), -0x1p-24f);
  EXPECT_TRUE(std::signbit(f16_to_float(0x8000)));
  EXPECT_EQ(f16_to_float(0x7c00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(f16_to_float(0xfc00), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(f16_to_float(0x7e00)));
}

TEST(DTypeF16, EveryHalfRoundTrips) {
  for (std::uint32_t h = 0; h <= 0xffff; ++h) {
    const float f = f16_to_float(std::uint16_t(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(f16_to_float(float_to_f16(f))));
      continue;
    }
    ASSERT_EQ(float_to_f16(f), h) << "half 0x" << std::hex << h;
  }
}

#if defined(__FLT16_MAX__)
TEST(DTypeF16, MatchesCompilerFloat16OnRandomFloats) {
  Rng rng(11);
  for (int i = 0; i < 1'000'000; ++i) {
    // Uniform bit patterns over a range of exponents around the half range.
    const std::uint32_t bits = std::uint32_t(rng.next_u64());
    const std::uint32_t exponent = 96 + std::uint32_t(rng.below(48));  // 2^-31 .. 2^16
    const float f = std::bit_cast<float>((bits & 0x807fffffu) | (exponent << 23));
    const _Float16 reference = static_cast<_Float16>(f);
    ASSERT_EQ(float_to_f16(f), std::bit_cast<std::uint16_t>(reference)) << f;
  }
}
#endif

TEST(DTypeBF16, KnownBitPatterns) {
  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(float_to_bf16(-2.0f), 0xc000);
  EXPECT_EQ(float_to_bf16(3.140625f), 0x4049);
  EXPECT_EQ(float_to_bf16(1.0f + 0x1p-8f), 0x3f80);       // tie: to even
  EXPECT_EQ(float_to_bf16(1.0f + 3 * 0x1p-8f), 0x3f82);   // tie: to even
  EXPECT_EQ(float_to_bf16(std::nextafter(1.0f + 0x1p-8f, 2.0f)), 0x3f81);
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::max()), 0x7f80);  // rounds up into Inf
  EXPECT_EQ(float_to_bf16(std::bit_cast<float>(0x00010000u)), 0x0001);  // subnormal kept
  EXPECT_EQ(float_to_bf16(-0.0f), 0x8000);
  EXPECT_EQ(float_to_bf16(-std::numeric_limits<float>::infinity()), 0xff80);
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::quiet_NaN()), 0x7fc0);
  EXPECT_EQ(float_to_bf16(std::bit_cast<float>(0x7f800001u)) & 0x7f80, 0x7f80);
  EXPECT_NE(float_to_bf16(std::bit_cast<float>(0x7f800001u)) & 0x007f, 0);  // NaN never becomes Inf
  EXPECT_EQ(bf16_to_float(0x4049), 3.140625f);
  EXPECT_EQ(bf16_to_float(0x0001), std::bit_cast<float>(0x00010000u));
  for (std::uint32_t b = 0; b <= 0xffff; ++b) {
    const float f = bf16_to_float(std::uint16_t(b));
    if (!std::isnan(f)) {
      ASSERT_EQ(float_to_bf16(f), b);
    }
  }
}

TEST(DType, F8DecodingAndNames) {
  EXPECT_EQ(f8_e4m3_to_float(0x38), 1.0f);
  EXPECT_EQ(f8_e4m3_to_float(0x7e), 448.0f);          // largest e4m3fn
  EXPECT_EQ(f8_e4m3_to_float(0x01), 0x1p-9f);         // smallest subnormal
  EXPECT_TRUE(std::isnan(f8_e4m3_to_float(0x7f)));
  EXPECT_EQ(f8_e4m3_to_float(0xb8), -1.0f);
  EXPECT_EQ(f8_e5m2_to_float(0x3c), 1.0f);
  EXPECT_EQ(f8_e5m2_to_float(0x7b), 57344.0f);
  EXPECT_EQ(dtype_from_name("BF16"), DType::BF16);
  EXPECT_FALSE(dtype_from_name("F17").has_value());
  for (DType d : all_dtypes) EXPECT_EQ(dtype_from_name(dtype_name(d)), d);
  EXPECT_EQ(dtype_of<float>(), DType::F32);
  EXPECT_EQ(dtype_of<std::int64_t>(), DType::I64);
  EXPECT_EQ(dtype_of<std::uint8_t>(), DType::U8);
  std::byte out[4];
  const float x = 1.5f;
  EXPECT_THROW(encode_values(DType::I32, &x, 1, out), ConfigError);  // no silent float -> int
}

// ---- atomic files ------------------------------------------------------------------------------------

using AtomicFile = TempDir;

TEST_F(AtomicFile, WritesAndReplaces) {
  write_file_atomically(path("a.txt"), "first");
  EXPECT_EQ(slurp(path("a.txt")), "first");
  write_file_atomically(path("a.txt"), [](ByteSink& sink) {
    sink.write("second, ");
    sink.write("in two parts");
  });
  EXPECT_EQ(slurp(path("a.txt")), "second, in two parts");
}

TEST_F(AtomicFile, InterruptedWriteLeavesPreviousFileAndNoTemporary) {
  write_file_atomically(path("model.bin"), "the good version");
  struct Interrupted {};
  EXPECT_THROW(write_file_atomically(path("model.bin"),
                                     [](ByteSink& sink) {
                                       sink.write("half of the new ver");
                                       throw Interrupted{};
                                     }),
               Interrupted);
  EXPECT_EQ(slurp(path("model.bin")), "the good version");
  int entries = 0;
  for (const auto& e : fs::directory_iterator(dir_)) {
    ++entries;
    EXPECT_EQ(e.path().filename(), "model.bin");
  }
  EXPECT_EQ(entries, 1);
}

TEST_F(AtomicFile, MissingDirectoryIsIoErrorNamingPath) {
  const auto target = path("no/such/dir/x.bin");
  try {
    write_file_atomically(target, "x");
    FAIL() << "expected IoError";
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find(target.string()), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("No such file or directory"), std::string::npos) << e.what();
  }
  EXPECT_THROW(read_file_bytes(path("missing.bin")), IoError);
}

// ---- safetensors: round trips --------------------------------------------------------------------------

using Safetensors = TempDir;

TEST_F(Safetensors, RoundTripEveryFloatDType) {
  Rng rng(3);
  Tensor<double> a = mixpeft::testing::random_tensor<double>({3, 5}, rng), b = mixpeft::testing::random_tensor<double>({7}, rng);
  b(0) = 0.0;
  b(1) = -0.0;
  b(2) = 1e-6;  // subnormal in F16
  for (DType d : {DType::F64, DType::F32, DType::F16, DType::BF16}) {
    save_safetensors<double>(path("t.safetensors"), {{"a", a, d}, {"b", b, d}});
    SafetensorsFile f(path("t.safetensors"));
    EXPECT_EQ(f.info("a").dtype, d);
    EXPECT_EQ(f.info("b").shape, Shape{7});
    const Tensor<double> ra = f.read<double>("a"), rb = f.read<double>("b");
    const Tensor<float> fa = f.read<float>("a");
    for (std::size_t i = 0; i < a.size(); ++i) {
      double expected = a.data()[i];
      if (d == DType::F32) expected = double(float(expected));
      if (d == DType::F16) expected = double(f16_to_float(float_to_f16(float(expected))));
      if (d == DType::BF16) expected = double(bf16_to_float(float_to_bf16(float(expected))));
      EXPECT_EQ(ra.data()[i], expected) << dtype_name(d);
      EXPECT_EQ(fa.data()[i], float(expected)) << dtype_name(d);
    }
    EXPECT_TRUE(std::signbit(rb(1))) << dtype_name(d);
  }
}

TEST_F(Safetensors, RoundTripIntegersScalarsEmptyAndMetadata) {
  Tensor<std::int64_t> ids = {{1, -2, 3}, {std::numeric_limits<std::int64_t>::max(), 0, -7}};
  Tensor<std::int64_t> scalar;  // rank 0
  scalar() = 42;
  Tensor<std::int64_t> none = empty<std::int64_t>({0, 4});
  save_safetensors<std::int64_t>(path("i.safetensors"),
                                 {{"ids", ids}, {"ids32", ids, DType::I32}, {"scalar", scalar}, {"none", none}},
                                 {{"format", "pt"}, {"note", "ünïcode"}});
  SafetensorsFile f(path("i.safetensors"));
  EXPECT_EQ(f.names(), (std::vector<std::string>{"ids", "ids32", "none", "scalar"}));
  EXPECT_EQ(f.metadata().at("note"), "ünïcode");
  EXPECT_EQ(f.read<std::int64_t>("ids"), ids);
  EXPECT_EQ(f.read<double>("ids32")(0, 1), -2.0);
  EXPECT_EQ(f.info("scalar").shape, Shape{});
  EXPECT_EQ(f.read<std::int64_t>("scalar")(), 42);
  EXPECT_EQ(f.info("none").shape, (Shape{0, 4}));
  EXPECT_EQ(f.read<float>("none").size(), 0u);
  EXPECT_THROW(f.info("nope"), FormatError);
}

TEST_F(Safetensors, MapOverloadAndWriterErrors) {
  std::map<std::string, Tensor<float>> m;
  m["z"] = Tensor<float>{1.0f, 2.0f};
  m["a"] = zeros<float>({1, 1});
  m["a"](0, 0) = 3.0f;
  save_safetensors(path("m.safetensors"), m, DType::BF16);
  SafetensorsFile f(path("m.safetensors"));
  EXPECT_EQ(f.read<float>("z"), m["z"]);
  EXPECT_EQ(f.info("a").dtype, DType::BF16);

  Tensor<float> t = {1.0f};
  EXPECT_THROW(save_safetensors<float>(path("d.safetensors"), {{"x", t}, {"x", t}}), ConfigError);
  EXPECT_THROW(save_safetensors<float>(path("d.safetensors"), {{"__metadata__", t}}), ConfigError);
  EXPECT_THROW(save_safetensors<float>(path("d.safetensors"), {{"x", t, DType::I64}}), ConfigError);
  EXPECT_THROW(save_safetensors<float>(path("d.safetensors"), {{"bad\xff", t, DType::F32}}), ConfigError);
  EXPECT_FALSE(fs::exists(path("d.safetensors")));
}

// ---- safetensors: the spec, byte by byte -----------------------------------------------------------------

TEST_F(Safetensors, ReadsAHandAssembledFile) {
  // Tensors deliberately stored out of name order, a header that is not 8-byte padded, and metadata last.
  const std::string header =
      R"({"b":{"dtype":"F16","shape":[1,2],"data_offsets":[0,4]},)"
      R"("a":{"data_offsets":[4,12],"shape":[2],"dtype":"F32"},"__metadata__":{"k":"v"}})";
  const std::string data = std::string("\x00\x3c\x00\xb8", 4) + f32_bytes({1.5f, -2.0f});
  write_raw(path("hand.safetensors"), assemble(header, data, /*pad=*/false));
  SafetensorsFile f(path("hand.safetensors"));
  EXPECT_EQ(f.names(), (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(f.metadata(), (Metadata{{"k", "v"}}));
  EXPECT_EQ(f.info("b").shape, (Shape{1, 2}));
  EXPECT_EQ(f.info("b").begin, 0u);
  EXPECT_EQ(f.info("a").end, 12u);
  const Tensor<float> a = f.read<float>("a"), b = f.read<float>("b");
  EXPECT_EQ(a(0), 1.5f);
  EXPECT_EQ(a(1), -2.0f);
  EXPECT_EQ(b(0, 0), 1.0f);
  EXPECT_EQ(b(0, 1), -0.5f);
}

TEST_F(Safetensors, WritesExactlyTheReferenceLayout) {
  // What the reference implementation writes for {"w": [1.5, -2.0] (F32), "b": [1.0] (F16)} with
  // metadata {"format": "pt"}: compact JSON, metadata first, names sorted, padded to 8 with spaces.
  Tensor<float> w = {1.5f, -2.0f}, b = {1.0f};
  save_safetensors<float>(path("ref.safetensors"), {{"w", w}, {"b", b, DType::F16}}, {{"format", "pt"}});
  const std::string header =
      R"({"__metadata__":{"format":"pt"},"b":{"dtype":"F16","shape":[1],"data_offsets":[0,2]},)"
      R"("w":{"dtype":"F32","shape":[2],"data_offsets":[2,10]}})";
  const std::string expected = assemble(header, std::string("\x00\x3c", 2) + f32_bytes({1.5f, -2.0f}));
  EXPECT_EQ((8 + header.size() + (8 - header.size() % 8) % 8) % 8, 0u);
  EXPECT_EQ(slurp(path("ref.safetensors")), expected);
}

// ---- safetensors: malformed files ----------------------------------------------------------------------

namespace {
const std::string good_header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
const std::string good_data = f32_bytes({1.0f, 2.0f});
}  // namespace

TEST_F(Safetensors, MalformedFilesThrowFormatErrorWithAReason) {
  struct Case {
    const char* name;
    std::string bytes;
    const char* message;  // expected substring
  };
  const auto with_header = [](const std::string& h, const std::string& d = good_data) { return assemble(h, d); };
  const std::vector<Case> cases = {
      {"empty file", "", "too short"},
      {"seven bytes", std::string(7, '\0'), "too short"},
      {"header longer than file", u64_le(1000) + good_header, "exceeds the file size"},
      {"absurd header length", u64_le(std::uint64_t(1) << 40) + good_header, "exceeds the limit"},
      {"header not json", with_header("{not json at all}"), "not valid JSON"},
      {"header truncated json", with_header(R"({"a":{"dtype":"F32")"), "not valid JSON"},
      {"header is an array", with_header("[1, 2]"), "does not start with '{'"},
      {"header padded before", with_header("  " + good_header), "does not start with '{'"},
      {"zero header length", u64_le(0) + good_data, "does not start with '{'"},
      {"entry not object", with_header(R"({"a":[1]})", ""), "must map to an object"},
      {"missing dtype", with_header(R"({"a":{"shape":[2],"data_offsets":[0,8]}})"), "no \"dtype\""},
      {"missing shape", with_header(R"({"a":{"dtype":"F32","data_offsets":[0,8]}})"), "no \"shape\""},
      {"missing offsets", with_header(R"({"a":{"dtype":"F32","shape":[2]}})"), "no \"data_offsets\""},
      {"dtype not string", with_header(R"({"a":{"dtype":4,"shape":[2],"data_offsets":[0,8]}})"), "must be a string"},
      {"unknown dtype", with_header(R"({"a":{"dtype":"F17","shape":[2],"data_offsets":[0,8]}})"), "unknown dtype"},
      {"shape not array", with_header(R"({"a":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})"), "must be an array"},
      {"negative extent", with_header(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})"),
       "non-negative integer"},
      {"fractional extent", with_header(R"({"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})"),
       "non-negative integer"},
      {"huge shape", with_header(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}})"),
       "overflows"},
      {"offsets not pair", with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,9]}})"),
       "[begin, end]"},
      {"offsets reversed", with_header(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})"), "begin > end"},
      {"size mismatch", with_header(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})"), "span 8 bytes"},
      {"offsets beyond buffer", with_header(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})"),
       "outside the 8-byte data buffer"},
      {"overlap",
       with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                   R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})"),
       "overlaps"},
      {"gap", with_header(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})"), "gap"},
      {"trailing bytes", with_header(good_header, good_data + "xxxx"), "trailing bytes"},
      {"duplicate names",
       with_header(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                   R"("a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})"),
       "duplicate key \"a\""},
      {"duplicate field", with_header(R"({"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}})"),
       "duplicate key \"dtype\""},
      {"metadata not object", with_header(R"({"__metadata__":"x",)" + good_header.substr(1)),
       "\"__metadata__\" must be an object"},
      {"metadata value not string", with_header(R"({"__metadata__":{"n":1},)" + good_header.substr(1)),
       "must be a string"},
      {"invalid utf-8", with_header("{\"a\xff\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}"),
       "not valid JSON"},
  };
  for (const auto& c : cases) {
    write_raw(path("bad.safetensors"), c.bytes);
    try {
      SafetensorsFile f(path("bad.safetensors"));
      ADD_FAILURE() << c.name << ": no exception";
    } catch (const FormatError& e) {
      EXPECT_NE(std::string(e.what()).find(c.message), std::string::npos) << c.name << ": " << e.what();
      EXPECT_NE(std::string(e.what()).find("bad.safetensors"), std::string::npos) << c.name << ": " << e.what();
    } catch (const std::exception& e) {
      ADD_FAILURE() << c.name << ": wrong exception type: " << e.what();
    }
  }
}

TEST_F(Safetensors, EveryTruncationThrowsFormatError) {
  Tensor<float> a = {{1.0f, 2.0f, 3.0f}}, b = {4.0f};
  save_safetensors<float>(path("full.safetensors"), {{"a", a}, {"b", b, DType::F16}}, {{"format", "pt"}});
  const std::string full = slurp(path("full.safetensors"));
  ASSERT_NO_THROW(SafetensorsFile{path("full.safetensors")});
  for (std::size_t n = 0; n < full.size(); ++n) {
    write_raw(path("cut.safetensors"), full.substr(0, n));
    EXPECT_THROW(SafetensorsFile{path("cut.safetensors")}, FormatError) << "truncated to " << n << " bytes";
  }
}

TEST_F(Safetensors, MissingFileIsIoError) { EXPECT_THROW(SafetensorsFile{path("missing.safetensors")}, IoError); }

// ---- parameter lists -----------------------------------------------------------------------------------

TEST_F(Safetensors, SaveAndLoadParameterListByName) {
  Rng rng(5);
  Parameter<float> w("weight", mixpeft::testing::random_tensor<float>({4, 3}, rng), false);
  Parameter<float> a("lora_A.weight", mixpeft::testing::random_tensor<float>({2, 3}, rng), true);
  Parameter<float> bias("bias", mixpeft::testing::random_tensor<float>({4}, rng), true, false);
  ParameterList<float> list;
  add_parameter(list, "layers.0.q_proj", w);
  add_parameter(list, "layers.0.q_proj", a);
  add_parameter(list, "layers.0.q_proj", bias);

  save_parameters(path("all.safetensors"), list, {.metadata = {{"format", "pt"}}});
  save_parameters(path("train.safetensors"), list, {.trainable_only = true, .dtype = DType::F64});
  EXPECT_EQ(SafetensorsFile(path("all.safetensors")).names().size(), 3u);
  const SafetensorsFile trained(path("train.safetensors"));
  EXPECT_EQ(trained.names(), (std::vector<std::string>{"layers.0.q_proj.bias", "layers.0.q_proj.lora_A.weight"}));
  EXPECT_EQ(trained.info("layers.0.q_proj.bias").dtype, DType::F64);

  Parameter<float> w2("weight", zeros<float>({4, 3}), false), a2("lora_A.weight", zeros<float>({2, 3}), true),
      b2("bias", zeros<float>({4}), true, false);
  ParameterList<float> fresh;
  add_parameter(fresh, "layers.0.q_proj", w2);
  add_parameter(fresh, "layers.0.q_proj", a2);
  add_parameter(fresh, "layers.0.q_proj", b2);
  const LoadReport r = load_parameters(path("all.safetensors"), fresh);
  EXPECT_EQ(r.loaded.size(), 3u);
  expect_bitwise_equal(w2.value, w.value);
  expect_bitwise_equal(a2.value, a.value);
  expect_bitwise_equal(b2.value, bias.value);

  // Loading the trainable-only file needs allow_missing for the frozen weight.
  EXPECT_THROW(load_parameters(path("train.safetensors"), fresh), FormatError);
  const LoadReport partial = load_parameters(path("train.safetensors"), fresh, {.allow_missing = true});
  EXPECT_EQ(partial.missing, (std::vector<std::string>{"layers.0.q_proj.weight"}));
  EXPECT_EQ(partial.loaded.size(), 2u);
}

TEST_F(Safetensors, LoadParametersRenamesAndRejectsShapesAndStrays) {
  Tensor<float> t = {{1.0f, 2.0f}};
  save_safetensors<float>(path("hf.safetensors"), {{"base_model.model.proj.weight", t}, {"extra", t}});
  Parameter<float> p("weight", zeros<float>({1, 2}), true);
  ParameterList<float> list;
  add_parameter(list, "proj", p);
  const auto hf = [](const std::string& n) { return "base_model.model." + n; };

  EXPECT_THROW(load_parameters(path("hf.safetensors"), list, {.rename = hf}), FormatError);  // "extra" unused
  const LoadReport r = load_parameters(path("hf.safetensors"), list, {.allow_unexpected = true, .rename = hf});
  EXPECT_EQ(r.unexpected, (std::vector<std::string>{"extra"}));
  EXPECT_EQ(p.value, t);

  Parameter<float> wrong("weight", zeros<float>({2, 1}), true);
  ParameterList<float> bad;
  add_parameter(bad, "proj", wrong);
  try {
    load_parameters(path("hf.safetensors"), bad, {.allow_unexpected = true, .rename = hf});
    FAIL() << "expected ShapeError";
  } catch (const ShapeError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("\"base_model.model.proj.weight\" has shape [1, 2]"), std::string::npos) << msg;
    EXPECT_NE(msg.find("\"proj.weight\" has shape [2, 1]"), std::string::npos) << msg;
  }
  EXPECT_EQ(wrong.value, zeros<float>({2, 1}));  // untouched
}
