/* peft_config.c: adapter_config.json in Hugging Face PEFT's layout (docs/formats.md). */
#include "peft_config.h"

#include "../io/safetensors.h"

#include <cJSON.h>
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

const char *const tk_proj_short[TK_NPROJ] = {"q_proj", "k_proj", "v_proj", "o_proj",
                                             "gate_proj", "up_proj", "down_proj"};
const char *const tk_proj_block[TK_NPROJ] = {"self_attn", "self_attn", "self_attn", "self_attn",
                                             "mlp", "mlp", "mlp"};

const char *const tk_vit_proj_full[TK_VIT_NPROJ] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                    "self_attn.out_proj", "mlp.fc1", "mlp.fc2"};

static const char *const k_vit_prefixes[] = {"vision_tower.vision_model.", "model.vision_tower.vision_model.",
                                             "vision_model."};

int tk_peft_vit_targets(const tk_peft_config *pc, int layer, int j) {
    if (pc->kind == TK_ADAPTER_NONE || layer < 0 || layer >= TK_MAX_LAYERS) return 0;
    return ((pc->vit_proj_mask >> j) & 1u) || ((pc->vit_module_mask[layer] >> j) & 1u);
}

int tk_peft_has_vit(const tk_peft_config *pc) { return pc->vit_proj_mask != 0 || pc->n_vit_modules > 0; }

void tk_vit_module_name(char *buf, size_t n, const char *prefix, int layer, int j) {
    snprintf(buf, n, "%sencoder.layers.%d.%s", prefix, layer, tk_vit_proj_full[j]);
}

/* A tower target: "<prefix>all", "<prefix><proj>" or "<prefix>encoder.layers.L.<block>.<proj>".
 * 1 when name is one (added), 0 when it has no tower prefix, -1 (err set) when malformed. */
static int vit_target(tk_peft_config *pc, const char *name, tk_err *err) {
    const char *pre = NULL;
    for (size_t i = 0; i < sizeof k_vit_prefixes / sizeof *k_vit_prefixes && !pre; i++)
        if (strncmp(name, k_vit_prefixes[i], strlen(k_vit_prefixes[i])) == 0) pre = k_vit_prefixes[i];
    if (!pre) return 0;
    if (pc->vit_prefix[0] && strcmp(pc->vit_prefix, pre) != 0)
        return tk_fail(err, "target module \"%s\": the vision tower was named under \"%s\" already", name,
                       pc->vit_prefix);
    const char *s = name + strlen(pre);
    unsigned mask = 0;
    if (strcmp(s, "all") == 0) mask = (1u << TK_VIT_NPROJ) - 1;
    for (int j = 0; j < TK_VIT_NPROJ && !mask; j++) {
        const char *dot = strchr(tk_vit_proj_full[j], '.');
        if (strcmp(s, dot + 1) == 0 || strcmp(s, tk_vit_proj_full[j]) == 0) mask = 1u << j;
    }
    if (mask) {
        pc->vit_proj_mask |= mask;
    } else {
        const char *lp = "encoder.layers.";
        char *end = NULL;
        long l = -1;
        if (strncmp(s, lp, strlen(lp)) == 0 && isdigit((unsigned char)s[strlen(lp)])) {
            errno = 0;
            l = strtol(s + strlen(lp), &end, 10);
            if (errno || l >= TK_MAX_LAYERS) l = -1;
        }
        int j = -1;
        for (int k = 0; k < TK_VIT_NPROJ && l >= 0 && end && *end == '.'; k++)
            if (strcmp(end + 1, tk_vit_proj_full[k]) == 0) j = k;
        if (j < 0)
            return tk_fail(err, "target module \"%s\" is not a vision tower module (%sall, %s{q,k,v,out}_proj, "
                                "%sfc1, %sfc2 or %sencoder.layers.L.self_attn.q_proj ...)",
                           name, pre, pre, pre, pre, pre);
        if (!(pc->vit_module_mask[l] & (1u << j))) pc->n_vit_modules++;
        pc->vit_module_mask[l] |= (uint8_t)(1u << j);
    }
    snprintf(pc->vit_prefix, sizeof pc->vit_prefix, "%s", pre);
    return 1;
}

int tk_proj_parse(const char *name) {
    for (int p = 0; p < TK_NPROJ; p++)
        if (strcmp(name, tk_proj_short[p]) == 0) return p;
    return -1;
}

const char *tk_adapter_kind_name(tk_adapter_kind k) {
    switch (k) {
    case TK_ADAPTER_LORA: return "lora";
    case TK_ADAPTER_DORA: return "dora";
    case TK_ADAPTER_BOTTLENECK: return "bottleneck";
    case TK_ADAPTER_ADALORA: return "adalora";
    default: return "none";
    }
}

void tk_peft_config_default(tk_peft_config *pc) {
    memset(pc, 0, sizeof *pc);
    pc->kind = TK_ADAPTER_LORA;
    pc->r = 8;
    pc->alpha = 16.0f;
    pc->bottleneck_scaling = 1.0f;
    pc->act = TK_ACT_TANH;
    pc->target_mask = (1u << TK_PROJ_Q) | (1u << TK_PROJ_V);
    pc->gate = tk_gate_config_default();
    /* AdaLoraConfig's defaults */
    pc->ada = (tk_adalora_config){.init_r = 12, .target_r = 8, .delta_t = 1, .beta1 = 0.85f, .beta2 = 0.85f,
                                  .orth_reg_weight = 0.5f};
}

void tk_peft_config_free(tk_peft_config *pc) {
    if (!pc) return;
    tk_peft_config_free_save(pc);
    free(pc->ada.rank);
    pc->ada.rank = NULL;
    pc->ada.n_rank = 0;
}

