// examples/common/images.hpp — the images of the example programs: real handwritten digits and drawn pictures.
//
// Digits: the UCI handwritten digits (1,797 grey images, 8 x 8, 17 levels) as scikit-learn ships them, converted by
// tools/make_digits.py into data/digits_images.npy [1797, 8, 8] float32 in [0, 1] and data/digits_labels.npy
// [1797] int64 in 0..9. load_digits(dir) reads them; split_digits cuts a seeded split stratified by label.
// Drawn pictures (every random choice from a seeded mixpeft::Rng, so a seed fixes every pixel):
//   scene    black canvas cut into a grid of 4 x 4-pixel cells; each object is a 3 x 3 glyph (square: full,
//            cross: plus sign, ring: square without its centre) in one colour, brightness 0.8-1.0; the whole
//            scene is shifted by 0 or 1 pixel in each direction, so glyphs never touch
//   digit    a UCI digit upscaled (nearest) to S x S: "plain" = light ink on black, "paper" = dark or coloured
//            ink on off-white paper
//   tissue   pastel stain (its colour) with a smooth sinusoidal texture and 0-3 dark square spots
// Colours: red, green, blue. With C = 3 they are RGB; with C = 1 each is a grey level (0.35, 0.65, 0.95 on dark
// backgrounds, one minus that on light ones), so colour questions stay answerable in grey.
// Every image gets Gaussian pixel noise (ImageSpec::noise) and is clamped to [0, 1].
// Captions (scene_caption, page_caption, tissue_caption) state a picture's content in the vocabulary of
// tokenizer.hpp: "a scene with 3 red shapes .", "a page with the digit 7 in blue ink .", "a red tissue with 2 spots .".
// ViT pre-training set (vit_pretrain_images): 17 classes, 0-9 the digit (plain or paper style, any ink),
// 10-12 the shape kind of a one-kind scene, 13-16 the number of spots on a tissue. Colours, object counts and
// positions in scenes are deliberately not labels: the frozen encoder is imperfect for them, which leaves room
// for LaVIN's joint optimisation (adapters inside the ViT) to help.
// Shapes: S image size (multiple of 8), C channels (1 or 3), N images; an image is [C, S, S], a set [N, C, S, S].
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "mixpeft/core/error.hpp"
#include "mixpeft/core/rng.hpp"
#include "mixpeft/core/tensor.hpp"
#include "mixpeft/io/npy.hpp"

namespace mixpeft::data {

// ---- seeded helpers shared by the data generators ---------------------------------------------------------------
namespace detail {

// A seed for an independent stream named by `tag` (splitmix64 of the seed and an FNV-1a hash of the tag).
inline std::uint64_t derive_seed(std::uint64_t seed, std::string_view tag) {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (const char c : tag) h = (h ^ std::uint64_t(static_cast<unsigned char>(c))) * 0x100000001b3ULL;
  std::uint64_t z = seed + h + 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

template <class V>
void shuffle(V& v, Rng& rng) {
  for (std::size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[rng.below(i)]);
}

}  // namespace detail

// ---- image geometry ---------------------------------------------------------------------------------------------
struct ImageSpec {
  std::size_t size = 8;      // S: a multiple of 8 (digits upscale by S / 8; scenes have (S / 4)^2 cells)
  std::size_t channels = 3;  // C: 1 (grey) or 3 (RGB)
  double noise = 0.03;       // standard deviation of the pixel noise

