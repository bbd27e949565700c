/* token_kind.h: what each token position is, shared by templates (text/), shards and the loader
 * (datasets/), the model's per-position kinds and the gate statistics (src/). Stored as one byte. */
#ifndef TK_TOKEN_KIND_H
#define TK_TOKEN_KIND_H

typedef enum {
    TK_KIND_PAD = 0,      /* padding added by tk_example_pad / batching */
    TK_KIND_PROMPT = 1,   /* BOS, system, user turns, separators */
    TK_KIND_RESPONSE = 2, /* assistant turns and the EOS that ends them */
    TK_KIND_IMAGE = 3,    /* image placeholder positions (visual tokens) */
} tk_kind;

#endif
