// examples/common/lavin_data.hpp — ScienceQA-like multiple-choice instructions for the LaVIN examples, and the
// text corpus that pre-trains their LLaMA.
//
// A sample (batch.hpp's Sample) reads, with the image slot shown as <img>:
//   <bos> context : none . <img> which digit is shown ? options : (A) 3 (B) 7 (C) 0 (D) 5 answer : the answer is B . <eos>
//   <bos> context : there are 2 red shapes and 1 blue shape . how many red shapes are there ? options : ...
// prefix = "context : ... ." (the hint; "none" for most tasks), prompt = question, options and "answer :",
// answer = "the answer is X ." (AnswerStyle::Sentence) or "X" (AnswerStyle::Letter), then <eos>.
// Tasks (LavinTask), the first seven need the image, the last five are text-only:
//   DigitValue    UCI digit     which digit is shown ?                   4 of 0-9
//   DigitGreater  UCI digit     is the digit greater than 4 ?            yes / no
//   DigitParity   UCI digit     is the digit even or odd ?               even / odd
//   SceneCount    scene         how many red shapes are there ?          0 1 2 3 (the asked count is uniform)
//   SceneColour   scene         what colour is the cross ?               red green blue (exactly one cross)
//   SceneShape    scene         which shape is red ?                     square cross ring (exactly one red object)
//   SceneSide     scene         which side is the red shape on ?         left / right (exactly one red object)
//   Arithmetic    corpus fact   what is 3 plus 4 ?                       4 of 0-9 (a + b <= 9, a - b >= 0)
//   Comparison    corpus fact   is 7 greater than 4 ?                    yes / no
//   AnimalClass   corpus fact   what is a cow ?                          mammal bird fish insect
//   AnimalLegs    corpus fact   how many legs does a cow have ?          0 2 4 6
//   ContextCount  the context   how many red shapes are there ?          0 1 2 3 (same wording as SceneCount)
// Answerability: an image task's answer is drawn uniformly (digits: as balanced as the UCI labels) independently
// of its wording, and options are shuffled, so without the image a model is at chance. A text task's fact is
// stated in the pre-training corpus (ContextCount: in the context), so a LLaMA pre-trained on pretrain_corpus can
// answer it without any image; multimodal tuning can then keep or damage that ability.
// Splits: digits come from the matching DigitSplit part; the facts of every text task (and the context
// configurations) are partitioned into train / val / test by a seeded shuffle, so a test fact was never seen in
// tuning (only in pre-training). Scenes are fresh draws. Options are drawn per sample.
// pretrain_corpus: every fact of every split twice (a statement, "3 plus 4 is 7 .", and a question with its
// answer, "what is 3 plus 4 ? 7 ."), parity and colour / shape statements, reading passages built from the
// *train* context configurations only, and captions of scenes, pages and tissues; shuffled per repeat, each
// passage "<bos> ... <eos>", concatenated into one stream for batch.hpp's lm_batch.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
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

enum class LavinTask : std::uint8_t {
  DigitValue, DigitGreater, DigitParity, SceneCount, SceneColour, SceneShape, SceneSide,
  Arithmetic, Comparison, AnimalClass, AnimalLegs, ContextCount,
};
inline constexpr std::size_t n_lavin_tasks = 12;

inline constexpr bool is_image_task(LavinTask t) { return t <= LavinTask::SceneSide; }

inline std::string_view lavin_task_name(LavinTask t) {
  static constexpr std::string_view names[] = {"digit_value", "digit_greater", "digit_parity", "scene_count",
                                                "scene_colour", "scene_shape", "scene_side", "arithmetic",
                                                "comparison", "animal_class", "animal_legs", "context_count"};
  return names[std::size_t(t)];
}

inline std::vector<LavinTask> all_lavin_tasks() {
  std::vector<LavinTask> tasks;
  for (std::size_t i = 0; i < n_lavin_tasks; ++i) tasks.push_back(LavinTask(i));
  return tasks;
}

enum class AnswerStyle : std::uint8_t { Sentence, Letter };

