// examples/common/mole_data.hpp — three-domain visual instructions that conflict for one low-rank LoRA (LLaVA-MoLE).
//
// Domains (Domain), each recognisable at a glance from its picture:
//   general    scene: 1-4 shapes of one colour on black                     value = number of shapes (1..4)
//   document   page: a UCI digit in coloured ink on off-white paper         value = the digit (0..9)
//   medical    tissue: pastel stain with 0-3 dark spots                      value = number of spots (0..3)
// Every domain is asked the SAME three questions, with the same words, and answers with one token then <eos>.
// With conflicting rules (the default) every question has a rule of its own in each domain:
//   "what is the number ?"   general: the shapes; document: the digit; medical: the health score 3 - spots
//   "is it high ?"           the domain's number >= 3 (general), 5 (document), 2 (medical)      choices yes / no
//   "what colour is it ?"    the colour of the shapes (general), the ink (document), the stain (medical), named
//                            in the domain's own colour code: the true name in general, shifted by one place
//                            (document) or two (medical) along red -> green -> blue -> red     choices red green blue
// So identical text maps to contradicting answers: a red picture is "red", "green" or "blue" by domain, two marks
// are "2" in a scene but "1" in a tissue, and "is it high ?" flips between domains for shared values. The rule must
// be picked from the image. One LoRA update (the same low-rank matrix applied to every token) must fit all three
// rule sets at once, which costs rank and makes the domains interfere; a top-1 mixture can give each domain its
// own expert at the active cost of one LoRA (docs/data.md has the argument). The control, consistent rules
// (conflicting = false), names colours truly and has medical report its spot count, so only "is it high ?"
// (its thresholds) differs by domain. With name_domain the prompt starts with the domain's noun
// ("scene : is it high ? answer :"), an easier text-visible cue, for ablation.
// The answers are balanced given the text: value uniform over the domain's range (documents: the UCI label mix),
// colour uniform, "high" true for about half of each domain.
// Splits: per domain, train and test; documents use DigitSplit::train for train and DigitSplit::test for test.
// Sample fields: domain = Domain, task = MoleQuestion (mole_caption_task for captions), prefix empty,
// prompt = [noun :] question answer :, answer = [token, <eos>], answer_index = 0, choices as above.
// mole_captions: "a scene with 3 red shapes ." / "a page with the digit 7 in blue ink ." / "a red tissue with 2
// spots ." as answers to an empty prompt, for LLaVA's stage 1 (aligning the projector before instruction tuning):
// captions describe what is seen, in true colour names, in every domain.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "batch.hpp"
#include "images.hpp"
#include "tokenizer.hpp"
#include "mixpeft/core/error.hpp"
#include "mixpeft/core/rng.hpp"

namespace mixpeft::data {

enum class Domain : std::uint8_t { General, Document, Medical };
inline constexpr std::size_t n_domains = 3;

inline std::string_view domain_name(Domain d) {
  static constexpr std::string_view names[] = {"general", "document", "medical"};
  return names[std::size_t(d)];
}
inline std::string_view domain_noun(Domain d) {
  static constexpr std::string_view nouns[] = {"scene", "page", "tissue"};
  return nouns[std::size_t(d)];
}

enum class MoleQuestion : std::uint8_t { Number, High, Colour };
inline constexpr std::size_t n_mole_questions = 3;
inline constexpr std::size_t mole_caption_task = n_mole_questions;  // Sample::task of a caption

inline std::string_view mole_question_name(MoleQuestion q) {
  static constexpr std::string_view names[] = {"number", "high", "colour"};
  return names[std::size_t(q)];
}
inline std::string_view mole_question_text(MoleQuestion q) {
  static constexpr std::string_view texts[] = {"what is the number ?", "is it high ?", "what colour is it ?"};
  return texts[std::size_t(q)];
}

// The values a domain's pictures show: [first, last] (shapes, the digit, spots).
inline std::pair<std::size_t, std::size_t> domain_value_range(Domain d) {
  static constexpr std::pair<std::size_t, std::size_t> ranges[] = {{1, 4}, {0, 9}, {0, 3}};
  return ranges[std::size_t(d)];
}
// "is it high ?" asks whether the domain's number (below) is at least this.
inline std::size_t high_threshold(Domain d) {
  static constexpr std::size_t thresholds[] = {3, 5, 2};
  return thresholds[std::size_t(d)];
}

// The domain's answer to "what is the number ?" for a picture showing `value`. General and document report what
// they see (the count, the digit). With conflicting rules medical reports a health score, 3 - spots (3: no
// lesion); with consistent rules (the control), the number of spots.
inline std::size_t domain_number(Domain d, std::size_t value, bool conflicting = true) {
  return d == Domain::Medical && conflicting ? 3 - value : value;
}

// The domain's name for a colour: with conflicting rules, shifted by the domain's index along red, green, blue.
inline Colour domain_colour(Domain d, Colour colour, bool conflicting = true) {
  return conflicting ? Colour((std::size_t(colour) + std::size_t(d)) % n_colours) : colour;
}

// The rule table: the answer word of question q about a picture of domain d with this value and colour.
inline std::string mole_answer(Domain d, MoleQuestion q, std::size_t value, Colour colour, bool conflicting = true) {
  const std::size_t number = domain_number(d, value, conflicting);
  switch (q) {
    case MoleQuestion::Number: return std::to_string(number);
    case MoleQuestion::High: return number >= high_threshold(d) ? "yes" : "no";
    case MoleQuestion::Colour: return std::string(colour_name(domain_colour(d, colour, conflicting)));
  }
  throw ConfigError("mole_answer: unknown question");
}

inline std::vector<std::int64_t> mole_choices(MoleQuestion q) {
  switch (q) {
    case MoleQuestion::Number: return encode_known("0 1 2 3 4 5 6 7 8 9");
    case MoleQuestion::High: return encode_known("yes no");
    case MoleQuestion::Colour: return encode_known("red green blue");
  }
  throw ConfigError("mole_choices: unknown question");
}

struct MoleConfig {
  ImageSpec image{};
  std::array<std::size_t, n_domains> train_sizes = {1000, 1000, 1000};
  std::size_t test_size = 300;  // per domain
  bool name_domain = false;     // put the domain's noun in the prompt
  bool conflicting = true;      // each domain its own number and colour rules (false: the control, see above)
  std::uint64_t seed = 0;