int tk_peft_config_copy(tk_peft_config *dst, const tk_peft_config *src, tk_err *err) {
    *dst = *src;
    dst->save = NULL;
    dst->n_save = 0;
    dst->ada.rank = NULL;
    dst->ada.n_rank = 0;
    for (int i = 0; i < src->n_save; i++)
        if (tk_peft_parse_save(dst, src->save[i], err)) return -1;
    if (src->ada.n_rank) {
        if (!(dst->ada.rank = malloc((size_t)src->ada.n_rank * sizeof *dst->ada.rank))) return tk_fail(err, "out of memory");
        memcpy(dst->ada.rank, src->ada.rank, (size_t)src->ada.n_rank * sizeof *dst->ada.rank);
        dst->ada.n_rank = src->ada.n_rank;
    }
    return 0;
}

const tk_rank_entry *tk_peft_rank_find(const tk_peft_config *pc, int layer, int proj) {
    for (int i = 0; i < pc->ada.n_rank; i++)
        if (pc->ada.rank[i].layer == layer && pc->ada.rank[i].proj == proj) return &pc->ada.rank[i];
    return NULL;
}

int tk_peft_rank_set(tk_peft_config *pc, int layer, int proj, const uint8_t *keep, int n, tk_err *err) {
    TK_ASSERT(n >= 0 && n <= TK_ADALORA_MAX_R);
    tk_rank_entry *e = (tk_rank_entry *)tk_peft_rank_find(pc, layer, proj);
    if (!e) {
        tk_rank_entry *grown = realloc(pc->ada.rank, (size_t)(pc->ada.n_rank + 1) * sizeof *grown);
        if (!grown) return tk_fail(err, "out of memory");
        pc->ada.rank = grown;
        e = &grown[pc->ada.n_rank++];
        e->layer = layer;
        e->proj = proj;
    }
    memset(e->keep, 0, sizeof e->keep);
    for (int j = 0; j < n; j++)
        if (keep[j]) e->keep[j >> 6] |= 1ull << (j & 63);
    return 0;
}

int tk_rank_count(const tk_rank_entry *e, int n) {
    int k = 0;
    for (int j = 0; j < n; j++) k += tk_rank_kept(e, j);
    return k;
}

int tk_peft_check_rank_pattern(const tk_peft_config *pc, int n_layers, tk_err *err) {
    for (int i = 0; i < pc->ada.n_rank; i++) {
        const tk_rank_entry *e = &pc->ada.rank[i];
        if (pc->kind != TK_ADAPTER_ADALORA || e->layer >= n_layers || !tk_peft_targets(pc, e->layer, e->proj)) {
            char nm[96];
            tk_module_name(nm, sizeof nm, e->layer, e->proj);
            return tk_fail(err, "rank_pattern names %s.lora_E, which is not an adapted module of this model "
                                "(%d layers; see target_modules)", nm, n_layers);
        }
    }
    return 0;
}

int tk_adalora_check_schedule(const tk_adalora_config *a, tk_err *err) {
    if (a->target_r > a->init_r)
        return tk_fail(err, "AdaLoRA: target_r (%d) is larger than init_r (%d)", a->target_r, a->init_r);
    if (a->total_step < 1) return tk_fail(err, "AdaLoRA: total_step must be >= 1");
    if ((long)a->tinit + a->tfinal >= a->total_step)
        return tk_fail(err, "AdaLoRA: tinit (%d) + tfinal (%d) must be below total_step (%d): the schedule leaves no "
                            "budgeting phase", a->tinit, a->tfinal, a->total_step);
    return 0;
}

void tk_peft_config_free_save(tk_peft_config *pc) {
    if (!pc) return;
    for (int i = 0; i < pc->n_save; i++) free(pc->save[i]);
    free(pc->save);
    pc->save = NULL;
    pc->n_save = 0;
}

/* A target entry is a projection short name or any dotted name ending in one ("self_attn.q_proj"). */
static int target_from_name(const char *name) {
    const char *dot = strrchr(name, '.');
    return tk_proj_parse(dot ? dot + 1 : name);
}

void tk_module_name(char *buf, size_t n, int layer, int proj) {
    snprintf(buf, n, "model.layers.%d.%s.%s", layer, tk_proj_block[proj], tk_proj_short[proj]);
}

/* "model.layers.L.<block>.<proj>" exactly: 1 with *layer, *proj set; 0 when the name has another
 * form; -1 when it has this form but names no LLaMA module (err set). */
static int full_module_name(const char *name, int *layer, int *proj, tk_err *err) {
    const char *pre = "model.layers.";
    if (strncmp(name, pre, strlen(pre)) != 0) return 0;
    const char *s = name + strlen(pre);
    if (!isdigit((unsigned char)*s)) return 0;
    char *end;
    errno = 0;
    long l = strtol(s, &end, 10);
    if (*end != '.') return 0;
    if (errno || l < 0 || l >= TK_MAX_LAYERS)
        return tk_fail(err, "target module \"%s\": layer index out of range [0, %d)", name, TK_MAX_LAYERS);
    const char *blk = end + 1, *dot = strchr(blk, '.');
    if (!dot) return 0;
    int p = tk_proj_parse(dot + 1);
    if (p < 0 || strlen(tk_proj_block[p]) != (size_t)(dot - blk) || strncmp(blk, tk_proj_block[p], (size_t)(dot - blk)) != 0)
        return tk_fail(err, "target module \"%s\" is not a LLaMA module (model.layers.L.self_attn.{q,k,v,o}_proj "
                            "or model.layers.L.mlp.{gate,up,down}_proj)", name);
    *layer = (int)l;
    *proj = p;
    return 1;
}

int tk_peft_add_target(tk_peft_config *pc, const char *name, tk_err *err) {
    int v = vit_target(pc, name, err);
    if (v) return v < 0 ? -1 : 0;
    int l = 0, p = 0, full = full_module_name(name, &l, &p, err);
    if (full < 0) return -1;
    if (full) {
        if (!(pc->module_mask[l] & (1u << p))) pc->n_modules++;
        pc->module_mask[l] |= (uint8_t)(1u << p);
        return 0;
    }
    p = target_from_name(name);
    if (p < 0)
        return tk_fail(err, "target module \"%s\" is not one of q_proj k_proj v_proj o_proj gate_proj up_proj "
                            "down_proj or a full name like model.layers.0.self_attn.q_proj", name);
    pc->target_mask |= 1u << p;
    return 0;
}

