/* convert_llava.c: LLaVA conversation JSON -> shards (see convert_llava.h). */
#include "convert_llava.h"

#include "../text/template.h"
#include "../vision/image.h"
#include "shard.h"
_Static_assert(TK_SHARD_LABEL_IGNORE == TK_IGNORE_INDEX, "ignored label");

#include <cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define IMAGE_TAG "<image>"
#define IMAGE_TAG_LEN 7

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

static size_t count_tag(const char *s) {
    size_t n = 0;
    for (const char *p = strstr(s, IMAGE_TAG); p; p = strstr(p + IMAGE_TAG_LEN, IMAGE_TAG)) n++;
    return n;
}

/* "<image>\n" + strip(s without "<image>"), malloc'd. */
static char *move_image_tag(const char *s) {
    size_t n = strlen(s);
    char *tmp = malloc(n + 1), *out = malloc(n + IMAGE_TAG_LEN + 2);
    if (!tmp || !out) {
        free(tmp);
        free(out);
        return NULL;
    }
    size_t k = 0;
    for (size_t i = 0; i < n;) {
        if (strncmp(s + i, IMAGE_TAG, IMAGE_TAG_LEN) == 0) {
            i += IMAGE_TAG_LEN;
        } else {
            tmp[k++] = s[i++];
        }
    }
    size_t b = 0, e = k;
    while (b < e && is_space(tmp[b])) b++;
    while (e > b && is_space(tmp[e - 1])) e--;
    memcpy(out, IMAGE_TAG "\n", IMAGE_TAG_LEN + 1);
    memcpy(out + IMAGE_TAG_LEN + 1, tmp + b, e - b);
    out[IMAGE_TAG_LEN + 1 + e - b] = '\0';
    free(tmp);
    return out;
}

/* Copies segs into *out, splitting the text segment that holds "<image>" into text, an image run of
 * n_image tokens, and the rest as a fresh encode call. Texts keep pointing into the source. */
int tk_llava_split_image(tk_segment **out, size_t *n_out, const tk_segments *segs, size_t n_image, tk_err *err) {
    tk_segment *o = malloc((segs->n + 2) * sizeof *o);
    if (!o) return tk_fail(err, "out of memory");
    size_t k = 0, found = 0;
    for (size_t i = 0; i < segs->n; i++) {
        const tk_segment *s = &segs->segs[i];
        const char *at = NULL;
        if (s->type == TK_SEG_TEXT && !found) {
            for (size_t j = 0; j + IMAGE_TAG_LEN <= s->len; j++)
                if (memcmp(s->text + j, IMAGE_TAG, IMAGE_TAG_LEN) == 0) {
                    at = s->text + j;
                    break;
                }
        }
        if (!at) {
            o[k++] = *s;
            continue;
        }
        found = 1;
        size_t before = (size_t)(at - s->text);
        o[k] = *s;
        o[k].len = before;
        k++;
        memset(&o[k], 0, sizeof o[k]);
        o[k].type = TK_SEG_IMAGE;
        o[k].kind = TK_KIND_IMAGE;
        o[k].n_image = n_image;
        k++;
        o[k] = *s;
        o[k].text = at + IMAGE_TAG_LEN;
        o[k].len = s->len - before - IMAGE_TAG_LEN;
        o[k].fresh = 1; /* tokenizer_image_token encodes the chunk after <image> on its own */
        k++;
    }
    if (!found) {
        free(o);
        return tk_fail(err, "internal: <image> not found in the rendered conversation");
    }
    *out = o;
    *n_out = k;
    return 0;
}

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

typedef struct {
    const tk_llava_convert_opts *o;
    tk_shard_writer *w;
    tk_shard_writer_opts wopts;
    size_t index;      /* next shard number */
    char path[4200];   /* the open shard */
    int single;
    tk_llava_convert_stats *st;
} shard_out;

static int out_close(shard_out *so, tk_err *err) {
    if (!so->w) return 0;
    int rc = tk_shard_writer_close(so->w, NULL, err);
    so->w = NULL;
    if (rc == 0) so->st->shards++;
    return rc;
}

