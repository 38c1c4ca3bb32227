// The C example's linear least-squares fit, in C++ with kfac.hpp: RAII
// handles, exceptions for errors. Runs alone or as a rank of kfac-launch.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "kfac.hpp"

namespace {
constexpr int kIn = 4, kOut = 3, kN = 48, kSteps = 60;

float rnd(unsigned& s) {
  s = s * 1664525u + 1013904223u;
  return static_cast<float>((s >> 8) & 0xFFFF) / 32768.0f - 1.0f;
}
}  // namespace

int main() {
  try {
    unsigned seed = 7;
    std::vector<float> wstar(kOut * kIn), bstar(kOut), x(kN * kIn), y(kN * kOut);
    for (int i = 0; i < kOut; i++) {
      for (int j = 0; j < kIn; j++) wstar[i * kIn + j] = rnd(seed);
      bstar[i] = rnd(seed);
    }
    for (int n = 0; n < kN; n++) {
      for (int j = 0; j < kIn; j++) x[n * kIn + j] = rnd(seed);
      for (int i = 0; i < kOut; i++) {
        float v = bstar[i];
        for (int j = 0; j < kIn; j++) v += wstar[i * kIn + j] * x[n * kIn + j];
        y[n * kOut + i] = v;
      }
    }
    kfac::Comm comm = std::getenv("KFAC_RANK") ? kfac::Comm::shm_from_env(20000) : kfac::Comm::local();
    auto [rank, world] = comm.rank_and_size();
    KfacConfig cfg = kfac::Preconditioner::default_config();
    cfg.damping = 1e-3;
    cfg.kl_clip = 0.0;
    cfg.inv_update_steps = 5;
    cfg.threads = 1;
    kfac::Preconditioner p(cfg, &comm);
    const std::uint32_t id = p.add_linear("fc", kIn, kOut, true);

    bool threw = false;
    try {
      p.add_linear("fc", kIn, kOut, true);
    } catch (const kfac::Error& e) {
      threw = e.status() == KFAC_ERR_INVALID_ARGUMENT;
    }
    if (!threw) return 1;

    std::vector<float> w(kOut * kIn, 0.0f), b(kOut, 0.0f);
    const int lo = static_cast<int>(rank * kN / world), hi = static_cast<int>((rank + 1) * kN / world);
    for (int step = 0; step < kSteps; step++) {
      std::vector<float> gw(kOut * kIn, 0.0f), gb(kOut, 0.0f), gs(kN * kOut, 0.0f);
      for (int n = lo; n < hi; n++) {
        for (int i = 0; i < kOut; i++) {
          float v = b[i] - y[n * kOut + i];
          for (int j = 0; j < kIn; j++) v += w[i * kIn + j] * x[n * kIn + j];
          gs[n * kOut + i] = 1.7320508f * rnd(seed);  // sampled Fisher
          gb[i] += v / kN;
          for (int j = 0; j < kIn; j++) gw[i * kIn + j] += v * x[n * kIn + j] / kN;
        }
      }
      p.observe_linear(id, {&x[lo * kIn], static_cast<std::size_t>(hi - lo), kIn, kIn},
                       {&gs[lo * kOut], static_cast<std::size_t>(hi - lo), kOut, kOut});
      std::vector<KfacGrad> grads{{id, gw.data(), kIn, gb.data()}};
      if (world > 1) {
        for (auto& v : gw) v *= static_cast<float>(world);
        for (auto& v : gb) v *= static_cast<float>(world);
        p.allreduce_gradients(grads);
      }
      p.step(grads);
      for (int i = 0; i < kOut; i++) {
        b[i] -= gb[i];
        for (int j = 0; j < kIn; j++) w[i * kIn + j] -= gw[i * kIn + j];
      }
    }
    double err = 0;
    for (int i = 0; i < kOut; i++) {
      err += std::fabs(b[i] - bstar[i]);
      for (int j = 0; j < kIn; j++) err += std::fabs(w[i * kIn + j] - wstar[i * kIn + j]);
    }
    kfac::Preconditioner q = kfac::Preconditioner::load(p.save());
    const bool restored = q.steps() == static_cast<std::uint64_t>(kSteps) && q.num_layers() == 1;
    const bool ok = err < 1e-2 && restored;
    std::printf("rank %u/%u: |W-W*|+|b-b*| = %.3g, %s\n", rank, world, err, ok ? "ok" : "FAILED");
    return ok ? 0 : 1;
  } catch (const kfac::Error& e) {
    std::fprintf(stderr, "kfac error %s: %s\n", e.status_string(), e.what());
    return 1;
  }
}
