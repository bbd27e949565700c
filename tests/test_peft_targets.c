/* test_peft_targets.c: target-module selection (src/peft/peft_config.c) as HF PEFT matches it:
 * short names apply to the layers of layers_to_transform, full module names
 * ("model.layers.3.self_attn.q_proj") select exactly that module whatever layers_to_transform says;
 * the --target-modules forms (list, "all", @file of names, @file of JSON); adapter_config.json save and
 * reload keep the exact set; bad names fail with a message naming them. Exits 1 on any failure.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"
#include "peft/peft_config.h"

static int g_failures;

static void check(const char *what, int ok) {
    printf("%-78s %s\n", what, ok ? "ok" : "FAIL");
    if (!ok) g_failures++;
}

/* The targeted set over n_layers as a string "L:p,L:p,..." for comparisons. */
static void targets_str(const tk_peft_config *pc, int n_layers, char *out, size_t n) {
    out[0] = 0;
    for (int l = 0; l < n_layers; l++)
        for (int p = 0; p < TK_NPROJ; p++)
            if (tk_peft_targets(pc, l, p)) {
                size_t k = strlen(out);
                snprintf(out + k, n - k, "%s%d:%s", k ? "," : "", l, tk_proj_short[p]);
            }
}

static void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    if (!f) {
        perror(path);
        exit(1);
    }
    fputs(text, f);
    fclose(f);
}

int main(void) {
    char dir[] = "/tmp/tk_targets_XXXXXX";
    if (!mkdtemp(dir)) return 1;
    char path[256], s[4096];
    tk_err err = {0};
    tk_peft_config pc;

    /* existing forms are unchanged */
    tk_peft_config_default(&pc);
    check("short names on every layer", tk_peft_parse_target_list(&pc, "q_proj,v_proj", &err) == 0);
    targets_str(&pc, 2, s, sizeof s);
    check("  -> 0:q_proj,0:v_proj,1:q_proj,1:v_proj", strcmp(s, "0:q_proj,0:v_proj,1:q_proj,1:v_proj") == 0);
    check("dotted suffix self_attn.k_proj", tk_peft_parse_target_list(&pc, "self_attn.k_proj", &err) == 0 &&
                                                pc.target_mask == (1u << TK_PROJ_K) && pc.n_modules == 0);
    check("all", tk_peft_parse_target_list(&pc, "all", &err) == 0 && pc.target_mask == (1u << TK_NPROJ) - 1);
    tk_peft_parse_layers(&pc, "1", &err);
    tk_peft_parse_target_list(&pc, "up_proj", &err);
    targets_str(&pc, 3, s, sizeof s);
    check("short name with --layers 1 -> 1:up_proj", strcmp(s, "1:up_proj") == 0);

    /* full names: exact modules, layers_to_transform does not restrict them (PEFT) */
    check("mixed list", tk_peft_parse_target_list(&pc, "q_proj,model.layers.0.mlp.down_proj,model.layers.2.self_attn.o_proj", &err) == 0);
    targets_str(&pc, 3, s, sizeof s);
    check("  -> 0:down_proj,1:q_proj,2:o_proj", strcmp(s, "0:down_proj,1:q_proj,2:o_proj") == 0);
    check("  n_modules 2", pc.n_modules == 2);
    check("layer 2 does not exist in a 2-layer model", tk_peft_check_layers(&pc, 2, &err) != 0 &&
                                                          strstr(err.msg, "model.layers.2.self_attn.o_proj") != NULL);
    check("but exists in a 3-layer model", tk_peft_check_layers(&pc, 3, &err) == 0);

    /* save and reload */
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    check("save", tk_peft_config_save(&pc, path, &err) == 0);
    tk_peft_config back;
    check("reload", tk_peft_config_load(&back, path, &err) == 0);
    char s2[4096];
    targets_str(&back, 3, s2, sizeof s2);
    check("reloaded set equals the saved one", strcmp(s, s2) == 0);
    tk_peft_config_free(&back);
    char *text = tk_read_file(path, NULL, &err);
    check("written as PEFT full names", text && strstr(text, "\"model.layers.0.mlp.down_proj\"") && strstr(text, "\"q_proj\""));
    free(text);

    /* @file forms */
    snprintf(path, sizeof path, "%s/modules.txt", dir);
    write_text(path, "# selected by keep\nmodel.layers.1.self_attn.v_proj\nmodel.layers.0.mlp.gate_proj, model.layers.0.mlp.up_proj\n");
    char arg[300];
    snprintf(arg, sizeof arg, "@%s", path);
    tk_peft_config_default(&pc);
    check("@modules.txt", tk_peft_parse_target_list(&pc, arg, &err) == 0);
    targets_str(&pc, 2, s, sizeof s);
    check("  -> 0:gate_proj,0:up_proj,1:v_proj", strcmp(s, "0:gate_proj,0:up_proj,1:v_proj") == 0 && pc.target_mask == 0);
    snprintf(path, sizeof path, "%s/modules.json", dir);
    write_text(path, "{\"criterion\": \"keep\", \"target_modules\": [\"model.layers.1.mlp.down_proj\"]}");
    snprintf(arg, sizeof arg, "@%s", path);
    check("@modules.json", tk_peft_parse_target_list(&pc, arg, &err) == 0);
    targets_str(&pc, 2, s, sizeof s);
    check("  -> 1:down_proj", strcmp(s, "1:down_proj") == 0);

    /* bad input */
    check("model.layers.0.mlp.q_proj is refused", tk_peft_parse_target_list(&pc, "model.layers.0.mlp.q_proj", &err) != 0 &&
                                                      strstr(err.msg, "model.layers.0.mlp.q_proj") != NULL);
    check("foo_proj is refused", tk_peft_parse_target_list(&pc, "foo_proj", &err) != 0 && strstr(err.msg, "foo_proj"));
    check("huge layer index is refused", tk_peft_parse_target_list(&pc, "model.layers.99999999999999999999.mlp.up_proj", &err) != 0);
    write_text(path, "{\"target_modules\": [1]}");
    check("JSON entry not a string is refused, naming the file",
          tk_peft_parse_target_list(&pc, arg, &err) != 0 && strstr(err.msg, path) != NULL);
    check("missing @file is refused", tk_peft_parse_target_list(&pc, "@/nonexistent/modules.txt", &err) != 0);
    snprintf(path, sizeof path, "%s/empty.txt", dir);
    write_text(path, "# nothing\n");
    snprintf(arg, sizeof arg, "@%s", path);
    check("empty @file is refused", tk_peft_parse_target_list(&pc, arg, &err) != 0);

    /* the JSON loader: full names in target_modules, layers_to_transform applies to short names only */
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    write_text(path, "{\"peft_type\": \"LORA\", \"r\": 4, \"target_modules\": [\"q_proj\", \"model.layers.0.mlp.down_proj\"],"
                     " \"layers_to_transform\": [1]}");
    check("load PEFT config with a full name", tk_peft_config_load(&pc, path, &err) == 0);
    targets_str(&pc, 2, s, sizeof s);
    check("  -> 0:down_proj,1:q_proj (as tests/parity/reference.py _targeted)", strcmp(s, "0:down_proj,1:q_proj") == 0);
    tk_peft_config_free(&pc);

    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
    printf("%s\n", g_failures ? "FAILED" : "all passed");
    return g_failures ? 1 : 0;
}