static int out_add(shard_out *so, const tk_shard_record *rec, tk_err *err) {
    if (!so->w) {
        if (so->single) {
            if (tk_pathf(so->path, sizeof so->path, err, "%s", so->o->out) != 0) return -1;
        } else if (tk_pathf(so->path, sizeof so->path, err, "%s-%05zu.shard", so->o->out, so->index) != 0) {
            return -1;
        }
        so->index++;
        so->w = tk_shard_writer_open(so->path, &so->wopts, err);
        if (!so->w) return -1;
    }
    if (tk_shard_writer_add(so->w, rec, err) != 0) return -1;
    if (!so->single) {
        tk_shard_stats s;
        tk_shard_writer_stats(so->w, &s);
        size_t limit = so->o->shard_bytes ? so->o->shard_bytes : TK_LLAVA_DEFAULT_SHARD_BYTES;
        if (s.raw_bytes >= limit) return out_close(so, err);
    }
    return 0;
}

/* One record's working memory. */
typedef struct {
    tk_turn *turns;
    char **owned; /* strings made by move_image_tag, per turn (NULL when not changed) */
    size_t cap;
    tk_segments segs;
    tk_example ex;
    int32_t *ids;
    size_t ids_cap;
} scratch;

static void scratch_free(scratch *s) {
    for (size_t i = 0; i < s->cap; i++) free(s->owned[i]);
    free(s->turns);
    free(s->owned);
    tk_segments_free(&s->segs);
    tk_example_free(&s->ex);
    free(s->ids);
}

/* Name used in messages: "FILE: record I (id X)". */
static void rec_name(char *out, size_t n, const char *file, size_t i, const cJSON *id) {
    if (cJSON_IsString(id)) snprintf(out, n, "%s: record %zu (id %.200s)", file, i, id->valuestring);
    else if (cJSON_IsNumber(id)) snprintf(out, n, "%s: record %zu (id %.17g)", file, i, id->valuedouble);
    else snprintf(out, n, "%s: record %zu", file, i);
}