int tk_peft_check_layers(const tk_peft_config *pc, int n_layers, tk_err *err) {
    if (pc->n_modules == 0) return 0;
    for (int l = n_layers < 0 ? 0 : n_layers; l < TK_MAX_LAYERS; l++)
        if (pc->module_mask[l]) {
            int p = 0;
            while (!(pc->module_mask[l] & (1u << p))) p++;
            char nm[96];
            tk_module_name(nm, sizeof nm, l, p);
            return tk_fail(err, "target module %s: layer %d does not exist (the model has %d)", nm, l, n_layers);
        }
    return 0;
}

static void clear_targets(tk_peft_config *pc) {
    pc->target_mask = 0;
    pc->n_modules = 0;
    memset(pc->module_mask, 0, sizeof pc->module_mask);
    pc->vit_proj_mask = 0;
    pc->n_vit_modules = 0;
    memset(pc->vit_module_mask, 0, sizeof pc->vit_module_mask);
    pc->vit_prefix[0] = 0;
}

/* Splits text at commas, newlines and blanks (dropping # comments) and adds each name. */
static int add_target_words(tk_peft_config *pc, char *text, const char *where, tk_err *err) {
    for (char *line = text, *next; line; line = next) {
        next = strchr(line, '\n');
        if (next) *next++ = 0;
        char *hash = strchr(line, '#');
        if (hash) *hash = 0;
        for (char *sv = NULL, *tok = strtok_r(line, ", \t\r", &sv); tok; tok = strtok_r(NULL, ", \t\r", &sv))
            if (tk_peft_add_target(pc, tok, err)) return where ? tk_err_prefix(err, where) : -1;
    }
    return 0;
}

static int targets_from_file(tk_peft_config *pc, const char *path, tk_err *err) {
    size_t len;
    char *text = tk_read_file(path, &len, err);
    if (!text) return -1;
    int rc = 0;
    const char *p = text;
    while (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n') p++;
    if (*p == '[' || *p == '{') {
        cJSON *root = cJSON_ParseWithLength(text, len);
        const cJSON *list = root && cJSON_IsObject(root) ? cJSON_GetObjectItemCaseSensitive(root, "target_modules") : root;
        if (!root || !cJSON_IsArray(list)) {
            rc = tk_fail(err, "%s: expected a JSON list of module names or an object with a \"target_modules\" list", path);
        } else {
            const cJSON *e;
            cJSON_ArrayForEach(e, list) {
                if (!cJSON_IsString(e)) {
                    rc = tk_fail(err, "%s: target_modules entries must be strings", path);
                    break;
                }
                if ((rc = tk_peft_add_target(pc, e->valuestring, err)) != 0) {
                    tk_err_prefix(err, path);
                    break;
                }
            }
        }
        cJSON_Delete(root);
    } else {
        rc = add_target_words(pc, text, path, err);
    }
    free(text);
    if (rc == 0 && !pc->target_mask && !pc->n_modules) rc = tk_fail(err, "%s: no module names in the file", path);
    return rc;
}

int tk_peft_parse_target_list(tk_peft_config *pc, const char *list, tk_err *err) {
    clear_targets(pc);
    if (strcmp(list, "all") == 0 || strcmp(list, "all-linear") == 0) {
        pc->target_mask = (1u << TK_NPROJ) - 1;
        return 0;
    }
    if (list[0] == '@') return targets_from_file(pc, list + 1, err);
    char *buf = strdup(list), *rest = strdup(list);
    if (!buf || !rest) {
        free(buf);
        free(rest);
        return tk_fail(err, "out of memory");
    }
    /* "all" inside a list (e.g. "all,vision_tower.vision_model.all"): every LLaMA projection */
    rest[0] = 0;
    for (char *save = NULL, *w = strtok_r(buf, ", \t\r\n", &save); w; w = strtok_r(NULL, ", \t\r\n", &save)) {
        if (strcmp(w, "all") == 0 || strcmp(w, "all-linear") == 0) {
            pc->target_mask = (1u << TK_NPROJ) - 1;
            continue;
        }
        if (rest[0]) strcat(rest, ",");
        strcat(rest, w);
    }
    free(buf);
    buf = rest;
    int rc = add_target_words(pc, buf, NULL, err);
    free(buf);
    if (rc == 0 && !pc->target_mask && !pc->n_modules && !tk_peft_has_vit(pc)) rc = tk_fail(err, "empty target module list");
    return rc;
}

int tk_peft_parse_targets(const char *list, unsigned *mask, tk_err *err) {
    *mask = 0;
    if (strcmp(list, "all") == 0 || strcmp(list, "all-linear") == 0) {
        *mask = (1u << TK_NPROJ) - 1;
        return 0;
    }
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", list);
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        int p = target_from_name(tok);
        if (p < 0)
            return tk_fail(err, "target module \"%s\" is not one of q_proj k_proj v_proj o_proj "
                                "gate_proj up_proj down_proj",
                           tok);
        *mask |= 1u << p;
    }
    if (!*mask) return tk_fail(err, "empty target module list");
    return 0;
}

static int add_layer(tk_peft_config *pc, long v, tk_err *err) {
    if (v < 0 || v >= TK_MAX_LAYERS) return tk_fail(err, "layer index %ld out of range", v);
    if (pc->n_layer_sel >= TK_MAX_LAYERS) return tk_fail(err, "too many layer indices");
    pc->layer_sel[pc->n_layer_sel++] = (int)v;
    return 0;
}

int tk_peft_parse_layers(tk_peft_config *pc, const char *list, tk_err *err) {
    pc->n_layer_sel = 0;
    const char *s = list;
    while (*s) {
        char *end;
        long a = strtol(s, &end, 10);
        if (end == s) return tk_fail(err, "layer list \"%s\": expected numbers like 0,2,5-7", list);
        long b = a;
        if (*end == '-') {
            s = end + 1;
            b = strtol(s, &end, 10);
            if (end == s || b < a) return tk_fail(err, "layer list \"%s\": bad range", list);
        }
        for (long v = a; v <= b; v++)
            if (add_layer(pc, v, err)) return -1;
        if (*end == ',') end++;
        else if (*end) return tk_fail(err, "layer list \"%s\": unexpected '%c'", list, *end);
        s = end;
    }
    return 0;
}

