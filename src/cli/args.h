/* args.h: table-driven command-line options shared by every verb. Each option is a long name bound
 * to a typed destination; `--name value`, `--name=value` and, for flags, bare `--name` are accepted.
 * A JSON config file (--config FILE) holds the same names as keys and is applied first, so every key
 * can be overridden on the command line. Help text is generated from the table.
 */
#ifndef TK_CLI_ARGS_H
#define TK_CLI_ARGS_H

#include "../common.h"

#include <stdint.h>

typedef enum { TK_OPT_STR, TK_OPT_INT, TK_OPT_U64, TK_OPT_FLOAT, TK_OPT_FLAG } tk_opt_type;

typedef struct {
    const char *name;  /* without the leading dashes */
    tk_opt_type type;
    void *dest;        /* const char **, int *, uint64_t *, float *, int * */
    const char *meta;  /* value placeholder in help, e.g. "DIR" */
    const char *help;
    int seen;          /* set when given (by config or command line) */
} tk_opt;

/* Parses argv[0..argc) (argv[0] is the first option, not the verb). Returns 0, 1 when --help was
 * asked (help already printed to stdout), or -1 with err set. */
int tk_args_parse(tk_opt *opts, int n_opts, int argc, char **argv, const char *usage, tk_err *err);
/* Applies a JSON object's keys to the options (strings are kept alive by the caller: *json_out). */
int tk_args_apply_config(tk_opt *opts, int n_opts, const char *path, void **json_out, tk_err *err);
void tk_args_help(const tk_opt *opts, int n_opts, const char *usage);
int tk_opt_seen(const tk_opt *opts, int n_opts, const char *name);
/* Every value of a repeatable option `name` on the command line (the parser keeps only the last),
 * in order, into out[0..cap); returns the count, or -1 (err set) when there are more than cap. The
 * values of other valued options are skipped (so "--out --input" is not mistaken for an input). */
int tk_args_collect(const tk_opt *opts, int n_opts, int argc, char **argv, const char *name, const char **out,
                    int cap, tk_err *err);

#endif
