/* cli.h: the verbs of the tspeft command. Each takes the arguments after the verb and returns the
 * process exit status (0 success, 1 failure, 2 usage error); errors go to stderr as one line. */
#ifndef TK_CLI_H
#define TK_CLI_H

int tk_cmd_convert(int argc, char **argv);
int tk_cmd_train(int argc, char **argv);
/* train on one rank of a data-parallel job (src/train/dist.h); dist NULL = tk_cmd_train */
struct tk_dist;
int tk_cmd_train_dist(int argc, char **argv, struct tk_dist *dist);
int tk_cmd_generate(int argc, char **argv);
int tk_cmd_info(int argc, char **argv);
int tk_cmd_merge(int argc, char **argv);
int tk_cmd_bench(int argc, char **argv);
int tk_cmd_eval(int argc, char **argv);
int tk_cmd_gates(int argc, char **argv);
int tk_cmd_select(int argc, char **argv);

#endif
