// Tests of the example programs' data: tokenizer, digits and drawn images, LaVIN and MoLE instruction data, batches.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "../examples/common/batch.hpp"
#include "../examples/common/images.hpp"
#include "../examples/common/lavin_data.hpp"
#include "../examples/common/mole_data.hpp"
#include "../examples/common/tokenizer.hpp"

using namespace mixpeft;
using namespace mixpeft::data;

namespace {

const std::filesystem::path data_dir = std::filesystem::path(__FILE__).parent_path().parent_path() / "data";

const Digits& digits() {
  static const Digits d = load_digits(data_dir);
  return d;
}
const DigitSplit& digit_split() {
  static const DigitSplit s = split_digits(digits(), 0.1, 0.2, 7);
  return s;
}

bool same_tensor(const Tensor<float>& a, const Tensor<float>& b) {
  return shape_of(a) == shape_of(b) && std::equal(a.begin(), a.end(), b.begin());
}

bool same_sample(const Sample& a, const Sample& b) {
  return same_tensor(a.image, b.image) && a.prefix == b.prefix && a.prompt == b.prompt && a.answer == b.answer &&
         a.answer_index == b.answer_index && a.choices == b.choices && a.correct == b.correct && a.task == b.task &&
         a.domain == b.domain && a.key == b.key;
}

bool same_samples(const std::vector<Sample>& a, const std::vector<Sample>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (!same_sample(a[i], b[i])) return false;
  return true;
}

std::set<std::string> keys_with_prefix(const std::vector<Sample>& samples, const std::string& prefix) {
  std::set<std::string> keys;
  for (const auto& s : samples)
    if (s.key.rfind(prefix, 0) == 0) keys.insert(s.key);
  return keys;
}

bool disjoint(const std::set<std::string>& a, const std::set<std::string>& b) {
  return std::none_of(a.begin(), a.end(), [&](const std::string& k) { return b.count(k) > 0; });
}

// The option texts of a LaVIN prompt "... options : (A) x (B) y answer :", in order.
std::vector<std::string> option_texts(const Sample& s) {
  std::vector<std::string> options;
  const auto open = token_id("("), close = token_id(")"), answer = token_id("answer");
  for (std::size_t i = 0; i + 2 < s.prompt.size(); ++i)
    if (s.prompt[i] == open && s.prompt[i + 2] == close) {
      std::vector<std::int64_t> words;
      for (std::size_t j = i + 3; j < s.prompt.size() && s.prompt[j] != open && s.prompt[j] != answer; ++j)
        words.push_back(s.prompt[j]);
      options.push_back(decode(words));
    }
  return options;
}

LavinConfig small_lavin(std::uint64_t seed = 3) {
  LavinConfig c;
  c.n_train = 600, c.n_val = 100, c.n_test = 300, c.seed = seed;
  return c;
}

}  // namespace

// ---- tokenizer ---------------------------------------------------------------------------------------------------
TEST(Tokenizer, VocabularyIsSmallUniqueAndStable) {
  EXPECT_EQ(vocab_size, 104u);
  EXPECT_LE(vocab_size, 128u);
  std::set<std::string_view> words(vocabulary.begin(), vocabulary.end());
  EXPECT_EQ(words.size(), vocab_size);
  EXPECT_EQ(token_id("<pad>"), token::pad);
  EXPECT_EQ(token_id("<bos>"), token::bos);
  EXPECT_EQ(token_id("<eos>"), token::eos);
  EXPECT_EQ(token_id("<unk>"), token::unk);
  EXPECT_EQ(token_id("<img>"), token::img);
  EXPECT_EQ(token_id("<mod>"), token::mod);
  EXPECT_EQ(token_id("."), 6);
  EXPECT_EQ(digit_token(0), 12);
  EXPECT_EQ(digit_token(7), token_id("7"));
  EXPECT_EQ(letter_token(0), 22);
  EXPECT_EQ(letter_token(3), token_id("D"));
  EXPECT_EQ(token_id("context"), 26);
  EXPECT_EQ(token_id("kind"), 103);
}

TEST(Tokenizer, SplitsPunctuationAndDigits) {
  const auto ids = encode("(A) 17? the answer:");
  const std::vector<std::int64_t> expected = {token_id("("), token_id("A"), token_id(")"), digit_token(1), digit_token(7),
                                              token_id("?"), token_id("the"), token_id("answer"), token_id(":")};
  EXPECT_EQ(ids, expected);
}