/* Result of one record: 0 written, 1 skipped (bad image, counted), -1 error. */
static int convert_record(shard_out *so, const cJSON *rec, size_t ri, const tk_tokenizer *tok, tk_template tmpl,
                          scratch *sc, tk_err *err) {
    const tk_llava_convert_opts *o = so->o;
    tk_llava_convert_stats *st = so->st;
    char name[512];
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(rec, "id");
    rec_name(name, sizeof name, o->input, ri, id);
    if (!cJSON_IsObject(rec)) return tk_fail(err, "%s: not a JSON object", name);
    if (id && !cJSON_IsString(id) && !cJSON_IsNumber(id))
        return tk_fail(err, "%s: \"id\" must be a string or a number", name);
    const cJSON *image = cJSON_GetObjectItemCaseSensitive(rec, "image");
    if (image && !cJSON_IsString(image) && !cJSON_IsNull(image))
        return tk_fail(err, "%s: \"image\" must be a string (one image per record)", name);
    if (cJSON_IsNull(image)) image = NULL;
    const cJSON *conv = cJSON_GetObjectItemCaseSensitive(rec, "conversations");
    if (!cJSON_IsArray(conv)) return tk_fail(err, "%s: \"conversations\" missing or not an array", name);
    size_t n_msgs = (size_t)cJSON_GetArraySize(conv);

    /* roles: skip leading non-human turns, then human/gpt pairs */
    if (n_msgs / 2 + 1 > sc->cap) {
        size_t cap = n_msgs / 2 + 1;
        tk_turn *t = realloc(sc->turns, cap * sizeof *t);
        if (!t) return tk_fail(err, "out of memory");
        sc->turns = t;
        char **ow = realloc(sc->owned, cap * sizeof *ow);
        if (!ow) return tk_fail(err, "out of memory");
        for (size_t i = sc->cap; i < cap; i++) ow[i] = NULL;
        sc->owned = ow;
        sc->cap = cap;
    }
    for (size_t i = 0; i < sc->cap; i++) {
        free(sc->owned[i]);
        sc->owned[i] = NULL;
    }
    size_t n_turns = 0, n_tags = 0, k = 0;
    int started = 0;
    const char *answer = NULL;
    const cJSON *m;
    cJSON_ArrayForEach(m, conv) {
        const cJSON *from = cJSON_GetObjectItemCaseSensitive(m, "from");
        const cJSON *value = cJSON_GetObjectItemCaseSensitive(m, "value");
        if (!cJSON_IsString(from) || !cJSON_IsString(value))
            return tk_fail(err, "%s: message %zu: expected {\"from\": string, \"value\": string}", name, k);
        int human = strcmp(from->valuestring, "human") == 0 || strcmp(from->valuestring, "user") == 0;
        int gpt = strcmp(from->valuestring, "gpt") == 0 || strcmp(from->valuestring, "assistant") == 0;
        if (!human && !gpt)
            return tk_fail(err, "%s: message %zu: \"from\" is \"%.40s\" (expected human or gpt)", name, k,
                           from->valuestring);
        if (!started && !human) { /* LLaVA: "Skip the first one if it is not from human" */
            k++;
            continue;
        }
        started = 1;
        size_t tags = count_tag(value->valuestring);
        if (tags && gpt) return tk_fail(err, "%s: message %zu: <image> in a gpt turn", name, k);
        n_tags += tags;
        k++;
        if (human) {
            if (n_turns > 0 && !sc->turns[n_turns - 1].assistant)
                return tk_fail(err, "%s: message %zu: two human turns in a row (expected human and gpt to alternate)",
                               name, k - 1);
            sc->turns[n_turns].user = value->valuestring;
            sc->turns[n_turns].assistant = NULL;
            if (tags) {
                sc->owned[n_turns] = move_image_tag(value->valuestring);
                if (!sc->owned[n_turns]) return tk_fail(err, "out of memory");
                sc->turns[n_turns].user = sc->owned[n_turns];
            }
            n_turns++;
        } else {
            if (n_turns == 0 || sc->turns[n_turns - 1].assistant)
                return tk_fail(err, "%s: message %zu: two gpt turns in a row (expected human and gpt to alternate)",
                               name, k - 1);
            sc->turns[n_turns - 1].assistant = value->valuestring;
            answer = value->valuestring;
        }
    }
    if (n_turns == 0) return tk_fail(err, "%s: no human turn in \"conversations\"", name);
    if (!sc->turns[n_turns - 1].assistant)
        return tk_fail(err, "%s: the conversation ends with a human turn (expected human/gpt pairs)", name);
    if (image && n_tags != 1)
        return tk_fail(err, "%s: has an image and %zu <image> placeholders (expected exactly 1)", name, n_tags);
    if (!image && n_tags != 0)
        return tk_fail(err, "%s: %zu <image> placeholder(s) but no \"image\"", name, n_tags);

    /* the image: read and fully decode it */
    char *bytes = NULL;
    size_t nbytes = 0;
    char ipath[4200];
    float *feat = NULL;      /* the feature cache (o->features) */
    uint16_t *feat16 = NULL;
    size_t fdim = 0;
    if (image) {
        const char *folder = o->image_folder;
        char jdir[4096];
        if (!folder) {
            snprintf(jdir, sizeof jdir, "%s", o->input);
            char *sl = strrchr(jdir, '/');
            if (sl) *sl = '\0';
            else snprintf(jdir, sizeof jdir, ".");
            folder = jdir;
        }
        if (image->valuestring[0] == '/') snprintf(ipath, sizeof ipath, "%s", image->valuestring);
        else if (tk_pathf(ipath, sizeof ipath, err, "%s/%s", folder, image->valuestring) != 0) return -1;
        tk_err ierr = {0};
        bytes = tk_read_file(ipath, &nbytes, &ierr);
        tk_image *img = bytes ? tk_image_decode(bytes, nbytes, ipath, o->max_pixels, &ierr) : NULL;
        if (!img) {
            free(bytes);
            if (o->skip_bad_images) {
                st->bad_images++;
                return 1;
            }
            tk_err_one_line(&ierr);
            return tk_fail(err, "%s: image %s (use --skip-bad-images to skip such records)", name, ierr.msg);
        }
        if (o->features) { /* encode now: store F16 features instead of the file */
            size_t nf = o->image_tokens * o->features_dim;
            feat = malloc(nf * sizeof *feat);
            feat16 = malloc(nf * sizeof *feat16);
            if (!feat || !feat16 || o->features(o->features_ctx, img, feat, &fdim, err) != 0 || fdim != o->features_dim) {
                if (feat && feat16 && !err->msg[0]) tk_fail(err, "feature width mismatch");
                tk_image_free(img);
                free(bytes);
                free(feat);
                free(feat16);
                return tk_err_prefix(err, ipath);
            }
            for (size_t k = 0; k < nf; k++) feat16[k] = tk_f32_to_f16(feat[k]);
            free(feat);
            feat = NULL;
        }
        tk_image_free(img);
    }

    /* tokens */
    tk_dialog d = {.system = o->system, .turns = sc->turns, .n_turns = n_turns};
    tk_template_opts topts = {.train_on_inputs = 0, .max_tokens = o->max_len};
    int rc = tk_template_segments(&sc->segs, tmpl, TK_PROMPT_TRAIN, &d, err);
    if (rc == 0 && image) {
        tk_segment *segs = NULL;
        size_t n_segs = 0;
        rc = tk_llava_split_image(&segs, &n_segs, &sc->segs, o->image_tokens, err);
        if (rc == 0) rc = tk_encode_segments(&sc->ex, NULL, tok, segs, n_segs, &topts, err);
        free(segs);
    } else if (rc == 0) {
        rc = tk_encode_segments(&sc->ex, NULL, tok, sc->segs.segs, sc->segs.n, &topts, err);
    }
    if (rc != 0) {
        free(bytes);
        free(feat16);
        return tk_err_prefix(err, name);
    }
    const tk_example *ex = &sc->ex;
    size_t n_img_tok = 0, n_target = 0;
    for (size_t i = 0; i < ex->n; i++) {
        n_img_tok += ex->kinds[i] == TK_KIND_IMAGE;
        n_target += ex->labels[i] != TK_IGNORE_INDEX;
    }
    if (image && n_img_tok != o->image_tokens) {
        free(bytes);
        free(feat16);
        return tk_fail(err, "%s: --max-len %zu cuts the record's %zu image tokens (keeps %zu); raise --max-len", name,
                       o->max_len, o->image_tokens, n_img_tok);
    }
    if (ex->n == 0) {
        free(bytes);
        free(feat16);
        return tk_fail(err, "%s: no tokens", name);
    }
    if (ex->n > sc->ids_cap) {
        int32_t *ni = realloc(sc->ids, ex->n * sizeof *ni);
        if (!ni) {
            free(bytes);
            free(feat16);
            return tk_fail(err, "out of memory");
        }
        sc->ids = ni;
        sc->ids_cap = ex->n;
    }
    int32_t placeholder = tk_tok_unk_id(tok) >= 0 ? tk_tok_unk_id(tok) : 0;
    for (size_t i = 0; i < ex->n; i++) sc->ids[i] = ex->input_ids[i] == TK_IMAGE_TOKEN_ID ? placeholder : ex->input_ids[i];

    /* meta */
    cJSON *meta = cJSON_CreateObject();
    char *meta_s = NULL;
    if (meta) {
        cJSON *idc = id ? cJSON_Duplicate(id, 1) : cJSON_CreateNumber((double)ri);
        if (idc) cJSON_AddItemToObject(meta, "id", idc);
        cJSON_AddStringToObject(meta, "answer", answer ? answer : "");
        cJSON_AddStringToObject(meta, "task", "llava");
        if (image) cJSON_AddStringToObject(meta, "image", image->valuestring);
        meta_s = cJSON_PrintUnformatted(meta);
        cJSON_Delete(meta);
    }
    if (!meta_s) {
        free(bytes);
        free(feat16);
        return tk_fail(err, "%s: out of memory building the metadata", name);
    }
    tk_shard_image simg = {.kind = TK_IMAGE_ENCODED, .ndim = 0, .nbytes = nbytes, .data = (const uint8_t *)bytes};
    if (feat16) {
        simg = (tk_shard_image){.kind = TK_IMAGE_F16_FEATURES, .ndim = 2, .shape = {o->image_tokens, fdim},
                                .nbytes = 2 * o->image_tokens * fdim, .data = (const uint8_t *)feat16};
        nbytes = simg.nbytes;
    }
    tk_shard_record srec = {.n_tokens = ex->n,
                            .input_ids = sc->ids,
                            .labels = ex->labels,
                            .kinds = ex->kinds,
                            .meta_len = strlen(meta_s),
                            .meta = meta_s,
                            .n_images = image ? 1 : 0,
                            .images = image ? &simg : NULL};
    rc = out_add(so, &srec, err);
    free(meta_s);
    free(bytes);
    free(feat16);
    if (rc != 0) return tk_err_prefix(err, name);
    st->written++;
    st->with_image += image != NULL;
    st->truncated += ex->n_dropped > 0;
    st->no_target += n_target == 0;
    st->tokens += ex->n;
    st->image_bytes += nbytes;
    return 0;
}

