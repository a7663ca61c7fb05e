// gen_grads: writes a synthetic gradient stream (raw little-endian float32, `steps` tensors of
// `count` elements in a row) for `int4ddp quantize`. Heavy-tailed like real gradients: Laplace or
// Student-t (nu = 3) samples, scale drifting with the step. Deterministic for a given seed.
//   gen_grads OUT --count N --steps S [--dist laplace|student|gauss] [--seed K]
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr,
                 "usage: gen_grads OUT --count N --steps S [--dist laplace|student|gauss] "
                 "[--seed K]\n");
    return 2;
  }
  const std::string out = argv[1];
  long long count = 1 << 16, steps = 8;
  unsigned long long seed = 0;
  std::string dist = "student";
  for (int i = 2; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--count")
      count = std::atoll(v.c_str());
    else if (k == "--steps")
      steps = std::atoll(v.c_str());
    else if (k == "--seed")
      seed = std::strtoull(v.c_str(), nullptr, 10);
    else if (k == "--dist")
      dist = v;
    else {
      std::fprintf(stderr, "gen_grads: unknown option %s\n", k.c_str());
      return 2;
    }
  }
  if (count <= 0 || steps <= 0 || (dist != "laplace" && dist != "student" && dist != "gauss")) {
    std::fprintf(stderr,
                 "gen_grads: need --count > 0, --steps > 0, --dist laplace|student|gauss\n");
    return 2;
  }
  std::mt19937_64 rng(seed);
  std::exponential_distribution<float> expo(1.0f);
  std::student_t_distribution<float> student(3.0f);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::bernoulli_distribution coin(0.5);
  const std::string tmp = out + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) {
    std::fprintf(stderr, "gen_grads: cannot write %s: %s\n", tmp.c_str(), std::strerror(errno));
    return 1;
  }
  std::vector<float> g(count);
  bool ok = true;
  for (long long s = 0; s < steps && ok; ++s) {
    const float scale = 1e-3f * (1.0f + 0.25f * static_cast<float>(s));
    for (float& v : g) {
      float z;
      if (dist == "laplace")
        z = coin(rng) ? expo(rng) : -expo(rng);
      else if (dist == "student")
        z = student(rng);
      else
        z = normal(rng);
      v = scale * z;
    }
    ok = std::fwrite(g.data(), sizeof(float), g.size(), f) == g.size();
  }
  ok = (std::fclose(f) == 0) && ok;
  if (!ok || std::rename(tmp.c_str(), out.c_str()) != 0) {
    std::remove(tmp.c_str());
    std::fprintf(stderr, "gen_grads: writing %s failed\n", out.c_str());
    return 1;
  }
  std::printf("gen_grads: wrote %lld x %lld %s floats to %s\n", steps, count, dist.c_str(),
              out.c_str());
  return 0;
}
