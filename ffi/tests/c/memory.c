/*
 * Out of memory through the C ABI (run by ffi/tests/c_clients.rs under an
 * address-space limit, `ulimit -v`, given in KiB as the first argument).
 *
 * 1. With the limit in force, registering a 6000-wide linear layer (its A
 *    factor alone is 144 MB) returns KFAC_ERR_NO_MEMORY with the layer and
 *    the bytes it needs in kfac_last_error(); the handle stays usable: a small layer registers,
 *    observes and steps, and its result is finite.
 * 2. A memory budget (KfacConfig.memory_budget) refuses a layer that does
 *    not fit, with KFAC_ERR_NO_MEMORY and the bytes needed, and admits
 *    one that does.
 * 3. Out of memory mid-step: a 400-wide layer registers and observes, then
 *    the limit is lowered to what is mapped now plus 1 MiB, too little
 *    for its f64 eigendecomposition: kfac_step returns KFAC_ERR_NO_MEMORY
 *    (gradient untouched, statistics kept); with the limit restored the
 *    step retried as it was succeeds (before, this was KFAC_ERR_PANIC and
 *    a poisoned handle).
 *
 * Prints "memory: ... ok" on success; any other outcome is a failure.
 */
#define _GNU_SOURCE /* mallopt, setrlimit under -std=c99 */
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "kfac.h"

