// lora_regression — the smallest end-to-end run of the library: a LoRA adapter learns a low-rank change of a
// frozen linear map.
//
// A frozen "pretrained" weight W0 [D, D] sees a task whose true map is W0 + U V (rank k). A LoRALinear with the
// frozen W0 and a rank-r adapter (r >= k) is trained with AdamW on mean squared error; the loss falls towards
// the noise floor while W0 never changes and only r * 2D parameters train.
#include <CLI/CLI.hpp>

#include <cstdio>

#include "mixpeft/mixpeft.hpp"

using namespace mixpeft;

int main(int argc, char** argv) {
  CLI::App app{"Train a LoRA adapter on a toy low-rank regression and print its loss"};
  std::size_t dim = 64, rank = 8, true_rank = 4, batch = 128, steps = 300;
  double lr = 1e-2, noise = 0.01;
  std::uint64_t seed = 0;
  app.add_option("--dim", dim, "input and output width D");
  app.add_option("--rank", rank, "LoRA rank r");
  app.add_option("--true-rank", true_rank, "rank k of the weight change to learn");
  app.add_option("--batch", batch, "samples per step");
  app.add_option("--steps", steps, "optimizer steps");
  app.add_option("--lr", lr, "AdamW learning rate");
  app.add_option("--noise", noise, "std of the label noise");
  app.add_option("--seed", seed, "random seed");
  CLI11_PARSE(app, argc, argv);

  Rng rng(seed);
  using Layer = LoRALinear<float>;
  Layer::Config config;
  config.in = dim;
  config.out = dim;
  config.bias = false;
  config.lora.rank = rank;
  config.lora.alpha = double(rank);
  config.lora.dropout = 0.0;
  Layer layer(config, rng);
  init::normal(layer.weight().value, rng, 0.0, 1.0 / std::sqrt(double(dim)));

  // The task's true weight: W0 + U V, with U [D, k] and V [k, D].
  Tensor<float> U = empty<float>({dim, true_rank}), V = empty<float>({true_rank, dim});
  init::normal(U, rng, 0.0, 0.5 / std::sqrt(double(true_rank)));
  init::normal(V, rng, 0.0, 1.0 / std::sqrt(double(dim)));
  Tensor<float> W_true = layer.weight().value;
  matrix_view(W_true) += matrix_view(U) * matrix_view(V);

  auto params = parameters_of<float>(layer);
  std::printf("LoRA regression: D = %zu, rank %zu (true change has rank %zu); %zu trainable of %zu parameters\n",
              dim, rank, true_rank, count_parameters(params, true), count_parameters(params, false));
  AdamW<float> optimizer(params, AdamWConfig{.lr = lr, .weight_decay = 0.0});
  WarmupCosineLr schedule(lr, std::int64_t(steps / 10), std::int64_t(steps));

  Layer::Cache cache;
  Tensor<float> x = empty<float>({batch, dim}), target, dy;
  for (std::size_t step = 0; step < steps; ++step) {
    init::normal(x, rng);
    linear_forward(x, W_true, nullptr, target);
    for (auto& t : target) t += float(rng.normal(0.0, noise));

    const Tensor<float> y = layer.forward(x, cache);
    dy = y - target;
    double loss = 0;
    for (float d : dy) loss += double(d) * d;
    loss /= double(dy.size());
    dy *= 2.0f / float(dy.size());

    optimizer.zero_grad();
    layer.backward(cache, dy);
    optimizer.step(schedule(std::int64_t(step)));
    if (step % (steps / 10 == 0 ? 1 : steps / 10) == 0 || step + 1 == steps)
      std::printf("step %4zu  lr %.2e  mse %.6f\n", step, schedule(std::int64_t(step)), loss);
  }
  std::printf("noise floor (label noise variance): %.6f\n", noise * noise);
  return 0;
}
