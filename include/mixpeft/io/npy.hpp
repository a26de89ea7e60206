// mixpeft/io/npy.hpp — NumPy .npy arrays (golden-test fixtures written by Python scripts).
//
// Layout (format version 1.0; 2.0 and 3.0 differ only in a u32 header length and are read too):
//   "\x93NUMPY", major, minor              8 bytes
//   header length L                        u16 little-endian (u32 from version 2.0)
//   header                                 ASCII Python dict literal, space padded, ending in '\n':
//                                            {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
//   data                                   prod(shape) elements, C order, little-endian
// numpy pads the header so that the data starts on a 64-byte boundary; save_npy does the same, so
// its files are byte-identical to np.save's. Supported descr: <f2 <f4 <f8, |i1 <i2 <i4 <i8,
// |u1 <u2 <u4 <u8, |b1. Anything else (big-endian, Fortran order, structured dtypes, a size that does
// not match the shape, trailing bytes) throws FormatError naming the file.
#pragma once

#include <cctype>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "mixpeft/core/error.hpp"
#include "mixpeft/core/tensor.hpp"
#include "mixpeft/io/atomic_file.hpp"
#include "mixpeft/io/dtype.hpp"

namespace mixpeft {

struct NpyHeader {
  DType dtype = DType::F32;
  Shape shape;
  std::size_t data_offset = 0;  // where the elements begin in the file
};

namespace detail::npy {

inline constexpr std::string_view magic = "\x93NUMPY";

inline std::optional<DType> dtype_from_descr(std::string_view d) {
  if (d.size() < 3 || (d[0] != '<' && d[0] != '|')) return std::nullopt;
  const std::string_view code = d.substr(1);
  struct Entry { std::string_view code; DType dtype; };
  static constexpr Entry table[] = {
      {"f2", DType::F16}, {"f4", DType::F32}, {"f8", DType::F64}, {"i1", DType::I8},  {"i2", DType::I16},
      {"i4", DType::I32}, {"i8", DType::I64}, {"u1", DType::U8},  {"u2", DType::U16}, {"u4", DType::U32},
      {"u8", DType::U64}, {"b1", DType::BOOL}};
  for (const auto& e : table)
    if (e.code == code && (d[0] == '<' || dtype_size(e.dtype) == 1)) return e.dtype;
  return std::nullopt;
}

inline std::string descr_of(DType d) {
  switch (d) {
    case DType::F16: return "<f2";
    case DType::F32: return "<f4";
    case DType::F64: return "<f8";
    case DType::I8: return "|i1";
    case DType::I16: return "<i2";
    case DType::I32: return "<i4";
    case DType::I64: return "<i8";
    case DType::U8: return "|u1";
    case DType::U16: return "<u2";
    case DType::U32: return "<u4";
    case DType::U64: return "<u8";
    case DType::BOOL: return "|b1";
    default: return "";
  }
}

// A reader for the dict literal numpy writes: string keys; string, bool and int-tuple values.
class DictParser {
 public:
  DictParser(std::string_view text, std::string where) : s_(text), where_(std::move(where)) {}

  NpyHeader parse() {
    NpyHeader h;
    std::optional<std::string> descr;
    std::optional<bool> fortran;
    std::optional<Shape> shape;
    expect('{');
    while (!peek('}')) {
      const std::string key = string_literal();
      expect(':');
      if (key == "descr" && !descr) descr = string_literal();
      else if (key == "fortran_order" && !fortran) fortran = boolean();
      else if (key == "shape" && !shape) shape = tuple();
      else fail(concat("unexpected or repeated key '", key, "'"));
      if (!peek('}')) expect(',');
    }
    expect('}');
    skip_space();
    if (pos_ != s_.size()) fail("trailing characters after the header dict");
    if (!descr || !fortran || !shape) fail("header needs 'descr', 'fortran_order' and 'shape'");
    const auto dtype = dtype_from_descr(*descr);
    if (!dtype) fail(concat("unsupported descr '", *descr, "' (little-endian numeric types only)"));
    if (*fortran) fail("Fortran-ordered arrays are not supported");
    h.dtype = *dtype;
    h.shape = *shape;
    return h;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const { throw FormatError(concat(where_, ": ", what)); }
  void skip_space() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\n')) ++pos_;
  }
  bool peek(char c) {
    skip_space();
    return pos_ < s_.size() && s_[pos_] == c;
  }
  void expect(char c) {
    if (!peek(c)) fail(concat("malformed header: expected '", c, "' at offset ", pos_));
    ++pos_;
  }
  std::string string_literal() {
    skip_space();
    if (pos_ >= s_.size() || (s_[pos_] != '\'' && s_[pos_] != '"')) fail("malformed header: expected a string");
    const char quote = s_[pos_++];
    const auto close = s_.find(quote, pos_);
    if (close == std::string_view::npos) fail("malformed header: unterminated string");
    std::string value(s_.substr(pos_, close - pos_));
    pos_ = close + 1;
    return value;
  }
  bool boolean() {
    skip_space();
    for (const auto& [word, value] : {std::pair{std::string_view("True"), true}, std::pair{std::string_view("False"), false}})
      if (s_.substr(pos_, word.size()) == word) {
        pos_ += word.size();
        return value;
      }
    fail("malformed header: 'fortran_order' must be True or False");
  }
  Shape tuple() {
    Shape shape;
    expect('(');
    while (!peek(')')) {
      if (pos_ >= s_.size() || !std::isdigit(static_cast<unsigned char>(s_[pos_]))) fail("malformed header: shape extents must be integers");
      std::size_t v = 0;
      while (pos_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[pos_]))) {
        const std::size_t digit = std::size_t(s_[pos_++] - '0');
        if (v > (std::numeric_limits<std::size_t>::max() - digit) / 10) fail("shape extent overflows");
        v = v * 10 + digit;
      }
      shape.push_back(v);
      if (!peek(')')) expect(',');
    }
    expect(')');
    return shape;
  }

