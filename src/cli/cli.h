/* cli.h: the verbs of the tspeft command. Each takes the arguments after the verb and returns the
 * process exit status (0 success, 1 failure, 2 usage error); errors go to stderr as one line. */
#ifndef TK_CLI_H
#define TK_CLI_H

int tk_cmd_train(int argc, char **argv);
int tk_cmd_generate(int argc, char **argv);
int tk_cmd_info(int argc, char **argv);
int tk_cmd_merge(int argc, char **argv);
int tk_cmd_bench(int argc, char **argv);

#endif