struct LavinConfig {
  ImageSpec image{};
  std::size_t n_train = 2000, n_val = 200, n_test = 600;
  double image_fraction = 0.5;                   // share of samples with an image (ScienceQA: about half)
  AnswerStyle answer_style = AnswerStyle::Sentence;
  std::vector<LavinTask> tasks = all_lavin_tasks();
  double fact_val_fraction = 0.15, fact_test_fraction = 0.25;  // of each text task's facts
  std::uint64_t seed = 0;

  void validate() const {
    image.validate();
    require<ConfigError>(n_train > 0 && n_test > 0, "LavinConfig: n_train and n_test must be > 0");
    require<ConfigError>(image_fraction >= 0.0 && image_fraction <= 1.0, "LavinConfig: image_fraction must be in [0, 1] (got ",
                         image_fraction, ")");
    require<ConfigError>(fact_val_fraction > 0.0 && fact_test_fraction > 0.0 && fact_val_fraction + fact_test_fraction < 1.0,
                         "LavinConfig: fact fractions must be > 0 and sum to < 1 (got ", fact_val_fraction, ", ",
                         fact_test_fraction, ")");
    bool any_image = false, any_text = false;
    for (std::size_t i = 0; i < tasks.size(); ++i) {
      require<ConfigError>(std::size_t(tasks[i]) < n_lavin_tasks, "LavinConfig: unknown task ", int(tasks[i]));
      for (std::size_t j = 0; j < i; ++j)
        require<ConfigError>(tasks[i] != tasks[j], "LavinConfig: task ", lavin_task_name(tasks[i]), " is listed twice");
      (is_image_task(tasks[i]) ? any_image : any_text) = true;
    }
    require<ConfigError>(image_fraction == 0.0 || any_image, "LavinConfig: image_fraction is ", image_fraction,
                         " but no image task is enabled");
    require<ConfigError>(image_fraction == 1.0 || any_text, "LavinConfig: image_fraction is ", image_fraction,
                         " but no text-only task is enabled");
  }
};

struct LavinData {
  std::vector<Sample> train, val, test;
};

