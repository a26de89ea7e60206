// lavin_param_count — LaVIN's trainable parameters per component, from the configs alone (no weights are
// allocated), for the paper's LLaMA-7B / 13B + CLIP ViT-L/14 set-ups or a configuration of your own.
// LaVIN-7B must come to 3,781,296 trainable parameters (SPEC 1.4: 32 x 81,930 + 24 x 20,490 + 659,584 + 8,192).
#include <CLI/CLI.hpp>

#include <iostream>

#include "mixpeft/models/lavin.hpp"

using namespace mixpeft;
using LavinF = Lavin<float>;

int main(int argc, char** argv) {
  CLI::App app{"Print LaVIN's parameter counts per component without allocating weights"};
  std::string llm = "7b";
  std::size_t hidden = 8, groups = 2, neck = 128;
  bool ffn_adapter = false;
  app.add_option("--llm", llm, "LLaMA size: 7b or 13b")->check(CLI::IsMember({"7b", "13b"}));
  app.add_option("--adapter-hidden", hidden, "MM-Adapter hidden width h");
  app.add_option("--adapter-groups", groups, "groups of the up-projections");
  app.add_option("--neck-hidden", neck, "hidden width of the visual neck");
  app.add_flag("--adapter-before-ffn", ffn_adapter, "a second MM-Adapter before each LLM FFN");
  CLI11_PARSE(app, argc, argv);

  LavinF::Config c;
  if (llm == "7b") c.llm = {.vocab = 32000, .dim = 4096, .n_layers = 32, .n_heads = 32, .ffn_dim = 11008};
  else c.llm = {.vocab = 32000, .dim = 5120, .n_layers = 40, .n_heads = 40, .ffn_dim = 13824};
  c.vit = {.image_size = 224, .patch = 14, .channels = 3, .dim = 1024, .n_layers = 24, .n_heads = 16,
           .mlp_dim = 4096, .take_every = 4};
  c.llm_adapter.hidden = hidden;
  c.llm_adapter.groups = groups;
  c.vit_adapter->hidden = hidden;
  c.vit_adapter->groups = groups;
  c.neck_hidden = neck;
  c.adapter_before_ffn = ffn_adapter;

  const LavinParameterCount n = LavinF::parameter_count(c);
  using param_count::format_count;
  std::cout << "LaVIN-" << llm << " (LLaMA-" << llm << " + CLIP ViT-L/14), adapters h = " << hidden << ", groups "
            << groups << ", neck " << neck << "\n"
            << "  LLM MM-Adapters + routers  " << format_count(n.llm_adapters) << "\n"
            << "  ViT MM-Adapters + routers  " << format_count(n.vit_adapters) << "\n"
            << "  visual neck                " << format_count(n.neck) << "\n"
            << "  modality embedding         " << format_count(n.modality_embedding) << "\n"
            << "  trainable                  " << format_count(n.trainable) << " ("
            << double(n.trainable) / 1e6 << "M)\n"
            << "  total (frozen backbones)   " << format_count(n.total) << "\n";
  return 0;
}
