/*
 * Caller-provided collectives: P threads of one process, each a rank whose
 * kfac communicator is built from callbacks over shared memory and a
 * pthread barrier (standing in for a stack's own NCCL/Gloo/MPI). Each rank
 * fits its shard of a least-squares problem; the result must match a
 * single-rank run, and a failing callback must surface as KFAC_ERR_COMM.
 */
#define _POSIX_C_SOURCE 200112L
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kfac.h"

#define P 3
#define IN 4
#define OUT 3
#define N 48
#define STEPS 30

typedef struct {
  pthread_barrier_t bar;
  void *slot[P];
  int fail_allreduce; /* set to make the next allreduce fail */
} Shared;

typedef struct {
  Shared *sh;
  unsigned rank, world;
  float w[OUT * IN], b[OUT];
  int status;
} Rank;

static int allreduce_cb(void *ud, void *buf, size_t count, KfacDtype dtype) {
  Rank *r = ud;
  if (r->sh->fail_allreduce) return 7;
  size_t esz = dtype == KFAC_DTYPE_F32 ? 4 : 8;
  void *tmp = malloc(count * esz + 1);
  r->sh->slot[r->rank] = buf;
  pthread_barrier_wait(&r->sh->bar);
  for (size_t i = 0; i < count; i++) { /* rank order */
    if (dtype == KFAC_DTYPE_F32) {
      float s = ((float *)r->sh->slot[0])[i];
      for (unsigned k = 1; k < r->world; k++) s += ((float *)r->sh->slot[k])[i];
      ((float *)tmp)[i] = s;
    } else {
      double s = ((double *)r->sh->slot[0])[i];
      for (unsigned k = 1; k < r->world; k++) s += ((double *)r->sh->slot[k])[i];
      ((double *)tmp)[i] = s;
    }
  }
  pthread_barrier_wait(&r->sh->bar);
  memcpy(buf, tmp, count * esz);
  free(tmp);
  pthread_barrier_wait(&r->sh->bar);
  return 0;
}

static int broadcast_cb(void *ud, void *buf, size_t bytes, uint32_t root) {
  Rank *r = ud;
  r->sh->slot[r->rank] = buf;
  pthread_barrier_wait(&r->sh->bar);
  if (r->rank != root) memcpy(buf, r->sh->slot[root], bytes);
  pthread_barrier_wait(&r->sh->bar);
  return 0;
}

static int allgather_cb(void *ud, const void *send, void *recv, size_t bytes) {
  Rank *r = ud;
  r->sh->slot[r->rank] = (void *)send;
  pthread_barrier_wait(&r->sh->bar);
  for (unsigned k = 0; k < r->world; k++) memcpy((char *)recv + k * bytes, r->sh->slot[k], bytes);
  pthread_barrier_wait(&r->sh->bar);
  return 0;
}

static int barrier_cb(void *ud) {
  Rank *r = ud;
  pthread_barrier_wait(&r->sh->bar);
  return 0;
}

static float rnd(unsigned *s) {
  *s = *s * 1664525u + 1013904223u;
  return (float)((*s >> 8) & 0xFFFF) / 32768.0f - 1.0f;
}

static float X[N][IN], Y[N][OUT], G[STEPS][N][OUT];

static void *train(void *arg) {
  Rank *r = arg;
  KfacComm *comm = NULL;
  KfacCollectives c;
  kfac_collectives_init(&c, sizeof c);
  c.user_data = r;
  c.rank = r->rank;
  c.world_size = r->world;
  c.allreduce = allreduce_cb;
  c.broadcast = broadcast_cb;
  c.allgather = allgather_cb;
  c.barrier = barrier_cb;
  if (r->world == 1) {
    r->status = kfac_comm_local(&comm);
  } else {
    r->status = kfac_comm_from_callbacks(&c, &comm);
  }
  if (r->status) return NULL;
  KfacConfig cfg;
  kfac_config_default(&cfg, sizeof cfg);
  cfg.damping = 1e-3;
  cfg.kl_clip = 0.0;
  cfg.inv_update_steps = 5;
  cfg.threads = 1;
  KfacPrecond *p = NULL;
  uint32_t id;
  if ((r->status = kfac_precond_create(&cfg, comm, &p)) != KFAC_OK) return NULL;
  if ((r->status = kfac_register_linear(p, "fc", IN, OUT, 1, &id)) != KFAC_OK) return NULL;
  memset(r->w, 0, sizeof r->w);
  memset(r->b, 0, sizeof r->b);
  int lo = (int)(r->rank * N / r->world), hi = (int)((r->rank + 1) * N / r->world);
  for (int step = 0; step < STEPS; step++) {
    float gw[OUT * IN] = {0}, gb[OUT] = {0};
    for (int n = lo; n < hi; n++)
      for (int i = 0; i < OUT; i++) {
        float v = r->b[i] - Y[n][i];
        for (int j = 0; j < IN; j++) v += r->w[i * IN + j] * X[n][j];
        gb[i] += v / N * (float)r->world;
        for (int j = 0; j < IN; j++) gw[i * IN + j] += v * X[n][j] / N * (float)r->world;
      }
    if ((r->status = kfac_observe_linear(p, id, &X[lo][0], (size_t)(hi - lo), IN, &G[step][lo][0], OUT)))
      return NULL;
    KfacGrad g = {id, gw, IN, gb};
    if ((r->status = kfac_allreduce_gradients(p, &g, 1))) return NULL;
    if ((r->status = kfac_step(p, &g, 1, NULL))) return NULL;
    for (int i = 0; i < OUT; i++) {
      r->b[i] -= gb[i];
      for (int j = 0; j < IN; j++) r->w[i * IN + j] -= gw[i * IN + j];
    }
  }
  kfac_precond_free(p);
  kfac_comm_free(comm);
  return NULL;
}

