/* fuzz_fmnist_images.c: tk_convert_fashion_mnist with an arbitrary images idx file (raw or gzip'd)
 * and a fixed, valid labels file (fuzz_fmnist.h). */
#include "fuzz_fmnist.h"

int tkf_target(const uint8_t *data, size_t size, tk_err *err) { return tkf_fmnist(data, size, 1, err); }