static int add_save(tk_peft_config *pc, const char *name, tk_err *err) {
    char **s = realloc(pc->save, (size_t)(pc->n_save + 1) * sizeof *s);
    if (!s) return tk_fail(err, "out of memory");
    pc->save = s;
    if (!(pc->save[pc->n_save] = strdup(name))) return tk_fail(err, "out of memory");
    pc->n_save++;
    return 0;
}

int tk_peft_parse_save(tk_peft_config *pc, const char *list, tk_err *err) {
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", list);
    for (char *sv = NULL, *tok = strtok_r(buf, ",", &sv); tok; tok = strtok_r(NULL, ",", &sv))
        if (add_save(pc, tok, err)) return -1;
    return 0;
}

int tk_peft_targets(const tk_peft_config *pc, int layer, int proj) {
    if (pc->n_modules && layer >= 0 && layer < TK_MAX_LAYERS && (pc->module_mask[layer] & (1u << proj))) return 1;
    if (!(pc->target_mask & (1u << proj))) return 0;
    if (pc->n_layer_sel == 0) return 1;
    for (int i = 0; i < pc->n_layer_sel; i++)
        if (pc->layer_sel[i] == layer) return 1;
    return 0;
}

float tk_peft_scale(const tk_peft_config *pc) {
    if (pc->kind == TK_ADAPTER_BOTTLENECK) return pc->bottleneck_scaling;
    if (pc->kind == TK_ADAPTER_ADALORA) {
        float ranknum = (float)pc->r + 1e-5f;
        return (pc->alpha > 0.0f ? pc->alpha : (float)pc->r) / ranknum;
    }
    return pc->use_rslora ? pc->alpha / sqrtf((float)pc->r) : pc->alpha / (float)pc->r;
}

/* ---- reading ---------------------------------------------------------------------------------- */

typedef struct {
    const char *path;
    tk_err *err;
} ctx;

static const cJSON *item(const cJSON *o, const char *key) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(o, key);
    return it && !cJSON_IsNull(it) ? it : NULL;
}

static int num(ctx *c, const cJSON *o, const char *key, double lo, double hi, float *out) {
    const cJSON *it = item(o, key);
    if (!it) return 0;
    if (!cJSON_IsNumber(it) || !(it->valuedouble >= lo && it->valuedouble <= hi))
        return tk_fail(c->err, "%s: \"%s\" must be a number in [%g, %g]", c->path, key, lo, hi);
    *out = (float)it->valuedouble;
    return 0;
}

static int integer(ctx *c, const cJSON *o, const char *key, int lo, int hi, int *out) {
    const cJSON *it = item(o, key);
    if (!it) return 0;
    if (!cJSON_IsNumber(it) || it->valuedouble != floor(it->valuedouble) || it->valuedouble < lo ||
        it->valuedouble > hi)
        return tk_fail(c->err, "%s: \"%s\" must be an integer in [%d, %d]", c->path, key, lo, hi);
    *out = (int)it->valuedouble;
    return 0;
}

static int boolean(ctx *c, const cJSON *o, const char *key, int *out) {
    const cJSON *it = item(o, key);
    if (!it) return 0;
    if (!cJSON_IsBool(it)) return tk_fail(c->err, "%s: \"%s\" must be true or false", c->path, key);
    *out = cJSON_IsTrue(it);
    return 0;
}

static int parse_targets_json(ctx *c, tk_peft_config *pc, const cJSON *t) {
    if (!t) return tk_fail(c->err, "%s: missing \"target_modules\"", c->path);
    if (cJSON_IsString(t)) {
        if (strcmp(t->valuestring, "all-linear") == 0) {
            pc->target_mask = (1u << TK_NPROJ) - 1;
            return 0;
        }
        return tk_fail(c->err, "%s: target_modules \"%s\": a regular expression is not supported; "
                               "give a list of module names",
                       c->path, t->valuestring);
    }
    if (!cJSON_IsArray(t)) return tk_fail(c->err, "%s: \"target_modules\" must be a list", c->path);
    clear_targets(pc);
    const cJSON *e;
    cJSON_ArrayForEach(e, t) {
        if (!cJSON_IsString(e)) return tk_fail(c->err, "%s: target_modules entries must be strings", c->path);
        if (tk_peft_add_target(pc, e->valuestring, c->err)) return tk_err_prefix(c->err, c->path);
    }
    if (!pc->target_mask && !pc->n_modules && !tk_peft_has_vit(pc))
        pc->kind = TK_ADAPTER_NONE; /* only modules_to_save are trained */
    return 0;
}

/* A JSON number as a layer index; checked before the cast (a double beyond long is undefined). */
static int json_layer(ctx *c, tk_peft_config *pc, const cJSON *e) {
    double v = e->valuedouble;
    if (v != floor(v) || !(v >= 0 && v < TK_MAX_LAYERS))
        return tk_fail(c->err, "%s: layers_to_transform: %.17g is not a layer index (an integer in [0, %d))",
                       c->path, v, TK_MAX_LAYERS);
    if (add_layer(pc, (long)v, c->err)) return tk_err_prefix(c->err, c->path);
    return 0;
}

static int parse_layers_json(ctx *c, tk_peft_config *pc, const cJSON *l) {
    pc->n_layer_sel = 0;
    if (!l) return 0;
    if (cJSON_IsNumber(l)) return json_layer(c, pc, l);
    if (!cJSON_IsArray(l))
        return tk_fail(c->err, "%s: \"layers_to_transform\" must be null, an integer or a list", c->path);
    const cJSON *e;
    cJSON_ArrayForEach(e, l) {
        if (!cJSON_IsNumber(e))
            return tk_fail(c->err, "%s: layers_to_transform entries must be integers", c->path);
        if (json_layer(c, pc, e)) return -1;
    }
    return 0;
}

