/* crc32c.h: CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum of the shard format.
 *
 *   uint32_t c = tk_crc32c(0, data, n);          // whole buffer
 *   c = tk_crc32c(tk_crc32c(0, a, na), b, nb);   // == tk_crc32c(0, ab, na + nb)
 *
 * The value is the standard one (initial value and final XOR 0xFFFFFFFF are applied inside): the
 * check value of the nine ASCII bytes "123456789" is 0xE3069283. Chaining: pass the previous result
 * as crc. tk_crc32c uses the SSE4.2 crc32 instruction when the CPU has it and the byte table
 * otherwise; tk_crc32c_table and tk_crc32c_bitwise are the portable paths, kept for the tests.
 * No state, thread-safe, data may be NULL when n == 0.
 */
#ifndef TK_DATASETS_CRC32C_H
#define TK_DATASETS_CRC32C_H

#include <stddef.h>
#include <stdint.h>

uint32_t tk_crc32c(uint32_t crc, const void *data, size_t n);
uint32_t tk_crc32c_table(uint32_t crc, const void *data, size_t n);
uint32_t tk_crc32c_bitwise(uint32_t crc, const void *data, size_t n);

#endif
