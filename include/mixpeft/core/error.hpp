// mixpeft/core/error.hpp — typed errors and the checks that raise them.
//
// Every failure the library can detect throws a subclass of mixpeft::Error whose message names
// the tensor (or file, or option) involved and the shapes or values that were wrong:
//   ShapeError    a tensor has the wrong rank or extents        "linear: x has shape [4, 3], expected [*, 5]"
//   ConfigError   a hyper-parameter or option is out of range    "LoRA: rank r must be > 0 (got 0)"
//   FormatError   a file is malformed or truncated              "safetensors: header length 99 exceeds file size"
//   NumericError  a NaN or Inf reached a loss or a gradient     "cross_entropy: loss is NaN"
//   IndexError    an id, target or position is out of range     "embedding_forward: id 40 at flat index 3 ..."
//   IoError       the operating system refused a read or write  "cannot open 'x.bin' for writing: ..."
#pragma once

#include <source_location>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace mixpeft {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
class ShapeError : public Error { public: using Error::Error; };
class ConfigError : public Error { public: using Error::Error; };
class FormatError : public Error { public: using Error::Error; };
class NumericError : public Error { public: using Error::Error; };
class IndexError : public Error { public: using Error::Error; };
class IoError : public Error { public: using Error::Error; };

namespace detail {
template <class... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream os;
  (os << ... << std::forward<Parts>(parts));
  return os.str();
}
}  // namespace detail

// Throws E with the concatenated message parts when `ok` is false.
template <class E = Error, class... Parts>
inline void require(bool ok, Parts&&... parts) {
  if (!ok) throw E(detail::concat(std::forward<Parts>(parts)...));
}

}  // namespace mixpeft