static int parse_gate_json(ctx *c, tk_gate_config *g, const cJSON *o) {
    if (!o) return 0;
    if (!cJSON_IsObject(o)) return tk_fail(c->err, "%s: \"ts_peft\" must be an object", c->path);
    g->enabled = 1;
    const cJSON *rule = item(o, "rule");
    if (rule && (!cJSON_IsString(rule) || tk_gate_rule_parse(rule->valuestring, &g->rule)))
        return tk_fail(c->err, "%s: ts_peft.rule must be one of " TK_GATE_RULE_NAMES, c->path);
    const cJSON *scope = item(o, "tau_scope");
    if (scope && (!cJSON_IsString(scope) || tk_tau_scope_parse(scope->valuestring, &g->scope)))
        return tk_fail(c->err, "%s: ts_peft.tau_scope must be \"module\" or \"layer\"", c->path);
    if (num(c, o, "lambda", 0, 1e9, &g->lambda) || num(c, o, "eta_tau", 1e-12, 1e9, &g->eta_tau) ||
        num(c, o, "tau0", 0, 1e9, &g->tau0) || num(c, o, "eta_lambda", 0, 1e9, &g->eta_lambda) ||
        num(c, o, "beta", 1e-12, 1e9, &g->beta) ||
        integer(c, o, "warmup_steps", 0, 1 << 30, &g->warmup_steps) || num(c, o, "trust_region", 0, 1, &g->trust))
        return -1;
    const cJSON *stt = item(o, "straight_through");
    if (stt) {
        if (!cJSON_IsBool(stt)) return tk_fail(c->err, "%s: ts_peft.straight_through must be true or false", c->path);
        g->straight_through = cJSON_IsTrue(stt);
    }
    const cJSON *keep = item(o, "keep");
    if (keep) {
        if (!cJSON_IsNumber(keep) || !(keep->valuedouble > 0.0 && keep->valuedouble <= 1.0))
            return tk_fail(c->err, "%s: ts_peft.keep must be in (0, 1]", c->path);
        g->keep = (float)keep->valuedouble;
    }
    const cJSON *tk = item(o, "target_keep");
    if (tk) {
        if (!cJSON_IsNumber(tk) || !(tk->valuedouble > 0.0 && tk->valuedouble <= 1.0))
            return tk_fail(c->err, "%s: ts_peft.target_keep must be null or in (0, 1]", c->path);
        g->target_keep = (float)tk->valuedouble;
    }
    return 0;
}

static int parse_save_json(ctx *c, tk_peft_config *pc, const cJSON *s) {
    if (!s) return 0;
    if (!cJSON_IsArray(s)) return tk_fail(c->err, "%s: \"modules_to_save\" must be null or a list", c->path);
    const cJSON *e;
    cJSON_ArrayForEach(e, s) {
        if (!cJSON_IsString(e)) return tk_fail(c->err, "%s: modules_to_save entries must be strings", c->path);
        if (add_save(pc, e->valuestring, c->err)) return -1;
    }
    return 0;
}

/* rank_pattern: {"model.layers.L.<block>.<proj>.lora_E": [true, false, ...], ...}, each list init_r long
 * (PEFT also accepts the key with the adapter name after lora_E while training; so does this). */
static int parse_rank_pattern_json(ctx *c, tk_peft_config *pc, const cJSON *o) {
    if (!o) return 0;
    if (!cJSON_IsObject(o)) return tk_fail(c->err, "%s: \"rank_pattern\" must be null or an object", c->path);
    const cJSON *e;
    cJSON_ArrayForEach(e, o) {
        char name[512];
        snprintf(name, sizeof name, "%s", e->string ? e->string : "");
        char *le = strstr(name, ".lora_E");
        if (le && (le[7] == 0 || (le[7] == '.' && !strchr(le + 8, '.')))) *le = 0;
        else le = NULL;
        int l = 0, p = 0, full = le ? full_module_name(name, &l, &p, c->err) : 0;
        if (full < 0) return tk_err_prefix(c->err, c->path);
        if (full == 0)
            return tk_fail(c->err, "%s: rank_pattern key \"%s\" is not a module's lora_E "
                                   "(model.layers.L.self_attn.q_proj.lora_E, ...)", c->path, e->string);
        int n = cJSON_GetArraySize(e);
        if (!cJSON_IsArray(e) || n != pc->ada.init_r)
            return tk_fail(c->err, "%s: rank_pattern \"%s\" must be a list of %d booleans (init_r)", c->path,
                           e->string, pc->ada.init_r);
        uint8_t keep[TK_ADALORA_MAX_R];
        int j = 0;
        const cJSON *b;
        cJSON_ArrayForEach(b, e) {
            if (!cJSON_IsBool(b))
                return tk_fail(c->err, "%s: rank_pattern \"%s\" must hold true/false only", c->path, e->string);
            keep[j++] = (uint8_t)cJSON_IsTrue(b);
        }
        if (tk_peft_rank_find(pc, l, p))
            return tk_fail(c->err, "%s: rank_pattern names %s twice", c->path, e->string);
        if (tk_peft_rank_set(pc, l, p, keep, n, c->err)) return -1;
    }
    return 0;
}

static int check_empty_object(ctx *c, const cJSON *o, const char *key) {
    const cJSON *it = item(o, key);
    if (it && !(cJSON_IsObject(it) && it->child == NULL))
        return tk_fail(c->err, "%s: \"%s\" is not supported (must be empty)", c->path, key);
    return 0;
}