TEST(Tokenizer, RoundTrips) {
  std::vector<std::int64_t> every(vocab_size);
  for (std::size_t i = 0; i < vocab_size; ++i) every[i] = std::int64_t(i);
  EXPECT_EQ(encode(decode(every)), every);
  Rng rng(5);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<std::int64_t> ids(1 + rng.below(30));
    for (auto& id : ids) id = std::int64_t(rng.below(vocab_size));
    EXPECT_EQ(encode(decode(ids)), ids);
  }
  for (const std::string text : {"context: none. which digit is shown? options: (A) 3 (B) 7 answer: the answer is B.",
                                 "a cow has 4 legs.", "<bos> 3 plus 4 is 7. <eos>"})
    EXPECT_EQ(decode(encode(text)), text);
}

TEST(Tokenizer, UnknownWordsAndBadIds) {
  EXPECT_EQ(encode("a zebra"), (std::vector<std::int64_t>{token_id("a"), token::unk}));
  EXPECT_THROW(encode_known("a zebra"), ConfigError);
  EXPECT_THROW(token_id("Cow"), ConfigError);  // case-sensitive
  EXPECT_THROW(token_text(std::int64_t(vocab_size)), IndexError);
  EXPECT_THROW(token_text(-1), IndexError);
  EXPECT_THROW(letter_token(4), ConfigError);
  EXPECT_THROW(digit_token(10), ConfigError);
}

// ---- digits and images ------------------------------------------------------------------------------------------
TEST(Digits, LoadWithTheRightShapesAndLabelCounts) {
  const Digits& d = digits();
  EXPECT_EQ(shape_of(d.images), (Shape{1797, 8, 8}));
  ASSERT_EQ(d.size(), 1797u);
  std::vector<std::size_t> counts(10, 0);
  for (const auto l : d.labels) ++counts.at(std::size_t(l));
  EXPECT_EQ(counts, (std::vector<std::size_t>{178, 182, 177, 183, 181, 182, 181, 179, 174, 180}));
  EXPECT_EQ(*std::min_element(d.images.begin(), d.images.end()), 0.0f);
  EXPECT_EQ(*std::max_element(d.images.begin(), d.images.end()), 1.0f);
}

TEST(Digits, MissingDirectoryThrowsIoError) {
  EXPECT_THROW(load_digits(data_dir / "no_such_dir"), IoError);
}

TEST(Digits, SplitIsDisjointStratifiedAndSeeded) {
  const DigitSplit& s = digit_split();
  EXPECT_EQ(s.train.size() + s.val.size() + s.test.size(), 1797u);
  std::vector<std::size_t> all = s.train;
  all.insert(all.end(), s.val.begin(), s.val.end());
  all.insert(all.end(), s.test.begin(), s.test.end());
  std::sort(all.begin(), all.end());
  for (std::size_t i = 0; i < all.size(); ++i) ASSERT_EQ(all[i], i);  // a partition of 0..1796
  std::vector<std::size_t> test_counts(10, 0);
  for (const auto i : s.test) ++test_counts[std::size_t(digits().labels[i])];
  for (const auto c : test_counts) EXPECT_NEAR(double(c), 0.2 * 180, 2.0);
  const DigitSplit again = split_digits(digits(), 0.1, 0.2, 7), other = split_digits(digits(), 0.1, 0.2, 8);
  EXPECT_EQ(again.test, s.test);
  EXPECT_NE(other.test, s.test);
  EXPECT_THROW(split_digits(digits(), 0.5, 0.5, 0), ConfigError);
}

TEST(Images, RenderersGiveTheSpecShapeInUnitRange) {
  for (const std::size_t size : {8, 16})
    for (const std::size_t channels : {1, 3}) {
      const ImageSpec spec{size, channels, 0.05};
      Rng rng(1);
      const std::vector<SceneObject> objects = {{ShapeKind::Cross, Colour::Red, 0, 1}};
      for (const auto& img : {render_digit(digits(), 5, spec, {}, rng), render_digit(digits(), 5, spec, {true, Colour::Blue}, rng),
                              render_scene(objects, spec, rng), render_tissue({Colour::Green, 3}, spec, rng)}) {
        EXPECT_EQ(shape_of(img), (Shape{channels, size, size}));
        EXPECT_GE(*std::min_element(img.begin(), img.end()), 0.0f);
        EXPECT_LE(*std::max_element(img.begin(), img.end()), 1.0f);
      }
    }
}

