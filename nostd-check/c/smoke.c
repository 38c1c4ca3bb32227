/* Links the no_std static library into a C program with no Rust runtime and
 * runs every kernel once. */
#include <stdio.h>
int kfac_nostd_smoke(void);
int main(void) {
    int rc = kfac_nostd_smoke();
    printf("kfac no_std smoke: %s\n", rc == 0 ? "ok" : "FAILED");
    return rc;
}