int tk_convert_llava(const tk_llava_convert_opts *o, tk_llava_convert_stats *st, tk_err *err) {
    tk_llava_convert_stats s;
    memset(&s, 0, sizeof s);
    if (st) *st = s;
    if (!o || !o->input || !o->tokenizer || !o->out)
        return tk_fail(err, "llava: --input, --tokenizer and --out are required");
    if (o->image_tokens < 1 || o->image_tokens > TK_LLAVA_MAX_IMAGE_TOKENS)
        return tk_fail(err, "llava: --image-tokens %zu (expected 1..%zu)", o->image_tokens, TK_LLAVA_MAX_IMAGE_TOKENS);
    tk_template tmpl;
    if (tk_template_from_name(o->template_name ? o->template_name : "vicuna_v1", &tmpl, err) != 0) return -1;
    if (tmpl == TK_TEMPLATE_ALPACA)
        return tk_fail(err, "llava: the alpaca template has one instruction and no conversation; use vicuna_v1, "
                       "llava_v1, llama2 or plain");
    size_t len = 0;
    char *text = tk_read_file(o->input, &len, err);
    if (!text) return -1;
    cJSON *root = cJSON_ParseWithLength(text, len);
    if (!root) {
        const char *at = cJSON_GetErrorPtr();
        size_t off = at && at >= text && at <= text + len ? (size_t)(at - text) : 0;
        free(text);
        return tk_fail(err, "%s: invalid JSON near byte %zu", o->input, off);
    }
    free(text);
    if (!cJSON_IsArray(root)) {
        cJSON_Delete(root);
        return tk_fail(err, "%s: expected a JSON array of records (LLaVA's conversation format)", o->input);
    }
    tk_tokenizer *tok = tk_tok_open(o->tokenizer, err);
    if (!tok) {
        cJSON_Delete(root);
        return -1;
    }
    shard_out so = {.o = o, .single = ends_with(o->out, ".shard"), .st = &s};
    so.wopts.vocab_size = (uint32_t)tk_tok_vocab_size(tok);
    scratch sc;
    memset(&sc, 0, sizeof sc);
    int rc = tk_mkdir_parent(o->out, err);
    s.records = (size_t)cJSON_GetArraySize(root);
    size_t every = o->progress_every ? o->progress_every : 1000, ri = 0;
    const cJSON *rec;
    cJSON_ArrayForEach(rec, root) {
        if (rc != 0) break;
        int r = convert_record(&so, rec, ri, tok, tmpl, &sc, err);
        if (r < 0) rc = -1;
        ri++;
        if (o->progress && (ri % every == 0 || ri == s.records)) o->progress(o->progress_ctx, ri, s.records);
    }
    if (rc == 0 && s.written == 0) {
        rc = tk_fail(err, "%s: no record written (%zu records, %zu skipped for bad images)", o->input, s.records,
                     s.bad_images);
    }
    if (rc == 0) {
        rc = out_close(&so, err);
    } else {
        tk_shard_writer_abort(so.w);
        so.w = NULL;
    }
    scratch_free(&sc);
    tk_tok_free(tok);
    cJSON_Delete(root);
    if (st) *st = s;
    return rc;
}