namespace detail::lavin {

using mixpeft::detail::concat;

struct Animal {
  std::string_view name;
  std::size_t kind;  // index into animal_kinds
};
inline constexpr std::array<std::string_view, 4> animal_kinds = {"mammal", "bird", "fish", "insect"};
inline constexpr std::array<std::string_view, 4> kind_legs = {"4", "2", "0", "6"};
inline constexpr std::array<Animal, 16> animals = {{
    {"cow", 0}, {"dog", 0}, {"cat", 0}, {"horse", 0}, {"hen", 1}, {"duck", 1}, {"swan", 1}, {"crow", 1},
    {"shark", 2}, {"trout", 2}, {"salmon", 2}, {"cod", 2}, {"bee", 3}, {"fly", 3}, {"moth", 3}, {"wasp", 3},
}};

// A question and its answer before the options are drawn.
struct Question {
  std::string context = "none";
  std::string text;               // ends with " ?"
  std::string answer;
  std::vector<std::string> pool;  // option texts to draw from, the answer among them
  std::size_t n_options = 0;
  std::string key;
  Tensor<float> image = zeros<float>({0});
};

inline std::vector<std::string> digit_words(std::size_t n) {
  std::vector<std::string> w;
  for (std::size_t i = 0; i < n; ++i) w.push_back(std::to_string(i));
  return w;
}
inline std::vector<std::string> colour_words() { return {"red", "green", "blue"}; }
inline std::vector<std::string> shape_words() { return {"square", "cross", "ring"}; }

inline std::string context_sentence(std::size_t n1, Colour c1, std::size_t n2, Colour c2) {
  return std::string("there ") + (n1 == 1 ? "is " : "are ") +
         counted(n1, std::string(colour_name(c1)) + " shape", std::string(colour_name(c1)) + " shapes") + " and " +
         counted(n2, std::string(colour_name(c2)) + " shape", std::string(colour_name(c2)) + " shapes");
}

// Every fact of a text-only task, in a fixed order.
inline std::vector<Question> text_facts(LavinTask task) {
  std::vector<Question> facts;
  switch (task) {
    case LavinTask::Arithmetic:
      for (std::size_t a = 0; a <= 9; ++a)
        for (std::size_t b = 0; b <= 9; ++b) {
          const std::string sa = std::to_string(a), sb = std::to_string(b);
          if (a + b <= 9)
            facts.push_back({.text = "what is " + sa + " plus " + sb + " ?", .answer = std::to_string(a + b),
                             .pool = digit_words(10), .n_options = 4, .key = "fact " + sa + " plus " + sb});
          if (a >= b)
            facts.push_back({.text = "what is " + sa + " minus " + sb + " ?", .answer = std::to_string(a - b),
                             .pool = digit_words(10), .n_options = 4, .key = "fact " + sa + " minus " + sb});
        }
      break;
    case LavinTask::Comparison:
      for (std::size_t a = 0; a <= 9; ++a)
        for (std::size_t b = 0; b <= 9; ++b)
          if (a != b)
            facts.push_back({.text = "is " + std::to_string(a) + " greater than " + std::to_string(b) + " ?",
                             .answer = a > b ? "yes" : "no", .pool = {"yes", "no"}, .n_options = 2,
                             .key = "fact " + std::to_string(a) + " greater than " + std::to_string(b)});
      break;
    case LavinTask::AnimalClass:
      for (const auto& an : animals)
        facts.push_back({.text = "what is a " + std::string(an.name) + " ?", .answer = std::string(animal_kinds[an.kind]),
                         .pool = {animal_kinds.begin(), animal_kinds.end()}, .n_options = 4,
                         .key = "fact kind of " + std::string(an.name)});
      break;
    case LavinTask::AnimalLegs:
      for (const auto& an : animals)
        facts.push_back({.text = "how many legs does a " + std::string(an.name) + " have ?",
                         .answer = std::string(kind_legs[an.kind]), .pool = {kind_legs.begin(), kind_legs.end()},
                         .n_options = 4, .key = "fact legs of " + std::string(an.name)});
      break;
    case LavinTask::ContextCount:
      for (std::size_t c1 = 0; c1 < n_colours; ++c1)
        for (std::size_t c2 = 0; c2 < n_colours; ++c2) {
          if (c1 == c2) continue;
          for (std::size_t n1 = 0; n1 <= 3; ++n1)
            for (std::size_t n2 = 0; n2 <= 3; ++n2)
              for (const std::size_t asked : {c1, c2}) {
                const std::string ctx = context_sentence(n1, Colour(c1), n2, Colour(c2));
                const std::string cname(colour_name(Colour(asked)));
                facts.push_back({.context = ctx, .text = "how many " + cname + " shapes are there ?",
                                 .answer = std::to_string(asked == c1 ? n1 : n2), .pool = digit_words(4),
                                 .n_options = 4, .key = "context " + ctx + " asks " + cname});
              }
        }
      break;
    default:
      throw ConfigError(concat("text_facts: ", lavin_task_name(task), " is not a text-only task"));
  }
  return facts;
}

// The facts of one text task split three ways by a seeded shuffle: {train, val, test}.
inline std::array<std::vector<Question>, 3> partition_facts(LavinTask task, const LavinConfig& config) {
  std::vector<Question> facts = text_facts(task);
  Rng rng(derive_seed(config.seed, concat("facts ", lavin_task_name(task))));
  shuffle(facts, rng);
  const std::size_t n = facts.size();
  const std::size_t n_test = std::max<std::size_t>(1, std::size_t(std::lround(config.fact_test_fraction * double(n))));
  const std::size_t n_val = std::max<std::size_t>(1, std::size_t(std::lround(config.fact_val_fraction * double(n))));
  require<ConfigError>(n_test + n_val < n, "LavinConfig: ", lavin_task_name(task), " has ", n,
                       " facts, too few for the requested val and test fractions");
  std::array<std::vector<Question>, 3> parts;
  for (std::size_t i = 0; i < n; ++i) parts[i < n_test ? 2 : i < n_test + n_val ? 1 : 0].push_back(std::move(facts[i]));
  return parts;
}

inline std::string scene_key(std::span<const SceneObject> objects) {
  std::string key = "scene";
  for (const auto& o : objects)
    key += concat(" ", colour_name(o.colour), " ", shape_name(o.shape), " (", o.row, ",", o.col, ")");
  return key;
}

// `n` objects with colours drawn from `colours` and kinds from `kinds` (indices into the enums).
inline void add_objects(std::vector<SceneObject>& objects, std::size_t n, const std::vector<std::size_t>& colours,
                        const std::vector<std::size_t>& kinds, Rng& rng) {
  for (std::size_t i = 0; i < n; ++i)
    objects.push_back({ShapeKind(kinds[rng.below(kinds.size())]), Colour(colours[rng.below(colours.size())]), 0, 0});
}

inline std::vector<std::size_t> all_but(std::size_t n, std::size_t excluded) {
  std::vector<std::size_t> v;
  for (std::size_t i = 0; i < n; ++i)
    if (i != excluded) v.push_back(i);
  return v;
}

// A question about a freshly drawn scene or a digit from `digit_pool`.
inline Question image_question(LavinTask task, const Digits& digits, std::span<const std::size_t> digit_pool,
                               const ImageSpec& spec, Rng& rng) {
  Question q;
  if (task <= LavinTask::DigitParity) {
    require<ConfigError>(!digit_pool.empty(), "make_lavin_data: the digit split part is empty");
    const std::size_t index = digit_pool[rng.below(digit_pool.size())];
    const auto label = std::size_t(digits.labels.at(index));
    q.image = render_digit(digits, index, spec, DigitStyle{}, rng);
    q.key = concat("digit ", index);
    if (task == LavinTask::DigitValue) {
      q.text = "which digit is shown ?", q.answer = std::to_string(label), q.pool = digit_words(10), q.n_options = 4;
    } else if (task == LavinTask::DigitGreater) {
      q.text = "is the digit greater than 4 ?", q.answer = label > 4 ? "yes" : "no", q.pool = {"yes", "no"};
      q.n_options = 2;
    } else {
      q.text = "is the digit even or odd ?", q.answer = label % 2 == 0 ? "even" : "odd", q.pool = {"even", "odd"};
      q.n_options = 2;
    }
    return q;
  }
  const std::size_t cells = spec.grid() * spec.grid(), max_others = std::min<std::size_t>(3, cells - 1);
  const std::vector<std::size_t> every_kind = {0, 1, 2};
  const auto colour = rng.below(n_colours);
  const std::string cname(colour_name(Colour(colour)));
  std::vector<SceneObject> objects;
  std::vector<std::pair<std::size_t, std::size_t>> placed;
  switch (task) {
    case LavinTask::SceneCount: {
      const std::size_t k = rng.below(4);
      const std::size_t lo = k == 0 ? 1 : 0, hi = std::min<std::size_t>(3, cells - k);
      add_objects(objects, k, {colour}, every_kind, rng);
      add_objects(objects, lo + rng.below(hi - lo + 1), all_but(n_colours, colour), every_kind, rng);
      q.text = "how many " + cname + " shapes are there ?", q.answer = std::to_string(k), q.pool = digit_words(4);
      q.n_options = 4;
      break;
    }
    case LavinTask::SceneColour: {
      const auto kind = rng.below(n_shape_kinds);
      objects.push_back({ShapeKind(kind), Colour(colour), 0, 0});
      add_objects(objects, rng.below(max_others + 1), every_kind, all_but(n_shape_kinds, kind), rng);
      q.text = "what colour is the " + std::string(shape_name(ShapeKind(kind))) + " ?", q.answer = cname;
      q.pool = colour_words(), q.n_options = 3;
      break;
    }
    case LavinTask::SceneShape: {
      const auto kind = rng.below(n_shape_kinds);
      objects.push_back({ShapeKind(kind), Colour(colour), 0, 0});
      add_objects(objects, rng.below(max_others + 1), all_but(n_colours, colour), every_kind, rng);
      q.text = "which shape is " + cname + " ?", q.answer = std::string(shape_name(ShapeKind(kind)));
      q.pool = shape_words(), q.n_options = 3;
      break;
    }
    case LavinTask::SceneSide: {
      const bool left = rng.below(2) == 0;
      objects.push_back({ShapeKind(rng.below(n_shape_kinds)), Colour(colour), 0, 0});
      add_objects(objects, rng.below(max_others + 1), all_but(n_colours, colour), every_kind, rng);
      // the target takes the first cell of a random order on its side, the others the next free cells
      auto order = random_cells(cells, spec, rng);
      const auto target = std::find_if(order.begin(), order.end(),
                                       [&](const auto& cell) { return (cell.second < spec.grid() / 2) == left; });
      std::iter_swap(order.begin(), target);
      placed.assign(order.begin(), order.begin() + std::ptrdiff_t(objects.size()));
      q.text = "which side is the " + cname + " shape on ?", q.answer = left ? "left" : "right";
      q.pool = {"left", "right"}, q.n_options = 2;
      break;
    }
    default:
      throw ConfigError(concat("image_question: ", lavin_task_name(task), " is not an image task"));
  }
  if (placed.empty()) placed = random_cells(objects.size(), spec, rng);
  for (std::size_t i = 0; i < objects.size(); ++i) objects[i].row = placed[i].first, objects[i].col = placed[i].second;
  q.image = render_scene(objects, spec, rng);
  q.key = scene_key(objects);
  return q;
}

// Draws the options, shuffles them and writes the tokens.
inline Sample to_sample(Question q, LavinTask task, AnswerStyle style, Rng& rng) {
  std::vector<std::string> distractors;
  for (const auto& p : q.pool)
    if (p != q.answer) distractors.push_back(p);
  shuffle(distractors, rng);
  std::vector<std::string> options(distractors.begin(), distractors.begin() + std::ptrdiff_t(q.n_options - 1));
  options.push_back(q.answer);
  shuffle(options, rng);
  Sample s;
  s.correct = std::size_t(std::find(options.begin(), options.end(), q.answer) - options.begin());
  std::string prompt = q.text + " options :";
  for (std::size_t i = 0; i < options.size(); ++i) {
    prompt += concat(" (", vocabulary[std::size_t(letter_token(i))], ") ", options[i]);
    s.choices.push_back(letter_token(i));
  }
  s.prefix = encode_known("context : " + q.context + " .");
  s.prompt = encode_known(prompt + " answer :");
  if (style == AnswerStyle::Sentence) s.answer = encode_known("the answer is");
  s.answer_index = s.answer.size();
  s.answer.push_back(s.choices[s.correct]);
  if (style == AnswerStyle::Sentence) s.answer.push_back(token_id("."));
  s.answer.push_back(token::eos);
  s.image = std::move(q.image);
  s.task = std::size_t(task);
  s.key = std::move(q.key);
  return s;
}

}  // namespace detail::lavin