TEST(Images, GlyphsColoursAndSpotsAreExact) {
  const ImageSpec spec{8, 3, 0.0};
  Rng rng(2);
  const std::size_t lit_pixels[] = {9, 5, 8};  // square, cross, ring
  for (std::size_t k = 0; k < n_shape_kinds; ++k) {
    const std::vector<SceneObject> one = {{ShapeKind(k), Colour::Red, 1, 0}};
    const auto img = render_scene(one, spec, rng);
    std::size_t lit = 0;
    for (std::size_t y = 0; y < 8; ++y)
      for (std::size_t x = 0; x < 8; ++x)
        if (img(0, y, x) > 0.5f) {
          ++lit;
          EXPECT_GE(y, 4u);  // row 1 of the grid
          EXPECT_LT(x, 4u);  // column 0
          EXPECT_GT(img(0, y, x), img(1, y, x));  // red beats green and blue
          EXPECT_GT(img(0, y, x), img(2, y, x));
        }
    EXPECT_EQ(lit, lit_pixels[k]);
  }
  for (std::size_t spots = 0; spots <= 3; ++spots) {
    const auto img = render_tissue({Colour::Blue, spots}, ImageSpec{16, 1, 0.0}, rng);
    const auto dark = std::count_if(img.begin(), img.end(), [](float v) { return v < 0.3f; });
    EXPECT_EQ(std::size_t(dark), spots * 9);  // side 16 / 8 + 1 = 3
  }
  EXPECT_THROW(render_scene(std::vector<SceneObject>{{ShapeKind::Ring, Colour::Red, 2, 0}}, spec, rng), ConfigError);
  EXPECT_THROW(render_tissue({Colour::Red, 4}, spec, rng), ConfigError);
  EXPECT_THROW(render_digit(digits(), 5000, spec, {}, rng), IndexError);
  EXPECT_THROW((ImageSpec{12, 3, 0.0}.validate()), ConfigError);
  EXPECT_THROW((ImageSpec{8, 2, 0.0}.validate()), ConfigError);
}

TEST(Images, ViTPretrainingSetIsLabelledBalancedAndSeeded) {
  const PretrainImageConfig config{.image = {8, 3, 0.03}, .n_scenes = 300, .n_tissues = 400, .seed = 4};
  const auto set = vit_pretrain_images(digits(), digit_split().train, config);
  ASSERT_EQ(set.size(), digit_split().train.size() + 700);
  EXPECT_EQ(shape_of(set.images), (Shape{set.size(), 3, 8, 8}));
  EXPECT_EQ(set.class_names.size(), 17u);
  std::vector<std::size_t> counts(17, 0);
  for (const auto l : set.labels) ++counts.at(std::size_t(l));
  for (std::size_t c = 10; c < 13; ++c) EXPECT_NEAR(double(counts[c]), 100.0, 30.0);
  for (std::size_t c = 13; c < 17; ++c) EXPECT_NEAR(double(counts[c]), 100.0, 30.0);
  const auto again = vit_pretrain_images(digits(), digit_split().train, config);
  EXPECT_TRUE(same_tensor(set.images, again.images));
  EXPECT_EQ(set.labels, again.labels);
  const std::vector<std::size_t> rows = {3, 0, 7};
  const auto sub = subset(set, rows);
  EXPECT_EQ(shape_of(sub.images), (Shape{3, 3, 8, 8}));
  EXPECT_EQ(sub.labels[0], set.labels[3]);
  EXPECT_EQ(sub.images(2, 1, 4, 4), set.images(7, 1, 4, 4));
}

// ---- LaVIN ------------------------------------------------------------------------------------------------------
TEST(LavinData, SameSeedSameDataOtherSeedOtherData) {
  const auto a = make_lavin_data(digits(), digit_split(), small_lavin(3));
  const auto b = make_lavin_data(digits(), digit_split(), small_lavin(3));
  const auto c = make_lavin_data(digits(), digit_split(), small_lavin(4));
  EXPECT_TRUE(same_samples(a.train, b.train));
  EXPECT_TRUE(same_samples(a.val, b.val));
  EXPECT_TRUE(same_samples(a.test, b.test));
  EXPECT_FALSE(same_samples(a.train, c.train));
}