int tk_peft_config_load(tk_peft_config *pc, const char *path, tk_err *err) {
    tk_peft_config_default(pc);
    size_t len;
    char *text = tk_read_file(path, &len, err);
    if (!text) return -1;
    cJSON *root = cJSON_ParseWithLength(text, len);
    free(text);
    ctx c = {path, err};
    int rc = -1;
    if (!root || !cJSON_IsObject(root)) {
        tk_fail(err, "%s: not a JSON object", path);
        goto done;
    }
    const cJSON *type = item(root, "peft_type");
    if (!type || !cJSON_IsString(type)) {
        tk_fail(err, "%s: missing \"peft_type\" (expected \"LORA\" or \"BOTTLENECK\")", path);
        goto done;
    }
    const cJSON *bm = item(root, "base_model_name_or_path");
    if (bm && cJSON_IsString(bm)) snprintf(pc->base_model, sizeof pc->base_model, "%s", bm->valuestring);
    if (strcasecmp(type->valuestring, "LORA") == 0) {
        int dora = 0;
        pc->kind = TK_ADAPTER_LORA;
        if (integer(&c, root, "r", 1, 1 << 20, &pc->r) || num(&c, root, "lora_alpha", 0, 1e9, &pc->alpha) ||
            num(&c, root, "lora_dropout", 0, 0.999, &pc->dropout) ||
            boolean(&c, root, "use_rslora", &pc->use_rslora) || boolean(&c, root, "use_dora", &dora) ||
            check_empty_object(&c, root, "rank_pattern") || check_empty_object(&c, root, "alpha_pattern"))
            goto done;
        if (dora) pc->kind = TK_ADAPTER_DORA;
        const cJSON *bias = item(root, "bias");
        if (bias && !(cJSON_IsString(bias) && strcmp(bias->valuestring, "none") == 0)) {
            tk_fail(err, "%s: \"bias\" must be \"none\" (LLaMA projections have no bias)", path);
            goto done;
        }
        const cJSON *fifo = item(root, "fan_in_fan_out");
        if (fifo && cJSON_IsTrue(fifo)) {
            tk_fail(err, "%s: fan_in_fan_out true is not supported for LLaMA", path);
            goto done;
        }
    } else if (strcasecmp(type->valuestring, "BOTTLENECK") == 0) {
        int parallel = 1, adapterp = 0;
        pc->kind = TK_ADAPTER_BOTTLENECK;
        if (integer(&c, root, "bottleneck_size", 1, 1 << 20, &pc->r) ||
            num(&c, root, "adapter_dropout", 0, 0.999, &pc->dropout) ||
            num(&c, root, "scaling", -1e9, 1e9, &pc->bottleneck_scaling) ||
            boolean(&c, root, "use_parallel_adapter", &parallel) ||
            boolean(&c, root, "use_adapterp", &adapterp))
            goto done;
        if (!parallel || adapterp) {
            tk_fail(err, "%s: only the parallel bottleneck adapter is supported "
                         "(use_parallel_adapter true, use_adapterp false)", path);
            goto done;
        }
        const cJSON *act = item(root, "non_linearity");
        if (act) {
            if (cJSON_IsString(act) && strcmp(act->valuestring, "tanh") == 0) pc->act = TK_ACT_TANH;
            else if (cJSON_IsString(act) && strcmp(act->valuestring, "relu") == 0) pc->act = TK_ACT_RELU;
            else {
                tk_fail(err, "%s: \"non_linearity\" must be \"tanh\" or \"relu\"", path);
                goto done;
            }
        }
    } else if (strcasecmp(type->valuestring, "ADALORA") == 0) {
        tk_adalora_config *a = &pc->ada;
        int dora = 0;
        pc->kind = TK_ADAPTER_ADALORA;
        pc->alpha = 8.0f; /* LoraConfig's default lora_alpha */
        if (integer(&c, root, "init_r", 1, TK_ADALORA_MAX_R, &a->init_r) ||
            integer(&c, root, "target_r", 0, TK_ADALORA_MAX_R, &a->target_r) ||
            integer(&c, root, "tinit", 0, 1 << 30, &a->tinit) || integer(&c, root, "tfinal", 0, 1 << 30, &a->tfinal) ||
            integer(&c, root, "deltaT", 1, 1 << 30, &a->delta_t) ||
            integer(&c, root, "total_step", 1, 1 << 30, &a->total_step) ||
            num(&c, root, "beta1", 1e-9, 1 - 1e-9, &a->beta1) || num(&c, root, "beta2", 1e-9, 1 - 1e-9, &a->beta2) ||
            num(&c, root, "orth_reg_weight", 0, 1e9, &a->orth_reg_weight) ||
            num(&c, root, "lora_alpha", 0, 1e9, &pc->alpha) || num(&c, root, "lora_dropout", 0, 0.999, &pc->dropout) ||
            boolean(&c, root, "use_dora", &dora) || check_empty_object(&c, root, "alpha_pattern"))
            goto done;
        if (a->target_r > a->init_r) {
            tk_fail(err, "%s: target_r (%d) is larger than init_r (%d)", path, a->target_r, a->init_r);
            goto done;
        }
        if (dora) {
            tk_fail(err, "%s: AdaLoRA does not support DoRA (use_dora must be false)", path);
            goto done;
        }
        pc->r = a->init_r;
        if (parse_rank_pattern_json(&c, pc, item(root, "rank_pattern"))) goto done;
        const cJSON *bias = item(root, "bias");
        if (bias && !(cJSON_IsString(bias) && strcmp(bias->valuestring, "none") == 0)) {
            tk_fail(err, "%s: \"bias\" must be \"none\" (LLaMA projections have no bias)", path);
            goto done;
        }
        const cJSON *fifo = item(root, "fan_in_fan_out");
        if (fifo && cJSON_IsTrue(fifo)) {
            tk_fail(err, "%s: fan_in_fan_out true is not supported for LLaMA", path);
            goto done;
        }
    } else {
        tk_fail(err, "%s: peft_type \"%s\" is not supported (expected LORA, ADALORA or BOTTLENECK)", path,
                type->valuestring);
        goto done;
    }
    if (parse_targets_json(&c, pc, item(root, "target_modules")) ||
        parse_layers_json(&c, pc, item(root, "layers_to_transform")) ||
        parse_save_json(&c, pc, item(root, "modules_to_save")) ||
        parse_gate_json(&c, &pc->gate, item(root, "ts_peft")))
        goto done;
    if (pc->kind == TK_ADAPTER_NONE) {
        pc->gate.enabled = 0;
        if (pc->n_save == 0) {
            tk_fail(err, "%s: \"target_modules\" is empty and nothing is in modules_to_save", path);
            goto done;
        }
    }
    rc = 0;
done:
    cJSON_Delete(root);
    if (rc) tk_peft_config_free(pc); /* a failed load leaves nothing owned */
    return rc;
}

