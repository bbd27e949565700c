/* args.c: see args.h. */
#include "args.h"

#include <cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static tk_opt *find(tk_opt *opts, int n, const char *name, size_t len) {
    for (int i = 0; i < n; i++)
        if (strlen(opts[i].name) == len && strncmp(opts[i].name, name, len) == 0) return &opts[i];
    return NULL;
}

static int set_value(tk_opt *o, const char *v, const char *where, tk_err *err) {
    char *end = NULL;
    errno = 0;
    switch (o->type) {
    case TK_OPT_STR: *(const char **)o->dest = v; break;
    case TK_OPT_INT: {
        long x = strtol(v, &end, 10);
        if (end == v || *end || errno || x < -2147483647L || x > 2147483647L)
            return tk_fail(err, "%s--%s: expected an integer, got \"%s\"", where, o->name, v);
        *(int *)o->dest = (int)x;
        break;
    }
    case TK_OPT_U64: {
        if (v[0] == '-') return tk_fail(err, "%s--%s: expected a non-negative integer, got \"%s\"", where, o->name, v);
        unsigned long long x = strtoull(v, &end, 10);
        if (end == v || *end || errno)
            return tk_fail(err, "%s--%s: expected a non-negative integer, got \"%s\"", where, o->name, v);
        *(uint64_t *)o->dest = (uint64_t)x;
        break;
    }
    case TK_OPT_FLOAT: {
        float x = strtof(v, &end);
        if (end == v || *end || !isfinite(x))
            return tk_fail(err, "%s--%s: expected a number, got \"%s\"", where, o->name, v);
        *(float *)o->dest = x;
        break;
    }
    case TK_OPT_FLAG:
        if (strcmp(v, "1") == 0 || strcmp(v, "true") == 0 || strcmp(v, "on") == 0) *(int *)o->dest = 1;
        else if (strcmp(v, "0") == 0 || strcmp(v, "false") == 0 || strcmp(v, "off") == 0) *(int *)o->dest = 0;
        else return tk_fail(err, "%s--%s: expected on/off, got \"%s\"", where, o->name, v);
        break;
    }
    o->seen = 1;
    return 0;
}

void tk_args_help(const tk_opt *opts, int n, const char *usage) {
    printf("%s\n\noptions:\n", usage);
    for (int i = 0; i < n; i++) {
        char left[64];
        if (opts[i].type == TK_OPT_FLAG) snprintf(left, sizeof left, "--%s", opts[i].name);
        else snprintf(left, sizeof left, "--%s %s", opts[i].name, opts[i].meta ? opts[i].meta : "X");
        printf("  %-28s %s\n", left, opts[i].help);
    }
    printf("  %-28s %s\n", "--help", "show this help");
}

int tk_args_parse(tk_opt *opts, int n, int argc, char **argv, const char *usage, tk_err *err) {
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            tk_args_help(opts, n, usage);
            return 1;
        }
        if (strncmp(a, "--", 2) != 0) return tk_fail(err, "unexpected argument \"%s\" (options start with --)", a);
        const char *name = a + 2, *eq = strchr(name, '=');
        size_t len = eq ? (size_t)(eq - name) : strlen(name);
        tk_opt *o = find(opts, n, name, len);
        if (!o) return tk_fail(err, "unknown option \"%.*s\" (see --help)", (int)(len + 2), a);
        const char *v;
        if (eq) v = eq + 1;
        else if (o->type == TK_OPT_FLAG && (i + 1 >= argc || strncmp(argv[i + 1], "--", 2) == 0)) v = "1";
        else if (i + 1 < argc) v = argv[++i];
        else return tk_fail(err, "--%s needs a value", o->name);
        if (set_value(o, v, "", err)) return -1;
    }
    return 0;
}

int tk_args_apply_config(tk_opt *opts, int n, const char *path, void **json_out, tk_err *err) {
    size_t len;
    char *text = tk_read_file(path, &len, err);
    if (!text) return -1;
    cJSON *root = cJSON_ParseWithLength(text, len);
    free(text);
    if (!root || !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return tk_fail(err, "%s: not a JSON object", path);
    }
    char where[4200];
    snprintf(where, sizeof where, "%s: ", path);
    const cJSON *it;
    cJSON_ArrayForEach(it, root) {
        if (it->string[0] == '_') continue; /* "_comment" keys document the file */
        tk_opt *o = find(opts, n, it->string, strlen(it->string));
        if (!o) {
            tk_fail(err, "%s: unknown key \"%s\" (keys are the option names of --help)", path, it->string);
            cJSON_Delete(root);
            return -1;
        }
        char buf[64];
        const char *v = buf;
        if (cJSON_IsString(it)) v = it->valuestring;
        else if (cJSON_IsBool(it)) v = cJSON_IsTrue(it) ? "1" : "0";
        else if (cJSON_IsNumber(it)) snprintf(buf, sizeof buf, "%.9g", it->valuedouble);
        else {
            tk_fail(err, "%s: key \"%s\" must be a string, number or boolean", path, it->string);
            cJSON_Delete(root);
            return -1;
        }
        if (set_value(o, v, where, err)) {
            cJSON_Delete(root);
            return -1;
        }
    }
    *json_out = root; /* strings point into it */
    return 0;
}

int tk_opt_seen(const tk_opt *opts, int n, const char *name) {
    for (int i = 0; i < n; i++)
        if (strcmp(opts[i].name, name) == 0) return opts[i].seen;
    return 0;
}

int tk_args_collect(const tk_opt *opts, int n_opts, int argc, char **argv, const char *name, const char **out,
                    int cap, tk_err *err) {
    size_t nl = strlen(name);
    int n = 0;
    for (int i = 0; i < argc; i++) {
        const char *v = NULL, *a = argv[i];
        if (strncmp(a, "--", 2) != 0) continue;
        if (strncmp(a + 2, name, nl) == 0 && a[2 + nl] == '=') {
            v = a + 3 + nl;
        } else if (strcmp(a + 2, name) == 0) {
            if (i + 1 < argc) v = argv[++i];
        } else if (!strchr(a, '=') && i + 1 < argc) {
            for (int j = 0; j < n_opts; j++) /* skip the value of another valued option */
                if (strcmp(opts[j].name, a + 2) == 0 && opts[j].type != TK_OPT_FLAG) i++;
        }
        if (!v) continue;
        if (n == cap) return tk_fail(err, "more than %d --%s values", cap, name);
        out[n++] = v;
    }
    return n;
}
