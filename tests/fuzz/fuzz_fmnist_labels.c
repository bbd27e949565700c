/* fuzz_fmnist_labels.c: tk_convert_fashion_mnist with an arbitrary labels idx file (raw or gzip'd)
 * and a fixed, valid images file (fuzz_fmnist.h). */
#include "fuzz_fmnist.h"

int tkf_target(const uint8_t *data, size_t size, tk_err *err) { return tkf_fmnist(data, size, 0, err); }