/* ---- writing ---------------------------------------------------------------------------------- */

/* The shortest decimal that reads back as f: 0.85f is written 0.85, not 0.850000023841858. */
static double short_float(float f) {
    char buf[32];
    for (int prec = 6; prec <= 9; prec++) {
        snprintf(buf, sizeof buf, "%.*g", prec, (double)f);
        double d = strtod(buf, NULL);
        if ((float)d == f) return d;
    }
    return (double)f;
}

int tk_peft_config_save(const tk_peft_config *pc, const char *path, tk_err *err) {
    cJSON *root = cJSON_CreateObject();
    if (!root) return tk_fail(err, "%s: out of memory", path);
    cJSON_AddStringToObject(root, "base_model_name_or_path", pc->base_model);
    if (pc->no_task_type) cJSON_AddNullToObject(root, "task_type");
    else cJSON_AddStringToObject(root, "task_type", "CAUSAL_LM");
    cJSON *targets = cJSON_AddArrayToObject(root, "target_modules"); /* empty: modules_to_save only */
    for (int p = 0; p < TK_NPROJ; p++)
        if (pc->kind != TK_ADAPTER_NONE && (pc->target_mask & (1u << p))) cJSON_AddItemToArray(targets, cJSON_CreateString(tk_proj_short[p]));
    for (int l = 0; l < TK_MAX_LAYERS && pc->kind != TK_ADAPTER_NONE && pc->n_modules; l++)
        for (int p = 0; p < TK_NPROJ; p++)
            if (pc->module_mask[l] & (1u << p)) {
                char nm[96];
                tk_module_name(nm, sizeof nm, l, p);
                cJSON_AddItemToArray(targets, cJSON_CreateString(nm));
            }
    for (int l = 0; l < TK_MAX_LAYERS && pc->kind != TK_ADAPTER_NONE && tk_peft_has_vit(pc); l++)
        for (int j = 0; j < TK_VIT_NPROJ; j++) {
            int all = (pc->vit_proj_mask >> j) & 1u;
            if (((pc->vit_module_mask[l] >> j) & 1u) || (all && l < pc->vit_layers)) {
                char nm[160];
                tk_vit_module_name(nm, sizeof nm, pc->vit_prefix, l, j);
                cJSON_AddItemToArray(targets, cJSON_CreateString(nm));
            } else if (all && l == 0 && pc->vit_layers <= 0) { /* layer count unknown: tspeft's shorthand */
                char nm[160];
                snprintf(nm, sizeof nm, "%s%s", pc->vit_prefix, strchr(tk_vit_proj_full[j], '.') + 1);
                cJSON_AddItemToArray(targets, cJSON_CreateString(nm));
            }
        }
    if (pc->n_layer_sel) {
        cJSON *l = cJSON_AddArrayToObject(root, "layers_to_transform");
        for (int i = 0; i < pc->n_layer_sel; i++) cJSON_AddItemToArray(l, cJSON_CreateNumber(pc->layer_sel[i]));
    } else {
        cJSON_AddNullToObject(root, "layers_to_transform");
    }
    if (pc->n_save) {
        cJSON *s = cJSON_AddArrayToObject(root, "modules_to_save");
        for (int i = 0; i < pc->n_save; i++) cJSON_AddItemToArray(s, cJSON_CreateString(pc->save[i]));
    } else {
        cJSON_AddNullToObject(root, "modules_to_save");
    }
    if (pc->kind == TK_ADAPTER_BOTTLENECK) {
        cJSON_AddStringToObject(root, "peft_type", "BOTTLENECK");
        cJSON_AddNumberToObject(root, "bottleneck_size", pc->r);
        cJSON_AddStringToObject(root, "non_linearity", pc->act == TK_ACT_TANH ? "tanh" : "relu");
        cJSON_AddNumberToObject(root, "adapter_dropout", pc->dropout);
        cJSON_AddNumberToObject(root, "scaling", pc->bottleneck_scaling);
        cJSON_AddBoolToObject(root, "use_parallel_adapter", 1);
        cJSON_AddBoolToObject(root, "use_adapterp", 0);
    } else if (pc->kind == TK_ADAPTER_ADALORA) { /* AdaLoraConfig's fields */
        const tk_adalora_config *a = &pc->ada;
        cJSON_AddStringToObject(root, "peft_type", "ADALORA");
        cJSON_AddNumberToObject(root, "init_r", a->init_r);
        cJSON_AddNumberToObject(root, "target_r", a->target_r);
        cJSON_AddNumberToObject(root, "tinit", a->tinit);
        cJSON_AddNumberToObject(root, "tfinal", a->tfinal);
        cJSON_AddNumberToObject(root, "deltaT", a->delta_t);
        cJSON_AddNumberToObject(root, "beta1", short_float(a->beta1));
        cJSON_AddNumberToObject(root, "beta2", short_float(a->beta2));
        cJSON_AddNumberToObject(root, "orth_reg_weight", short_float(a->orth_reg_weight));
        if (a->total_step > 0) cJSON_AddNumberToObject(root, "total_step", a->total_step);
        else cJSON_AddNullToObject(root, "total_step");
        if (a->n_rank) {
            cJSON *rp = cJSON_AddObjectToObject(root, "rank_pattern");
            int top = 0;
            for (int i = 0; i < a->n_rank; i++) top = a->rank[i].layer + 1 > top ? a->rank[i].layer + 1 : top;
            for (int l = 0; l < top; l++) /* (layer, projection) order */
                for (int p = 0; p < TK_NPROJ; p++) {
                    const tk_rank_entry *e = tk_peft_rank_find(pc, l, p);
                    if (!e) continue;
                    char nm[112];
                    tk_module_name(nm, sizeof nm, l, p);
                    strcat(nm, ".lora_E");
                    cJSON *list = cJSON_AddArrayToObject(rp, nm);
                    for (int j = 0; j < a->init_r; j++) cJSON_AddItemToArray(list, cJSON_CreateBool(tk_rank_kept(e, j)));
                }
        } else {
            cJSON_AddNullToObject(root, "rank_pattern");
        }
        cJSON_AddNumberToObject(root, "lora_alpha", short_float(pc->alpha));
        cJSON_AddNumberToObject(root, "lora_dropout", short_float(pc->dropout));
        cJSON_AddStringToObject(root, "bias", "none");
        cJSON_AddBoolToObject(root, "fan_in_fan_out", 0);
        cJSON_AddBoolToObject(root, "inference_mode", 1);
    } else {
        cJSON_AddStringToObject(root, "peft_type", "LORA");
        cJSON_AddNumberToObject(root, "r", pc->r);
        cJSON_AddNumberToObject(root, "lora_alpha", pc->alpha);
        cJSON_AddNumberToObject(root, "lora_dropout", pc->dropout);
        cJSON_AddBoolToObject(root, "use_rslora", pc->use_rslora);
        cJSON_AddBoolToObject(root, "use_dora", pc->kind == TK_ADAPTER_DORA);
        cJSON_AddStringToObject(root, "bias", "none");
        cJSON_AddBoolToObject(root, "fan_in_fan_out", 0);
        cJSON_AddBoolToObject(root, "inference_mode", 1);
    }
    if (pc->gate.enabled) {
        const tk_gate_config *g = &pc->gate;
        cJSON *ts = cJSON_AddObjectToObject(root, "ts_peft");
        cJSON_AddStringToObject(ts, "rule", tk_gate_rule_name(g->rule));
        cJSON_AddNumberToObject(ts, "lambda", g->lambda);
        cJSON_AddNumberToObject(ts, "eta_tau", g->eta_tau);
        cJSON_AddNumberToObject(ts, "tau0", g->tau0);
        if (g->target_keep > 0.0f) cJSON_AddNumberToObject(ts, "target_keep", g->target_keep);
        else cJSON_AddNullToObject(ts, "target_keep");
        cJSON_AddNumberToObject(ts, "eta_lambda", g->eta_lambda);
        cJSON_AddNumberToObject(ts, "beta", g->beta);
        cJSON_AddNumberToObject(ts, "warmup_steps", g->warmup_steps);
        if (g->scope != TK_TAU_MODULE) cJSON_AddStringToObject(ts, "tau_scope", tk_tau_scope_name(g->scope));
        if (g->trust > 0.0f) cJSON_AddNumberToObject(ts, "trust_region", g->trust);
        if (g->rule == TK_GATE_RANDOM) cJSON_AddNumberToObject(ts, "keep", g->keep);
        if (g->straight_through) cJSON_AddBoolToObject(ts, "straight_through", 1);
    }
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    if (!text) return tk_fail(err, "%s: out of memory", path);
    int rc = tk_write_file_atomic(path, text, strlen(text), err);
    free(text);
    return rc;
}

