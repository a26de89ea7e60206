#include <gtest/gtest.h>

#include <unistd.h>

#include <bit>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "mixpeft/core/rng.hpp"
#include "mixpeft/io/atomic_file.hpp"
#include "mixpeft/io/npy.hpp"
#include "mixpeft/testing/gradcheck.hpp"

using namespace mixpeft;
namespace fs = std::filesystem;

namespace {

class Npy : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() / detail::concat("mixpeft_npy_", info->name(), "_", ::getpid());
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

// np.save's layout: magic, version 1.0, u16 header length, the dict padded with spaces to a 64-byte
// boundary and a final newline (the expected sizes below were taken from numpy 2.x).
std::string npy_file(const std::string& dict, std::size_t header_length, const std::string& data) {
  std::string header = dict + std::string(header_length - dict.size() - 1, ' ') + "\n";
  return std::string("\x93NUMPY\x01\x00", 8) + char(header_length & 0xff) + char(header_length >> 8) + header + data;
}

template <class U>
std::string le_bytes(std::initializer_list<U> values) {
  std::string s;
  for (U v : values) {
    const auto bits = std::bit_cast<std::conditional_t<sizeof(U) == 8, std::uint64_t, std::uint32_t>>(v);
    for (std::size_t i = 0; i < sizeof(U); ++i) s += char((bits >> (8 * i)) & 0xff);
  }
  return s;
}

}  // namespace

TEST_F(Npy, WritesExactlyWhatNumpyWrites) {
  // np.save(f, np.arange(6, dtype='<f8').reshape(2, 3)) is 176 bytes with a 118-byte header.
  Tensor<double> a = {{0.0, 1.0, 2.0}, {3.0, 4.0, 5.0}};
  save_npy(path("a.npy"), a);
  EXPECT_EQ(slurp(path("a.npy")), npy_file("{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }", 118,
                                           le_bytes<double>({0, 1, 2, 3, 4, 5})));
  // np.array([1, 2, 3], dtype='<i8'): a one-element tuple keeps its comma.
  Tensor<std::int64_t> ids = {1, 2, 3};
  save_npy(path("ids.npy"), ids);
  EXPECT_EQ(slurp(path("ids.npy")), npy_file("{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }", 118,
                                             le_bytes<std::int64_t>({1, 2, 3})));
  // np.array(2.5, dtype='<f4'): a rank-0 array.
  Tensor<float> scalar;
  scalar() = 2.5f;
  save_npy(path("s.npy"), scalar);
  EXPECT_EQ(slurp(path("s.npy")),
            npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (), }", 118, le_bytes<float>({2.5f})));
  EXPECT_EQ(slurp(path("a.npy")).size() % 16, 0u);
}

TEST_F(Npy, ReadsHandAssembledFiles) {
  write_raw(path("f4.npy"), npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }", 118,
                                     le_bytes<float>({1.5f, -2.0f, 0.25f, 8.0f})));
  const Tensor<float> f = load_npy<float>(path("f4.npy"));
  EXPECT_EQ(shape_of(f), (Shape{2, 2}));
  EXPECT_EQ(f(0, 1), -2.0f);
  EXPECT_EQ(f(1, 1), 8.0f);
  const Tensor<double> d = load_npy<double>(path("f4.npy"));  // converted on load
  EXPECT_EQ(d(1, 0), 0.25);

  // Older numpy padded to 16 bytes, and double quotes and key order are legal Python too.
  write_raw(path("old.npy"), npy_file("{\"shape\": (3,), \"fortran_order\": False, \"descr\": \"<i8\"}", 70,
                                      le_bytes<std::int64_t>({-1, 0, std::numeric_limits<std::int64_t>::max()})));
  const Tensor<std::int64_t> i = load_npy<std::int64_t>(path("old.npy"));
  EXPECT_EQ(i(0), -1);
  EXPECT_EQ(i(2), std::numeric_limits<std::int64_t>::max());

  // Version 2.0 stores the header length in 4 bytes.
  std::string dict = "{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }";
  dict += std::string(116 - dict.size() - 1, ' ') + "\n";
  write_raw(path("v2.npy"), std::string("\x93NUMPY\x02\x00", 8) + std::string("\x74\x00\x00\x00", 4) + dict +
                                le_bytes<double>({3.25}));
  EXPECT_EQ(load_npy<double>(path("v2.npy"))(0), 3.25);
}