TEST(LavinData, SamplesAreWellFormed) {
  const auto data = make_lavin_data(digits(), digit_split(), small_lavin());
  ASSERT_EQ(data.train.size(), 600u);
  ASSERT_EQ(data.val.size(), 100u);
  ASSERT_EQ(data.test.size(), 300u);
  std::size_t with_image = 0, longest = 0;
  for (const auto* part : {&data.train, &data.val, &data.test})
    for (const auto& s : *part) {
      const auto task = LavinTask(s.task);
      EXPECT_EQ(s.has_image(), is_image_task(task)) << sample_text(s);
      if (s.has_image()) {
        EXPECT_EQ(shape_of(s.image), (Shape{3, 8, 8}));
      }
      with_image += s.has_image();
      ASSERT_LT(s.correct, s.choices.size());
      EXPECT_EQ(s.answer[s.answer_index], s.choices[s.correct]);
      EXPECT_EQ(s.answer.back(), token::eos);
      EXPECT_EQ(option_texts(s).size(), s.choices.size()) << sample_text(s);
      for (const auto* ids : {&s.prefix, &s.prompt, &s.answer})
        EXPECT_EQ(std::count(ids->begin(), ids->end(), token::unk), 0);
      longest = std::max(longest, 2 + s.prefix.size() + s.prompt.size() + s.answer.size());  // + <mod> <bos>
    }
  EXPECT_EQ(with_image, 500u);  // image_fraction 0.5 of 1000
  EXPECT_LE(longest, 48u);
  LavinConfig letters = small_lavin();
  letters.answer_style = AnswerStyle::Letter;
  const auto short_answers = make_lavin_data(digits(), digit_split(), letters);
  EXPECT_EQ(short_answers.test[0].answer.size(), 2u);
  EXPECT_EQ(short_answers.test[0].answer_index, 0u);
}

TEST(LavinData, SplitsShareNoDigitNoFactNoScene) {
  const auto data = make_lavin_data(digits(), digit_split(), small_lavin());
  const std::vector<const std::vector<Sample>*> parts = {&data.train, &data.val, &data.test};
  for (const std::string prefix : {"digit ", "fact ", "context "})
    for (std::size_t i = 0; i < 3; ++i)
      for (std::size_t j = i + 1; j < 3; ++j) {
        const auto a = keys_with_prefix(*parts[i], prefix), b = keys_with_prefix(*parts[j], prefix);
        EXPECT_FALSE(a.empty());
        EXPECT_TRUE(disjoint(a, b)) << prefix << " shared between splits " << i << " and " << j;
      }
  const std::set<std::size_t> test_digits(digit_split().test.begin(), digit_split().test.end());
  for (const auto& key : keys_with_prefix(data.test, "digit "))
    EXPECT_TRUE(test_digits.count(std::stoul(key.substr(6)))) << key;
  for (const auto& a : data.train)
    for (const auto& b : data.test)
      if (a.has_image() && b.has_image()) {
        ASSERT_FALSE(same_tensor(a.image, b.image));
      }
}

TEST(LavinData, ImageQuestionsAreAtChanceWithoutTheImage) {
  LavinConfig config = small_lavin(11);
  config.n_train = 8000, config.n_val = 0, config.n_test = 3000, config.image_fraction = 1.0;
  const auto data = make_lavin_data(digits(), digit_split(), config);
  // The strongest text-only guesser we can fit: per task, how often each option text is right when offered
  // (learned on train), then pick the offered option with the best rate.
  std::map<std::pair<std::size_t, std::string>, std::pair<double, double>> rate;  // (task, text) -> (right, offered)
  for (const auto& s : data.train) {
    const auto options = option_texts(s);
    for (std::size_t i = 0; i < options.size(); ++i) {
      auto& r = rate[{s.task, options[i]}];
      r.first += i == s.correct;
      r.second += 1;
    }
  }
  std::vector<double> hits(n_lavin_tasks, 0), seen(n_lavin_tasks, 0), n_options(n_lavin_tasks, 0);
  std::vector<std::vector<double>> letters(n_lavin_tasks, std::vector<double>(4, 0));
  for (const auto& s : data.test) {
    const auto options = option_texts(s);
    std::size_t best = 0;
    double best_rate = -1;
    for (std::size_t i = 0; i < options.size(); ++i) {
      const auto& r = rate[{s.task, options[i]}];
      const double p = r.second > 0 ? r.first / r.second : 0.0;
      if (p > best_rate) best_rate = p, best = i;
    }
    hits[s.task] += best == s.correct;
    seen[s.task] += 1;
    n_options[s.task] = double(options.size());
    letters[s.task][s.correct] += 1;
  }
  for (std::size_t t = 0; t < n_lavin_tasks; ++t) {
    if (!is_image_task(LavinTask(t))) continue;
    ASSERT_GT(seen[t], 300.0);
    const double chance = 1.0 / n_options[t];
    EXPECT_LT(hits[t] / seen[t], chance + 0.08) << lavin_task_name(LavinTask(t));
    for (std::size_t l = 0; l < std::size_t(n_options[t]); ++l)  // the right letter is uniform
      EXPECT_NEAR(letters[t][l] / seen[t], chance, 0.08) << lavin_task_name(LavinTask(t)) << " letter " << l;
  }
}

