// mixpeft/io/safetensors.hpp — reading and writing the safetensors format (Hugging Face).
//
// Layout of a file (all integers little-endian):
//   bytes [0, 8)          N, a u64: the length of the header
//   bytes [8, 8 + N)      UTF-8 JSON object, optionally padded with trailing spaces:
//                           {"__metadata__": {"key": "value", ...},                      (optional, str -> str)
//                            "name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...}
//   bytes [8 + N, EOF)    the data buffer; a tensor's bytes are buffer[begin, end), row-major.
// The reader checks everything the format requires and throws FormatError naming the file and the
// problem: a file shorter than 8 bytes, N beyond the file or above 100 MB, a header that is not a JSON
// object or does not start with '{', duplicate keys, missing or wrongly typed fields, an unknown dtype,
// prod(shape) * dtype size != end - begin, offsets outside the buffer, and offsets that overlap, leave
// gaps or leave trailing bytes (the buffer must be exactly covered by the tensors).
// The writer stores tensors sorted by name, contiguously, after a header padded with spaces to a
// multiple of 8 bytes (so the buffer is 8-byte aligned), and replaces the file atomically.
//
// SafetensorsFile maps the file read-only (mmap; the file must not be truncated while it is open) and
// converts on read<T>(name); save_parameters and load_parameters move a ParameterList to and from a
// file by parameter name.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "mixpeft/core/error.hpp"
#include "mixpeft/core/parameter.hpp"
#include "mixpeft/core/tensor.hpp"
#include "mixpeft/io/atomic_file.hpp"
#include "mixpeft/io/dtype.hpp"

namespace mixpeft {

inline constexpr std::uint64_t safetensors_max_header = 100'000'000;

using Metadata = std::map<std::string, std::string>;

struct TensorInfo {
  DType dtype = DType::F32;
  Shape shape;
  std::size_t begin = 0, end = 0;  // byte range within the data buffer
  std::size_t numel() const {
    std::size_t n = 1;
    for (auto e : shape) n *= e;
    return n;
  }
};

namespace detail::safetensors {

// A read-only private mapping of a whole file.
class MappedFile {
 public:
  explicit MappedFile(const std::filesystem::path& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw IoError(atomic_file::system_error("cannot open", path, errno));
    struct ::stat st {};
    if (::fstat(fd, &st) != 0) {
      const int err = errno;
      ::close(fd);
      throw IoError(atomic_file::system_error("cannot stat", path, err));
    }
    size_ = std::size_t(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        const int err = errno;
        ::close(fd);
        throw IoError(atomic_file::system_error("cannot map", path, err));
      }
      data_ = static_cast<const std::byte*>(p);
    }
    ::close(fd);
  }
  MappedFile(MappedFile&& o) noexcept : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  MappedFile& operator=(MappedFile&& o) noexcept {
    if (this != &o) {
      unmap();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile() { unmap(); }

  const std::byte* data() const { return data_; }
  std::size_t size() const { return size_; }

 private:
  void unmap() {
    if (data_) ::munmap(const_cast<std::byte*>(data_), size_);
  }
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

// Parses JSON and rejects a key repeated within one object (nlohmann would keep the last silently).
inline nlohmann::json parse_json_unique(std::string_view text, const std::string& where) {
  std::vector<std::set<std::string>> open_objects;
  auto callback = [&](int, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    using E = nlohmann::json::parse_event_t;
    if (event == E::object_start) open_objects.emplace_back();
    else if (event == E::object_end) open_objects.pop_back();
    else if (event == E::key && !open_objects.back().insert(parsed.get<std::string>()).second)
      throw FormatError(concat(where, ": duplicate key \"", parsed.get<std::string>(), "\" in header"));
    return true;
  };
  try {
    return nlohmann::json::parse(text.begin(), text.end(), callback);
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(concat(where, ": header is not valid JSON (", e.what(), ")"));
  }
}

inline std::size_t checked_u64(const nlohmann::json& j, const std::string& where, std::string_view what) {
  require<FormatError>(j.is_number_unsigned(), where, ": ", what, " must be a non-negative integer, got ",
                       j.dump());
  const auto v = j.get<std::uint64_t>();
  require<FormatError>(v <= std::numeric_limits<std::size_t>::max(), where, ": ", what, " is too large");
  return std::size_t(v);
}

inline TensorInfo parse_entry(const std::string& name, const nlohmann::json& j, const std::string& file,
                              std::size_t buffer_size) {
  const std::string where = concat(file, ": tensor \"", name, "\"");
  require<FormatError>(j.is_object(), where, " must map to an object, got ", j.type_name());
  for (const char* field : {"dtype", "shape", "data_offsets"})
    require<FormatError>(j.contains(field), where, " has no \"", field, "\" field");
  TensorInfo info;
  const auto& dtype = j["dtype"];
  require<FormatError>(dtype.is_string(), where, ": \"dtype\" must be a string, got ", dtype.dump());
  const auto parsed = dtype_from_name(dtype.get<std::string>());
  require<FormatError>(parsed.has_value(), where, " has unknown dtype ", dtype.dump());
  info.dtype = *parsed;

  const auto& shape = j["shape"];
  require<FormatError>(shape.is_array(), where, ": \"shape\" must be an array, got ", shape.dump());
  std::size_t numel = 1;
  for (const auto& e : shape) {
    const std::size_t extent = checked_u64(e, where, "a shape extent");
    require<FormatError>(extent == 0 || numel <= std::numeric_limits<std::size_t>::max() / extent, where,
                         ": shape ", shape.dump(), " overflows");
    numel *= extent;
    info.shape.push_back(extent);
  }
  const auto& offsets = j["data_offsets"];
  require<FormatError>(offsets.is_array() && offsets.size() == 2, where,
                       ": \"data_offsets\" must be an array [begin, end], got ", offsets.dump());
  info.begin = checked_u64(offsets[0], where, "data_offsets[0]");
  info.end = checked_u64(offsets[1], where, "data_offsets[1]");
  require<FormatError>(info.begin <= info.end, where, " has data_offsets [", info.begin, ", ", info.end,
                       "] with begin > end");
  require<FormatError>(info.end <= buffer_size, where, " has data_offsets [", info.begin, ", ", info.end,
                       "] outside the ", buffer_size, "-byte data buffer");
  const std::size_t width = dtype_size(info.dtype);
  require<FormatError>(numel <= std::numeric_limits<std::size_t>::max() / width &&
                           numel * width == info.end - info.begin,
                       where, " has shape ", shape_string(info.shape), " of ", dtype_name(info.dtype), " (",
                       numel, " elements) but data_offsets span ", info.end - info.begin, " bytes");
  return info;
}

}  // namespace detail::safetensors

class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::filesystem::path& path) : path_(path), file_(path) { parse(); }

