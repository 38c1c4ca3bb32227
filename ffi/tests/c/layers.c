/*
 * conv2d and embedding through the C ABI, checked against equivalent
 * formulations (run by ffi/tests/c_clients.rs):
 *
 * 1. The same conv2d (3x3, stride 2, padding 1, bias) observed once in NCHW
 *    and once in NHWC (the same numbers transposed) must precondition the
 *    same weight gradient to the same result.
 * 2. An embedding observed with token ids must precondition like a linear
 *    layer without bias observed with the one-hot rows of those ids (its A
 *    factor is the diagonal of token frequencies); the embedding's weight
 *    gradient is `num x dim`, the linear layer's `dim x num`.
 * 3. Bad calls (a token id out of range, NULL input, a too-short leading
 *    dimension, a wrong layer kind) fail with a status and a message and
 *    leave the preconditioner usable.
 *
 * All four layers share one preconditioner, so they share its KL-clipping
 * scale. Tolerance: the two sides of each pair sum the same products in a
 * different order (f32); with damping 0.1 the preconditioner amplifies that
 * by at most ~(max eigenvalue / damping) ~ 10^2, so |diff| <= 1e-3 * max|x|.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "kfac.h"

#define CIN 3
#define COUT 4
#define K 3
#define NB 2
#define H 7
#define W 6
#define OH ((H + 2 - K) / 2 + 1)
#define OW ((W + 2 - K) / 2 + 1)
#define NUM 5
#define DIM 3
#define NTOK 9

static float hrand(unsigned a, unsigned b) {
  unsigned h = a * 2654435761u ^ (b + 0x9E3779B9u + (a << 6) + (a >> 2));
  h ^= h >> 16;
  h *= 0x7feb352du;
  h ^= h >> 15;
  return (float)(h & 0xFFFFFF) / 8388608.0f - 1.0f;
}

static int fails = 0;
#define CHECK(cond, ...)                      \
  do {                                        \
    if (!(cond)) {                            \
      fprintf(stderr, "FAILED: " __VA_ARGS__); \
      fprintf(stderr, " [%s]\n", kfac_last_error()); \
      fails++;                                \
    }                                         \
  } while (0)

static double max_abs(const float *x, int n) {
  double m = 0;
  for (int i = 0; i < n; i++) m = fabs(x[i]) > m ? fabs(x[i]) : m;
  return m;
}

int main(void) {
  KfacConfig cfg;
  kfac_config_default(&cfg, sizeof cfg);
  cfg.damping = 0.1;
  cfg.threads = 1;
  KfacPrecond *p = NULL;
  CHECK(kfac_precond_create(&cfg, NULL, &p) == KFAC_OK, "create");
  uint32_t c_nchw, c_nhwc, emb, lin;
  CHECK(kfac_register_conv2d(p, "conv_nchw", CIN, COUT, K, K, 2, 2, 1, 1, 1, 1, 1, KFAC_LAYOUT_NCHW,
                             &c_nchw) == KFAC_OK, "register conv nchw");
  CHECK(kfac_register_conv2d(p, "conv_nhwc", CIN, COUT, K, K, 2, 2, 1, 1, 1, 1, 1, KFAC_LAYOUT_NHWC,
                             &c_nhwc) == KFAC_OK, "register conv nhwc");
  CHECK(kfac_register_embedding(p, "emb", NUM, DIM, &emb) == KFAC_OK, "register embedding");
  CHECK(kfac_register_linear(p, "onehot", NUM, DIM, 0, &lin) == KFAC_OK, "register linear");
  CHECK(kfac_register_conv2d(p, "bad", CIN, COUT, K, K, 2, 2, 1, 1, 1, 1, 1, 7, &lin) ==
            KFAC_ERR_INVALID_ARGUMENT, "layout 7 refused");

  /* conv data in NCHW and the same numbers in NHWC */
  static float x_nchw[NB][CIN][H][W], x_nhwc[NB][H][W][CIN];
  static float g_nchw[NB][COUT][OH][OW], g_nhwc[NB][OH][OW][COUT];
  for (int n = 0; n < NB; n++)
    for (int c = 0; c < CIN; c++)
      for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++)
          x_nhwc[n][y][x][c] = x_nchw[n][c][y][x] = hrand(1, (unsigned)(((n * CIN + c) * H + y) * W + x));
  for (int n = 0; n < NB; n++)
    for (int c = 0; c < COUT; c++)
      for (int y = 0; y < OH; y++)
        for (int x = 0; x < OW; x++)
          g_nhwc[n][y][x][c] = g_nchw[n][c][y][x] = hrand(2, (unsigned)(((n * COUT + c) * OH + y) * OW + x));
  CHECK(kfac_observe_conv2d(p, c_nchw, &x_nchw[0][0][0][0], &g_nchw[0][0][0][0], NB, H, W) == KFAC_OK,
        "observe nchw");
  CHECK(kfac_observe_conv2d(p, c_nhwc, &x_nhwc[0][0][0][0], &g_nhwc[0][0][0][0], NB, H, W) == KFAC_OK,
        "observe nhwc");
  CHECK(kfac_observe_conv2d(p, c_nchw, NULL, &g_nchw[0][0][0][0], NB, H, W) == KFAC_ERR_NULL,
        "NULL conv input refused");
  CHECK(kfac_observe_conv2d(p, emb, &x_nchw[0][0][0][0], &g_nchw[0][0][0][0], NB, H, W) == KFAC_ERR_SHAPE,
        "conv observation of an embedding refused");

  /* embedding tokens and the equivalent one-hot rows; gradients with a
   * padded leading dimension */
  uint64_t tok[NTOK];
  float onehot[NTOK][NUM], ge[NTOK][DIM + 2];
  memset(onehot, 0, sizeof onehot);
  for (int i = 0; i < NTOK; i++) {
    tok[i] = (uint64_t)((i * 7 + 3) % (NUM - 1)); /* id NUM-1 never occurs */
    onehot[i][tok[i]] = 1.0f;
    for (int d = 0; d < DIM + 2; d++) ge[i][d] = d < DIM ? hrand(3, (unsigned)(i * DIM + d)) : NAN;
  }
  uint64_t bad_tok[2] = {0, NUM};
  CHECK(kfac_observe_embedding(p, emb, bad_tok, 2, &ge[0][0], DIM + 2) != KFAC_OK, "token id NUM refused");
  CHECK(kfac_observe_embedding(p, emb, tok, NTOK, &ge[0][0], DIM - 1) == KFAC_ERR_SHAPE, "short ldg refused");
  CHECK(kfac_observe_embedding(p, emb, tok, NTOK, &ge[0][0], DIM + 2) == KFAC_OK, "observe embedding");
  CHECK(kfac_observe_linear(p, lin, &onehot[0][0], NTOK, NUM, &ge[0][0], DIM + 2) == KFAC_OK,
        "observe one-hot linear");

  /* one weight gradient per pair */
  static float wc1[COUT][CIN * K * K], wc2[COUT][CIN * K * K], bc1[COUT], bc2[COUT];
  static float we[NUM][DIM], wl[DIM][NUM];
  for (int o = 0; o < COUT; o++) {
    bc1[o] = bc2[o] = hrand(4, (unsigned)o);
    for (int i = 0; i < CIN * K * K; i++) wc1[o][i] = wc2[o][i] = hrand(5, (unsigned)(o * 100 + i));
  }
  for (int t = 0; t < NUM; t++)
    for (int d = 0; d < DIM; d++) we[t][d] = wl[d][t] = hrand(6, (unsigned)(t * DIM + d));
  KfacGrad grads[4] = {{c_nchw, &wc1[0][0], CIN * K * K, bc1},
                       {c_nhwc, &wc2[0][0], CIN * K * K, bc2},
                       {emb, &we[0][0], DIM, NULL},
                       {lin, &wl[0][0], NUM, NULL}};
  KfacStepStats st = {.struct_size = sizeof st};
  CHECK(kfac_step(p, grads, 4, &st) == KFAC_OK, "step");
  CHECK(st.inverses_updated == 1 && st.factors_updated == 1, "first step updates everything");

  double scale = max_abs(&wc1[0][0], COUT * CIN * K * K), worst = 0;
  for (int o = 0; o < COUT; o++) {
    for (int i = 0; i < CIN * K * K; i++) worst = fmax(worst, fabs(wc1[o][i] - wc2[o][i]));
    worst = fmax(worst, fabs(bc1[o] - bc2[o]));
  }
  CHECK(scale > 0 && worst <= 1e-3 * scale, "NCHW vs NHWC: max diff %g, scale %g", worst, scale);
  double conv_diff = worst;

  scale = max_abs(&we[0][0], NUM * DIM);
  worst = 0;
  for (int t = 0; t < NUM; t++)
    for (int d = 0; d < DIM; d++) worst = fmax(worst, fabs(we[t][d] - wl[d][t]));
  CHECK(scale > 0 && worst <= 1e-3 * scale, "embedding vs one-hot linear: max diff %g, scale %g", worst,
        scale);
  /* this libkfac is built without MPI: the call exists and says so */
  KfacComm *mc = NULL;
  CHECK(kfac_has_mpi() == 0, "built without MPI");
  CHECK(kfac_comm_mpi(0, 0, 1000, &mc) == KFAC_ERR_INVALID_ARGUMENT && mc == NULL,
        "kfac_comm_mpi refused without MPI");
  printf("layers: conv NCHW/NHWC max diff %.3g, embedding/one-hot max diff %.3g, %s\n", conv_diff,
         worst, fails ? "FAILED" : "ok");
  kfac_precond_free(p);
  return fails ? 1 : 0;
}
