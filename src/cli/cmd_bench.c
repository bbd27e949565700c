/* cmd_bench.c: `tspeft bench`: training-step speed and memory of a synthetic LLaMA of any shape
 * (random weights, nothing read from disk), beside this machine's cblas_sgemm peak measured in the
 * same run at the same thread count. */
#include "../analysis/gatelog.h"
#include "../model/llama.h"
#include "../ops/blas.h"
#include "../train/optim.h"
#include "args.h"
#include "blas_core.h"
#include "cli.h"

#include <cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

static const char *USAGE =
    "usage: tspeft bench [--dim 768 --layers 12 --heads 12 --ffn 2048 --vocab 32000 --seq 512 --batch 1]\n"
    "                    [--r 16 --targets all --gate on --keep 1.0] [--steps 5 --warmup 1 --threads 2] [--json FILE]\n"
    "                    [--keep-also X[,Y,Z]] [--bf16-weights] [--attention auto|full|tiled] [--recompute N|all]\n"
    "                    [--compute fp32|bf16]\n"
    "Times full LoRA training steps (forward, loss, backward, AdamW) of a random LLaMA and prints tokens/s,\n"
    "achieved GFLOP/s (the matmul FLOPs of a dense reference step, counted from the shapes: see\n"
    "docs/performance.md), peak RSS beside a memory model from the shapes, the time per phase and in the\n"
    "adapter branches, and the 2048^3 cblas_sgemm peak of this machine at the same thread count (the best\n"
    "of runs before and after the timed steps).\n"
    "--keep forces the gate's keep ratio: before every step, untimed, thresholds are set from measured r.\n"
    "--keep-also X,Y also times those ratios, in turn with --keep step by step (--steps of each), and prints\n"
    "each beside --keep's, measured side by side in one run; the headline figures are --keep's steps.\n"
    "--sgemm-beside runs the 2048^3 sgemm after each timed step for as long as the step took and prints each\n"
    "step's share of that rate (a diagnostic for hosts whose speed drifts; its 48 MiB count in the peak RSS).";

/* Runs of the 2048^3 sgemm before the model is built and again after the timed steps; the peak is
 * the best of all of them. */
#define TK_PEAK_REPS 4

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Matrices for n^3 sgemm runs (NULL a: out of memory). */
typedef struct {
    size_t n;
    float *a, *b, *c;
} sgemm_probe;

static sgemm_probe probe_alloc(size_t n) {
    sgemm_probe p = {n, tk_calloc(n * n, sizeof(float)), tk_calloc(n * n, sizeof(float)), tk_calloc(n * n, sizeof(float))};
    if (!p.a || !p.b || !p.c) {
        tk_free(p.a), tk_free(p.b), tk_free(p.c);
        p.a = p.b = p.c = NULL;
        return p;
    }
    for (size_t i = 0; i < n * n; i++) p.a[i] = p.b[i] = 1e-3f * (float)(i % 97);
    return p;
}

static void probe_free(sgemm_probe *p) {
    tk_free(p->a), tk_free(p->b), tk_free(p->c);
    p->a = p->b = p->c = NULL;
}

/* Seconds of one run of the probe's sgemm (C = A B^T, as y = x W^T). */
static double probe_run(const sgemm_probe *p) {
    int n = (int)p->n;
    double t = tk_time();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0f, p->a, n, p->b, n, 0.0f, p->c, n);
    return tk_time() - t;
}

static double probe_flops(const sgemm_probe *p) { return 2.0 * (double)p->n * (double)p->n * (double)p->n; }

/* Best GFLOP/s of an n^3 sgemm over reps runs (0 when out of memory). */
static double sgemm_peak(size_t n, int reps) {
    sgemm_probe p = probe_alloc(n);
    double best = 0.0;
    for (int r = 0; p.a && r < reps; r++) {
        double g = probe_flops(&p) / probe_run(&p) / 1e9;
        if (g > best) best = g;
    }
    probe_free(&p);
    return best;
}

/* --sgemm-beside: the sgemm's sustained GFLOP/s over as long as the step just timed took (at least
 * one run), right after it: the machine's BLAS rate at the step's moment, for a shared host whose
 * speed drifts between the peak's best reading and the steps. */