TEST(LavinData, TextQuestionsAreAnsweredByTheCorpusOrTheContext) {
  const LavinConfig config = small_lavin();
  const auto data = make_lavin_data(digits(), digit_split(), config);
  const auto stream = pretrain_corpus(config, {.repeats = 2, .captions = 50, .seed = 1});
  std::set<std::string> passages;
  std::vector<std::int64_t> current;
  for (const auto id : stream) {
    if (id == token::bos) current.clear();
    else if (id == token::eos) passages.insert(decode(current));
    else current.push_back(id);
  }
  std::size_t checked = 0;
  for (const auto& s : data.test) {
    const auto task = LavinTask(s.task);
    if (is_image_task(task)) continue;
    const std::string question = decode(std::vector<std::int64_t>(s.prompt.begin(), s.prompt.begin() + std::ptrdiff_t(
        std::find(s.prompt.begin(), s.prompt.end(), token_id("?")) - s.prompt.begin() + 1)));
    const std::string right = option_texts(s)[s.correct];
    const std::string context = decode(s.prefix);
    if (task == LavinTask::ContextCount) {
      // "context: there are 2 red shapes and 1 blue shape." asked "how many red shapes are there?"
      const std::string colour = question.substr(9, question.find(' ', 9) - 9);
      const auto at = context.find(" " + colour + " shape");
      ASSERT_NE(at, std::string::npos) << context;
      EXPECT_EQ(context.substr(at - 1, 1), right) << context << " / " << question;
      EXPECT_EQ(passages.count(context.substr(9, context.size() - 10) + ". " + question + " " + right + "."), 0u)
          << "a test context is in the corpus";
    } else {
      EXPECT_EQ(passages.count(question + " " + right + "."), 1u) << question << " " << right;
    }
    ++checked;
  }
  EXPECT_GT(checked, 100u);
  EXPECT_GT(passages.count("3 plus 4 is 7."), 0u);
  EXPECT_GT(passages.count("a cow has 4 legs."), 0u);
}

TEST(LavinData, BadConfigsThrow) {
  LavinConfig c = small_lavin();
  c.tasks = {LavinTask::Arithmetic};
  EXPECT_THROW(make_lavin_data(digits(), digit_split(), c), ConfigError);  // image_fraction 0.5, no image task
  c.image_fraction = 0.0;
  EXPECT_NO_THROW(make_lavin_data(digits(), digit_split(), c));
  c.tasks = {LavinTask::Arithmetic, LavinTask::Arithmetic};
  EXPECT_THROW(make_lavin_data(digits(), digit_split(), c), ConfigError);
  c = small_lavin();
  c.fact_test_fraction = 0.9;
  EXPECT_THROW(make_lavin_data(digits(), digit_split(), c), ConfigError);
  c = small_lavin();
  c.image.size = 10;
  EXPECT_THROW(make_lavin_data(digits(), digit_split(), c), ConfigError);
}

