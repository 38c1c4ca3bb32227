/*
 * A small MLP (8-16-3, tanh, softmax cross-entropy) trained in plain C with
 * K-FAC through libkfac, on a synthetic 3-class problem (labels from a
 * random teacher). Full-batch steps; every rank of a `kfac-launch` job takes
 * its shard of the batch, gradients are averaged with
 * kfac_allreduce_gradients, and all ranks end with the same weights.
 *
 * Prints the final training accuracy and a checksum of the weights; exits 0
 * when the accuracy is above 90%.
 *
 * Built with `mpicc -DKFAC_EXAMPLE_MPI` (against a libkfac built with the
 * `mpi` feature) it runs under `mpirun -np P` instead: it initializes MPI
 * itself and hands MPI_COMM_WORLD to kfac_comm_mpi (hierarchical when
 * KFAC_COMM=hier).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kfac.h"
#ifdef KFAC_EXAMPLE_MPI
#include <mpi.h>
#endif

#define D0 8
#define D1 16
#define D2 3
#define N 96
#define STEPS 40

static float X[N][D0];
static int LABEL[N];

/* Deterministic uniform [-1, 1) from two indices (same on every rank). */
static float hrand(unsigned a, unsigned b) {
  unsigned h = a * 2654435761u ^ (b + 0x9E3779B9u + (a << 6) + (a >> 2));
  h ^= h >> 16;
  h *= 0x7feb352du;
  h ^= h >> 15;
  h *= 0x846ca68bu;
  h ^= h >> 16;
  return (float)(h & 0xFFFFFF) / 8388608.0f - 1.0f;
}

static int die(const char *what) {
  fprintf(stderr, "%s failed: %s\n", what, kfac_last_error());
#ifdef KFAC_EXAMPLE_MPI
  MPI_Abort(MPI_COMM_WORLD, 1); /* never leave the other ranks waiting */
#endif
  return 1;
}

int main(int argc, char **argv) {
#ifdef KFAC_EXAMPLE_MPI
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_SERIALIZED, &provided);
#else
  (void)argc;
  (void)argv;
#endif
  /* data: labels of a random linear teacher */
  for (int n = 0; n < N; n++) {
    float best = -1e9f;
    for (int j = 0; j < D0; j++) X[n][j] = hrand(1, (unsigned)(n * D0 + j));
    for (int c = 0; c < D2; c++) {
      float v = 0;
      for (int j = 0; j < D0; j++) v += hrand(2, (unsigned)(c * D0 + j)) * X[n][j];
      if (v > best) { best = v; LABEL[n] = c; }
    }
  }
  float w1[D1 * D0], b1[D1] = {0}, w2[D2 * D1], b2[D2] = {0};
  for (int i = 0; i < D1 * D0; i++) w1[i] = 0.5f * hrand(3, (unsigned)i);
  for (int i = 0; i < D2 * D1; i++) w2[i] = 0.5f * hrand(4, (unsigned)i);

  KfacComm *comm = NULL;
  unsigned rank = 0, world = 1;
#ifdef KFAC_EXAMPLE_MPI
  const char *mode = getenv("KFAC_COMM");
  uint32_t hier = mode && strcmp(mode, "hier") == 0;
  if (kfac_comm_mpi(MPI_Comm_c2f(MPI_COMM_WORLD), hier, 60000, &comm)) return die("comm");
#else
  if (getenv("KFAC_RANK") ? kfac_comm_shm_from_env(20000, &comm) : kfac_comm_local(&comm)) return die("comm");