  void validate() const {
    require<ConfigError>(size >= 8 && size % 8 == 0, "ImageSpec: size must be a positive multiple of 8 (got ", size,
                         ")");
    require<ConfigError>(channels == 1 || channels == 3, "ImageSpec: channels must be 1 or 3 (got ", channels, ")");
    require<ConfigError>(noise >= 0.0 && noise <= 0.5, "ImageSpec: noise must be in [0, 0.5] (got ", noise, ")");
  }
  std::size_t grid() const { return size / 4; }  // scene cells per row and column
  Shape shape() const { return {channels, size, size}; }
};

enum class Colour : std::uint8_t { Red, Green, Blue };
inline constexpr std::size_t n_colours = 3;
inline std::string_view colour_name(Colour c) {
  static constexpr std::string_view names[] = {"red", "green", "blue"};
  return names[std::size_t(c)];
}

enum class ShapeKind : std::uint8_t { Square, Cross, Ring };
inline constexpr std::size_t n_shape_kinds = 3;
inline std::string_view shape_name(ShapeKind s) {
  static constexpr std::string_view names[] = {"square", "cross", "ring"};
  return names[std::size_t(s)];
}

namespace detail {

using Paint = std::array<float, 3>;  // channel values (only the first is used when C = 1)

inline Paint colour_paint(Colour c, std::size_t channels, bool light_background) {
  static constexpr Paint rgb[] = {{0.95f, 0.15f, 0.10f}, {0.15f, 0.85f, 0.20f}, {0.15f, 0.35f, 0.95f}};
  static constexpr float grey[] = {0.35f, 0.65f, 0.95f};
  if (channels == 3) return rgb[std::size_t(c)];
  const float g = light_background ? 1.0f - grey[std::size_t(c)] : grey[std::size_t(c)];
  return {g, g, g};
}

inline Tensor<float> canvas(const ImageSpec& spec, const Paint& background) {
  Tensor<float> img = empty<float>(spec.shape());
  const std::size_t plane = spec.size * spec.size;
  for (std::size_t c = 0; c < spec.channels; ++c) std::fill_n(img.data() + c * plane, plane, background[c]);
  return img;
}

// img[:, y, x] = (1 - alpha) img[:, y, x] + alpha paint
inline void blend(Tensor<float>& img, std::size_t y, std::size_t x, const Paint& paint, float alpha) {
  const std::size_t s = img.shape()[1];
  for (std::size_t c = 0; c < img.shape()[0]; ++c) {
    float& v = img.data()[(c * s + y) * s + x];
    v = (1.0f - alpha) * v + alpha * paint[c];
  }
}

inline void add_noise(Tensor<float>& img, double stddev, Rng& rng) {
  for (auto& v : img) v = std::clamp(v + float(rng.normal(0.0, stddev)), 0.0f, 1.0f);
}

// 3 x 3 glyph masks, row-major.
inline bool glyph_pixel(ShapeKind s, std::size_t y, std::size_t x) {
  switch (s) {
    case ShapeKind::Square: return true;
    case ShapeKind::Cross: return y == 1 || x == 1;
    case ShapeKind::Ring: return !(y == 1 && x == 1);
  }
  return false;
}

}  // namespace detail

// ---- the UCI digits ---------------------------------------------------------------------------------------------
struct Digits {
  Tensor<float> images;               // [N, 8, 8] in [0, 1]
  std::vector<std::int64_t> labels;   // [N] in 0..9
  std::size_t size() const { return labels.size(); }
};

// Reads digits_images.npy and digits_labels.npy from `data_dir` (IoError when missing, FormatError when malformed).
inline Digits load_digits(const std::filesystem::path& data_dir) {
  Digits d;
  d.images = load_npy<float>(data_dir / "digits_images.npy");
  const Tensor<std::int64_t> labels = load_npy<std::int64_t>(data_dir / "digits_labels.npy");
  require<FormatError>(d.images.dimension() == 3 && d.images.shape()[1] == 8 && d.images.shape()[2] == 8,
                       "load_digits: images have shape ", shape_string(d.images.shape()), ", expected [N, 8, 8]");
  require<FormatError>(labels.dimension() == 1 && labels.shape()[0] == d.images.shape()[0], "load_digits: labels have shape ",
                       shape_string(labels.shape()), ", expected [", d.images.shape()[0], "]");
  d.labels.assign(labels.begin(), labels.end());
  for (std::size_t i = 0; i < d.labels.size(); ++i)
    require<FormatError>(d.labels[i] >= 0 && d.labels[i] <= 9, "load_digits: label ", d.labels[i], " at index ", i,
                         " is not a digit");
  return d;
}

struct DigitSplit {
  std::vector<std::size_t> train, val, test;  // indices into Digits, ascending
};

// Per label, a seeded shuffle puts round(test_fraction n) images in test, round(val_fraction n) in val, the rest in
// train (n = images of that label), so every split has about the same label mix.
inline DigitSplit split_digits(const Digits& digits, double val_fraction, double test_fraction, std::uint64_t seed) {
  require<ConfigError>(val_fraction >= 0.0 && test_fraction > 0.0 && val_fraction + test_fraction < 1.0,
                       "split_digits: need val_fraction >= 0, test_fraction > 0 and their sum < 1 (got ", val_fraction,
                       ", ", test_fraction, ")");
  Rng rng(detail::derive_seed(seed, "digit split"));
  DigitSplit split;
  for (std::int64_t label = 0; label <= 9; ++label) {
    std::vector<std::size_t> idx;
    for (std::size_t i = 0; i < digits.size(); ++i)
      if (digits.labels[i] == label) idx.push_back(i);
    detail::shuffle(idx, rng);
    const auto n_test = std::size_t(std::lround(test_fraction * double(idx.size())));
    const auto n_val = std::size_t(std::lround(val_fraction * double(idx.size())));
    for (std::size_t k = 0; k < idx.size(); ++k)
      (k < n_test ? split.test : k < n_test + n_val ? split.val : split.train).push_back(idx[k]);
  }
  for (auto* part : {&split.train, &split.val, &split.test}) std::sort(part->begin(), part->end());
  return split;
}

// ---- renderers ------------------------------------------------------------------------------------------------
struct DigitStyle {
  bool paper = false;              // false: light ink on black; true: ink on off-white paper
  std::optional<Colour> ink = {};  // none: white ink (plain) or black ink (paper)
};

inline Tensor<float> render_digit(const Digits& digits, std::size_t index, const ImageSpec& spec, const DigitStyle& style,
                                  Rng& rng) {
  spec.validate();
  require<IndexError>(index < digits.size(), "render_digit: index ", index, " is outside [0, ", digits.size(), ")");
  const float tone = float(rng.uniform(0.85, 0.97)), strength = float(rng.uniform(0.8, 1.0));
  const detail::Paint background = style.paper ? detail::Paint{tone, tone, tone - 0.04f} : detail::Paint{0, 0, 0};
  const float plain = style.paper ? 0.0f : 1.0f;
  const detail::Paint ink = style.ink ? detail::colour_paint(*style.ink, spec.channels, style.paper)
                                      : detail::Paint{plain, plain, plain};
  Tensor<float> img = detail::canvas(spec, background);
  const std::size_t f = spec.size / 8;
  const float* src = digits.images.data() + index * 64;
  for (std::size_t y = 0; y < spec.size; ++y)
    for (std::size_t x = 0; x < spec.size; ++x) detail::blend(img, y, x, ink, strength * src[(y / f) * 8 + x / f]);
  detail::add_noise(img, spec.noise, rng);
  return img;
}

struct SceneObject {
  ShapeKind shape = ShapeKind::Square;
  Colour colour = Colour::Red;
  std::size_t row = 0, col = 0;  // grid cell, each < spec.grid()
};

inline Tensor<float> render_scene(std::span<const SceneObject> objects, const ImageSpec& spec, Rng& rng) {
  spec.validate();
  Tensor<float> img = detail::canvas(spec, {0, 0, 0});
  const std::size_t dy = rng.below(2), dx = rng.below(2);  // one shift for the whole scene keeps glyphs apart
  for (const auto& o : objects) {
    require<ConfigError>(o.row < spec.grid() && o.col < spec.grid(), "render_scene: cell (", o.row, ", ", o.col,
                         ") is outside the ", spec.grid(), " x ", spec.grid(), " grid");
    const std::size_t y0 = 4 * o.row + dy, x0 = 4 * o.col + dx;
    const float alpha = float(rng.uniform(0.8, 1.0));
    const detail::Paint paint = detail::colour_paint(o.colour, spec.channels, false);
    for (std::size_t y = 0; y < 3; ++y)
      for (std::size_t x = 0; x < 3; ++x)
        if (detail::glyph_pixel(o.shape, y, x)) detail::blend(img, y0 + y, x0 + x, paint, alpha);
  }
  detail::add_noise(img, spec.noise, rng);
  return img;
}

// `n` distinct cells of the spec's grid in random order (ConfigError when the grid has fewer).
inline std::vector<std::pair<std::size_t, std::size_t>> random_cells(std::size_t n, const ImageSpec& spec, Rng& rng) {
  const std::size_t g = spec.grid();
  require<ConfigError>(n <= g * g, "random_cells: ", n, " objects do not fit a ", g, " x ", g, " grid");
  std::vector<std::size_t> cells(g * g);
  for (std::size_t i = 0; i < cells.size(); ++i) cells[i] = i;
  detail::shuffle(cells, rng);
  std::vector<std::pair<std::size_t, std::size_t>> out;
  for (std::size_t i = 0; i < n; ++i) out.emplace_back(cells[i] / g, cells[i] % g);
  return out;
}

struct Tissue {
  Colour stain = Colour::Red;
  std::size_t spots = 0;  // 0..3 dark spots of side S / 8 + 1, at least one pixel apart
};

inline Tensor<float> render_tissue(const Tissue& tissue, const ImageSpec& spec, Rng& rng) {
  spec.validate();
  require<ConfigError>(tissue.spots <= 3, "render_tissue: at most 3 spots (got ", tissue.spots, ")");
  const detail::Paint tint = detail::colour_paint(tissue.stain, spec.channels, false);
  detail::Paint background{};
  for (std::size_t c = 0; c < 3; ++c) background[c] = spec.channels == 3 ? 0.55f + 0.4f * tint[c] : 0.45f + 0.4f * tint[c];
  Tensor<float> img = detail::canvas(spec, background);
  const std::size_t s = spec.size, plane = s * s;
  const double fy = rng.uniform(0.6, 1.6), fx = rng.uniform(0.6, 1.6);
  const double py = rng.uniform(0.0, 6.3), px = rng.uniform(0.0, 6.3);
  for (std::size_t y = 0; y < s; ++y)
    for (std::size_t x = 0; x < s; ++x) {
      const float t = float(0.05 * std::sin(fy * double(y) + py) * std::sin(fx * double(x) + px));
      for (std::size_t c = 0; c < spec.channels; ++c) img.data()[c * plane + y * s + x] += t;
    }
  const std::size_t side = s / 8 + 1, span = s - side + 1;
  std::vector<std::pair<std::size_t, std::size_t>> placed;
  while (placed.size() < tissue.spots) {  // rejection sampling: at most 3 spots always fit an 8 x 8 canvas
    const std::size_t y = rng.below(span), x = rng.below(span);
    const bool apart = std::all_of(placed.begin(), placed.end(), [&](const auto& p) {
      return std::max(y, p.first) - std::min(y, p.first) > side || std::max(x, p.second) - std::min(x, p.second) > side;
    });
    if (apart) placed.emplace_back(y, x);
  }
  const float k = float(rng.uniform(0.8, 1.2));
  const detail::Paint dark = spec.channels == 3 ? detail::Paint{0.35f * k, 0.12f * k, 0.40f * k}
                                                : detail::Paint{0.15f * k, 0.15f * k, 0.15f * k};
  for (const auto& [y0, x0] : placed)
    for (std::size_t y = y0; y < y0 + side; ++y)
      for (std::size_t x = x0; x < x0 + side; ++x) detail::blend(img, y, x, dark, 1.0f);
  detail::add_noise(img, spec.noise, rng);
  return img;
}

// ---- captions: what a picture shows, as one sentence of the vocabulary ---------------------------------------
namespace detail {
inline std::string counted(std::size_t n, std::string_view singular, std::string_view plural) {
  return std::to_string(n) + " " + std::string(n == 1 ? singular : plural);
}
}  // namespace detail

inline std::string scene_caption(std::size_t n, Colour c) {
  return "a scene with " + detail::counted(n, std::string(colour_name(c)) + " shape", std::string(colour_name(c)) + " shapes") + " .";
}
inline std::string page_caption(std::size_t digit, Colour ink) {
  return "a page with the digit " + std::to_string(digit) + " in " + std::string(colour_name(ink)) + " ink .";
}
inline std::string tissue_caption(const Tissue& t) {
  return "a " + std::string(colour_name(t.stain)) + " tissue with " + detail::counted(t.spots, "spot", "spots") + " .";
}

// ---- labelled images for supervised ViT pre-training ----------------------------------------------------------
struct LabelledImages {
  Tensor<float> images;              // [N, C, S, S]
  std::vector<std::int64_t> labels;  // [N] in [0, class_names.size())
  std::vector<std::string> class_names;
  std::size_t size() const { return labels.size(); }
};

// Copies images[rows] and labels[rows] (a minibatch); IndexError for a row out of range.
inline LabelledImages subset(const LabelledImages& set, std::span<const std::size_t> rows) {
  LabelledImages out;
  Shape shape = shape_of(set.images);
  const std::size_t stride = set.size() ? set.images.size() / set.size() : 0;
  shape[0] = rows.size();
  out.images = empty<float>(shape);
  for (std::size_t i = 0; i < rows.size(); ++i) {
    require<IndexError>(rows[i] < set.size(), "subset: row ", rows[i], " is outside [0, ", set.size(), ")");
    std::copy_n(set.images.data() + rows[i] * stride, stride, out.images.data() + i * stride);
    out.labels.push_back(set.labels[rows[i]]);
  }
  out.class_names = set.class_names;
  return out;
}

struct PretrainImageConfig {
  ImageSpec image{};
  std::size_t n_scenes = 1200;   // one-kind scenes (labels 10-12)
  std::size_t n_tissues = 1200;  // tissues (labels 13-16)
  std::uint64_t seed = 0;
};

// Every digit in `digit_indices` once (random style and ink), then the scenes and tissues, in a seeded order.
inline LabelledImages vit_pretrain_images(const Digits& digits, std::span<const std::size_t> digit_indices,
                                          const PretrainImageConfig& config) {
  config.image.validate();
  const ImageSpec& spec = config.image;
  Rng rng(detail::derive_seed(config.seed, "vit pretrain"));
  std::vector<std::pair<Tensor<float>, std::int64_t>> items;
  for (const std::size_t i : digit_indices) {
    DigitStyle style{.paper = rng.below(2) == 1, .ink = {}};
    if (const auto ink = rng.below(n_colours + 1); ink < n_colours) style.ink = Colour(ink);
    items.emplace_back(render_digit(digits, i, spec, style, rng), digits.labels.at(i));
  }
  for (std::size_t n = 0; n < config.n_scenes; ++n) {
    const auto kind = ShapeKind(rng.below(n_shape_kinds));
    std::vector<SceneObject> objects;
    for (const auto& [r, c] : random_cells(1 + rng.below(std::min<std::size_t>(4, spec.grid() * spec.grid())), spec, rng))
      objects.push_back({kind, Colour(rng.below(n_colours)), r, c});
    items.emplace_back(render_scene(objects, spec, rng), 10 + std::int64_t(kind));
  }
  for (std::size_t n = 0; n < config.n_tissues; ++n) {
    const Tissue t{Colour(rng.below(n_colours)), rng.below(4)};
    items.emplace_back(render_tissue(t, spec, rng), 13 + std::int64_t(t.spots));
  }
  detail::shuffle(items, rng);
  LabelledImages out;
  out.class_names = {"digit 0", "digit 1", "digit 2", "digit 3", "digit 4", "digit 5", "digit 6", "digit 7",
                     "digit 8", "digit 9", "scene of squares", "scene of crosses", "scene of rings",
                     "tissue with 0 spots", "tissue with 1 spot", "tissue with 2 spots", "tissue with 3 spots"};
  Shape shape = spec.shape();
  shape.insert(shape.begin(), items.size());
  out.images = empty<float>(shape);
  const std::size_t stride = spec.channels * spec.size * spec.size;
  for (std::size_t i = 0; i < items.size(); ++i) {
    std::copy_n(items[i].first.data(), stride, out.images.data() + i * stride);
    out.labels.push_back(items[i].second);
  }
  return out;
}

}  // namespace mixpeft::data
