/*
 * A linear least-squares model trained with K-FAC through the C ABI:
 * y = W x + b with W (3 x 4), on data generated from a known W*, b*.
 * One process by default; under `kfac-launch -n P` every rank joins the
 * shared-memory group, observes its shard of each batch, averages the
 * gradients itself, and all ranks end with the same weights.
 *
 * Also exercises the error paths: NULL pointers, a freed handle, a caught
 * internal panic, a bad struct_size, a short save buffer, and a checkpoint
 * round trip.
 *
 * Exit status 0 when the model fits and every check holds.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kfac.h"

#define IN 4
#define OUT 3
#define N 48
#define STEPS 60

static int failures = 0;

#define CHECK(cond, ...)                                                       \
  do {                                                                         \
    if (!(cond)) {                                                             \
      fprintf(stderr, "CHECK failed at line %d: ", __LINE__);                  \
      fprintf(stderr, __VA_ARGS__);                                            \
      fprintf(stderr, " (last error: %s)\n", kfac_last_error());               \
      failures++;                                                              \
    }                                                                          \
  } while (0)

/* Deterministic data in [-1, 1). */
static float rnd(unsigned *s) {
  *s = *s * 1664525u + 1013904223u;
  return (float)((*s >> 8) & 0xFFFF) / 32768.0f - 1.0f;
}

