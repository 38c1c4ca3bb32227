/*
 * Out of memory through the C ABI (run by ffi/tests/c_clients.rs under an
 * address-space limit, `ulimit -v`, given in KiB as the first argument).
 *
 * 1. With the limit in force, registering a 6000-wide linear layer (its A
 *    factor alone is 144 MB) returns KFAC_ERR_NO_MEMORY with the bytes in
 *    kfac_last_error(); the handle stays usable: a small layer registers,
 *    observes and steps, and its result is finite.
 * 2. A memory budget (KfacConfig.memory_budget) refuses a layer that does
 *    not fit, with KFAC_ERR_NO_MEMORY and the bytes needed, and admits
 *    one that does.
 *
 * Prints "memory: ... ok" on success; any other outcome is a failure.
 */
#include <stdio.h>
#include <string.h>

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

int main(void) {
  KfacConfig c;
  KfacPrecond *p = NULL;
  uint32_t id = 0;
  size_t layers = 0;

  /* 1. The address-space limit (set by the parent). */
  CHECK(kfac_config_default(&c, sizeof c), KFAC_OK);
  c.threads = 1;
  CHECK(kfac_precond_create(&c, NULL, &p), KFAC_OK);
  CHECK(kfac_register_linear(p, "wide", 6000, 16, 0, &id), KFAC_ERR_NO_MEMORY);
  if (!strstr(kfac_last_error(), "144000000 bytes") || !strstr(kfac_last_error(), "'wide'")) {
    fprintf(stderr, "message without the layer and the bytes: %s\n", kfac_last_error());
    return 1;
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
  printf("memory: 6000-wide layer refused under the limit, budget enforced, ok\n");
  return 0;
}