int main(void) {
  unsigned seed = 11;
  float ws[OUT][IN], bs[OUT];
  for (int i = 0; i < OUT; i++) {
    for (int j = 0; j < IN; j++) ws[i][j] = rnd(&seed);
    bs[i] = rnd(&seed);
  }
  for (int n = 0; n < N; n++) {
    for (int j = 0; j < IN; j++) X[n][j] = rnd(&seed);
    for (int i = 0; i < OUT; i++) {
      Y[n][i] = bs[i];
      for (int j = 0; j < IN; j++) Y[n][i] += ws[i][j] * X[n][j];
    }
  }
  for (int s = 0; s < STEPS; s++)
    for (int n = 0; n < N; n++)
      for (int i = 0; i < OUT; i++) G[s][n][i] = 1.7320508f * rnd(&seed);

  Shared one;
  Rank single = {&one, 0, 1, {0}, {0}, 0};
  pthread_barrier_init(&one.bar, NULL, 1);
  one.fail_allreduce = 0;
  train(&single);
  if (single.status) {
    fprintf(stderr, "single rank failed: %d %s\n", single.status, kfac_last_error());
    return 1;
  }

  Shared sh;
  sh.fail_allreduce = 0;
  pthread_barrier_init(&sh.bar, NULL, P);
  Rank ranks[P];
  pthread_t th[P];
  for (unsigned k = 0; k < P; k++) {
    ranks[k].sh = &sh;
    ranks[k].rank = k;
    ranks[k].world = P;
    ranks[k].status = 0;
    pthread_create(&th[k], NULL, train, &ranks[k]);
  }
  for (unsigned k = 0; k < P; k++) pthread_join(th[k], NULL);
  int bad = 0;
  for (unsigned k = 0; k < P; k++) {
    if (ranks[k].status) {
      fprintf(stderr, "rank %u failed: %d\n", k, ranks[k].status);
      bad = 1;
      continue;
    }
    double d = 0;
    for (int i = 0; i < OUT * IN; i++) d += fabs(ranks[k].w[i] - single.w[i]);
    for (int i = 0; i < OUT; i++) d += fabs(ranks[k].b[i] - single.b[i]);
    printf("rank %u: |theta - theta_single| = %.3g\n", k, d);
    if (d > 1e-3) bad = 1;
  }

  /* A failing callback surfaces as KFAC_ERR_COMM on the calling rank. */
  KfacCollectives c;
  kfac_collectives_init(&c, sizeof c);
  c.user_data = &ranks[0];
  c.rank = 0;
  c.world_size = 2;
  c.allreduce = allreduce_cb;
  c.broadcast = broadcast_cb;
  c.allgather = allgather_cb;
  c.barrier = barrier_cb;
  Shared solo;
  pthread_barrier_init(&solo.bar, NULL, 1);
  solo.fail_allreduce = 1;
  ranks[0].sh = &solo;
  ranks[0].world = 2;
  KfacComm *comm = NULL;
  KfacPrecond *p = NULL;
  KfacConfig cfg;
  kfac_config_default(&cfg, sizeof cfg);
  uint32_t id;
  if (kfac_comm_from_callbacks(&c, &comm) || kfac_precond_create(&cfg, comm, &p) ||
      kfac_register_linear(p, "fc", IN, OUT, 1, &id)) {
    fprintf(stderr, "setup failed: %s\n", kfac_last_error());
    return 1;
  }
  float gw[OUT * IN] = {0}, gb[OUT] = {0};
  KfacGrad g = {id, gw, IN, gb};
  KfacStatus s = kfac_allreduce_gradients(p, &g, 1);
  printf("failing callback -> status %d (%s)\n", (int)s, kfac_last_error());
  if (s != KFAC_ERR_COMM) bad = 1;
  kfac_precond_free(p);
  kfac_comm_free(comm);
  printf("%s\n", bad ? "FAILED" : "callbacks ok");
  return bad;
}