  void validate() const {
    image.validate();
    require<ConfigError>(image.grid() * image.grid() >= 4, "MoleConfig: the scene grid must hold 4 shapes");
    for (std::size_t d = 0; d < n_domains; ++d)
      require<ConfigError>(train_sizes[d] > 0, "MoleConfig: train_sizes[", d, "] must be > 0");
    require<ConfigError>(test_size > 0, "MoleConfig: test_size must be > 0");
  }
};

struct MoleData {
  std::array<std::vector<Sample>, n_domains> train, test;  // indexed by Domain

  // All domains' training samples in one list (domain-major order; minibatches shuffles).
  std::vector<Sample> mixed_train() const {
    std::vector<Sample> all;
    for (const auto& part : train) all.insert(all.end(), part.begin(), part.end());
    return all;
  }
};

namespace detail::mole {

struct Picture {
  Tensor<float> image;
  std::size_t value = 0;
  Colour colour = Colour::Red;
  std::string key;
};

inline Picture draw(Domain d, const Digits& digits, std::span<const std::size_t> digit_pool, const ImageSpec& spec,
                    Rng& rng) {
  using mixpeft::detail::concat;
  Picture p;
  p.colour = Colour(rng.below(n_colours));
  switch (d) {
    case Domain::General: {
      p.value = 1 + rng.below(4);
      std::vector<SceneObject> objects;
      for (const auto& [r, c] : random_cells(p.value, spec, rng))
        objects.push_back({ShapeKind(rng.below(n_shape_kinds)), p.colour, r, c});
      p.image = render_scene(objects, spec, rng);
      p.key = concat("scene ", p.value, " ", colour_name(p.colour));
      break;
    }
    case Domain::Document: {
      require<ConfigError>(!digit_pool.empty(), "make_mole_data: the digit split part is empty");
      const std::size_t index = digit_pool[rng.below(digit_pool.size())];
      p.value = std::size_t(digits.labels.at(index));
      p.image = render_digit(digits, index, spec, DigitStyle{.paper = true, .ink = p.colour}, rng);
      p.key = concat("digit ", index);
      break;
    }
    case Domain::Medical: {
      p.value = rng.below(4);
      p.image = render_tissue({p.colour, p.value}, spec, rng);
      p.key = concat("tissue ", colour_name(p.colour), " ", p.value);
      break;
    }
  }
  return p;
}

inline Sample question_sample(Domain d, MoleQuestion q, Picture pic, const MoleConfig& config) {
  Sample s;
  const std::string noun = config.name_domain ? std::string(domain_noun(d)) + " : " : "";
  s.prompt = encode_known(noun + std::string(mole_question_text(q)) + " answer :");
  const std::int64_t answer = token_id(mole_answer(d, q, pic.value, pic.colour, config.conflicting));
  s.answer = {answer, token::eos};
  s.choices = mole_choices(q);
  s.correct = std::size_t(std::find(s.choices.begin(), s.choices.end(), answer) - s.choices.begin());
  s.image = std::move(pic.image);
  s.task = std::size_t(q);
  s.domain = std::size_t(d);
  s.key = std::move(pic.key);
  return s;
}

}  // namespace detail::mole

inline MoleData make_mole_data(const Digits& digits, const DigitSplit& split, const MoleConfig& config) {
  using mixpeft::detail::concat;
  config.validate();
  MoleData out;
  for (std::size_t d = 0; d < n_domains; ++d)
    for (const bool test : {false, true}) {
      Rng rng(detail::derive_seed(config.seed, concat("mole ", domain_name(Domain(d)), test ? " test" : " train")));
      auto& part = (test ? out.test : out.train)[d];
      const std::size_t n = test ? config.test_size : config.train_sizes[d];
      for (std::size_t i = 0; i < n; ++i) {
        const auto q = MoleQuestion(rng.below(n_mole_questions));
        part.push_back(detail::mole::question_sample(
            Domain(d), q, detail::mole::draw(Domain(d), digits, test ? split.test : split.train, config.image, rng),
            config));
      }
    }
  return out;
}

// `per_domain` captioned pictures of every domain (digits from `digit_pool`), domain-major.
inline std::vector<Sample> mole_captions(const Digits& digits, std::span<const std::size_t> digit_pool,
                                         const MoleConfig& config, std::size_t per_domain) {
  config.validate();
  Rng rng(detail::derive_seed(config.seed, "mole captions"));
  std::vector<Sample> out;
  for (std::size_t d = 0; d < n_domains; ++d)
    for (std::size_t i = 0; i < per_domain; ++i) {
      auto pic = detail::mole::draw(Domain(d), digits, digit_pool, config.image, rng);
      const std::string text = d == 0   ? scene_caption(pic.value, pic.colour)
                               : d == 1 ? page_caption(pic.value, pic.colour)
                                        : tissue_caption({pic.colour, pic.value});
      Sample s;
      s.answer = encode_known(text);
      s.answer.push_back(token::eos);
      s.image = std::move(pic.image);
      s.task = mole_caption_task;
      s.domain = d;
      s.key = std::move(pic.key);
      out.push_back(std::move(s));
    }
  return out;
}

}  // namespace mixpeft::data