  const std::filesystem::path& path() const { return path_; }
  const std::vector<std::string>& names() const { return names_; }  // sorted
  bool contains(const std::string& name) const { return tensors_.count(name) > 0; }
  const Metadata& metadata() const { return metadata_; }

  const TensorInfo& info(const std::string& name) const {
    const auto it = tensors_.find(name);
    require<FormatError>(it != tensors_.end(), where(), ": no tensor named \"", name, "\"");
    return it->second;
  }

  // The stored little-endian bytes of a tensor.
  std::span<const std::byte> bytes(const std::string& name) const {
    const auto& i = info(name);
    return {file_.data() + data_start_ + i.begin, i.end - i.begin};
  }

  // Reads a tensor, converting from its stored dtype to T; `out` is resized to the stored shape.
  template <class T>
  void read_into(const std::string& name, Tensor<T>& out) const {
    const auto& i = info(name);
    resize_to(out, i.shape);
    decode_values(i.dtype, bytes(name).data(), i.numel(), out.data());
  }
  template <class T>
  Tensor<T> read(const std::string& name) const {
    Tensor<T> out;
    read_into(name, out);
    return out;
  }

 private:
  std::string where() const { return detail::concat("safetensors '", path_.string(), "'"); }

  void parse() {
    namespace ds = detail::safetensors;
    const std::string w = where();
    const std::size_t size = file_.size();
    require<FormatError>(size >= 8, w, ": file has ", size, " bytes, too short for the 8-byte header length");
    const auto n = detail::dtype::load_le<std::uint64_t>(file_.data());
    require<FormatError>(n <= safetensors_max_header, w, ": header length ", n, " exceeds the limit of ",
                         safetensors_max_header, " bytes");
    require<FormatError>(n <= size - 8, w, ": header length ", n, " exceeds the file size ", size);
    const std::string_view text(reinterpret_cast<const char*>(file_.data()) + 8, std::size_t(n));
    require<FormatError>(!text.empty() && text.front() == '{', w, ": header does not start with '{'");
    data_start_ = 8 + std::size_t(n);
    const std::size_t buffer_size = size - data_start_;

    const nlohmann::json header = ds::parse_json_unique(text, w);
    require<FormatError>(header.is_object(), w, ": header is not a JSON object");
    for (const auto& [key, value] : header.items()) {
      if (key == "__metadata__") {
        require<FormatError>(value.is_object(), w, ": \"__metadata__\" must be an object, got ", value.type_name());
        for (const auto& [mk, mv] : value.items()) {
          require<FormatError>(mv.is_string(), w, ": metadata \"", mk, "\" must be a string, got ", mv.dump());
          metadata_[mk] = mv.get<std::string>();
        }
        continue;
      }
      tensors_.emplace(key, ds::parse_entry(key, value, w, buffer_size));
      names_.push_back(key);
    }
    std::sort(names_.begin(), names_.end());

    // The tensors must tile the buffer exactly: sorted by offset, each begins where the previous ends.
    std::vector<const std::pair<const std::string, TensorInfo>*> by_offset;
    for (const auto& entry : tensors_) by_offset.push_back(&entry);
    std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) {
      return std::pair(a->second.begin, a->second.end) < std::pair(b->second.begin, b->second.end);
    });
    std::size_t covered = 0;
    const std::string* previous = nullptr;
    for (const auto* entry : by_offset) {
      const auto& [name, info] = *entry;
      require<FormatError>(info.begin >= covered, w, ": tensor \"", name, "\" (bytes [", info.begin, ", ", info.end,
                           ")) overlaps tensor \"", previous ? *previous : std::string(), "\" (ending at ", covered,
                           ")");
      require<FormatError>(info.begin == covered, w, ": data buffer has a gap: bytes [", covered, ", ", info.begin,
                           ") before tensor \"", name, "\" belong to no tensor");
      covered = info.end;
      previous = &name;
    }
    require<FormatError>(covered == buffer_size, w, ": data buffer has ", buffer_size, " bytes but the tensors cover ",
                         covered, " (trailing bytes)");
  }

  std::filesystem::path path_;
  detail::safetensors::MappedFile file_;
  std::size_t data_start_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::vector<std::string> names_;
  Metadata metadata_;
};