#endif
  if (kfac_comm_rank(comm, &rank, &world)) return die("rank");
  KfacConfig cfg;
  kfac_config_default(&cfg, sizeof cfg);
  cfg.damping = 1e-2;
  cfg.kl_clip = 1e-2;
  cfg.lr = 1.0;
  cfg.inv_update_steps = 2;
  cfg.threads = 1;
  KfacPrecond *p = NULL;
  uint32_t l1, l2;
  if (kfac_precond_create(&cfg, comm, &p)) return die("create");
  if (kfac_register_linear(p, "fc1", D0, D1, 1, &l1) || kfac_register_linear(p, "fc2", D1, D2, 1, &l2))
    return die("register");

  const int lo = (int)(rank * N / world), hi = (int)((rank + 1) * N / world), m = hi - lo;
  static float h[N][D1], dz1[N][D1], gs2[N][D2], gs1[N][D1];
  for (int step = 0; step < STEPS; step++) {
    float gw1[D1 * D0] = {0}, gb1[D1] = {0}, gw2[D2 * D1] = {0}, gb2[D2] = {0};
    for (int n = lo; n < hi; n++) {
      float z[D2], pr[D2], mx = -1e9f, sum = 0;
      for (int i = 0; i < D1; i++) {
        float v = b1[i];
        for (int j = 0; j < D0; j++) v += w1[i * D0 + j] * X[n][j];
        h[n][i] = tanhf(v);
      }
      for (int c = 0; c < D2; c++) {
        z[c] = b2[c];
        for (int i = 0; i < D1; i++) z[c] += w2[c * D1 + i] * h[n][i];
        if (z[c] > mx) mx = z[c];
      }
      for (int c = 0; c < D2; c++) sum += (pr[c] = expf(z[c] - mx));
      /* a class sampled from the model (true Fisher) for K-FAC's G */
      float u = 0.5f * (hrand(5, (unsigned)(step * N + n)) + 1.0f) * sum, acc = 0;
      int s = D2 - 1;
      for (int c = 0; c < D2; c++) {
        acc += pr[c];
        if (u < acc) { s = c; break; }
      }
      for (int c = 0; c < D2; c++) {
        pr[c] /= sum;
        float d = pr[c] - (c == LABEL[n]); /* loss gradient */
        gs2[n][c] = pr[c] - (c == s);      /* sampled */
        gb2[c] += d / N;
        for (int i = 0; i < D1; i++) gw2[c * D1 + i] += d * h[n][i] / N;
      }
      for (int i = 0; i < D1; i++) {
        float d = 0, ds = 0;
        for (int c = 0; c < D2; c++) {
          d += w2[c * D1 + i] * (pr[c] - (c == LABEL[n]));
          ds += w2[c * D1 + i] * gs2[n][c];
        }
        dz1[n][i] = d * (1 - h[n][i] * h[n][i]);
        gs1[n][i] = ds * (1 - h[n][i] * h[n][i]);
        gb1[i] += dz1[n][i] / N;
        for (int j = 0; j < D0; j++) gw1[i * D0 + j] += dz1[n][i] * X[n][j] / N;
      }
    }
    if (kfac_observe_linear(p, l1, &X[lo][0], (size_t)m, D0, &gs1[lo][0], D1) ||
        kfac_observe_linear(p, l2, &h[lo][0], (size_t)m, D1, &gs2[lo][0], D2))
      return die("observe");
    KfacGrad g[2] = {{l1, gw1, D0, gb1}, {l2, gw2, D1, gb2}};
    if (world > 1) {
      for (int i = 0; i < D1 * D0; i++) gw1[i] *= (float)world;
      for (int i = 0; i < D2 * D1; i++) gw2[i] *= (float)world;
      for (int i = 0; i < D1; i++) gb1[i] *= (float)world;
      for (int i = 0; i < D2; i++) gb2[i] *= (float)world;
      if (kfac_allreduce_gradients(p, g, 2)) return die("allreduce");
    }
    if (kfac_step(p, g, 2, NULL)) return die("step");
    for (int i = 0; i < D1 * D0; i++) w1[i] -= gw1[i];
    for (int i = 0; i < D1; i++) b1[i] -= gb1[i];
    for (int i = 0; i < D2 * D1; i++) w2[i] -= gw2[i];
    for (int i = 0; i < D2; i++) b2[i] -= gb2[i];
  }
  int correct = 0;
  double checksum = 0;
  for (int n = 0; n < N; n++) {
    float z[D2];
    int arg = 0;
    for (int i = 0; i < D1; i++) {
      float v = b1[i];
      for (int j = 0; j < D0; j++) v += w1[i * D0 + j] * X[n][j];
      h[n][i] = tanhf(v);
    }
    for (int c = 0; c < D2; c++) {
      z[c] = b2[c];
      for (int i = 0; i < D1; i++) z[c] += w2[c * D1 + i] * h[n][i];
      if (z[c] > z[arg]) arg = c;
    }
    correct += arg == LABEL[n];
  }
  for (int i = 0; i < D2 * D1; i++) checksum += w2[i];
  kfac_precond_free(p);
  kfac_comm_free(comm);
#ifdef KFAC_EXAMPLE_MPI
  MPI_Finalize();
#endif
  double accuracy = (double)correct / N;
  printf("rank %u/%u: accuracy %.3f checksum %.6f %s\n", rank, world, accuracy, checksum,
         accuracy > 0.9 ? "ok" : "FAILED");
  return accuracy > 0.9 ? 0 : 1;
}
