// examples/common/batch.hpp — instruction samples and the padded batches the models consume.
//
// A Sample is model-independent text plus an optional image:
//   prefix   tokens before the image slot (LaVIN's context)
//   prompt   tokens after it (question, options, "answer :")
//   answer   supervised tokens, ending in <eos>; answer[answer_index] decides correctness, and it is
//            choices[correct] (the option letter, or the word or digit of an open answer)
// make_batch lays every row out as
//   [<mod>]  <bos>  prefix  [<img> x V]  prompt  answer  <pad> ...
// with <mod> only when modality_slot is set (LaVIN's modality token goes there) and the V = visual_tokens image
// slots only for samples with an image when V > 0. V = 0 drops every image: all rows become text-only (the
// "text only" rung of the LaVIN ladder). The model overwrites the embeddings of the <mod> and <img> slots.
// Targets are already shifted for next-token prediction (cross_entropy_forward(logits [B, T, V], targets)):
//   targets[b, t] = ids[b, t + 1]   when position t + 1 holds an answer token
//   targets[b, t] = -100            everywhere else (prefix, image slots, prompt, padding, the last position)
// decide_pos[b] is the t whose logits predict the deciding token (targets[b, t] == choices[b][correct[b]]):
// accuracy = argmax over choices[b] of logits[b, decide_pos[b], :] == correct[b].
// lm_batch cuts random windows from a token stream for language-model pre-training (every target valid).
// Shapes: B rows, T = longest row, V visual tokens per image, B_img rows with an image; images [B_img, C, S, S].
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "images.hpp"
#include "tokenizer.hpp"
#include "mixpeft/core/error.hpp"
#include "mixpeft/core/rng.hpp"
#include "mixpeft/core/tensor.hpp"

namespace mixpeft::data {

inline constexpr std::int64_t ignore_label = -100;

struct Sample {
  Tensor<float> image = zeros<float>({0});  // [C, S, S]; shape {0} when the sample is text-only
  std::vector<std::int64_t> prefix, prompt, answer;
  std::size_t answer_index = 0;           // answer[answer_index] decides correctness
  std::vector<std::int64_t> choices;      // tokens competing at that position (empty: nothing to score)
  std::size_t correct = 0;                // choices[correct] == answer[answer_index]
  std::size_t task = 0;                   // question family (LavinTask / MoleQuestion)
  std::size_t domain = 0;                 // MoLE domain (0 for LaVIN)
  std::string key;                        // what the sample is made from ("digit 17", "fact 3 plus 4", ...)