// Train, val and test samples; digits for image tasks come from split.train / split.val / split.test.
inline LavinData make_lavin_data(const Digits& digits, const DigitSplit& split, const LavinConfig& config) {
  namespace dl = detail::lavin;
  using mixpeft::detail::concat;
  config.validate();
  std::vector<LavinTask> image_tasks, text_tasks;
  for (const auto t : config.tasks) (is_image_task(t) ? image_tasks : text_tasks).push_back(t);
  std::vector<std::array<std::vector<dl::Question>, 3>> facts;
  for (const auto t : text_tasks) facts.push_back(dl::partition_facts(t, config));
  const std::array<const std::vector<std::size_t>*, 3> digit_parts = {&split.train, &split.val, &split.test};
  const std::array<std::size_t, 3> sizes = {config.n_train, config.n_val, config.n_test};
  const std::array<std::string_view, 3> names = {"train", "val", "test"};
  LavinData out;
  std::array<std::vector<Sample>*, 3> parts = {&out.train, &out.val, &out.test};
  for (std::size_t p = 0; p < 3; ++p) {
    Rng rng(detail::derive_seed(config.seed, concat("lavin ", names[p])));
    const auto n_image = std::size_t(std::lround(config.image_fraction * double(sizes[p])));
    for (std::size_t i = 0; i < sizes[p]; ++i) {
      if (i < n_image) {
        const LavinTask task = image_tasks[rng.below(image_tasks.size())];
        parts[p]->push_back(dl::to_sample(dl::image_question(task, digits, *digit_parts[p], config.image, rng), task,
                                          config.answer_style, rng));
      } else {
        const std::size_t t = rng.below(text_tasks.size());
        const auto& pool = facts[t][p];
        parts[p]->push_back(dl::to_sample(pool[rng.below(pool.size())], text_tasks[t], config.answer_style, rng));
      }
    }
    detail::shuffle(*parts[p], rng);
  }
  return out;
}

