// examples/common/tokenizer.hpp — the fixed word-level vocabulary of the example programs.
//
// One vocabulary serves every example (LLaMA pre-training, LaVIN and MoLE instruction data), so a backbone
// pre-trained once can be tuned on either. IDs are stable: they are the positions in `vocabulary` below, and
// new words may only ever be appended at the end.
//   0 <pad>  1 <bos>  2 <eos>  3 <unk>       padding, sequence start and end, out-of-vocabulary word
//   4 <img>                                   placeholder slot where one visual token is inserted
//   5 <mod>                                   placeholder slot for LaVIN's modality token (position 0)
//   6..11   . , ? : ( )                       punctuation
//   12..21  0 .. 9                            digits (digit d has id 12 + d)
//   22..25  A B C D                           option letters (upper case; the article "a" is a word)
//   26..    words, lower case
// encode: split on white space, then split every punctuation character off as its own token and every digit
// string into single digits ("(A)" -> ( A ), "17" -> 1 7). Matching is case-sensitive. Unknown words become
// <unk> (encode) or throw ConfigError (encode_known, used by the data generators so a typo cannot slip in).
// decode: tokens joined by single spaces, with no space before . , ? : ) and none after ( ; so
// encode(decode(ids)) == ids for every id sequence, and decode(encode(s)) == s for text written that way.
#pragma once

#include <array>
#include <cctype>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "mixpeft/core/error.hpp"

namespace mixpeft::data {

inline constexpr std::array<std::string_view, 104> vocabulary = {
    "<pad>", "<bos>", "<eos>", "<unk>", "<img>", "<mod>",
    ".", ",", "?", ":", "(", ")",
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
    "A", "B", "C", "D",
    // instruction format
    "context", "options", "answer", "the", "is", "none",
    // function words
    "what", "which", "how", "many", "are", "there", "of", "a", "in", "on", "and", "it", "has", "have",
    "does", "with",
    // numbers
    "plus", "minus", "greater", "less", "than", "number", "digit", "even", "odd", "or", "yes", "no",
    // scenes
    "image", "shown", "shape", "shapes", "colour", "red", "green", "blue", "square", "cross", "ring",
    "left", "right", "side",
    // animals
    "animal", "mammal", "bird", "fish", "insect", "legs",
    "cow", "dog", "cat", "horse", "hen", "duck", "swan", "crow", "shark", "trout", "salmon", "cod",
    "bee", "fly", "moth", "wasp",
    // MoLE domains
    "scene", "page", "tissue", "spot", "spots", "ink", "high", "kind",
};

inline constexpr std::size_t vocab_size = vocabulary.size();
static_assert(vocabulary[vocab_size - 1] == "kind", "vocabulary: the array size must match its entries");

namespace token {
inline constexpr std::int64_t pad = 0, bos = 1, eos = 2, unk = 3, img = 4, mod = 5;
inline constexpr std::int64_t first_digit = 12, first_letter = 22;
}  // namespace token

namespace detail {

inline const std::unordered_map<std::string_view, std::int64_t>& vocabulary_index() {
  static const auto index = [] {
    std::unordered_map<std::string_view, std::int64_t> m;
    for (std::size_t i = 0; i < vocabulary.size(); ++i) m.emplace(vocabulary[i], std::int64_t(i));
    return m;
  }();
  return index;
}

inline bool is_punctuation(char c) {
  return c == '.' || c == ',' || c == '?' || c == ':' || c == '(' || c == ')';
}

// Splits text into word pieces as described at the top of the file.
inline std::vector<std::string_view> split_words(std::string_view text) {
  std::vector<std::string_view> pieces;
  std::size_t i = 0;
  while (i < text.size()) {
    const char c = text[i];
    if (std::isspace(static_cast<unsigned char>(c))) {
      ++i;
    } else if (is_punctuation(c) || std::isdigit(static_cast<unsigned char>(c))) {
      pieces.push_back(text.substr(i, 1));
      ++i;
    } else {
      std::size_t j = i;
      while (j < text.size() && !std::isspace(static_cast<unsigned char>(text[j])) && !is_punctuation(text[j]) &&
             !std::isdigit(static_cast<unsigned char>(text[j])))
        ++j;
      pieces.push_back(text.substr(i, j - i));
      i = j;
    }
  }
  return pieces;
}

}  // namespace detail

// The id of a vocabulary word; ConfigError when the word is not in the vocabulary.
inline std::int64_t token_id(std::string_view word) {
  const auto& index = detail::vocabulary_index();
  const auto it = index.find(word);
  require<ConfigError>(it != index.end(), "tokenizer: '", word, "' is not in the vocabulary");
  return it->second;
}

inline std::int64_t digit_token(std::size_t d) {
  require<ConfigError>(d <= 9, "tokenizer: digit ", d, " is not a single digit");
  return token::first_digit + std::int64_t(d);
}

inline std::int64_t letter_token(std::size_t option) {
  require<ConfigError>(option < 4, "tokenizer: option ", option, " has no letter (A-D only)");
  return token::first_letter + std::int64_t(option);
}

inline std::vector<std::int64_t> encode(std::string_view text) {
  const auto& index = detail::vocabulary_index();
  std::vector<std::int64_t> ids;
  for (const auto piece : detail::split_words(text)) {
    const auto it = index.find(piece);
    ids.push_back(it == index.end() ? token::unk : it->second);
  }
  return ids;
}

inline std::vector<std::int64_t> encode_known(std::string_view text) {
  std::vector<std::int64_t> ids;
  for (const auto piece : detail::split_words(text)) ids.push_back(token_id(piece));
  return ids;
}

inline const std::string_view& token_text(std::int64_t id) {
  require<IndexError>(id >= 0 && std::size_t(id) < vocab_size, "tokenizer: id ", id, " is outside [0, ",
                      vocab_size, ")");
  return vocabulary[std::size_t(id)];
}

inline std::string decode(std::span<const std::int64_t> ids) {
  std::string text;
  bool after_open = true;  // no space at the start or after "("
  for (const auto id : ids) {
    const std::string_view w = token_text(id);
    const bool closes = w.size() == 1 && detail::is_punctuation(w[0]) && w[0] != '(';
    if (!after_open && !closes) text += ' ';
    text += w;
    after_open = w == "(";
  }
  return text;
}

}  // namespace mixpeft::data
