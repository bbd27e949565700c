/* test_shard_crc32c.c: the shard checksum (datasets/crc32c.c).
 *
 * Known answers (RFC 3720 appendix B.4 and the usual "123456789" check value) for each of the three
 * implementations, agreement of the table and SSE4.2 paths with the bit-by-bit definition on random
 * buffers of every length 0..300 at every alignment 0..7, and chaining. Exits 1 if any check fails.
 */
#include "common.h"
#include "datasets/crc32c.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>

static int n_fail = 0;
static int n_pass = 0;

static void check(int ok, const char *what) {
    printf("  %-66s %s\n", what, ok ? "ok" : "FAIL");
    if (ok) {
        n_pass++;
    } else {
        n_fail++;
    }
}

typedef uint32_t (*crc_fn)(uint32_t, const void *, size_t);

static void known_answers(const char *name, crc_fn f) {
    printf("%s: known answers\n", name);
    uint8_t buf[32];
    char what[128];
    snprintf(what, sizeof what, "\"123456789\" -> 0xe3069283");
    check(f(0, "123456789", 9) == 0xE3069283u, what);
    memset(buf, 0, 32);
    check(f(0, buf, 32) == 0x8A9136AAu, "32 zero bytes -> 0x8a9136aa (RFC 3720)");
    memset(buf, 0xff, 32);
    check(f(0, buf, 32) == 0x62A8AB43u, "32 0xff bytes -> 0x62a8ab43 (RFC 3720)");
    for (int i = 0; i < 32; i++) buf[i] = (uint8_t)i;
    check(f(0, buf, 32) == 0x46DD794Eu, "bytes 0..31 -> 0x46dd794e (RFC 3720)");
    for (int i = 0; i < 32; i++) buf[i] = (uint8_t)(31 - i);
    check(f(0, buf, 32) == 0x113FDB5Cu, "bytes 31..0 -> 0x113fdb5c (RFC 3720)");
    check(f(0, NULL, 0) == 0, "empty input -> 0");
    check(f(f(0, "1234", 4), "56789", 5) == 0xE3069283u, "chained \"1234\" + \"56789\" == whole");
}

int main(void) {
    known_answers("bitwise", tk_crc32c_bitwise);
    known_answers("table", tk_crc32c_table);
    known_answers("dispatch (sse4.2 when present)", tk_crc32c);

    printf("agreement on random buffers, lengths 0..300, alignments 0..7\n");
    uint8_t buf[320];
    uint64_t s = 0x1234567;
    for (size_t i = 0; i < sizeof buf; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        buf[i] = (uint8_t)(s >> 56);
    }
    int table_ok = 1, fast_ok = 1;
    for (size_t off = 0; off < 8; off++) {
        for (size_t n = 0; n + off <= 300; n++) {
            uint32_t want = tk_crc32c_bitwise(0x5a5a5a5au, buf + off, n);
            table_ok &= tk_crc32c_table(0x5a5a5a5au, buf + off, n) == want;
            fast_ok &= tk_crc32c(0x5a5a5a5au, buf + off, n) == want;
        }
    }
    check(table_ok, "table == bitwise");
    check(fast_ok, "dispatch == bitwise");
    uint32_t one = tk_crc32c(0, buf, 300);
    buf[150] ^= 0x10;
    check(tk_crc32c(0, buf, 300) != one, "one flipped bit changes the checksum");

    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail == 0 ? 0 : 1;
}
