/* cli.h: the verbs of the tspeft command. Each takes the arguments after the verb and returns the
 * process exit status (0 success, 1 failure, 2 usage error); errors go to stderr as one line. */
#ifndef TK_CLI_H
#define TK_CLI_H

#include "../common.h"

#include <stddef.h>

int tk_cmd_convert(int argc, char **argv);
int tk_cmd_train(int argc, char **argv);
/* train on one rank of a data-parallel job (src/train/dist.h); dist NULL = tk_cmd_train */
struct tk_dist;
int tk_cmd_train_dist(int argc, char **argv, struct tk_dist *dist);
int tk_cmd_generate(int argc, char **argv);
int tk_cmd_info(int argc, char **argv);
int tk_cmd_merge(int argc, char **argv);
int tk_cmd_bench(int argc, char **argv);
/* bench --loader (bench_loader.c) */
int tk_bench_loader(const char *spec, size_t B, size_t T, size_t batches, size_t prefetch, int threads, tk_err *err);
int tk_cmd_eval(int argc, char **argv);
/* cmd_image.c: the image-classification task of train and eval (vision/classify.h); tk_cmd_train and
 * tk_cmd_eval hand over when tk_cli_is_image_task(argc, argv) (--task image-classification). */
int tk_cli_is_image_task(int argc, char **argv);
int tk_cmd_train_image(int argc, char **argv);
int tk_cmd_eval_image(int argc, char **argv);
int tk_cmd_gates(int argc, char **argv);
/* --gate on|off|random (on/off also 1/0, true/false) and --keep P (given: keep_seen; only with random, in
 * (0, 1]) of the train verbs: *gate 1, 0 or 2; -1 with err (a usage error). */
int tk_cli_gate_mode(const char *gate_s, int keep_seen, float keep, int *gate, tk_err *err);
int tk_cmd_select(int argc, char **argv);

#endif