// ---- writing -----------------------------------------------------------------------------------------

template <class T>
struct TensorEntry {
  std::string name;
  const Tensor<T>& tensor;
  DType dtype = exact;

  static constexpr DType exact = dtype_of<T>();  // the dtype that stores T without loss
};

template <class T>
void save_safetensors(const std::filesystem::path& path, const std::vector<TensorEntry<T>>& entries,
                      const Metadata& metadata = {}) {
  const std::string w = detail::concat("save_safetensors '", path.string(), "'");
  std::vector<std::size_t> order(entries.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](auto a, auto b) { return entries[a].name < entries[b].name; });

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::size_t offset = 0;
  for (std::size_t k = 0; k < order.size(); ++k) {
    const auto& e = entries[order[k]];
    require<ConfigError>(!e.name.empty() && e.name != "__metadata__", w, ": invalid tensor name \"", e.name, "\"");
    require<ConfigError>(k == 0 || entries[order[k - 1]].name != e.name, w, ": duplicate tensor name \"", e.name,
                         "\"");
    require<ConfigError>(can_encode<T>(e.dtype), w, ": cannot store tensor \"", e.name, "\" as ", dtype_name(e.dtype));
    const std::size_t bytes = e.tensor.size() * dtype_size(e.dtype);
    header[e.name] = {{"dtype", std::string(dtype_name(e.dtype))},
                      {"shape", shape_of(e.tensor)},
                      {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception&) {
    throw ConfigError(w + ": tensor names and metadata must be valid UTF-8");
  }
  text.append((8 - text.size() % 8) % 8, ' ');

  write_file_atomically(path, [&](ByteSink& sink) {
    std::byte length[8];
    detail::dtype::store_le<std::uint64_t>(length, text.size());
    sink.write(length, 8);
    sink.write(text);
    constexpr std::size_t chunk = 1 << 16;  // elements converted per write
    std::vector<std::byte> buffer;
    for (const auto i : order) {
      const auto& e = entries[i];
      const std::size_t width = dtype_size(e.dtype);
      for (std::size_t first = 0; first < e.tensor.size(); first += chunk) {
        const std::size_t n = std::min(chunk, e.tensor.size() - first);
        buffer.resize(n * width);
        encode_values(e.dtype, e.tensor.data() + first, n, buffer.data());
        sink.write(buffer.data(), buffer.size());
      }
    }
  });
}

// (Compare is deduced, never defaulted, so a braced list always means the vector overload above.)
template <class T, class Compare>
void save_safetensors(const std::filesystem::path& path, const std::map<std::string, Tensor<T>, Compare>& tensors,
                      DType dtype = dtype_of<T>(), const Metadata& metadata = {}) {
  std::vector<TensorEntry<T>> entries;
  for (const auto& [name, t] : tensors) entries.push_back({name, t, dtype});
  save_safetensors(path, entries, metadata);
}

// ---- parameter lists ---------------------------------------------------------------------------------

using NameMap = std::function<std::string(const std::string&)>;  // parameter name -> stored name

struct SaveParametersOptions {
  bool trainable_only = false;
  std::optional<DType> dtype{};  // default: the parameters' own precision (F32 for float, F64 for double)
  Metadata metadata{};
  NameMap rename{};            // default: store under the parameter's own name
};

template <class T>
void save_parameters(const std::filesystem::path& path, const ParameterList<T>& list,
                     const SaveParametersOptions& options = {}) {
  std::vector<TensorEntry<T>> entries;
  for (const auto& ref : list) {
    if (options.trainable_only && !ref.param->trainable) continue;
    entries.push_back({options.rename ? options.rename(ref.name) : ref.name, ref.param->value,
                       options.dtype.value_or(dtype_of<T>())});
  }
  save_safetensors(path, entries, options.metadata);
}

struct LoadParametersOptions {
  bool allow_missing = false;     // parameters with no tensor in the file keep their values
  bool allow_unexpected = false;  // tensors in the file that no parameter asked for are ignored
  NameMap rename{};               // parameter name -> name in the file
};

struct LoadReport {
  std::vector<std::string> loaded;      // parameter names
  std::vector<std::string> missing;     // parameter names not found in the file
  std::vector<std::string> unexpected;  // file names used by no parameter
};

namespace detail::safetensors {
inline std::string name_list(const std::vector<std::string>& names) {
  std::string s;
  for (std::size_t i = 0; i < names.size() && i < 8; ++i) s += (i ? ", \"" : "\"") + names[i] + "\"";
  if (names.size() > 8) s += concat(", ... (", names.size(), " in all)");
  return s;
}
}  // namespace detail::safetensors

// Copies every parameter whose (renamed) name is in the file into its value, converting to T.
// Everything is checked before any value changes: ShapeError when a stored shape differs from the
// parameter's, FormatError on missing or unexpected names unless allowed.
template <class T>
LoadReport load_parameters(const SafetensorsFile& file, const ParameterList<T>& list,
                           const LoadParametersOptions& options = {}) {
  const std::string w = detail::concat("load_parameters '", file.path().string(), "'");
  LoadReport report;
  std::vector<std::pair<std::string, Parameter<T>*>> plan;  // stored name -> destination
  std::set<std::string> used;
  for (const auto& ref : list) {
    const std::string stored = options.rename ? options.rename(ref.name) : ref.name;
    if (!file.contains(stored)) {
      report.missing.push_back(ref.name);
      continue;
    }
    const Shape& found = file.info(stored).shape;
    const Shape expected = shape_of(ref.param->value);
    require<ShapeError>(found == expected, w, ": tensor \"", stored, "\" has shape ", shape_string(found),
                        " but parameter \"", ref.name, "\" has shape ", shape_string(expected));
    plan.emplace_back(stored, ref.param);
    used.insert(stored);
    report.loaded.push_back(ref.name);
  }
  for (const auto& name : file.names())
    if (!used.count(name)) report.unexpected.push_back(name);
  require<FormatError>(options.allow_missing || report.missing.empty(), w, ": no tensor for parameter(s) ",
                       detail::safetensors::name_list(report.missing));
  require<FormatError>(options.allow_unexpected || report.unexpected.empty(), w,
                       ": tensor(s) that match no parameter: ", detail::safetensors::name_list(report.unexpected));
  for (auto& [stored, param] : plan) file.read_into(stored, param->value);
  return report;
}

template <class T>
LoadReport load_parameters(const std::filesystem::path& path, const ParameterList<T>& list,
                           const LoadParametersOptions& options = {}) {
  return load_parameters(SafetensorsFile(path), list, options);
}

}  // namespace mixpeft