// ---- batches ----------------------------------------------------------------------------------------------------
TEST(Batch, LayoutTargetsAndImages) {
  const auto data = make_lavin_data(digits(), digit_split(), small_lavin());
  const std::vector<std::size_t> rows = {0, 1, 2, 3, 4, 5, 6, 7};
  const auto batch = make_batch<double>(data.test, rows, {.visual_tokens = 6, .modality_slot = true});
  const std::size_t n = rows.size(), t_max = batch.ids.shape()[1];
  ASSERT_EQ(shape_of(batch.targets), shape_of(batch.ids));
  std::size_t n_img = 0;
  for (std::size_t b = 0; b < n; ++b) {
    const Sample& s = data.test[rows[b]];
    const std::size_t len = batch.key_lengths[b];
    EXPECT_EQ(len, 2 + s.prefix.size() + (s.has_image() ? 6 : 0) + s.prompt.size() + s.answer.size());
    EXPECT_EQ(batch.ids(b, 0), token::mod);
    EXPECT_EQ(batch.ids(b, 1), token::bos);
    EXPECT_EQ(batch.modality(b), s.has_image() ? 1 : 0);
    const std::size_t slots = std::size_t(std::count(&batch.ids(b, 0), &batch.ids(b, 0) + t_max, token::img));
    EXPECT_EQ(slots, s.has_image() ? 6u : 0u);
    for (std::size_t t = len; t < t_max; ++t) EXPECT_EQ(batch.ids(b, t), token::pad);
    for (std::size_t t = 0; t < t_max; ++t) {
      const bool answer_next = t + 1 >= batch.answer_start[b] && t + 1 < len;
      EXPECT_EQ(batch.targets(b, t), answer_next ? batch.ids(b, t + 1) : ignore_label) << "row " << b << " t " << t;
    }
    EXPECT_EQ(batch.targets(b, batch.decide_pos[b]), batch.choices[b][batch.correct[b]]);
    EXPECT_EQ(batch.task[b], s.task);
    if (s.has_image()) {
      ASSERT_LT(n_img, batch.image_rows.size());
      EXPECT_EQ(batch.image_rows[n_img], b);
      EXPECT_EQ(batch.visual_start[n_img], 2 + s.prefix.size());
      EXPECT_EQ(batch.ids(b, batch.visual_start[n_img]), token::img);
      EXPECT_EQ(batch.images(n_img, 2, 5, 3), double(s.image(2, 5, 3)));
      ++n_img;
    }
  }
  EXPECT_EQ(n_img, batch.image_rows.size());
  EXPECT_EQ(batch.images.shape()[0], n_img);
  ASSERT_GT(n_img, 0u);

  const auto text_only = make_batch(data.test, rows, {});
  EXPECT_EQ(text_only.images.size(), 0u);
  EXPECT_TRUE(text_only.image_rows.empty());
  EXPECT_EQ(std::count(text_only.ids.begin(), text_only.ids.end(), token::img), 0);
  EXPECT_EQ(std::count(text_only.modality.begin(), text_only.modality.end(), 1), 0);
  EXPECT_EQ(text_only.ids(0, 0), token::bos);
}

TEST(Batch, Errors) {
  auto data = make_lavin_data(digits(), digit_split(), small_lavin());
  const std::vector<std::size_t> bad_row = {0, 100000};
  EXPECT_THROW(make_batch(data.test, bad_row, {}), IndexError);
  data.test[0].correct = (data.test[0].correct + 1) % data.test[0].choices.size();
  const std::vector<std::size_t> first = {0};
  EXPECT_THROW(make_batch(data.test, first, {}), ConfigError);
  EXPECT_THROW(make_batch(data.test, std::vector<std::size_t>{}, {}), ConfigError);
  EXPECT_THROW(minibatches(10, 0), ConfigError);
}

TEST(Batch, MinibatchesAndLanguageModelWindows) {
  Rng rng(3);
  const auto parts = minibatches(10, 4, &rng);
  ASSERT_EQ(parts.size(), 3u);
  EXPECT_EQ(parts[2].size(), 2u);
  std::vector<std::size_t> all;
  for (const auto& p : parts) all.insert(all.end(), p.begin(), p.end());
  std::sort(all.begin(), all.end());
  for (std::size_t i = 0; i < 10; ++i) EXPECT_EQ(all[i], i);
  EXPECT_EQ(minibatches(5, 2)[0], (std::vector<std::size_t>{0, 1}));

  const auto stream = pretrain_corpus(small_lavin(), {.repeats = 1, .captions = 10, .seed = 0});
  EXPECT_EQ(std::count(stream.begin(), stream.end(), token::unk), 0);
  const auto lm = lm_batch(stream, 4, 16, rng);
  EXPECT_EQ(shape_of(lm.ids), (Shape{4, 16}));
  for (std::size_t b = 0; b < 4; ++b)
    for (std::size_t t = 0; t + 1 < 16; ++t) EXPECT_EQ(lm.targets(b, t), lm.ids(b, t + 1));
  EXPECT_THROW(lm_batch(std::vector<std::int64_t>(8, 1), 2, 8, rng), ConfigError);
}