void tk_peft_module_init(tk_adapted_linear *L, const tk_peft_config *pc, size_t r, float scale, uint64_t rand_seed) {
    L->kind = pc->kind;
    L->r = r;
    L->scale = scale;
    L->dropout = pc->dropout;
    L->act = pc->act;
    L->gated = pc->gate.enabled;
    L->tau = pc->gate.tau0;
    L->lambda = pc->gate.lambda;
    L->rand_keep = pc->gate.rule == TK_GATE_RANDOM ? pc->gate.keep : 0.0f;
    L->straight_through = pc->gate.enabled && pc->gate.straight_through;
    L->rand_seed = rand_seed;
}

/* N(0, sd) by Box-Muller. */
static float normal(tk_rng *rng, float sd) {
    float u1 = tk_rng_uniform(rng), u2 = tk_rng_uniform(rng);
    return sd * sqrtf(-2.0f * logf(1.0f - u1)) * cosf(6.28318530718f * u2);
}

void tk_peft_module_init_weights(tk_adapted_linear *L, tk_rng *rng) {
    if (L->kind == TK_ADAPTER_ADALORA) {
        memset(L->E, 0, L->r * sizeof(float));
        for (size_t i = 0; i < L->r * L->in; i++) L->A[i] = normal(rng, 0.02f);
        for (size_t i = 0; i < L->out * L->r; i++) L->B[i] = normal(rng, 0.02f);
        return;
    }
    float bound = 1.0f / sqrtf((float)L->in);
    for (size_t i = 0; i < L->r * L->in; i++) L->A[i] = (2.0f * tk_rng_uniform(rng) - 1.0f) * bound;
    memset(L->B, 0, L->out * L->r * sizeof(float));
    if (L->kind == TK_ADAPTER_DORA)
        for (size_t o = 0; o < L->out; o++) {
            double ss = 0.0;
            for (size_t i = 0; i < L->in; i++) ss += (double)L->w0[o * L->in + i] * L->w0[o * L->in + i];
            L->mag[o] = (float)sqrt(ss);
        }
}

/* Reads a one-element F32 tensor if present: a finite value >= 0. */
static int read_gate_value(const tk_st_file *f, const char *name, float *out, tk_err *err) {
    const tk_st_tensor *t = tk_st_find(f, name);
    if (!t) return 0;
    if (t->numel != 1) return tk_fail(err, "%s: tensor '%s' must hold one value, found %zu", tk_st_path(f), name, t->numel);
    if (tk_st_read_f32(f, t, out, 1, err)) return -1;
    if (!(*out >= 0.0f) || isinf(*out))
        return tk_fail(err, "%s: tensor '%s' must be a finite value >= 0", tk_st_path(f), name);
    return 0;
}

int tk_peft_load_gate(tk_adapted_linear *L, const tk_st_file *f, const char *key, tk_err *err) {
    char nm[512];
    snprintf(nm, sizeof nm, "%s.ts_tau", key);
    if (read_gate_value(f, nm, &L->tau, err)) return -1;
    snprintf(nm, sizeof nm, "%s.ts_lambda", key);
    return read_gate_value(f, nm, &L->lambda, err);
}
