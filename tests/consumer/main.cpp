#include <mixpeft/mixpeft.hpp>

#include <iostream>

int main() {
  mixpeft::Rng rng(1);
  mixpeft::Tensor<float> x = mixpeft::zeros<float>({2, 3});
  mixpeft::Tensor<float> w = mixpeft::empty<float>({4, 3});
  mixpeft::init::kaiming_uniform(w, rng);
  mixpeft::Tensor<float> y;
  mixpeft::linear_forward(x, w, nullptr, y);
  std::cout << "consumer ok: y has shape " << mixpeft::shape_string(y.shape()) << "\n";
  return y.size() == 8 ? 0 : 1;
}
