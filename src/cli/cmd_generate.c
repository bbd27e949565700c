/* cmd_generate.c: `tspeft generate`: greedy decoding with a KV cache from token ids, with the
 * adapter (and its token gate) applied. */
#include "../../datasets/convert_llava.h"
#include "../../text/template.h"
#include "../../text/tokenizer.h"
#include "../../vision/projector.h"
#include "../model/llama.h"
#include "../train/multimodal.h"
#include "args.h"
#include "cli.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *USAGE =
    "usage: tspeft generate --model DIR [--adapter DIR] --ids 1,2,3 [--max-new-tokens N] [--eos ID]\n"
    "       tspeft generate --model DIR [--adapter DIR] --tokenizer FILE --prompt TEXT [--template NAME]\n"
    "                       [--image FILE --vision-tower DIR [--projector FILE]]\n"
    "Greedy decoding with a KV cache. With --ids, prints the generated ids on one line; with --prompt, the\n"
    "prompt goes through the template's generation prompt (vicuna_v1 by default, LLaVA-1.5's; an --image is\n"
    "placed before the question as LLaVA does) and the generated text is printed. The gated adapter is\n"
    "applied exactly as in training.";

/* --prompt [--image]: the template's generation prompt, tokenized (image positions: kind IMAGE, id 0),
 * the image's projections spliced in, greedy decoding; prints the text. */