struct CorpusConfig {
  std::size_t repeats = 20;   // passes over the facts (each pass shuffled)
  std::size_t captions = 200; // random picture captions per pass
  std::uint64_t seed = 0;
};

// The LLaMA pre-training stream (see the top of the file). `lavin` fixes which context configurations are
// train-only (reading passages) and must be the config used for make_lavin_data.
inline std::vector<std::int64_t> pretrain_corpus(const LavinConfig& lavin, const CorpusConfig& config) {
  namespace dl = detail::lavin;
  using mixpeft::detail::concat;
  lavin.validate();
  require<ConfigError>(config.repeats > 0, "CorpusConfig: repeats must be > 0");
  std::vector<std::string> fixed;
  for (const auto task : {LavinTask::Arithmetic, LavinTask::Comparison, LavinTask::AnimalClass, LavinTask::AnimalLegs})
    for (const auto& f : dl::text_facts(task)) fixed.push_back(f.text + " " + f.answer + " .");
  for (std::size_t a = 0; a <= 9; ++a)
    for (std::size_t b = 0; b <= 9; ++b) {
      if (a + b <= 9) fixed.push_back(concat(a, " plus ", b, " is ", a + b, " ."));
      if (a >= b) fixed.push_back(concat(a, " minus ", b, " is ", a - b, " ."));
      if (a != b) fixed.push_back(concat(a, a > b ? " is greater than " : " is less than ", b, " ."));
    }
  for (std::size_t d = 0; d <= 9; ++d) {
    const char* parity = d % 2 == 0 ? "even" : "odd";
    fixed.push_back(concat(d, " is ", parity, " ."));
    fixed.push_back(concat("is ", d, " even or odd ? ", parity, " ."));
  }
  for (const auto& an : dl::animals) {
    fixed.push_back(concat("a ", an.name, " is a ", dl::animal_kinds[an.kind], " ."));
    fixed.push_back(concat("a ", an.name, " has ", dl::kind_legs[an.kind], " legs ."));
  }
  for (std::size_t i = 0; i < 3; ++i) {
    fixed.push_back(concat(colour_name(Colour(i)), " is a colour ."));
    fixed.push_back(concat("a ", shape_name(ShapeKind(i)), " is a shape ."));
  }
  const auto contexts = dl::partition_facts(LavinTask::ContextCount, lavin);
  for (const auto& f : contexts[0])
    fixed.push_back(f.context + " . " + f.text + " " + f.answer + " .");

  Rng rng(detail::derive_seed(config.seed, "corpus"));
  std::vector<std::int64_t> stream;
  for (std::size_t r = 0; r < config.repeats; ++r) {
    std::vector<std::string> passages = fixed;
    for (std::size_t i = 0; i < config.captions; ++i) {
      const auto c = Colour(rng.below(n_colours));
      switch (rng.below(3)) {
        case 0: passages.push_back(scene_caption(1 + rng.below(4), c)); break;
        case 1: passages.push_back(page_caption(rng.below(10), c)); break;
        default: passages.push_back(tissue_caption({c, rng.below(4)})); break;
      }
    }
    detail::shuffle(passages, rng);
    for (const auto& p : passages) {
      stream.push_back(token::bos);
      for (const auto id : encode_known(p)) stream.push_back(id);
      stream.push_back(token::eos);
    }
  }
  return stream;
}

}  // namespace mixpeft::data