static double sgemm_beside(const sgemm_probe *p, double seconds) {
    double t = 0.0;
    int runs = 0;
    while (runs == 0 || t < seconds) t += probe_run(p), runs++;
    return probe_flops(p) * runs / t / 1e9;
}

/* Matmul FLOPs a dense reference training step needs (every token kept, nothing recomputed), with
 * N = B*T tokens and 2 FLOPs per multiply-add (docs/performance.md):
 *   frozen linear O x I (7 per layer + lm_head): forward x W^T and backward dx = dy W: 2 * 2 N I O
 *   adapter of rank R: forward x A^T and u B^T, 2 N R (I + O); backward dy B, dB, dA, dx, twice that
 *   causal attention per layer and head: the visible pairs P = B T (T+1) / 2; forward Q K^T and P V,
 *   backward dV, dP, dQ, dK: 6 * 2 P D
 * Element-wise work (norms, RoPE, softmax, SiLU, the gate, cross-entropy, AdamW) is not counted;
 * neither is recomputation, nor the masked half of T x T that a full attention kernel computes. */
static double step_flops(const tk_llama *m, size_t B, size_t T, double *frozen, double *attention) {
    const tk_llama_config *c = &m->cfg;
    double N = (double)(B * T), lin = 0.0, ad = 0.0;
    for (int l = 0; l < c->n_layers; l++)
        for (int p = 0; p < TK_NPROJ; p++) {
            const tk_adapted_linear *L = &m->layers[l].proj[p];
            lin += (double)L->in * L->out;
            if (L->kind != TK_ADAPTER_NONE) ad += (double)L->r * (L->in + L->out);
        }
    lin += (double)c->vocab_size * c->dim; /* lm_head */
    double pairs = (double)B * (double)T * (double)(T + 1) / 2.0;
    double attn = 6.0 * 2.0 * pairs * c->head_dim * c->n_heads * c->n_layers;
    *frozen = 2.0 * 2.0 * N * lin;
    *attention = attn;
    return *frozen + attn + 3.0 * 2.0 * N * ad;
}

/* Bytes of the model's frozen weights (fp32, or 2 per element when BF16-resident). */
static double weight_bytes(const tk_llama *m) {
    const tk_llama_config *c = &m->cfg;
    /* --compute bf16: BF16 copies replace the frozen matrices (a tied head gets one beside the embedding) */
    double mats = 0.0, el = m->bf16 ? 2.0 : 4.0, eld = m->dot_copies ? 2.0 : el;
    double emb = (double)c->vocab_size * c->dim;
    for (int l = 0; l < c->n_layers; l++)
        for (int p = 0; p < TK_NPROJ; p++) mats += (double)m->layers[l].proj[p].in * m->layers[l].proj[p].out;
    double head = c->tie_embeddings ? (m->dot_copies ? 2.0 * emb : 0.0) : eld * emb;
    return mats * eld + emb * el + head + 4.0 * c->dim * (2.0 * c->n_layers + 1);
}

/* Thresholds that keep a fraction `keep` of each gated module's tokens, then frozen. A module's r
 * depends on the gates before it (they change its input), so thresholds set from one pass keep more
 * or fewer tokens once all of them apply; the passes repeat, each setting every tau from the r that
 * the previous taus produced, until every module keeps within one token of its target (at most 12
 * passes). The optimizer moves the adapters a little each step, and r with them (keep 0.5 drifted to
 * 0.58 over five steps), so this runs again, untimed, before every step. `verbose`: print the keep
 * ratio reached. */
static int force_keep(tk_llama *m, tk_llama_acts *a, const int32_t *ids, size_t B, size_t T, float keep,
                      int verbose, tk_err *err) {
    size_t N = B * T, want = N - (size_t)((1.0f - keep) * (float)N);
    float *r = malloc(N * sizeof *r);
    if (!r) return tk_fail(err, "out of memory");
    int pass = 0;
    size_t worst = 0, kept = 0, seen = 0;
    do {
        if (tk_llama_forward(m, a, ids, NULL, B, T, 0, NULL, err)) {
            free(r);
            return -1;
        }
        worst = kept = seen = 0;
        for (int l = 0; l < m->cfg.n_layers; l++)
            for (int p = 0; p < TK_NPROJ; p++) {
                tk_adapted_linear *L = &m->layers[l].proj[p];
                if (L->kind == TK_ADAPTER_NONE || !L->gated) continue;
                size_t got = 0;
                for (size_t i = 0; i < N; i++) got += L->S[i];
                size_t off = got > want ? got - want : want - got;
                worst = off > worst ? off : worst;
                kept += got;
                seen += N;
                size_t drop = N - want; /* tau = the r of rank drop: the drop smallest fall below it */
                if (drop > 0 && drop < N) memcpy(r, L->rr, N * sizeof *r);
                L->tau = drop == 0 ? 0.0f : (drop >= N ? INFINITY : tk_select_rank(r, N, drop));
            }
    } while (worst > 1 && ++pass < 12);
    free(r);
    if (verbose)
        fprintf(stderr, "bench: thresholds for keep %.3f set in %d passes (last pass kept %.3f, worst module off by %zu "
                        "tokens)\n", (double)keep, pass + 1, seen ? (double)kept / (double)seen : 1.0, worst);
    return 0;
}