static int generate_text(tk_llama *m, const tk_tokenizer *tok, tk_mm *mm, const char *prompt, const char *image,
                         const char *template_name, size_t max_new, int32_t eos, tk_err *err) {
    tk_template t;
    if (tk_template_from_name(template_name, &t, err)) return -1;
    size_t n_img = mm ? tk_mm_tokens(mm) : 0;
    char *user = NULL;
    size_t ul = strlen(prompt) + 16;
    if (!(user = malloc(ul))) return tk_fail(err, "out of memory");
    snprintf(user, ul, "%s%s", image ? "<image>\n" : "", prompt);
    tk_turn turn = {user, NULL};
    tk_dialog d = {.turns = &turn, .n_turns = 1};
    tk_segments segs = {0};
    tk_segment *split = NULL;
    size_t n_split = 0;
    tk_example ex = {0};
    tk_template_opts to = {.train_on_inputs = 1};
    tk_llama_kv *kv = NULL;
    float *embeds = NULL, *logits = NULL;
    int32_t *gen = NULL;
    char *bytes = NULL, *text = NULL;
    int rc = -1;
    if (tk_template_segments(&segs, t, TK_PROMPT_EVAL, &d, err)) goto done;
    if (image) {
        if (tk_llava_split_image(&split, &n_split, &segs, n_img, err) ||
            tk_encode_segments(&ex, NULL, tok, split, n_split, &to, err))
            goto done;
    } else if (tk_encode_segments(&ex, NULL, tok, segs.segs, segs.n, &to, err)) {
        goto done;
    }
    size_t C = (size_t)m->cfg.dim, V = (size_t)m->cfg.vocab_size, n = ex.n;
    size_t Vt = (size_t)tk_tok_vocab_size(tok) < V ? (size_t)tk_tok_vocab_size(tok) : V;
    if (n + max_new > (size_t)m->cfg.max_seq_len) max_new = n < (size_t)m->cfg.max_seq_len ? m->cfg.max_seq_len - n : 0;
    if (max_new == 0) {
        tk_fail(err, "the prompt (%zu tokens) fills the model's %d positions", n, m->cfg.max_seq_len);
        goto done;
    }
    if (!(embeds = calloc(n * C, sizeof *embeds)) || !(logits = malloc(V * sizeof *logits)) ||
        !(gen = malloc(max_new * sizeof *gen))) {
        tk_fail(err, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < n; i++)
        if (ex.input_ids[i] < 0) ex.input_ids[i] = 0; /* image positions: their embedding is replaced */
    if (image) {
        size_t nb, s0 = 0;
        while (s0 < n && ex.kinds[s0] != TK_KIND_IMAGE) s0++;
        if (!(bytes = tk_read_file(image, &nb, err)) ||
            tk_mm_embed_image(mm, (const uint8_t *)bytes, nb, image, embeds + s0 * C, err))
            goto done;
    }
    if (!(kv = tk_llama_kv_alloc(m, n + max_new, n, err)) ||
        tk_llama_step_ex(m, kv, ex.input_ids, embeds, ex.kinds, n, logits, err))
        goto done;
    size_t ng = 0;
    for (; ng < max_new; ng++) {
        int32_t best = 0; /* among the ids the tokenizer can decode (llava-hf pads its vocabulary) */
        for (size_t v = 1; v < Vt; v++)
            if (logits[v] > logits[best]) best = (int32_t)v;
        if (eos >= 0 && best == eos) break;
        gen[ng] = best;
        if (ng + 1 < max_new && tk_llama_step(m, kv, &gen[ng], 1, logits, err)) goto done;
    }
    if (!(text = tk_tok_decode(tok, gen, ng, NULL, err))) goto done;
    printf("%s\n", text);
    rc = 0;
done:
    free(user);
    tk_segments_free(&segs);
    free(split);
    tk_example_free(&ex);
    tk_llama_kv_free(kv);
    free(embeds);
    free(logits);
    free(gen);
    free(bytes);
    free(text);
    return rc;
}

/* Parses "1,2,3" (or spaces) into ids; returns the count or -1. */
static long parse_ids(const char *s, int32_t **out, tk_err *err) {
    size_t cap = 16, n = 0;
    int32_t *ids = malloc(cap * sizeof *ids);
    if (!ids) return tk_fail(err, "out of memory");
    while (*s) {
        while (*s == ',' || *s == ' ') s++;
        if (!*s) break;
        char *end;
        errno = 0;
        long v = strtol(s, &end, 10);
        if (end == s || errno || v < 0 || v > 2147483647L) {
            free(ids);
            return tk_fail(err, "--ids: \"%s\" is not a list of non-negative integers", s);
        }
        if (n == cap) {
            int32_t *t = realloc(ids, 2 * cap * sizeof *ids);
            if (!t) {
                free(ids);
                return tk_fail(err, "out of memory");
            }
            ids = t;
            cap *= 2;
        }
        ids[n++] = (int32_t)v;
        s = end;
    }
    *out = ids;
    return (long)n;
}

int tk_cmd_generate(int argc, char **argv) {
    const char *model_dir = NULL, *adapter_dir = NULL, *ids_arg = NULL, *prompt = NULL, *tok_path = NULL;
    const char *image = NULL, *template_name = "vicuna_v1", *projector = NULL, *compute = "fp32";
    int max_new = 32, eos = -2, threads = 0, bf16 = 0, compute_bf16 = 0;
    tk_mm_opts mo = {0};
    tk_mm *mm = NULL;
    tk_tokenizer *tok = NULL;
    char proj_buf[4200];
    tk_opt opts[] = {
        {"model", TK_OPT_STR, &model_dir, "DIR", "Hugging Face LLaMA directory", 0},
        {"adapter", TK_OPT_STR, &adapter_dir, "DIR", "PEFT adapter directory (optional)", 0},
        {"ids", TK_OPT_STR, &ids_arg, "LIST", "prompt token ids, comma-separated", 0},
        {"prompt", TK_OPT_STR, &prompt, "TEXT", "prompt text (with --tokenizer), put into --template", 0},
        {"tokenizer", TK_OPT_STR, &tok_path, "FILE", "sentencepiece tokenizer.model (with --prompt)", 0},
        {"template", TK_OPT_STR, &template_name, "NAME", "vicuna_v1 (default) | llava_v1 | alpaca | llama2 | plain", 0},
        {"image", TK_OPT_STR, &image, "FILE", "an image shown before the prompt (LLaVA; needs --vision-tower)", 0},
        {"vision-tower", TK_OPT_STR, &mo.tower, "DIR", "HF CLIP/SigLIP vision tower (with --image)", 0},
        {"projector", TK_OPT_STR, &projector, "FILE", "projector (default: ADAPTER/mm_projector.safetensors)", 0},
        {"image-preprocess", TK_OPT_STR, &mo.preprocess, "P", "clip | llava-pad | siglip (default clip)", 0},
        {"image-size", TK_OPT_INT, &mo.image_size, "S", "preprocess the image to S pixels (default: the tower's)", 0},
        {"interpolate-pos", TK_OPT_FLAG, &mo.interpolate_pos, NULL, "interpolate the tower's position embeddings "
                                                                     "(bicubic) for --image-size", 0},
        {"max-new-tokens", TK_OPT_INT, &max_new, "N", "tokens to generate (default 32)", 0},
        {"eos", TK_OPT_INT, &eos, "ID", "stop after this id (default: none with --ids; the tokenizer's with --prompt)", 0},
        {"threads", TK_OPT_INT, &threads, "T", "threads (default: all cores)", 0},
        {"bf16-weights", TK_OPT_FLAG, &bf16, NULL, "keep BF16 base matrices BF16 in memory", 0},
        {"compute", TK_OPT_STR, &compute, "P", "fp32 | bf16: frozen products in BF16, fp32 accumulation (AVX512-BF16; default fp32)", 0},
    };
    int n = (int)(sizeof opts / sizeof opts[0]);
    tk_err err = {0};
    tk_llama *m = NULL;
    int32_t *ids = NULL, *out = NULL;
    int status = 1;
    int pr = tk_args_parse(opts, n, argc, argv, USAGE, &err);
    if (pr == 1) return 0;
    if (pr == 0 && (!model_dir || (!ids_arg == !prompt) || (prompt && !tok_path) || (image && (!prompt || !mo.tower))))
        pr = tk_fail(&err, "generate needs --model DIR and either --ids LIST or --prompt TEXT --tokenizer FILE "
                           "(--image also needs --prompt and --vision-tower; see --help)");
    if (pr == 0) pr = tk_compute_parse(compute, &compute_bf16, &err);
    if (pr < 0) {
        fprintf(stderr, "tspeft generate: %s\n", err.msg);
        return 2;
    }
    if (max_new < 1) {
        tk_fail(&err, "--max-new-tokens must be >= 1");
        goto done;
    }
    tk_set_threads(threads);
    compute_bf16 = tk_compute_resolve(compute_bf16, 0);
    long np = ids_arg ? parse_ids(ids_arg, &ids, &err) : 0;
    if (np < 0) goto done;
    if (prompt && !(tok = tk_tok_open(tok_path, &err))) goto done;
    if (!(m = tk_llama_open_ex(model_dir, bf16, &err))) goto done;
    if (image) { /* the projector joins the trainable block before the adapter is attached */
        if (!projector && adapter_dir) {
            snprintf(proj_buf, sizeof proj_buf, "%s/mm_projector.safetensors", adapter_dir);
            projector = proj_buf;
        }
        if (!projector) {
            tk_fail(&err, "--image needs --projector FILE (or an --adapter holding mm_projector.safetensors)");
            goto done;
        }
        mo.projector = projector;
        if (!(mm = tk_mm_open(&mo, (size_t)m->cfg.dim, &err))) goto done;
        tk_mm_hook(mm, m);
    }
    tk_peft_config pc;
    tk_peft_config_default(&pc);
    pc.kind = TK_ADAPTER_NONE;
    if (adapter_dir) {
        char path[4096];
        snprintf(path, sizeof path, "%s/adapter_config.json", adapter_dir);
        if (tk_peft_config_load(&pc, path, &err)) goto done;
    }
    if (!mm) m->vit_targets = TK_VIT_IGNORE; /* text only: a LLaVA adapter's tower modules are not used */
    int rc = (mm && tk_mm_set_tower_training(mm, &pc, 0, 0.0f, 0, &err)) || tk_llama_attach(m, &pc, adapter_dir, 0, &err);
    tk_peft_config_free(&pc);
    m->compute_bf16 = compute_bf16;
    if (rc || tk_llama_pack_frozen(m, &err) < 0) goto done;
    if (mm && tk_mm_init_weights(mm, projector, 0, &err)) goto done;
    if (prompt) {
        if (generate_text(m, tok, mm, prompt, image, template_name, (size_t)max_new,
                          eos == -2 ? tk_tok_eos_id(tok) : eos, &err))
            goto done;
        status = 0;
        goto done;
    }
    if (eos == -2) eos = -1;
    if (!(out = malloc((size_t)max_new * sizeof *out))) {
        tk_fail(&err, "out of memory");
        goto done;
    }
    long got = tk_llama_generate(m, ids, (size_t)np, (size_t)max_new, eos, out, &err);
    if (got < 0) goto done;
    for (long i = 0; i < got; i++) printf("%s%d", i ? " " : "", out[i]);
    printf("\n");
    status = 0;
done:
    if (status) fprintf(stderr, "tspeft generate: %s\n", err.msg);
    free(ids);
    free(out);
    tk_llama_close(m);
    tk_mm_free(mm);
    tk_tok_free(tok);
    return status;
}
