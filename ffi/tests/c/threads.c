/*
 * One preconditioner hammered by four pthreads through the C ABI (run by
 * ffi/tests/c_clients.rs, also under valgrind): every call returns KFAC_OK
 * or KFAC_ERR_BUSY (a handle serves one call at a time), never anything
 * else, and never corrupts the heap. Afterwards the factors equal,
 * bitwise, those of a second preconditioner given the same number of
 * observations from one thread (every observation holds the same data, so
 * only their count matters).
 */
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "kfac.h"

#define N 4
#define THREADS 4
#define ITERS 200

static const float A[N * 3] = {0.5f, -1.0f, 0.25f, 1.5f, 0.75f, -0.5f,
                               -0.25f, 0.125f, 1.0f, 0.0f, -1.5f, 2.0f};
static const float G[N * 2] = {0.1f, -0.2f, 0.3f, 0.05f, -0.4f, 0.25f, 0.2f, -0.1f};

struct worker {
  KfacPrecond *p;
  int id;
  int observed; /* successful observations */
  int bad;      /* statuses other than OK / BUSY */
};

static void *hammer(void *arg) {
  struct worker *w = arg;
  for (int i = 0; i < ITERS; i++) {
    KfacStatus st;
    uint64_t steps = 0;
    size_t layers = 0;
    switch ((w->id + i) % 3) {
      case 0:
        st = kfac_observe_linear(w->p, 0, A, N, 3, G, 2);
        if (st == KFAC_OK) w->observed++;
        break;
      case 1:
        st = kfac_steps(w->p, &steps);
        break;
      default:
        st = kfac_num_layers(w->p, &layers);
        if (st == KFAC_OK && layers != 1) w->bad++;
        break;
    }
    if (st != KFAC_OK && st != KFAC_ERR_BUSY) {
      fprintf(stderr, "thread %d: status %d: %s\n", w->id, (int)st, kfac_last_error());
      w->bad++;
    }
  }
  return NULL;
}

static KfacPrecond *create(void) {
  KfacConfig c;
  KfacPrecond *p = NULL;
  uint32_t id = 9;
  if (kfac_config_default(&c, sizeof c) != KFAC_OK) return NULL;
  c.threads = 1;
  if (kfac_precond_create(&c, NULL, &p) != KFAC_OK) return NULL;
  if (kfac_register_linear(p, "fc", 3, 2, 1, &id) != KFAC_OK || id != 0) {
    kfac_precond_free(p);
    return NULL;
  }
  return p;
}

/* Steps once and reads the factors (A 4x4, G 2x2) into f[0..20). */
static int step_and_factors(KfacPrecond *p, float *f) {
  float wgrad[6] = {0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f}, bgrad[2] = {0.25f, 0.25f};
  KfacGrad g = {0, wgrad, 3, bgrad};
  if (kfac_step(p, &g, 1, NULL) != KFAC_OK) return 0;
  return kfac_get_factors(p, 0, f, 4, f + 16, 2) == KFAC_OK;
}

int main(void) {
  KfacPrecond *p = create(), *q = create();
  pthread_t t[THREADS];
  struct worker w[THREADS];
  int observed = 0, bad = 0;
  float got[20], want[20];
  if (!p || !q) {
    fprintf(stderr, "create failed: %s\n", kfac_last_error());
    return 1;
  }
  for (int i = 0; i < THREADS; i++) {
    w[i] = (struct worker){p, i, 0, 0};
    if (pthread_create(&t[i], NULL, hammer, &w[i]) != 0) return 1;
  }
  for (int i = 0; i < THREADS; i++) {
    pthread_join(t[i], NULL);
    observed += w[i].observed;
    bad += w[i].bad;
  }
  for (int i = 0; i < observed; i++) {
    if (kfac_observe_linear(q, 0, A, N, 3, G, 2) != KFAC_OK) bad++;
  }
  if (observed == 0 || !step_and_factors(p, got) || !step_and_factors(q, want)) bad++;
  else if (memcmp(got, want, sizeof got) != 0) {
    fprintf(stderr, "factors differ from the one-thread run\n");
    bad++;
  }
  if (kfac_precond_free(p) != KFAC_OK || kfac_precond_free(q) != KFAC_OK) bad++;
  if (kfac_precond_free(p) != KFAC_ERR_INVALID_HANDLE) bad++;
  printf("threads: %d observations, %d bad: %s\n", observed, bad, bad ? "FAILED" : "ok");
  return bad != 0;
}
