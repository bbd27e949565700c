/* fuzz_args_config.c: tk_args_apply_config (tspeft train --config FILE) on an arbitrary JSON file,
 * against an option table with one option of every type (string, int, u64, float, flag).
 */
#include "cli/args.h"
#include "fuzz_common.h"

#include <cJSON.h>
#include <stdint.h>

int tkf_target(const uint8_t *data, size_t size, tk_err *err) {
    const char *path = tkf_path("config.json");
    tkf_write(path, data, size);
    const char *model = NULL, *sched = "constant";
    int steps = 100, shuffle = 0, gate = 1;
    uint64_t seed = 42;
    float lr = 2e-4f, keep = 0.0f;
    tk_opt opts[] = {
        {"model", TK_OPT_STR, &model, "DIR", "model directory", 0},
        {"lr-scheduler", TK_OPT_STR, &sched, "NAME", "schedule", 0},
        {"steps", TK_OPT_INT, &steps, "N", "steps", 0},
        {"seed", TK_OPT_U64, &seed, "S", "seed", 0},
        {"lr", TK_OPT_FLOAT, &lr, "X", "learning rate", 0},
        {"ts-target-keep", TK_OPT_FLOAT, &keep, "RHO", "keep ratio", 0},
        {"shuffle", TK_OPT_FLAG, &shuffle, NULL, "shuffle", 0},
        {"gate", TK_OPT_FLAG, &gate, "on|off", "gate", 0},
    };
    int n = (int)(sizeof opts / sizeof opts[0]);
    void *json = NULL;
    int rc = tk_args_apply_config(opts, n, path, &json, err);
    if (rc == 0) {
        TKF_REQUIRE(json != NULL);
        /* the strings stay readable while the JSON lives */
        volatile size_t k = 0;
        for (const char *s = model; s && *s; s++) k++;
        for (const char *s = sched; s && *s; s++) k++;
        TKF_REQUIRE(shuffle == 0 || shuffle == 1);
        cJSON_Delete(json);
    } else {
        TKF_REQUIRE(json == NULL);
    }
    return rc;
}