/* --keep plus at most three --keep-also ratios */
#define TK_BENCH_KEEPS 4

/* Sums over one keep ratio's timed steps. */
typedef struct {
    double t, fwd, bwd, kept, seen;
} keep_sums;

/* The keep ratio measured over those steps (1 when the gate saw no token). */
static double keep_ratio(const keep_sums *k) { return k->seen ? k->kept / k->seen : 1.0; }

/* --keep-also "X[,Y,Z]" appended to keeps[0..*nk). */
static int parse_keeps(const char *list, float *keeps, int *nk, tk_err *err) {
    for (const char *p = list;;) {
        char *end;
        float v = strtof(p, &end);
        if (end == p || !(v >= 0.0f && v <= 1.0f) || (*end != ',' && *end != '\0'))
            return tk_fail(err, "--keep-also: \"%s\" is not a list of ratios in [0,1] (X[,Y,Z])", list);
        if (*nk >= TK_BENCH_KEEPS) return tk_fail(err, "--keep-also: at most %d ratios", TK_BENCH_KEEPS - 1);
        keeps[(*nk)++] = v;
        if (*end == '\0') return 0;
        p = end + 1;
    }
}

int tk_cmd_bench(int argc, char **argv) {
    tk_llama_config c = {0};
    c.dim = 768;
    c.hidden_dim = 2048;
    c.n_layers = 12;
    c.n_heads = 12;
    c.n_kv_heads = 0;
    c.vocab_size = 32000;
    c.norm_eps = 1e-5f;
    c.rope_theta = 10000.0f;
    int seq = 512, batch = 1, r = 16, gate = 1, steps = 5, warmup = 1, threads = 2, bf16 = 0;
    float keep = 1.0f, alpha = 32.0f;
    const char *targets = "all", *json_path = NULL, *type = "lora", *attention = "auto", *recompute = "0";
    const char *compute = "fp32";
    int compute_bf16 = 0;
    const char *keep_also = NULL;
    int beside = 0;
    uint64_t seed = 0;
    const char *loader = NULL;
    int batches = 200, prefetch = 2;
    tk_opt opts[] = {
        {"loader", TK_OPT_STR, &loader, "SHARDS", "instead: time the shard loader (a file or quoted glob) at --batch x --seq", 0},
        {"batches", TK_OPT_INT, &batches, "N", "--loader: batches timed (default 200)", 0},
        {"prefetch", TK_OPT_INT, &prefetch, "N", "--loader: batches prepared ahead (default 2)", 0},
        {"dim", TK_OPT_INT, &c.dim, "C", "hidden size (default 768)", 0},
        {"layers", TK_OPT_INT, &c.n_layers, "L", "layers (default 12)", 0},
        {"heads", TK_OPT_INT, &c.n_heads, "H", "attention heads (default 12)", 0},
        {"kv-heads", TK_OPT_INT, &c.n_kv_heads, "G", "key/value heads (default: heads)", 0},
        {"ffn", TK_OPT_INT, &c.hidden_dim, "F", "MLP width (default 2048)", 0},
        {"vocab", TK_OPT_INT, &c.vocab_size, "V", "vocabulary (default 32000)", 0},
        {"seq", TK_OPT_INT, &seq, "T", "sequence length (default 512)", 0},
        {"batch", TK_OPT_INT, &batch, "B", "sequences per step (default 1)", 0},
        {"adapter-type", TK_OPT_STR, &type, "T", "lora | bottleneck | none (default lora)", 0},
        {"r", TK_OPT_INT, &r, "N", "adapter rank (default 16)", 0},
        {"alpha", TK_OPT_FLOAT, &alpha, "X", "lora_alpha (default 32)", 0},
        {"targets", TK_OPT_STR, &targets, "LIST", "adapted projections (default all)", 0},
        {"gate", TK_OPT_FLAG, &gate, "on|off", "TS-PEFT gate (default on)", 0},
        {"keep", TK_OPT_FLOAT, &keep, "X", "forced keep ratio in [0,1] (default 1.0)", 0},
        {"keep-also", TK_OPT_STR, &keep_also, "X[,Y,Z]", "more keep ratios, timed in turn with --keep step by step (side by side)", 0},
        {"sgemm-beside", TK_OPT_FLAG, &beside, NULL, "after each timed step, the 2048^3 sgemm rate over as long (diagnostic)", 0},
        {"steps", TK_OPT_INT, &steps, "N", "timed steps (default 5)", 0},
        {"warmup", TK_OPT_INT, &warmup, "N", "untimed steps first (default 1)", 0},
        {"threads", TK_OPT_INT, &threads, "T", "threads (default 2)", 0},
        {"seed", TK_OPT_U64, &seed, "S", "weights seed (default 0)", 0},
        {"bf16-weights", TK_OPT_FLAG, &bf16, NULL, "keep the frozen matrices BF16 in memory", 0},
        {"attention", TK_OPT_STR, &attention, "K", "auto | full | tiled (default auto: tiled from 1024 positions)", 0},
        {"recompute", TK_OPT_STR, &recompute, "N", "recompute the first N layers (or all) in backward (default 0)", 0},
        {"compute", TK_OPT_STR, &compute, "P", "fp32 | bf16: frozen products in BF16, fp32 accumulation (AVX512-BF16; default fp32)", 0},
        {"json", TK_OPT_STR, &json_path, "FILE", "also write the figures as JSON", 0},
    };
    int n = (int)(sizeof opts / sizeof opts[0]);
    tk_err err = {0};
    int pr = tk_args_parse(opts, n, argc, argv, USAGE, &err);
    if (pr == 1) return 0;
    if (pr == 0) pr = tk_compute_parse(compute, &compute_bf16, &err);
    if (pr < 0) {
        fprintf(stderr, "tspeft bench: %s\n", err.msg);
        return 2;
    }
    if (loader) {
        if (batches < 1 || prefetch < 0 || seq < 1 || batch < 1) {
            fprintf(stderr, "tspeft bench: --batches, --seq and --batch must be >= 1, --prefetch >= 0\n");
            return 2;
        }
        if (tk_bench_loader(loader, (size_t)batch, (size_t)seq, (size_t)batches, (size_t)prefetch, threads, &err)) {
            fprintf(stderr, "tspeft bench: %s\n", err.msg);
            return 1;
        }
        return 0;
    }
    if (!c.n_kv_heads) c.n_kv_heads = c.n_heads;
    c.head_dim = c.n_heads > 0 ? c.dim / c.n_heads : 0;
    c.max_seq_len = seq;
    int status = 1;
    tk_llama *m = NULL;
    tk_llama_acts *a = NULL;
    int32_t *ids = NULL;
    sgemm_probe probe = {0};
    double *beside_buf = NULL; /* --sgemm-beside: beside_rate, beside_share and a sorted copy, [steps] each */
    tk_peft_config pc;
    tk_peft_config_default(&pc);
    if (seq < 2 || batch < 1 || steps < 1 || warmup < 0 || !(keep >= 0.0f && keep <= 1.0f) || c.n_heads < 1 ||
        c.dim % c.n_heads) {
        tk_fail(&err, "need --seq >= 2, --batch >= 1, --steps >= 1, --keep in [0,1], dim divisible by heads");
        goto done;
    }
    float keeps[TK_BENCH_KEEPS] = {keep};
    int nk = 1;
    if (keep_also && parse_keeps(keep_also, keeps, &nk, &err)) goto done;
    tk_llama_mem_opts mo = {TK_ATTN_AUTO, 0};
    if (tk_attn_mode_parse(attention, &mo.attention, &err) || tk_recompute_parse(recompute, &mo.recompute, &err))
        goto done;
    threads = tk_set_threads(threads);
    if (strcmp(type, "lora") == 0) pc.kind = TK_ADAPTER_LORA;
    else if (strcmp(type, "bottleneck") == 0) pc.kind = TK_ADAPTER_BOTTLENECK;
    else if (strcmp(type, "none") == 0) pc.kind = TK_ADAPTER_NONE;
    else {
        tk_fail(&err, "--adapter-type: \"%s\" is not lora, bottleneck or none", type);
        goto done;
    }
    pc.r = r;
    pc.alpha = alpha;
    if (tk_peft_parse_targets(targets, &pc.target_mask, &err)) goto done;
    pc.gate.enabled = gate && pc.kind != TK_ADAPTER_NONE;
    pc.gate.warmup_steps = 1 << 30; /* thresholds stay where --keep put them */
    if (pc.kind == TK_ADAPTER_NONE) tk_peft_parse_save(&pc, "model.norm.weight", &err);
    double sg_peak = sgemm_peak(2048, TK_PEAK_REPS);
    if (!(m = tk_llama_random(&c, seed, bf16, &err)) || tk_llama_attach(m, &pc, NULL, seed, &err)) goto done;
    m->compute_bf16 = tk_compute_resolve(compute_bf16, 0);
    int n_packed = tk_llama_pack_frozen(m, &err);
    if (n_packed < 0) goto done;
    /* LoRA B starts at zero, which makes every r_i zero: give the branches a random state so the gate
     * has something to decide on. */
    tk_rng rng;
    tk_rng_seed(&rng, seed + 1);
    for (size_t i = 0; i < m->params.total; i++) m->params.data[i] += 0.01f * (2.0f * tk_rng_uniform(&rng) - 1.0f);
    size_t B = (size_t)batch, T = (size_t)seq, N = B * T;
    if (!(ids = malloc(N * sizeof *ids)) || !(a = tk_llama_acts_alloc_ex(m, B, T, &mo, &err))) {
        if (!err.msg[0]) tk_fail(&err, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < N; i++) ids[i] = (int32_t)(tk_rng_u64(&rng) % (uint64_t)c.vocab_size);
    if (pc.gate.enabled && force_keep(m, a, ids, B, T, keep, !json_path, &err)) goto done;
    if (beside && (!(probe = probe_alloc(2048)).a || !(beside_buf = calloc(3 * (size_t)steps, sizeof(double))))) {
        tk_fail(&err, "out of memory (--sgemm-beside)");
        goto done;
    }
    double *beside_rate = beside_buf, *beside_share = beside_buf + steps, *beside_sorted = beside_buf + 2 * steps;
    double fl_frozen, fl_attn, flops = step_flops(m, B, T, &fl_frozen, &fl_attn);
    double t_min = INFINITY, t_frozen = 0.0, t_attn = 0.0;
    keep_sums ks[TK_BENCH_KEEPS] = {{0}}; /* per keep ratio; ks[0]: --keep's steps, the headline figures */
    double ph[4] = {0}; /* forward, loss, backward, optimizer (clipping + AdamW) */
    if (!json_path)
        fprintf(stderr, "bench: %d untimed + %d timed steps of %zu tokens...\n", warmup, steps * nk, N);
    for (int s = 0; s < warmup + steps * nk; s++) {
        int ki = s < warmup ? 0 : (s - warmup) % nk; /* the keep ratio of this step: keeps[ki] */
        if (pc.gate.enabled && s > 0 && (keeps[ki] < 1.0f || nk > 1) &&
            force_keep(m, a, ids, B, T, keeps[ki], 0, &err))
            goto done;
        m->ws.secs_branch_fwd = m->ws.secs_branch_bwd = m->ws.secs_base_fwd = m->ws.secs_base_bwd = 0.0;
        m->ws.secs_attn_fwd = m->ws.secs_attn_bwd = 0.0;
        double t0 = tk_time();
        tk_params_zero_grad(&m->params);
        for (int l = 0; l < c.n_layers; l++)
            for (int p = 0; p < TK_NPROJ; p++) tk_gate_stats_reset(&m->layers[l].proj[p].stats);
        size_t count = 0;
        double tp[5];
        tp[0] = tk_time();
        if (tk_llama_forward(m, a, ids, NULL, B, T, 1, &rng, &err)) goto done;
        tp[1] = tk_time();
        tk_llama_loss(m, a, ids, B, T, 1.0f / (float)(B * (T - 1)), &count);
        tp[2] = tk_time();
        if (tk_llama_backward(m, a, B, T, &err)) goto done;
        tp[3] = tk_time();
        tk_clip_grad_norm(m->params.grad, m->params.total, 1.0);
        tk_params_adamw(&m->params, 1e-4f, 0.9f, 0.999f, 1e-8f, 0.0f, s + 1);
        tp[4] = tk_time();
        double dt = tk_time() - t0;
        if (s < warmup) continue;
        ks[ki].t += dt, ks[ki].fwd += m->ws.secs_branch_fwd, ks[ki].bwd += m->ws.secs_branch_bwd;
        for (int l = 0; l < c.n_layers; l++)
            for (int p = 0; p < TK_NPROJ; p++) {
                ks[ki].kept += (double)m->layers[l].proj[p].stats.kept;
                ks[ki].seen += (double)m->layers[l].proj[p].stats.n;
            }
        if (ki != 0) continue; /* the headline figures are --keep's steps */
        if (beside) {
            int i = (s - warmup) / nk;
            beside_rate[i] = sgemm_beside(&probe, dt);
            beside_share[i] = flops / dt / 1e9 / beside_rate[i];
        }
        for (int k = 0; k < 4; k++) ph[k] += tp[k + 1] - tp[k];
        t_min = dt < t_min ? dt : t_min;
        t_frozen += m->ws.secs_base_fwd + m->ws.secs_base_bwd;
        t_attn += m->ws.secs_attn_fwd + m->ws.secs_attn_bwd;
    }
    double fwd = ks[0].fwd, bwd = ks[0].bwd;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru); /* before the second peak measurement's 48 MiB of matrices */
    /* The peak again, after the steps: a single measurement that caught the machine in a slow moment
     * would flatter the share (a 3-run peak once read 272 GFLOP/s, against 360-410 around it). */
    double sg_peak2 = sgemm_peak(2048, TK_PEAK_REPS);
    sg_peak = sg_peak2 > sg_peak ? sg_peak2 : sg_peak;
    double mean = ks[0].t / steps;
    double tf = t_frozen / steps, ta = t_attn / steps, tb = (fwd + bwd) / steps;
    double rss_mib = (double)ru.ru_maxrss / 1024.0;
    /* memory model: weights + trainable block (data, grad, AdamW m, v) + activations + adapter state */
    double mib = 1024.0 * 1024.0, w_b = weight_bytes(m), p_b = 16.0 * (double)m->params.total;
    double a_b = (double)tk_llama_acts_bytes(m, B, T, &mo), ad_b = 0.0;
    for (int l = 0; l < c.n_layers; l++)
        for (int p = 0; p < TK_NPROJ; p++) {
            const tk_adapted_linear *L = &m->layers[l].proj[p];
            if (L->kind != TK_ADAPTER_NONE) ad_b += 4.0 * (double)N * (L->r + 1) + (double)N;
        }
    ad_b += 4.0 * (4.0 * (double)m->ws.n_tok * m->ws.width + 2.0 * (double)m->ws.n_tok * m->ws.rank + m->ws.wconv_n +
                   (double)TK_BRANCH_LANES * m->ws.lane_n + m->ws.n_tok + (double)m->ws.rank * m->ws.width);
    printf("bench: dim %d, %d layers, %d heads (kv %d), ffn %d, vocab %d, seq %d x batch %d, %s r=%d on %s, gate %s, "
           "%s weights, %d threads\n",
           c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size, seq, batch, type, r, targets,
           pc.gate.enabled ? "on" : "off", bf16 ? "BF16" : "fp32", threads);
    if (tk_blas_core_detected())
        printf("  OpenBLAS kernels: %s (OPENBLAS_CORETYPE set by tspeft: the library read this CPU as %s)\n",
               tk_blas_core_name(), tk_blas_core_detected());
    else
        printf("  OpenBLAS kernels: %s\n", tk_blas_core_name());
    printf("  step %.3f s (min %.3f)  %.0f tokens/s  %.1f GFLOP/s  sgemm peak %.1f GFLOP/s (%.0f%%)  peak RSS %.0f MiB\n",
           mean, t_min, (double)N / mean, flops / mean / 1e9, sg_peak, 100.0 * flops / mean / 1e9 / sg_peak, rss_mib);
    double beside_med = 0.0, beside_lo = 0.0, beside_hi = 0.0, beside_mean = 0.0;
    if (beside) {
        double *sh = beside_sorted;
        for (int i = 0; i < steps; i++) beside_mean += beside_rate[i] / steps;
        memcpy(sh, beside_share, (size_t)steps * sizeof sh[0]);
        qsort(sh, (size_t)steps, sizeof sh[0], cmp_double);
        beside_lo = sh[0], beside_hi = sh[steps - 1];
        beside_med = steps % 2 ? sh[steps / 2] : 0.5 * (sh[steps / 2 - 1] + sh[steps / 2]);
        /* the sgemm's own mean beside the steps against its best reading: the most that code running at
         * exactly the sgemm's rate could show as its share of the peak at these moments */
        printf("  sgemm beside each step (as long, right after it): mean %.1f GFLOP/s (%.0f%% of the peak reading); "
               "each step's share of its own: median %.0f%% (%.0f-%.0f%%)\n", beside_mean,
               100.0 * beside_mean / sg_peak, 100.0 * beside_med, 100.0 * beside_lo, 100.0 * beside_hi);
    }
    printf("  keep ratio %.3f  adapter branch: forward %.3f s, backward %.3f s per step\n", keep_ratio(&ks[0]),
           fwd / steps, bwd / steps);
    for (int k = 1; k < nk; k++)
        printf("  keep %.2f, in turn with %.2f (measured %.3f): step %.3f s, adapter branch forward %.3f s, backward %.3f s "
               "(backward %+.0f%% against keep %.2f in the same run)\n", (double)keeps[k], (double)keeps[0],
               keep_ratio(&ks[k]), ks[k].t / steps, ks[k].fwd / steps, ks[k].bwd / steps,
               ks[0].bwd > 0 ? 100.0 * (ks[k].bwd / ks[0].bwd - 1.0) : 0.0, (double)keeps[0]);
    printf("  phases: forward %.3f s, loss %.3f s, backward %.3f s, optimizer %.3f s;  %.1f GFLOP per step\n",
           ph[0] / steps, ph[1] / steps, ph[2] / steps, ph[3] / steps, flops / 1e9);
    /* where the step goes: the frozen matmuls alone bound what the whole step can reach */
    printf("  time: frozen matmuls (%s) %.3f s (%.1f GFLOP at %.1f GFLOP/s), attention %.3f s (%.1f GFLOP), adapter branches "
           "%.3f s, the rest %.3f s\n", m->compute_bf16 ? "BF16 compute" : n_packed ? "packed" : "OpenBLAS", tf, fl_frozen / 1e9, tf > 0 ? fl_frozen / tf / 1e9 : 0.0, ta, fl_attn / 1e9, tb,
           mean - tf - ta - tb);
    printf("  memory model: weights %.0f MiB (%s) + trainable %.0f MiB + activations %.0f MiB (%s attention, %d of %d "
           "layers recomputed) + adapter state %.0f MiB = %.0f MiB; peak RSS %.0f MiB\n",
           w_b / mib, bf16 || m->dot_copies ? "BF16" : "fp32", p_b / mib, a_b / mib, a->tiled ? "tiled" : "full", a->recompute, c.n_layers,
           ad_b / mib, (w_b + p_b + a_b + ad_b) / mib, rss_mib);
    if (json_path) {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddNumberToObject(j, "dim", c.dim);
        cJSON_AddNumberToObject(j, "layers", c.n_layers);
        cJSON_AddNumberToObject(j, "heads", c.n_heads);
        cJSON_AddNumberToObject(j, "kv_heads", c.n_kv_heads);
        cJSON_AddNumberToObject(j, "ffn", c.hidden_dim);
        cJSON_AddNumberToObject(j, "vocab", c.vocab_size);
        cJSON_AddNumberToObject(j, "seq", seq);
        cJSON_AddNumberToObject(j, "batch", batch);
        cJSON_AddNumberToObject(j, "r", r);
        cJSON_AddStringToObject(j, "adapter_type", type);
        cJSON_AddBoolToObject(j, "gate", pc.gate.enabled);
        cJSON_AddNumberToObject(j, "threads", threads);
        cJSON_AddBoolToObject(j, "bf16_weights", bf16);
        cJSON_AddStringToObject(j, "compute", m->compute_bf16 ? "bf16" : "fp32");
        cJSON_AddNumberToObject(j, "packed_matrices", n_packed);
        cJSON_AddNumberToObject(j, "keep_ratio", keep_ratio(&ks[0]));
        cJSON_AddNumberToObject(j, "step_seconds", mean);
        cJSON_AddNumberToObject(j, "step_seconds_min", t_min);
        cJSON_AddNumberToObject(j, "tokens_per_second", (double)N / mean);
        cJSON_AddNumberToObject(j, "gflops", flops / mean / 1e9);
        cJSON_AddNumberToObject(j, "sgemm_peak_gflops", sg_peak);
        cJSON_AddStringToObject(j, "openblas_core", tk_blas_core_name());
        if (tk_blas_core_detected()) cJSON_AddStringToObject(j, "openblas_core_detected", tk_blas_core_detected());
        cJSON_AddNumberToObject(j, "peak_rss_mib", rss_mib);
        if (beside) {
            cJSON_AddItemToObject(j, "sgemm_beside_gflops", cJSON_CreateDoubleArray(beside_rate, steps));
            cJSON_AddItemToObject(j, "share_of_sgemm_beside", cJSON_CreateDoubleArray(beside_share, steps));
            cJSON_AddNumberToObject(j, "share_of_sgemm_beside_median", beside_med);
            cJSON_AddNumberToObject(j, "sgemm_beside_mean_gflops", beside_mean);
        }
        cJSON_AddNumberToObject(j, "adapter_forward_seconds", fwd / steps);
        cJSON_AddNumberToObject(j, "adapter_backward_seconds", bwd / steps);
        cJSON_AddNumberToObject(j, "forward_seconds", ph[0] / steps);
        cJSON_AddNumberToObject(j, "loss_seconds", ph[1] / steps);
        cJSON_AddNumberToObject(j, "backward_seconds", ph[2] / steps);
        cJSON_AddNumberToObject(j, "optimizer_seconds", ph[3] / steps);
        cJSON_AddNumberToObject(j, "flops_per_step", flops);
        cJSON_AddNumberToObject(j, "frozen_matmul_seconds", tf);
        cJSON_AddNumberToObject(j, "frozen_matmul_flops", fl_frozen);
        cJSON_AddNumberToObject(j, "attention_seconds", ta);
        cJSON_AddNumberToObject(j, "attention_flops", fl_attn);
        cJSON_AddStringToObject(j, "attention", a->tiled ? "tiled" : "full");
        cJSON_AddNumberToObject(j, "recompute_layers", a->recompute);
        cJSON_AddNumberToObject(j, "model_weights_mib", w_b / mib);
        cJSON_AddNumberToObject(j, "model_trainable_mib", p_b / mib);
        cJSON_AddNumberToObject(j, "model_activations_mib", a_b / mib);
        cJSON_AddNumberToObject(j, "model_adapter_state_mib", ad_b / mib);
        if (nk > 1) { /* every keep ratio of the run, --keep's first */
            cJSON *arr = cJSON_AddArrayToObject(j, "by_keep");
            for (int k = 0; k < nk && arr; k++) {
                cJSON *o = cJSON_CreateObject();
                cJSON_AddNumberToObject(o, "keep", keeps[k]);
                cJSON_AddNumberToObject(o, "keep_ratio", keep_ratio(&ks[k]));
                cJSON_AddNumberToObject(o, "step_seconds", ks[k].t / steps);
                cJSON_AddNumberToObject(o, "adapter_forward_seconds", ks[k].fwd / steps);
                cJSON_AddNumberToObject(o, "adapter_backward_seconds", ks[k].bwd / steps);
                cJSON_AddItemToArray(arr, o);
            }
        }
        char *text = cJSON_Print(j);
        cJSON_Delete(j);
        if (!text || tk_write_file_atomic(json_path, text, strlen(text), &err)) {
            free(text);
            if (!err.msg[0]) tk_fail(&err, "out of memory");
            goto done;
        }
        free(text);
    }
    status = 0;
done:
    if (status) fprintf(stderr, "tspeft bench: %s\n", err.msg);
    free(ids);
    free(beside_buf);
    probe_free(&probe);
    tk_peft_config_free(&pc);
    tk_llama_acts_free(m, a);
    tk_llama_close(m);
    return status;
}