int main(void) {
  float wstar[OUT][IN], bstar[OUT], x[N][IN], y[N][OUT];
  unsigned seed = 7;
  for (int i = 0; i < OUT; i++) {
    for (int j = 0; j < IN; j++) wstar[i][j] = rnd(&seed);
    bstar[i] = rnd(&seed);
  }
  for (int n = 0; n < N; n++) {
    for (int j = 0; j < IN; j++) x[n][j] = rnd(&seed);
    for (int i = 0; i < OUT; i++) {
      float v = bstar[i];
      for (int j = 0; j < IN; j++) v += wstar[i][j] * x[n][j];
      y[n][i] = v;
    }
  }

  CHECK(kfac_abi_version() == KFAC_ABI_VERSION, "ABI version");
  CHECK(strlen(kfac_version_string()) > 0, "version string");

  /* One process, or a rank of a kfac-launch job. */
  KfacComm *comm = NULL;
  unsigned rank = 0, world = 1;
  if (getenv("KFAC_RANK") != NULL) {
    CHECK(kfac_comm_shm_from_env(20000, &comm) == KFAC_OK, "join group");
  } else {
    CHECK(kfac_comm_local(&comm) == KFAC_OK, "local comm");
  }
  CHECK(kfac_comm_rank(comm, &rank, &world) == KFAC_OK, "rank");

  KfacConfig cfg;
  CHECK(kfac_config_default(&cfg, sizeof cfg) == KFAC_OK, "defaults");
  cfg.damping = 1e-3;
  cfg.kl_clip = 0.0; /* off */
  cfg.inv_update_steps = 5;
  cfg.threads = 1;

  KfacPrecond *p = NULL;
  CHECK(kfac_precond_create(&cfg, comm, &p) == KFAC_OK, "create");
  uint32_t id = 0;
  CHECK(kfac_register_linear(p, "fc", IN, OUT, 1, &id) == KFAC_OK, "register");

  /* Error paths leave everything usable. */
  CHECK(kfac_register_linear(NULL, "x", 1, 1, 0, &id) == KFAC_ERR_NULL, "NULL handle");
  CHECK(kfac_register_linear(p, "fc", IN, OUT, 1, &id) == KFAC_ERR_INVALID_ARGUMENT, "duplicate");
  CHECK(kfac_observe_linear(p, id, &x[0][0], N, IN - 1, NULL, OUT) != KFAC_OK, "bad lda");
  {
    KfacConfig old = cfg;
    KfacPrecond *none = NULL;
    old.struct_size = sizeof old - 4; /* not the size of any KfacConfig layout */
    CHECK(kfac_precond_create(&old, NULL, &none) == KFAC_ERR_INVALID_ARGUMENT && none == NULL,
          "short struct_size");
  }
  CHECK(kfac_test_panic() == KFAC_ERR_PANIC, "panic is caught");
  CHECK(strstr(kfac_status_string(KFAC_ERR_PANIC), "KFAC_ERR_PANIC") != NULL, "status string");
  CHECK(strcmp(kfac_status_string(-1), "unknown status") == 0, "unknown status string");
  CHECK(strstr(kfac_last_error(), "panic") != NULL, "panic message");

  float w[OUT][IN] = {{0}}, b[OUT] = {0};
  int lo = (int)(rank * N / world), hi = (int)((rank + 1) * N / world);
  double loss = 0;
  for (int step = 0; step < STEPS; step++) {
    /* forward on the shard; residuals v = W x + b - y. For K-FAC's G factor
       the output gradients are sampled from the model's predictive
       distribution (unit-variance Gaussian: g ~ N(0, I) in distribution,
       here uniform noise of variance 1), so G estimates the true Fisher. */
    float gs[N][OUT];
    float gw[OUT][IN] = {{0}}, gb[OUT] = {0};
    loss = 0;
    for (int n = lo; n < hi; n++) {
      for (int i = 0; i < OUT; i++) {
        float v = b[i] - y[n][i];
        for (int j = 0; j < IN; j++) v += w[i][j] * x[n][j];
        gs[n][i] = 1.7320508f * rnd(&seed);
        loss += 0.5 * v * v;
        gb[i] += v / N;
        for (int j = 0; j < IN; j++) gw[i][j] += v * x[n][j] / N;
      }
    }
    CHECK(kfac_observe_linear(p, id, &x[lo][0], (size_t)(hi - lo), IN, &gs[lo][0], OUT) == KFAC_OK,
          "observe");
    KfacGrad g = {id, &gw[0][0], IN, gb};
    if (world > 1) {
      /* shard sums of the whole-batch mean gradient: the average over
         ranks of P times them is their sum */
      for (int i = 0; i < OUT; i++) {
        gb[i] *= (float)world;
        for (int j = 0; j < IN; j++) gw[i][j] *= (float)world;
      }
      CHECK(kfac_allreduce_gradients(p, &g, 1) == KFAC_OK, "allreduce");
    }
    KfacStepStats st = {.struct_size = sizeof st};
    KfacStatus s = kfac_step(p, &g, 1, &st);
    CHECK(s == KFAC_OK, "step %d", step);
    if (s != KFAC_OK) break;
    for (int i = 0; i < OUT; i++) {
      b[i] -= gb[i];
      for (int j = 0; j < IN; j++) w[i][j] -= gw[i][j];
    }
  }
  double err = 0;
  for (int i = 0; i < OUT; i++) {
    err += fabs(b[i] - bstar[i]);
    for (int j = 0; j < IN; j++) err += fabs(w[i][j] - wstar[i][j]);
  }

  KfacStepStats last = {.struct_size = sizeof last};
  CHECK(kfac_last_stats(p, &last) == KFAC_OK && last.step == STEPS - 1, "stats");

  /* checkpoint: size query, short buffer refused, round trip */
  size_t size = 0, written = 0;
  CHECK(kfac_save_size(p, &size) == KFAC_OK && size > 24, "save size");
  unsigned char *buf = malloc(size);
  CHECK(kfac_save(p, buf, size - 1, &written) == KFAC_ERR_BUFFER_TOO_SMALL, "short buffer");
  CHECK(kfac_save(p, buf, size, &written) == KFAC_OK && written == size, "save");
  KfacPrecond *q = NULL;
  CHECK(kfac_load(buf, size, NULL, &q) == KFAC_OK, "load");
  buf[size / 2] ^= 0x10;
  KfacPrecond *bad = NULL;
  CHECK(kfac_load(buf, size, NULL, &bad) == KFAC_ERR_CHECKPOINT, "corrupted checkpoint");
  free(buf);

  CHECK(kfac_precond_free(q) == KFAC_OK, "free q");
  CHECK(kfac_precond_free(p) == KFAC_OK, "free p");
  CHECK(kfac_precond_free(p) == KFAC_ERR_INVALID_HANDLE, "double free is detected");
  CHECK(kfac_observe_linear(p, id, &x[0][0], N, IN, &x[0][0], OUT) == KFAC_ERR_INVALID_HANDLE,
        "use after free is detected");
  CHECK(kfac_comm_free(comm) == KFAC_OK, "free comm");

  CHECK(err < 1e-2, "fit error %g", err);
  printf("rank %u/%u: loss %.3g, |W-W*|+|b-b*| = %.3g, %s\n", rank, world, loss, err,
         failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
