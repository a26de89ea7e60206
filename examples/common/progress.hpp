// examples/common/progress.hpp — progress lines while training, and result tables (Markdown and CSV).
//
// Progress prints one line every `every` optimizer steps and after the last one:
//   "  llm pretrain  step  120/800  loss 1.2345  21,034 tok/s  12.3 s  eta 70 s"
// where the loss is the mean over the steps since the previous line and the speed counts the caller's units
// (tokens, images, samples) over the same steps. every = 0 prints nothing (the timings are still kept).
// Table collects rows of strings under fixed headers and prints them as an aligned Markdown table (what the
// results pages show; widths count UTF-8 characters) or as CSV (quoted where a cell holds a comma or a quote).
// fixed(v, p) formats a double with p decimals; percent(a) formats an accuracy in [0, 1] as "87.3".
// These are helpers of the example programs (namespace mixpeft::examples), not part of the library.
#pragma once

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <ostream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "mixpeft/core/error.hpp"
#include "mixpeft/models/param_count.hpp"

namespace mixpeft::examples {

inline std::string fixed(double value, int precision) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, "%.*f", precision, value);
  return buffer;
}

inline std::string percent(double accuracy) { return fixed(100.0 * accuracy, 1); }

class Progress {
 public:
  Progress(std::string label, std::size_t total_steps, std::size_t every, std::string unit, std::ostream& os)
      : label_(std::move(label)), unit_(std::move(unit)), total_(total_steps), every_(every), os_(&os),
        start_(clock::now()), window_start_(start_) {}

  // Records optimizer step `step` (1-based) with its loss and the units it processed.
  void update(std::size_t step, double loss, double units) {
    window_loss_ += loss;
    window_units_ += units;
    ++window_steps_;
    last_loss_ = loss;
    if (every_ == 0 || (step % every_ != 0 && step != total_)) return;
    const auto now = clock::now();
    const double window = seconds_between(window_start_, now), elapsed = seconds_between(start_, now);
    const double eta = step > 0 && step < total_ ? elapsed / double(step) * double(total_ - step) : 0.0;
    char line[256];
    std::snprintf(line, sizeof line, "  %-14s step %5zu/%-5zu loss %.4f  %s %s/s  %.1f s  eta %.0f s\n",
                  label_.c_str(), step, total_, window_loss_ / double(window_steps_),
                  param_count::format_count(std::size_t(window > 0 ? window_units_ / window : 0.0)).c_str(),
                  unit_.c_str(), elapsed, eta);
    *os_ << line << std::flush;
    window_loss_ = window_units_ = 0.0;
    window_steps_ = 0;
    window_start_ = now;
  }

  double seconds() const { return seconds_between(start_, clock::now()); }
  double last_loss() const { return last_loss_; }

 private:
  using clock = std::chrono::steady_clock;
  static double seconds_between(clock::time_point a, clock::time_point b) {
    return std::chrono::duration<double>(b - a).count();
  }

  std::string label_, unit_;
  std::size_t total_, every_;
  std::ostream* os_;
  clock::time_point start_, window_start_;
  double window_loss_ = 0.0, window_units_ = 0.0, last_loss_ = 0.0;
  std::size_t window_steps_ = 0;
};

class Table {
 public:
  explicit Table(std::vector<std::string> headers) : headers_(std::move(headers)) {}

  void add(std::vector<std::string> row) {
    require<ConfigError>(row.size() == headers_.size(), "Table: a row has ", row.size(), " cells for ",
                         headers_.size(), " columns");
    rows_.push_back(std::move(row));
  }

  // Markdown with padded columns: text left-aligned, cells that start with a digit or sign right-aligned.
  void print(std::ostream& os) const {
    std::vector<std::size_t> width(headers_.size());
    for (std::size_t c = 0; c < headers_.size(); ++c) {
      width[c] = std::max<std::size_t>(3, display_width(headers_[c]));
      for (const auto& row : rows_) width[c] = std::max(width[c], display_width(row[c]));
    }
    const auto line = [&](const std::vector<std::string>& cells) {
      os << '|';
      for (std::size_t c = 0; c < cells.size(); ++c) {
        const std::string pad(width[c] - display_width(cells[c]), ' ');
        os << ' ' << (numeric(cells[c]) ? pad + cells[c] : cells[c] + pad) << " |";
      }
      os << '\n';
    };
    line(headers_);
    os << '|';
    for (std::size_t c = 0; c < headers_.size(); ++c) os << std::string(width[c] + 2, '-') << '|';
    os << '\n';
    for (const auto& row : rows_) line(row);
  }

  std::string markdown() const {
    std::ostringstream os;
    print(os);
    return os.str();
  }

  std::string csv() const {
    std::string out;
    const auto line = [&](const std::vector<std::string>& cells) {
      for (std::size_t c = 0; c < cells.size(); ++c) out += (c ? "," : "") + quoted(cells[c]);
      out += '\n';
    };
    line(headers_);
    for (const auto& row : rows_) line(row);
    return out;
  }

  const std::vector<std::string>& headers() const { return headers_; }
  const std::vector<std::vector<std::string>>& rows() const { return rows_; }

 private:
  // Characters, not bytes: UTF-8 continuation bytes (10xxxxxx) do not count ("±", "Δ").
  static std::size_t display_width(const std::string& s) {
    std::size_t n = 0;
    for (const char ch : s) n += (static_cast<unsigned char>(ch) & 0xC0) != 0x80;
    return n;
  }
  static bool numeric(const std::string& s) {
    return !s.empty() && (std::isdigit(static_cast<unsigned char>(s[0])) || s[0] == '-' || s[0] == '+');
  }
  static std::string quoted(const std::string& s) {
    if (s.find_first_of(",\"\n") == std::string::npos) return s;
    std::string q = "\"";
    for (char ch : s) q += ch == '"' ? std::string("\"\"") : std::string(1, ch);
    return q + "\"";
  }

  std::vector<std::string> headers_;
  std::vector<std::vector<std::string>> rows_;
};

}  // namespace mixpeft::examples