#define CHECK(expr, want)                                                        \
  do {                                                                           \
    KfacStatus st_ = (expr);                                                     \
    if (st_ != (want)) {                                                         \
      fprintf(stderr, "%s:%d: %s returned %d (%s), expected %d\n", __FILE__,     \
              __LINE__, #expr, (int)st_, kfac_last_error(), (int)(want));        \
      return 1;                                                                  \
    }                                                                            \
  } while (0)

static int small_layer_works(KfacPrecond *p, const char *name) {
  enum { N = 4, IN = 16, OUT = 8 };
  float a[N * IN], g[N * OUT], w[OUT * IN];
  uint32_t id = 0;
  for (int i = 0; i < N * IN; i++) a[i] = (float)((i * 7) % 11) * 0.2f - 1.0f;
  for (int i = 0; i < N * OUT; i++) g[i] = (float)((i * 5) % 9) * 0.1f - 0.4f;
  for (int i = 0; i < OUT * IN; i++) w[i] = (float)((i * 3) % 13) * 0.05f - 0.3f;
  CHECK(kfac_register_linear(p, name, IN, OUT, 0, &id), KFAC_OK);
  CHECK(kfac_observe_linear(p, id, a, N, IN, g, OUT), KFAC_OK);
  KfacGrad grad;
  memset(&grad, 0, sizeof grad);
  grad.layer = id;
  grad.weight = w;
  grad.ldw = IN;
  grad.bias = NULL;
  CHECK(kfac_step(p, &grad, 1, NULL), KFAC_OK);
  for (int i = 0; i < OUT * IN; i++) {
    if (!(w[i] == w[i]) || w[i] > 1e30f || w[i] < -1e30f) {
      fprintf(stderr, "non-finite preconditioned gradient\n");
      return 1;
    }
  }
  return 0;
}

/* Bytes of address space mapped now (VmSize), 0 if unknown. */
static unsigned long long vm_size(void) {
  FILE *f = fopen("/proc/self/status", "r");
  char line[256];
  unsigned long long kb = 0;
  if (!f) return 0;
  while (fgets(line, sizeof line, f)) {
    if (strncmp(line, "VmSize:", 7) == 0) kb = strtoull(line + 7, NULL, 10);
  }
  fclose(f);
  return kb * 1024;
}

static int mid_step(void) {
  enum { N = 4, IN = 400, OUT = 8 };
  static float a[N * IN], g[N * OUT], w[OUT * IN], before[OUT * IN];
  KfacConfig c;
  KfacPrecond *p = NULL;
  uint32_t id = 0;
  struct rlimit old, low;
  for (int i = 0; i < N * IN; i++) a[i] = (float)((i * 7) % 11) * 0.2f - 1.0f;
  for (int i = 0; i < N * OUT; i++) g[i] = (float)((i * 5) % 9) * 0.1f - 0.4f;
  for (int i = 0; i < OUT * IN; i++) before[i] = w[i] = (float)((i * 3) % 13) * 0.05f - 0.3f;
  CHECK(kfac_config_default(&c, sizeof c), KFAC_OK);
  c.threads = 1;
  c.inv_update_steps = 1;
  CHECK(kfac_precond_create(&c, NULL, &p), KFAC_OK);
  CHECK(kfac_register_linear(p, "mid", IN, OUT, 0, &id), KFAC_OK);
  CHECK(kfac_observe_linear(p, id, a, N, IN, g, OUT), KFAC_OK);
  KfacGrad grad;
  memset(&grad, 0, sizeof grad);
  grad.layer = id;
  grad.weight = w;
  grad.ldw = IN;
  if (getrlimit(RLIMIT_AS, &old) != 0) return 1;
  low = old;
  low.rlim_cur = (rlim_t)(vm_size() + (1u << 20));
  if (setrlimit(RLIMIT_AS, &low) != 0) return 1;
  KfacStatus st = kfac_step(p, &grad, 1, NULL);
  if (setrlimit(RLIMIT_AS, &old) != 0) return 1;
  if (st != KFAC_ERR_NO_MEMORY || strstr(kfac_last_error(), "discarded") ||
      !strstr(kfac_last_error(), "layer 'mid'")) {
    fprintf(stderr, "mid-step: status %d: %s\n", (int)st, kfac_last_error());
    return 1;
  }
  if (memcmp(w, before, sizeof w) != 0) {
    fprintf(stderr, "mid-step: the gradient was changed\n");
    return 1;
  }
  /* Retried without a new observation: the statistics were kept. */
  CHECK(kfac_step(p, &grad, 1, NULL), KFAC_OK);
  CHECK(kfac_precond_free(p), KFAC_OK);
  return 0;
}

int main(void) {
  /* glibc: one arena (a thread's arena reserves 64 MiB up front, which the
   * limit would not see being used) and a fixed mmap threshold, so large
   * allocations map fresh address space and a lowered limit bites. */
  mallopt(M_ARENA_MAX, 1);
  mallopt(M_MMAP_THRESHOLD, 128 * 1024);
  mallopt(M_TRIM_THRESHOLD, 128 * 1024);
  KfacConfig c;
  KfacPrecond *p = NULL;
  uint32_t id = 0;
  size_t layers = 0;

  /* 1. The address-space limit (set by the parent). */
  CHECK(kfac_config_default(&c, sizeof c), KFAC_OK);
  c.threads = 1;
  CHECK(kfac_precond_create(&c, NULL, &p), KFAC_OK);
  CHECK(kfac_register_linear(p, "wide", 6000, 16, 0, &id), KFAC_ERR_NO_MEMORY);
  {
    /* "... layer 'wide': ... needs <bytes> bytes": at least its A factor. */
    const char *m = kfac_last_error();
    const char *needs = strstr(m, "needs ");
    unsigned long long bytes = needs ? strtoull(needs + 6, NULL, 10) : 0;
    if (!strstr(m, "layer 'wide'") || bytes < 144000000ull) {
      fprintf(stderr, "message without the layer and the bytes: %s\n", m);
      return 1;
    }
  }
  CHECK(kfac_num_layers(p, &layers), KFAC_OK);
  if (layers != 0) {
    fprintf(stderr, "a refused layer was registered\n");
    return 1;
  }
  if (small_layer_works(p, "small")) return 1;
  CHECK(kfac_precond_free(p), KFAC_OK);

  /* 2. The memory budget. */
  CHECK(kfac_config_default(&c, sizeof c), KFAC_OK);
  c.threads = 1;
  c.memory_budget = 1u << 20; /* 1 MiB */
  CHECK(kfac_precond_create(&c, NULL, &p), KFAC_OK);
  CHECK(kfac_register_linear(p, "big", 1024, 64, 1, &id), KFAC_ERR_NO_MEMORY);
  if (!strstr(kfac_last_error(), "memory budget exceeded") || !strstr(kfac_last_error(), "'big'")) {
    fprintf(stderr, "budget message: %s\n", kfac_last_error());
    return 1;
  }
  if (small_layer_works(p, "fits")) return 1;
  CHECK(kfac_precond_free(p), KFAC_OK);
  /* 3. Out of memory mid-step. */
  if (mid_step()) return 1;
  printf("memory: 6000-wide layer refused under the limit, budget enforced, "
         "step out of memory recovered, ok\n");
  return 0;
}
