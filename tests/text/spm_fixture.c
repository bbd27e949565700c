/* spm_fixture.c: see spm_fixture.h. */
#include "spm_fixture.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

const char *const SPM_FIXTURE_LLAMA_ARGS[] = {
    "--model_type=bpe", "--byte_fallback=true", "--normalization_rule_name=identity",
    "--remove_extra_whitespaces=false", "--allow_whitespace_only_pieces=true", "--split_digits=true",
    "--unk_id=0", "--bos_id=1", "--eos_id=2", "--pad_id=-1", NULL};

int spm_fixture_dir(char *dir, size_t n) {
    if (snprintf(dir, n, "/tmp/tk_text_test_XXXXXX") >= (int)n || !mkdtemp(dir)) {
        printf("spm_fixture: cannot create a temporary directory: %s\n", strerror(errno));
        return -1;
    }
    return 0;
}

static const char *const WORDS[] = {
    "the", "a", "of", "to", "in", "is", "was", "for", "on", "with", "as", "by", "at", "from", "that", "this",
    "answer", "question", "correct", "solution", "option", "ending", "true", "false", "please", "choose",
    "which", "what", "when", "water", "energy", "light", "plant", "animal", "earth", "heat", "move",
    "change", "cause", "because", "response", "instruction", "input", "output", "hello", "world", "chat",
    "user", "human", "assistant", "helpful", "polite", "cat", "dog", "mat", "sleeps", "runs", "quickly"};
#define N_WORDS (sizeof WORDS / sizeof WORDS[0])

static const char *const EXTRA_LINES[] = {
    "café naïve résumé Ångström", "日本語のテキストです 中文汉字", "한국어 텍스트", "emoji 😀 🎉 👍",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:", "### Input:", "### Response:", "USER: hello ASSISTANT: hi there",
    "[INST] <<SYS>> <</SYS>> [/INST]", "numbers 12345 3.14159"};
#define N_EXTRA (sizeof EXTRA_LINES / sizeof EXTRA_LINES[0])

static int write_corpus(const char *path) {
    FILE *f = fopen(path, "w");
    if (!f) {
        printf("spm_fixture: cannot write %s: %s\n", path, strerror(errno));
        return -1;
    }
    uint64_t s = 0x9E3779B97F4A7C15ull;
    for (int line = 0; line < 3000; line++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        int n = 3 + (int)((s >> 33) % 14);
        for (int w = 0; w < n; w++) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            fprintf(f, "%s%s", w ? " " : "", WORDS[(s >> 33) % N_WORDS]);
        }
        fputc('\n', f);
    }
    for (int r = 0; r < 20; r++)
        for (size_t i = 0; i < N_EXTRA; i++) fprintf(f, "%s\n", EXTRA_LINES[i]);
    if (fclose(f) != 0) {
        printf("spm_fixture: cannot write %s\n", path);
        return -1;
    }
    return 0;
}

int spm_fixture_train(const char *dir, const char *name, const char *const *extra_args, char *model_path, size_t n) {
    char corpus[512], input_arg[600], prefix_arg[600];
    snprintf(corpus, sizeof corpus, "%s/corpus.txt", dir);
    if (access(corpus, R_OK) != 0 && write_corpus(corpus) != 0) return -1;
    snprintf(input_arg, sizeof input_arg, "--input=%s", corpus);
    snprintf(prefix_arg, sizeof prefix_arg, "--model_prefix=%s/%s", dir, name);
    const char *argv[64];
    size_t k = 0;
    argv[k++] = "spm_train";
    argv[k++] = input_arg;
    argv[k++] = prefix_arg;
    argv[k++] = "--character_coverage=1.0";
    argv[k++] = "--minloglevel=2";
    for (size_t i = 0; extra_args && extra_args[i] && k < 62; i++) argv[k++] = extra_args[i];
    argv[k] = NULL;

    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&fa, STDERR_FILENO, "/dev/null", O_WRONLY, 0);
    pid_t pid;
    int rc = posix_spawnp(&pid, "spm_train", &fa, NULL, (char *const *)argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0) {
        printf("spm_fixture: cannot run spm_train (%s): install the Debian package sentencepiece (make deps)\n",
               strerror(rc));
        return -1;
    }
    int status = 0;
    if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        printf("spm_fixture: spm_train failed for %s (status %d)\n", name, status);
        return -1;
    }
    if (snprintf(model_path, n, "%s/%s.model", dir, name) >= (int)n) return -1;
    return 0;
}

void spm_fixture_cleanup(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    char path[1024];
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        unlink(path);
    }
    closedir(d);
    rmdir(dir);
}