// ---- MoLE -------------------------------------------------------------------------------------------------------
TEST(MoleData, DeterministicSizedAndSplitByDigit) {
  MoleConfig config;
  config.train_sizes = {300, 200, 100}, config.test_size = 150, config.seed = 2;
  const auto a = make_mole_data(digits(), digit_split(), config), b = make_mole_data(digits(), digit_split(), config);
  for (std::size_t d = 0; d < n_domains; ++d) {
    EXPECT_TRUE(same_samples(a.train[d], b.train[d]));
    EXPECT_TRUE(same_samples(a.test[d], b.test[d]));
    EXPECT_EQ(a.train[d].size(), config.train_sizes[d]);
    EXPECT_EQ(a.test[d].size(), 150u);
    for (const auto& s : a.test[d]) {
      EXPECT_EQ(s.domain, d);
      EXPECT_EQ(s.answer.size(), 2u);
      EXPECT_EQ(s.answer[s.answer_index], s.choices[s.correct]);
    }
  }
  EXPECT_EQ(a.mixed_train().size(), 600u);
  EXPECT_TRUE(disjoint(keys_with_prefix(a.train[1], "digit "), keys_with_prefix(a.test[1], "digit ")));
  config.seed = 3;
  EXPECT_FALSE(same_samples(make_mole_data(digits(), digit_split(), config).train[0], a.train[0]));
}

TEST(MoleData, SameWordsDifferentRules) {
  MoleConfig config;
  config.train_sizes = {200, 200, 200}, config.test_size = 50;
  const auto data = make_mole_data(digits(), digit_split(), config);
  std::map<std::size_t, std::set<std::vector<std::int64_t>>> prompts;  // question -> prompts over all domains
  for (const auto& part : data.train)
    for (const auto& s : part) prompts[s.task].insert(s.prompt);
  ASSERT_EQ(prompts.size(), n_mole_questions);
  for (const auto& [q, set] : prompts) EXPECT_EQ(set.size(), 1u) << "the text must not reveal the domain";
  // Conflicting rules (the default): every question's answer depends on the domain for the same picture content.
  EXPECT_EQ(mole_answer(Domain::General, MoleQuestion::Number, 2, Colour::Red), "2");
  EXPECT_EQ(mole_answer(Domain::Document, MoleQuestion::Number, 2, Colour::Red), "2");
  EXPECT_EQ(mole_answer(Domain::Medical, MoleQuestion::Number, 2, Colour::Red), "1");  // health score 3 - spots
  EXPECT_EQ(mole_answer(Domain::General, MoleQuestion::High, 2, Colour::Red), "no");
  EXPECT_EQ(mole_answer(Domain::Document, MoleQuestion::High, 2, Colour::Red), "no");
  EXPECT_EQ(mole_answer(Domain::Medical, MoleQuestion::High, 1, Colour::Red), "yes");  // score 2 >= 2
  EXPECT_EQ(mole_answer(Domain::Medical, MoleQuestion::High, 2, Colour::Red), "no");
  EXPECT_EQ(mole_answer(Domain::General, MoleQuestion::High, 3, Colour::Red), "yes");
  EXPECT_EQ(mole_answer(Domain::Document, MoleQuestion::High, 3, Colour::Red), "no");
  EXPECT_EQ(mole_answer(Domain::General, MoleQuestion::Colour, 1, Colour::Red), "red");
  EXPECT_EQ(mole_answer(Domain::Document, MoleQuestion::Colour, 1, Colour::Red), "green");
  EXPECT_EQ(mole_answer(Domain::Medical, MoleQuestion::Colour, 1, Colour::Red), "blue");
  EXPECT_EQ(mole_answer(Domain::Medical, MoleQuestion::Colour, 1, Colour::Blue), "green");
  // Consistent rules (the control): true counts and colour names; only the thresholds of "is it high ?" differ.
  for (std::size_t d = 0; d < n_domains; ++d) {
    EXPECT_EQ(mole_answer(Domain(d), MoleQuestion::Number, 2, Colour::Red, false), "2");
    EXPECT_EQ(mole_answer(Domain(d), MoleQuestion::Colour, 2, Colour::Green, false), "green");
  }
  EXPECT_EQ(mole_answer(Domain::General, MoleQuestion::High, 2, Colour::Red, false), "no");
  EXPECT_EQ(mole_answer(Domain::Medical, MoleQuestion::High, 2, Colour::Red, false), "yes");
  // Generated data: the same seed draws the same pictures under both rule sets; exactly the answers that the
  // rules change differ (colour outside general, the number in medical), the rest are equal.
  config.conflicting = false;
  const auto consistent = make_mole_data(digits(), digit_split(), config);
  for (std::size_t d = 0; d < n_domains; ++d) {
    ASSERT_EQ(data.train[d].size(), consistent.train[d].size());
    for (std::size_t i = 0; i < data.train[d].size(); ++i) {
      const auto& a = data.train[d][i];
      const auto& b = consistent.train[d][i];
      ASSERT_EQ(a.task, b.task);
      ASSERT_EQ(a.image, b.image);
      const bool changed = (a.task == std::size_t(MoleQuestion::Colour) && d > 0) ||
                           (a.task == std::size_t(MoleQuestion::Number) && Domain(d) == Domain::Medical);
      if (a.task != std::size_t(MoleQuestion::High)) {
        EXPECT_EQ(a.answer != b.answer, changed) << d << " " << i;
      }
    }
  }
  config.conflicting = true;
  config.name_domain = true;
  const auto named = make_mole_data(digits(), digit_split(), config);
  EXPECT_EQ(decode(named.train[2][0].prompt).substr(0, 8), "tissue: ");
  EXPECT_NE(named.train[0][0].prompt, named.train[1][0].prompt);
}