  std::string_view s_;
  std::string where_;
  std::size_t pos_ = 0;
};

inline NpyHeader parse_header(const std::vector<char>& file, const std::string& where) {
  const auto* bytes = reinterpret_cast<const std::byte*>(file.data());
  require<FormatError>(file.size() >= 10 && std::string_view(file.data(), 6) == magic, where,
                       ": not a .npy file (bad magic string)");
  const int major = static_cast<unsigned char>(file[6]);
  require<FormatError>(major >= 1 && major <= 3, where, ": unsupported .npy format version ", major, ".",
                       int(static_cast<unsigned char>(file[7])));
  const std::size_t prefix = major == 1 ? 10 : 12;
  require<FormatError>(file.size() >= prefix, where, ": file is truncated inside the header length");
  const std::size_t length = major == 1 ? detail::dtype::load_le<std::uint16_t>(bytes + 8)
                                        : detail::dtype::load_le<std::uint32_t>(bytes + 8);
  require<FormatError>(length <= file.size() - prefix, where, ": header length ", length, " exceeds the file size ",
                       file.size());
  NpyHeader h = DictParser(std::string_view(file.data() + prefix, length), where).parse();
  h.data_offset = prefix + length;
  std::size_t numel = 1;
  for (auto e : h.shape) {
    require<FormatError>(e == 0 || numel <= std::numeric_limits<std::size_t>::max() / e, where, ": shape ",
                         shape_string(h.shape), " overflows");
    numel *= e;
  }
  const std::size_t available = file.size() - h.data_offset, width = dtype_size(h.dtype);
  require<FormatError>(numel <= std::numeric_limits<std::size_t>::max() / width, where, ": shape ",
                       shape_string(h.shape), " overflows");
  require<FormatError>(numel * width == available, where, ": shape ", shape_string(h.shape), " of ",
                       descr_of(h.dtype), " needs ", numel * width, " data bytes but the file has ", available);
  return h;
}

}  // namespace detail::npy

// Reads an array, converting its elements to T.
template <class T>
Tensor<T> load_npy(const std::filesystem::path& path) {
  const auto file = read_file_bytes(path);
  const NpyHeader h = detail::npy::parse_header(file, detail::concat("npy '", path.string(), "'"));
  Tensor<T> out = empty<T>(h.shape);
  decode_values(h.dtype, reinterpret_cast<const std::byte*>(file.data()) + h.data_offset, out.size(), out.data());
  return out;
}

// Writes a version 1.0 .npy file atomically, storing elements as `dtype`.
template <class T>
void save_npy(const std::filesystem::path& path, const Tensor<T>& t, DType dtype = dtype_of<T>()) {
  const std::string descr = detail::npy::descr_of(dtype);
  require<ConfigError>(!descr.empty() && can_encode<T>(dtype), "save_npy '", path.string(), "': cannot store ",
                       dtype_name(dtype));
  std::string shape;
  for (std::size_t i = 0; i < t.dimension(); ++i) shape += detail::concat(i ? ", " : "", t.shape()[i]);
  if (t.dimension() == 1) shape += ',';  // a one-element Python tuple
  std::string dict = detail::concat("{'descr': '", descr, "', 'fortran_order': False, 'shape': (", shape, "), }");
  dict.append(64 - (10 + dict.size() + 1) % 64, ' ');
  dict += '\n';
  require<ConfigError>(dict.size() <= 0xffff, "save_npy '", path.string(), "': header too long for format 1.0");
  std::vector<std::byte> data(t.size() * dtype_size(dtype));
  encode_values(dtype, t.data(), t.size(), data.data());
  write_file_atomically(path, [&](ByteSink& sink) {
    sink.write(detail::npy::magic);
    const char version[2] = {1, 0};
    sink.write(version, 2);
    std::byte length[2];
    detail::dtype::store_le<std::uint16_t>(length, std::uint16_t(dict.size()));
    sink.write(length, 2);
    sink.write(dict);
    sink.write(data.data(), data.size());
  });
}

}  // namespace mixpeft