  bool has_image() const { return image.dimension() == 3 && image.size() > 0; }
};

// The sample as one line of text; the image slot shows as "<img>" when the sample has an image.
inline std::string sample_text(const Sample& s) {
  std::vector<std::int64_t> ids{token::bos};
  ids.insert(ids.end(), s.prefix.begin(), s.prefix.end());
  if (s.has_image()) ids.push_back(token::img);
  ids.insert(ids.end(), s.prompt.begin(), s.prompt.end());
  ids.insert(ids.end(), s.answer.begin(), s.answer.end());
  return decode(ids);
}

struct BatchOptions {
  std::size_t visual_tokens = 0;  // V: <img> slots per image; 0 gives the model no image at all
  bool modality_slot = false;     // <mod> at position 0 (LaVIN)
};

template <class T = float>
struct Batch {
  Tensor<std::int64_t> ids;                  // [B, T], right-padded with <pad>
  Tensor<std::int64_t> targets;              // [B, T], shifted; -100 outside the answers
  std::vector<std::size_t> key_lengths;      // [B] tokens before the padding (AttentionMask::key_lengths)
  Tensor<std::int64_t> modality;             // [B] 1 when the row carries an image, else 0 (LaVIN's t_m row)
  Tensor<T> images;                          // [B_img, C, S, S]; shape {0} when no row has an image
  std::vector<std::size_t> image_rows;       // [B_img] the batch row of each image
  std::vector<std::size_t> visual_start;     // [B_img] that row's first <img> slot
  std::vector<std::size_t> answer_start;     // [B] position of the first answer token
  std::vector<std::size_t> decide_pos;       // [B] logits here predict the deciding token
  std::vector<std::vector<std::int64_t>> choices;  // [B] as in the samples
  std::vector<std::size_t> correct, task, domain;  // [B]
};

// Lays out samples[rows] (see the top of the file). Errors: a row out of range (IndexError); an empty answer, an
// inconsistent answer_index / choices / correct, or images of different shapes (ConfigError).
template <class T = float>
Batch<T> make_batch(std::span<const Sample> samples, std::span<const std::size_t> rows, const BatchOptions& options) {
  require<ConfigError>(!rows.empty(), "make_batch: no rows");
  std::vector<std::vector<std::int64_t>> seqs;
  Batch<T> batch;
  Shape image_shape;
  for (std::size_t b = 0; b < rows.size(); ++b) {
    require<IndexError>(rows[b] < samples.size(), "make_batch: row ", rows[b], " is outside [0, ", samples.size(), ")");
    const Sample& s = samples[rows[b]];
    require<ConfigError>(!s.answer.empty() && s.answer_index < s.answer.size(), "make_batch: sample ", rows[b],
                         " has answer_index ", s.answer_index, " but ", s.answer.size(), " answer tokens");
    require<ConfigError>(s.choices.empty() || (s.correct < s.choices.size() && s.choices[s.correct] == s.answer[s.answer_index]),
                         "make_batch: sample ", rows[b], ": choices[correct] is not the deciding answer token");
    std::vector<std::int64_t> seq;
    if (options.modality_slot) seq.push_back(token::mod);
    seq.push_back(token::bos);
    seq.insert(seq.end(), s.prefix.begin(), s.prefix.end());
    const bool with_image = s.has_image() && options.visual_tokens > 0;
    if (with_image) {
      const Shape shape = shape_of(s.image);
      if (image_shape.empty()) image_shape = shape;
      require<ConfigError>(shape == image_shape, "make_batch: sample ", rows[b], " has an image of shape ",
                           shape_string(shape), " but an earlier one has ", shape_string(image_shape));
      batch.image_rows.push_back(b);
      batch.visual_start.push_back(seq.size());
      seq.insert(seq.end(), options.visual_tokens, token::img);
    }
    seq.insert(seq.end(), s.prompt.begin(), s.prompt.end());
    batch.answer_start.push_back(seq.size());
    batch.decide_pos.push_back(seq.size() + s.answer_index - 1);
    seq.insert(seq.end(), s.answer.begin(), s.answer.end());
    batch.key_lengths.push_back(seq.size());
    batch.choices.push_back(s.choices);
    batch.correct.push_back(s.correct);
    batch.task.push_back(s.task);
    batch.domain.push_back(s.domain);
    seqs.push_back(std::move(seq));
  }
  const std::size_t n = rows.size(), t_max = *std::max_element(batch.key_lengths.begin(), batch.key_lengths.end());
  batch.ids = zeros<std::int64_t>({n, t_max});  // <pad> is id 0
  batch.targets = empty<std::int64_t>({n, t_max});
  batch.targets.fill(ignore_label);
  batch.modality = zeros<std::int64_t>({n});
  for (std::size_t b = 0; b < n; ++b) {
    std::copy(seqs[b].begin(), seqs[b].end(), batch.ids.data() + b * t_max);
    for (std::size_t t = batch.answer_start[b]; t < seqs[b].size(); ++t)
      batch.targets.data()[b * t_max + t - 1] = seqs[b][t];
  }
  if (batch.image_rows.empty()) {
    batch.images = zeros<T>({0});
    return batch;
  }
  Shape shape = image_shape;
  shape.insert(shape.begin(), batch.image_rows.size());
  batch.images = empty<T>(shape);
  const std::size_t stride = samples[rows[batch.image_rows[0]]].image.size();
  for (std::size_t i = 0; i < batch.image_rows.size(); ++i) {
    const std::size_t b = batch.image_rows[i];
    batch.modality.data()[b] = 1;
    const float* src = samples[rows[b]].image.data();
    std::transform(src, src + stride, batch.images.data() + i * stride, [](float v) { return static_cast<T>(v); });
  }
  return batch;
}

// Row indices 0..n-1 cut into batches of `batch_size` (the last may be shorter), shuffled when `rng` is given.
inline std::vector<std::vector<std::size_t>> minibatches(std::size_t n, std::size_t batch_size, Rng* rng = nullptr) {
  require<ConfigError>(batch_size > 0, "minibatches: batch_size must be > 0");
  std::vector<std::size_t> order(n);
  for (std::size_t i = 0; i < n; ++i) order[i] = i;
  if (rng) detail::shuffle(order, *rng);
  std::vector<std::vector<std::size_t>> out;
  for (std::size_t i = 0; i < n; i += batch_size)
    out.emplace_back(order.begin() + std::ptrdiff_t(i), order.begin() + std::ptrdiff_t(std::min(n, i + batch_size)));
  return out;
}

struct LmBatch {
  Tensor<std::int64_t> ids;      // [B, T] stream[s .. s + T)
  Tensor<std::int64_t> targets;  // [B, T] stream[s + 1 .. s + T + 1)
};

// B windows of T tokens at uniformly random starts of `stream` (ConfigError when the stream is not longer than T).
inline LmBatch lm_batch(std::span<const std::int64_t> stream, std::size_t batch, std::size_t length, Rng& rng) {
  require<ConfigError>(batch > 0 && length > 0 && stream.size() > length, "lm_batch: cannot cut ", batch, " windows of ",
                       length, " tokens from a stream of ", stream.size());
  LmBatch out{empty<std::int64_t>({batch, length}), empty<std::int64_t>({batch, length})};
  for (std::size_t b = 0; b < batch; ++b) {
    const std::size_t s = rng.below(stream.size() - length);
    std::copy_n(stream.begin() + std::ptrdiff_t(s), length, out.ids.data() + b * length);
    std::copy_n(stream.begin() + std::ptrdiff_t(s + 1), length, out.targets.data() + b * length);
  }
  return out;
}

}  // namespace mixpeft::data