TEST_F(Npy, RoundTripsEverySupportedType) {
  Rng rng(9);
  const Tensor<double> x = mixpeft::testing::random_tensor<double>({3, 4, 5}, rng);
  for (DType d : {DType::F64, DType::F32, DType::F16}) {
    save_npy(path("x.npy"), x, d);
    const Tensor<double> y = load_npy<double>(path("x.npy"));
    ASSERT_EQ(shape_of(y), shape_of(x));
    for (std::size_t i = 0; i < x.size(); ++i) {
      const double expected = d == DType::F64   ? x.data()[i]
                              : d == DType::F32 ? double(float(x.data()[i]))
                                                : double(f16_to_float(float_to_f16(float(x.data()[i]))));
      ASSERT_EQ(y.data()[i], expected) << dtype_name(d);
    }
  }
  const Tensor<std::int32_t> small = {{1, -2}, {3, -128}}, unsigned_small = {{1, 2}, {3, 255}};
  for (DType d : {DType::I32, DType::I64, DType::I16, DType::I8, DType::U8}) {
    const Tensor<std::int32_t>& t = d == DType::U8 ? unsigned_small : small;
    save_npy(path("i.npy"), t, d);
    EXPECT_EQ(load_npy<std::int32_t>(path("i.npy")), t) << dtype_name(d);
  }
  const Tensor<float> none = empty<float>({0, 3});
  save_npy(path("none.npy"), none);
  EXPECT_EQ(shape_of(load_npy<float>(path("none.npy"))), (Shape{0, 3}));
  EXPECT_THROW(save_npy(path("bad.npy"), x, DType::I64), ConfigError);  // no silent float -> int
  EXPECT_THROW(save_npy(path("bad.npy"), x, DType::BF16), ConfigError);  // numpy has no bfloat16
}

TEST_F(Npy, MalformedFilesThrowFormatErrorWithAReason) {
  const std::string f4 = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }";
  const std::string data = le_bytes<float>({1.0f, 2.0f});
  struct Case {
    const char* name;
    std::string bytes;
    const char* message;
  };
  const std::vector<Case> cases = {
      {"empty", "", "bad magic"},
      {"bad magic", "\x93NUMPZ\x01\x00" + std::string(2, '\0'), "bad magic"},
      {"version 4", std::string("\x93NUMPY\x04\x00\x10\x00", 10), "unsupported .npy format version 4.0"},
      {"header beyond file", std::string("\x93NUMPY\x01\x00\xff\x00", 10) + "{}", "exceeds the file size"},
      {"big endian", npy_file("{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", 118, data),
       "unsupported descr '>f4'"},
      {"object dtype", npy_file("{'descr': '|O', 'fortran_order': False, 'shape': (2,), }", 118, data),
       "unsupported descr"},
      {"structured dtype", npy_file("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }", 118, data),
       "expected a string"},
      {"fortran order", npy_file("{'descr': '<f4', 'fortran_order': True, 'shape': (2,), }", 118, data), "Fortran"},
      {"bad bool", npy_file("{'descr': '<f4', 'fortran_order': Maybe, 'shape': (2,), }", 118, data), "True or False"},
      {"missing shape", npy_file("{'descr': '<f4', 'fortran_order': False, }", 118, data), "needs 'descr'"},
      {"unknown key", npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}", 118, data),
       "unexpected or repeated key 'x'"},
      {"repeated key", npy_file("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", 118, data),
       "repeated key 'descr'"},
      {"negative extent", npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (-2,), }", 118, data),
       "integers"},
      {"unterminated tuple", npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (2, ", 118, data),
       "malformed header"},
      {"unterminated string", npy_file("{'descr': '<f4", 118, data), "unterminated string"},
      {"not a dict", npy_file("['descr', '<f4']", 118, data), "expected '{'"},
      {"trailing text", npy_file(f4 + " junk", 118, data), "trailing characters"},
      {"too little data", npy_file(f4, 118, data.substr(0, 7)), "needs 8 data bytes but the file has 7"},
      {"too much data", npy_file(f4, 118, data + "x"), "needs 8 data bytes but the file has 9"},
      {"shape overflows", npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,), }", 118,
                                   data),
       "overflows"},
  };
  for (const auto& c : cases) {
    write_raw(path("bad.npy"), c.bytes);
    try {
      load_npy<float>(path("bad.npy"));
      ADD_FAILURE() << c.name << ": no exception";
    } catch (const FormatError& e) {
      EXPECT_NE(std::string(e.what()).find(c.message), std::string::npos) << c.name << ": " << e.what();
      EXPECT_NE(std::string(e.what()).find("bad.npy"), std::string::npos) << c.name << ": " << e.what();
    } catch (const std::exception& e) {
      ADD_FAILURE() << c.name << ": wrong exception type: " << e.what();
    }
  }
}

TEST_F(Npy, EveryTruncationThrowsFormatError) {
  save_npy(path("full.npy"), Tensor<float>{{1.0f, 2.0f}, {3.0f, 4.0f}});
  const std::string full = slurp(path("full.npy"));
  for (std::size_t n = 0; n < full.size(); ++n) {
    write_raw(path("cut.npy"), full.substr(0, n));
    EXPECT_THROW(load_npy<float>(path("cut.npy")), FormatError) << "truncated to " << n << " bytes";
  }
  EXPECT_THROW(load_npy<float>(path("missing.npy")), IoError);
}