TEST(MoleData, AnswersAreBalancedGivenTheTextAndDomainsAreVisible) {
  MoleConfig config;
  config.train_sizes = {1500, 1500, 1500}, config.test_size = 300, config.name_domain = true, config.seed = 9;
  const auto data = make_mole_data(digits(), digit_split(), config);
  for (std::size_t d = 0; d < n_domains; ++d) {
    // prompt -> (question, answer -> count); the best text-only guess is the most frequent answer of a prompt
    std::map<std::vector<std::int64_t>, std::pair<std::size_t, std::map<std::int64_t, double>>> answers;
    for (const auto& s : data.train[d]) {
      answers[s.prompt].first = s.task;
      answers[s.prompt].second[s.answer[0]] += 1;
    }
    EXPECT_EQ(answers.size(), n_mole_questions);
    for (const auto& [prompt, entry] : answers) {
      const auto& [task, counts] = entry;
      double total = 0, top = 0;
      for (const auto& [a, c] : counts) total += c, top = std::max(top, c);
      const auto [lo, hi] = domain_value_range(Domain(d));
      const double k = task == std::size_t(MoleQuestion::Number) ? double(hi - lo + 1)
                       : task == std::size_t(MoleQuestion::High) ? 2.0
                                                                 : 3.0;
      EXPECT_EQ(double(counts.size()), k) << domain_name(Domain(d)) << ": " << decode(prompt);
      EXPECT_LT(top / total, 1.0 / k + 0.08) << domain_name(Domain(d)) << ": " << decode(prompt);
    }
  }
  // 1-nearest neighbour on the per-channel means: the domain is plain from the picture.
  const auto means = [](const Tensor<float>& img) {
    std::array<double, 3> m{};
    for (std::size_t c = 0; c < 3; ++c)
      for (std::size_t i = 0; i < 64; ++i) m[c] += img.data()[c * 64 + i] / 64.0;
    return m;
  };
  std::vector<std::pair<std::array<double, 3>, std::size_t>> reference;
  for (std::size_t d = 0; d < n_domains; ++d)
    for (const auto& s : data.train[d]) reference.emplace_back(means(s.image), d);
  double right = 0, total = 0;
  for (std::size_t d = 0; d < n_domains; ++d)
    for (const auto& s : data.test[d]) {
      const auto m = means(s.image);
      std::size_t best = 0;
      double best_dist = 1e9;
      for (const auto& [r, e] : reference) {
        const double dist = (m[0] - r[0]) * (m[0] - r[0]) + (m[1] - r[1]) * (m[1] - r[1]) + (m[2] - r[2]) * (m[2] - r[2]);
        if (dist < best_dist) best_dist = dist, best = e;
      }
      right += best == d;
      total += 1;
    }
  EXPECT_GT(right / total, 0.98);
}

TEST(MoleData, CaptionsDescribeThePictures) {
  MoleConfig config;
  const auto caps = mole_captions(digits(), digit_split().train, config, 5);
  ASSERT_EQ(caps.size(), 15u);
  EXPECT_EQ(decode(caps[0].answer).substr(0, 12), "a scene with");
  EXPECT_EQ(decode(caps[5].answer).substr(0, 21), "a page with the digit");
  EXPECT_NE(decode(caps[10].answer).find("tissue with"), std::string::npos);
  for (const auto& s : caps) {
    EXPECT_TRUE(s.prompt.empty());
    EXPECT_TRUE(s.choices.empty());
    EXPECT_EQ(s.task, mole_caption_task);
  }
  const auto batch = make_batch(caps, std::vector<std::size_t>{0, 5}, {.visual_tokens = 4});
  EXPECT_EQ(batch.image_rows.size(), 2u);
  EXPECT_THROW(make_mole_data(digits(), digit_split(), MoleConfig{.image = {8, 3, 0.0}, .test_size = 0}), ConfigError);
}
