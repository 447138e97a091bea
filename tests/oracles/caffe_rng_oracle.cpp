// Caffe's CPU random helpers as math_functions.cpp and util/rng.hpp call boost, for
// tests/test_caffe_rng.py. Usage: caffe_rng_oracle SEED OP COUNT [A [B]]
// Writes COUNT results (uint32, float32 or uint8) to stdout, then the generator's
// next raw word, so a test sees both the values and how many words they used.
#include <stdint.h>
#include <cfloat>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <boost/math/special_functions/next.hpp>
#include <boost/random.hpp>

typedef boost::mt19937 rng_t;

template <typename T> static void put(const T& value) { fwrite(&value, sizeof(T), 1, stdout); }

template <typename Dist, typename Out>
static void draw(rng_t* rng, Dist dist, long count) {
  boost::variate_generator<rng_t*, Dist> generator(rng, dist);
  for (long i = 0; i < count; ++i) put(static_cast<Out>(generator()));
}

int main(int argc, char** argv) {
  if (argc < 4) return 2;
  rng_t rng(static_cast<unsigned int>(strtoul(argv[1], NULL, 10)));
  const char* op = argv[2];
  const long count = atol(argv[3]);
  const double a = argc > 4 ? atof(argv[4]) : 0.0;
  const double b = argc > 5 ? atof(argv[5]) : 1.0;
  if (!strcmp(op, "raw")) {
    for (long i = 0; i < count; ++i) put(static_cast<uint32_t>(rng()));
  } else if (!strcmp(op, "uniform")) {
    const float high = boost::math::nextafter<float>(static_cast<float>(b), FLT_MAX);
    draw<boost::uniform_real<float>, float>(&rng, boost::uniform_real<float>(a, high), count);
  } else if (!strcmp(op, "gaussian")) {
    draw<boost::normal_distribution<float>, float>(
        &rng, boost::normal_distribution<float>(a, b), count);
  } else if (!strcmp(op, "gaussian_double")) {
    draw<boost::normal_distribution<double>, double>(
        &rng, boost::normal_distribution<double>(a, b), count);
  } else if (!strcmp(op, "uniform_double")) {
    const double high = boost::math::nextafter<double>(b, DBL_MAX);
    draw<boost::uniform_real<double>, double>(&rng, boost::uniform_real<double>(a, high), count);
  } else if (!strcmp(op, "bernoulli_double")) {
    draw<boost::bernoulli_distribution<double>, uint8_t>(
        &rng, boost::bernoulli_distribution<double>(a), count);
  } else if (!strcmp(op, "bernoulli_float")) {
    draw<boost::bernoulli_distribution<float>, uint8_t>(
        &rng, boost::bernoulli_distribution<float>(static_cast<float>(a)), count);
  } else if (!strcmp(op, "shuffle")) {
    std::vector<int32_t> items(count);
    for (long i = 0; i < count; ++i) items[i] = static_cast<int32_t>(i);
    for (long i = count - 1; i > 0; --i) {
      boost::uniform_int<long> dist(0, i);
      std::swap(items[i], items[dist(rng)]);
    }
    for (long i = 0; i < count; ++i) put(items[i]);
  } else {
    return 2;
  }
  put(static_cast<uint32_t>(rng()));
  return 0;
}
