// The MLP of examples/c/mlp.c (8-16-3, tanh, softmax cross-entropy,
// full-batch K-FAC on a synthetic 3-class problem) written in C++17 with the
// RAII wrapper kfac.hpp: handles free themselves, failures throw
// kfac::Error with the library's message, matrices are passed as views.
// Same data, same arithmetic order and same output line as the C version,
// so the two must agree; every rank of a `kfac-launch` job takes its shard.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "kfac.hpp"

namespace {

constexpr int D0 = 8, D1 = 16, D2 = 3, N = 96, STEPS = 40;

float hrand(unsigned a, unsigned b) {
  unsigned h = a * 2654435761u ^ (b + 0x9E3779B9u + (a << 6) + (a >> 2));
  h ^= h >> 16;
  h *= 0x7feb352du;
  h ^= h >> 15;
  h *= 0x846ca68bu;
  h ^= h >> 16;
  return static_cast<float>(h & 0xFFFFFF) / 8388608.0f - 1.0f;
}

/// A dense row-major matrix.
struct Matrix {
  int rows, cols;
  std::vector<float> v;
  Matrix(int r, int c) : rows(r), cols(c), v(static_cast<std::size_t>(r) * c, 0.0f) {}
  float& operator()(int r, int c) { return v[static_cast<std::size_t>(r) * cols + c]; }
  float operator()(int r, int c) const { return v[static_cast<std::size_t>(r) * cols + c]; }
  /// Rows [lo, hi) as a view for kfac.
  kfac::MatrixView<const float> rows_view(int lo, int hi) const {
    return {v.data() + static_cast<std::size_t>(lo) * cols, static_cast<std::size_t>(hi - lo),
            static_cast<std::size_t>(cols), static_cast<std::size_t>(cols)};
  }
};

struct Layer {
  Matrix w;
  std::vector<float> b;
  Layer(int out, int in) : w(out, in), b(out, 0.0f) {}
};

int run() {
  Matrix x(N, D0);
  std::vector<int> label(N);
  for (int n = 0; n < N; n++) {
    float best = -1e9f;
    for (int j = 0; j < D0; j++) x(n, j) = hrand(1, static_cast<unsigned>(n * D0 + j));
    for (int c = 0; c < D2; c++) {
      float v = 0;
      for (int j = 0; j < D0; j++) v += hrand(2, static_cast<unsigned>(c * D0 + j)) * x(n, j);
      if (v > best) {
        best = v;
        label[n] = c;
      }
    }
  }
  Layer l1(D1, D0), l2(D2, D1);
  for (int i = 0; i < D1 * D0; i++) l1.w.v[i] = 0.5f * hrand(3, static_cast<unsigned>(i));
  for (int i = 0; i < D2 * D1; i++) l2.w.v[i] = 0.5f * hrand(4, static_cast<unsigned>(i));

  kfac::Comm comm = std::getenv("KFAC_RANK") ? kfac::Comm::shm_from_env(20000) : kfac::Comm::local();
  const auto [rank, world] = comm.rank_and_size();
  KfacConfig cfg = kfac::Preconditioner::default_config();
  cfg.damping = 1e-2;
  cfg.kl_clip = 1e-2;
  cfg.lr = 1.0;
  cfg.inv_update_steps = 2;
  cfg.threads = 1;
  kfac::Preconditioner p(cfg, &comm);
  const std::uint32_t id1 = p.add_linear("fc1", D0, D1, true);
  const std::uint32_t id2 = p.add_linear("fc2", D1, D2, true);

  const int lo = static_cast<int>(rank * N / world), hi = static_cast<int>((rank + 1) * N / world);
  Matrix h(N, D1), dz1(N, D1), gs2(N, D2), gs1(N, D1);
  for (int step = 0; step < STEPS; step++) {
    Layer g1(D1, D0), g2(D2, D1);
    for (int n = lo; n < hi; n++) {
      float z[D2], pr[D2], mx = -1e9f, sum = 0;
      for (int i = 0; i < D1; i++) {
        float v = l1.b[i];
        for (int j = 0; j < D0; j++) v += l1.w(i, j) * x(n, j);
        h(n, i) = std::tanh(v);
      }
      for (int c = 0; c < D2; c++) {
        z[c] = l2.b[c];
        for (int i = 0; i < D1; i++) z[c] += l2.w(c, i) * h(n, i);
        if (z[c] > mx) mx = z[c];
      }
      for (int c = 0; c < D2; c++) sum += (pr[c] = std::exp(z[c] - mx));
      float u = 0.5f * (hrand(5, static_cast<unsigned>(step * N + n)) + 1.0f) * sum, acc = 0;
      int s = D2 - 1;
      for (int c = 0; c < D2; c++) {
        acc += pr[c];
        if (u < acc) {
          s = c;
          break;
        }
      }
      for (int c = 0; c < D2; c++) {
        pr[c] /= sum;
        float d = pr[c] - (c == label[n]);
        gs2(n, c) = pr[c] - (c == s);
        g2.b[c] += d / N;
        for (int i = 0; i < D1; i++) g2.w(c, i) += d * h(n, i) / N;
      }
      for (int i = 0; i < D1; i++) {
        float d = 0, ds = 0;
        for (int c = 0; c < D2; c++) {
          d += l2.w(c, i) * (pr[c] - (c == label[n]));
          ds += l2.w(c, i) * gs2(n, c);
        }
        dz1(n, i) = d * (1 - h(n, i) * h(n, i));
        gs1(n, i) = ds * (1 - h(n, i) * h(n, i));
        g1.b[i] += dz1(n, i) / N;
        for (int j = 0; j < D0; j++) g1.w(i, j) += dz1(n, i) * x(n, j) / N;
      }
    }
    p.observe_linear(id1, x.rows_view(lo, hi), gs1.rows_view(lo, hi));
    p.observe_linear(id2, h.rows_view(lo, hi), gs2.rows_view(lo, hi));
    std::vector<KfacGrad> grads = {{id1, g1.w.v.data(), D0, g1.b.data()},
                                   {id2, g2.w.v.data(), D1, g2.b.data()}};
    if (world > 1) {
      for (Layer* g : {&g1, &g2}) {
        for (float& v : g->w.v) v *= static_cast<float>(world);
        for (float& v : g->b) v *= static_cast<float>(world);
      }
      p.allreduce_gradients(grads);
    }
    p.step(grads);
    for (auto [l, g] : {std::pair{&l1, &g1}, std::pair{&l2, &g2}}) {
      for (std::size_t i = 0; i < l->w.v.size(); i++) l->w.v[i] -= g->w.v[i];
      for (std::size_t i = 0; i < l->b.size(); i++) l->b[i] -= g->b[i];
    }
  }
  int correct = 0;
  for (int n = 0; n < N; n++) {
    float z[D2];
    int arg = 0;
    for (int i = 0; i < D1; i++) {
      float v = l1.b[i];
      for (int j = 0; j < D0; j++) v += l1.w(i, j) * x(n, j);
      h(n, i) = std::tanh(v);
    }
    for (int c = 0; c < D2; c++) {
      z[c] = l2.b[c];
      for (int i = 0; i < D1; i++) z[c] += l2.w(c, i) * h(n, i);
      if (z[c] > z[arg]) arg = c;
    }
    correct += arg == label[n];
  }
  double checksum = 0;
  for (float v : l2.w.v) checksum += v;
  const double accuracy = static_cast<double>(correct) / N;
  // Read access: names, factor sizes and fc2's eigendecomposition.
  const auto d1 = static_cast<std::size_t>(D1), d2 = static_cast<std::size_t>(D2);
  const bool inspect_ok = p.layer_id("fc2") == id2 && p.layer_name(id1) == "fc1" &&
                          p.layer_info(id2).d_a == d1 + 1 &&
                          p.factors(id2).second.size() == d2 * d2 &&
                          p.decomposition(id2).lg.size() == d2;
  const bool ok = accuracy > 0.9 && inspect_ok;
  std::printf("rank %u/%u: accuracy %.3f checksum %.6f %s\n", rank, world, accuracy, checksum,
              ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}

}  // namespace

int main() {
  try {
    return run();
  } catch (const kfac::Error& e) {
    std::fprintf(stderr, "kfac error %d: %s\n", static_cast<int>(e.status()), e.what());
    return 1;
  }
}
