/* test_gate.c: the TS-PEFT threshold step (src/peft/gate.c) on hand-made cases with answers derived
 * in the comments, a brute-force check of the exact proximal step, the surrogate rule, and
 * tk_gate_update (warm-up, disabled gate, dual lambda with a target keep ratio, statistics), and the
 * study rules: the weighted step with a trust region against brute force, importance and scaled
 * weights, the layer-free random rule's rate and determinism.
 *
 *   Phi(t) = sum_i (c_i + lambda/n) [r_i >= t]
 *   prox:      tau' = argmin_{t >= 0} Phi(t) + (t - tau)^2 / (2 eta)   ties: nearest tau, then smaller t
 *   surrogate: tau' = max(0, tau - eta (sum_i c_i dS~_i + lambda mean_i dS~_i)),
 *              S~_i = sigmoid((r_i - tau)/beta), dS~_i/dtau = -S~_i (1 - S~_i) / beta
 *   dual:      lambda' = max(0, lambda + eta_lambda (kept/n - rho))
 *
 * Numbers in the hand cases are chosen so that the objectives are exact in binary (0.25, 0.0625, ...)
 * where a tie is being tested. Exits 1 on any failure.
 */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif

#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common.h"
#include "peft/gate.h"

static int g_failures;

static void report(const char *name, double err, double tol) {
    int ok = err <= tol; /* false for NaN */
    printf("%-70s max err %.3e  (tol %.0e)  %s\n", name, err, tol, ok ? "ok" : "FAIL");
    if (!ok) g_failures++;
}

static void report_bool(const char *name, int ok) {
    printf("%-70s %s\n", name, ok ? "ok" : "FAIL");
    if (!ok) g_failures++;
}

/* tk_gate_prox must return exactly want (bit for bit: the step is exact). */
static void expect_prox(const char *name, const float *r, const float *c, size_t n, float tau,
                        float lambda, float eta, float want) {
    float got = -1.0f;
    int rc = tk_gate_prox(r, c, n, tau, lambda, eta, &got);
    int ok = rc == 0 && got == want;
    printf("%-70s got %.9g want %.9g  %s\n", name, (double)got, (double)want, ok ? "ok" : "FAIL");
    if (!ok) g_failures++;
}

static uint64_t g_rng = 0x13198a2e03707344ull;
static double urand(void) { /* splitmix64 -> [0, 1) */
    uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (double)(z >> 11) * 0x1p-53;
}

/* ---- prox: hand cases ------------------------------------------------------------------------- */

static void test_prox_hand(void) {
    float p75 = nextafterf(0.75f, 0.0f), p1 = nextafterf(1.0f, 0.0f);

    /* 1. c = 0, lambda = 0: Phi == 0, the objective is the quadratic alone, minimal at t = tau. */
    {
        float r[3] = {0.1f, 0.2f, 0.3f}, c[3] = {0, 0, 0};
        expect_prox("prox: c=0 lambda=0, tau between r values -> unchanged", r, c, 3, 0.25f, 0.0f, 0.05f,
                    0.25f);
        expect_prox("prox: c=0 lambda=0, tau == an r value -> unchanged", r, c, 3, 0.2f, 0.0f, 0.05f, 0.2f);
        expect_prox("prox: c=0 lambda=0, tau above every r -> unchanged", r, c, 3, 0.9f, 0.0f, 0.05f, 0.9f);
        expect_prox("prox: c=0 lambda=0, tau = 0 -> unchanged", r, c, 3, 0.0f, 0.0f, 0.05f, 0.0f);
    }
    /* 2. One very helpful token below tau. r = {0.1, 0.5, 0.9}, c = {-10, 0, 0}, tau 0.3, eta 0.05:
     *    keeping token 0 needs t <= 0.1; best such t is 0.1: obj = -10 + 0.2^2/0.1 = -9.6.
     *    Staying at 0.3: obj = 0. So tau drops to exactly r_0 = 0.1f (the tie r == t keeps). */
    {
        float r[3] = {0.1f, 0.5f, 0.9f}, c[3] = {-10.0f, 0, 0};
        expect_prox("prox: helpful token below tau -> tau drops to r_k", r, c, 3, 0.3f, 0.0f, 0.05f, 0.1f);
        /* 4. eta limits the move: reaching 0.1 costs 0.04/(2 eta); with eta = 1e-4 that is 200 > 10:
         *    stay at 0.3. The break-even is eta = 0.002: eta 0.0025 costs 8 (move: obj -2 < 0),
         *    eta 0.0015 costs 13.3 (stay). */
        expect_prox("prox: eta 1e-4 too small to reach the helpful token -> unchanged", r, c, 3, 0.3f,
                    0.0f, 1e-4f, 0.3f);
        expect_prox("prox: eta 0.0025 (cost 8 < 10) -> moves to r_k", r, c, 3, 0.3f, 0.0f, 0.0025f, 0.1f);
        expect_prox("prox: eta 0.0015 (cost 13.3 > 10) -> unchanged", r, c, 3, 0.3f, 0.0f, 0.0015f, 0.3f);
    }
    /* 3. Harmful tokens just above tau. r = {0.30, 0.31, 0.9}, c = {1, 1, 0}, tau 0.29, eta 0.05:
     *    keep all (t = 0.29): obj 2;  drop token 0 (t = next(0.30)): 1 + 0.01^2/0.1 = 1.001;
     *    drop both (t = next(0.31)): 0 + 0.02^2/0.1 = 0.004;  drop all (t = next(0.9)): 0 + 3.7.
     *    tau rises to nextafterf(0.31f). */
    {
        float r[3] = {0.30f, 0.31f, 0.9f}, c[3] = {1.0f, 1.0f, 0.0f};
        expect_prox("prox: harmful tokens just above tau -> nextafterf(r_k)", r, c, 3, 0.29f, 0.0f, 0.05f,
                    nextafterf(0.31f, INFINITY));
        /* with eta 1e-5 the move to next(0.31) costs 0.0004/2e-5 = 20 > 2: unchanged */
        expect_prox("prox: harmful tokens, eta 1e-5 -> unchanged", r, c, 3, 0.29f, 0.0f, 1e-5f, 0.29f);
    }
    /* 5a. Tie at equal distance -> the smaller t. r = {0.25, prev(0.75)}, c = {-1, +1}, tau 0.5,
     *    eta 0.5 (1/(2 eta) = 1): t = 0.25 keeps both: Phi 0, quad 0.0625 -> 0.0625;
     *    t = 0.5 keeps token 1: 1; t = next(prev(0.75)) = 0.75 keeps none: 0 + 0.0625. Exact tie
     *    between 0.25 and 0.75, both 0.25 from tau: the smaller, 0.25. */
    {
        float r[2] = {0.25f, p75}, c[2] = {-1.0f, 1.0f};
        expect_prox("prox: tie at equal distance -> smaller t", r, c, 2, 0.5f, 0.0f, 0.5f, 0.25f);
    }
    /* 5b. Tie at unequal distances -> the nearer t, even when larger. r = {0.25, prev(1.0)},
     *    c = {-1.1875, 1}, tau 0.75, eta 0.5: t = 0.25: Phi -0.1875 + quad 0.25 = 0.0625;
     *    t = 0.75: Phi 1; t = 1.0: Phi 0 + quad 0.0625 = 0.0625. Tie; 1.0 is nearer (0.25 vs 0.5). */
    {
        float r[2] = {0.25f, p1}, c[2] = {-1.1875f, 1.0f};
        expect_prox("prox: tie, the larger t is nearer tau -> larger t", r, c, 2, 0.75f, 0.0f, 0.5f, 1.0f);
        /* mirror: tau 0.5, c = {-0.8125, 1}: t = 0.25: 0.1875 + 0.0625 = 0.25; t = 0.5: 1;
         * t = 1.0: 0 + 0.25. Tie; 0.25 is nearer. */
        float c2[2] = {-0.8125f, 1.0f};
        expect_prox("prox: tie, the smaller t is nearer tau -> smaller t", r, c2, 2, 0.5f, 0.0f, 0.5f, 0.25f);
    }
    /* 6. Duplicate r values: a group is kept or dropped as a whole.
     *    r = {0.4, 0.4, 0.4, 0.8}, c = {1, 1, -0.5, 0}, tau 0.39, eta 0.05: keep all: 1.5;
     *    drop the group (t = next(0.4)): 0 + 0.01^2/0.1 = 0.001 -> nextafterf(0.4f). */
    {
        float r[4] = {0.4f, 0.4f, 0.4f, 0.8f}, c[4] = {1.0f, 1.0f, -0.5f, 0.0f};
        expect_prox("prox: duplicate r, group sum harmful -> drop the whole group", r, c, 4, 0.39f, 0.0f,
                    0.05f, nextafterf(0.4f, INFINITY));
        /* c = {1, 1, -3, 0}: group sum -1: keeping (t = 0.39): -1; dropping: 0.001 -> unchanged,
         * although two of its tokens are harmful */
        float c2[4] = {1.0f, 1.0f, -3.0f, 0.0f};
        expect_prox("prox: duplicate r, group sum helpful -> keep the group", r, c2, 4, 0.39f, 0.0f, 0.05f,
                    0.39f);
        /* tau 0.41 just above the helpful group: lowering to 0.4 gives -1 + 0.0001/0.1 = -0.999 < 0 */
        expect_prox("prox: duplicate r, helpful group just below tau -> tau = r", r, c2, 4, 0.41f, 0.0f,
                    0.05f, 0.4f);
    }
    /* 7. r containing 0. r = {0, 0, 0.5}, c = {1, 1, 0}, tau 0, eta 0.05: t = 0 keeps the zeros: 2;
     *    t = next(0) (the smallest subnormal) drops them: 0 + ~0 -> nextafterf(0, inf). */
    {
        float r[3] = {0.0f, 0.0f, 0.5f}, c[3] = {1.0f, 1.0f, 0.0f};
        expect_prox("prox: r = 0 harmful -> tau = nextafterf(0) (smallest subnormal)", r, c, 3, 0.0f, 0.0f,
                    0.05f, nextafterf(0.0f, INFINITY));
        /* r = {0, 0.5}, c = {-1, 0}, tau 0.3: t = 0 keeps token 0: -1 + 0.09/0.1 = -0.1; stay: 0 */
        float r2[2] = {0.0f, 0.5f}, c2[2] = {-1.0f, 0.0f};
        expect_prox("prox: r = 0 helpful -> tau = 0", r2, c2, 2, 0.3f, 0.0f, 0.05f, 0.0f);
        /* every r = 0, c = 0, lambda 0: Phi == 0 -> unchanged */
        float r3[2] = {0.0f, 0.0f}, c3[2] = {0.0f, 0.0f};
        expect_prox("prox: every r = 0, c = 0 -> unchanged", r3, c3, 2, 0.2f, 0.0f, 0.05f, 0.2f);
    }
    /* 8. n = 0: tau unchanged (and written). */
    {
        expect_prox("prox: n = 0 -> unchanged", NULL, NULL, 0, 0.7f, 0.3f, 0.05f, 0.7f);
    }
    /* 9. lambda is the price of density. r = {0.1, 0.2}, c = 0, lambda 1, n 2 (0.5 per kept token),
     *    tau 0.15, eta 0.05: t = 0.15 keeps token 1: 0.5; t = next(0.2) keeps none: 0.05^2/0.1 = 0.025;
     *    t = 0.1 keeps both: 1 + 0.025. -> nextafterf(0.2f). */
    {
        float r[2] = {0.1f, 0.2f}, c[2] = {0.0f, 0.0f};
        expect_prox("prox: c = 0, lambda 1 -> drop tokens at the price of density", r, c, 2, 0.15f, 1.0f,
                    0.05f, nextafterf(0.2f, INFINITY));
        /* c = {-0.6, -0.6}: each kept token now gains -0.6 + 0.5 = -0.1: t = 0.1 keeps both:
         * -0.2 + 0.025 = -0.175; t = 0.15: -0.1; t = next(0.2): 0.025 -> 0.1 */
        float c2[2] = {-0.6f, -0.6f};
        expect_prox("prox: helpful beyond the price of density -> keep", r, c2, 2, 0.15f, 1.0f, 0.05f, 0.1f);
    }
    /* 10. Unsorted input, the result depends only on the (r, c) pairs. Case 3 shuffled. */
    {
        float r[3] = {0.9f, 0.31f, 0.30f}, c[3] = {0.0f, 1.0f, 1.0f};
        expect_prox("prox: unsorted input (case 3 shuffled)", r, c, 3, 0.29f, 0.0f, 0.05f,
                    nextafterf(0.31f, INFINITY));
    }
}

/* ---- prox: brute force ------------------------------------------------------------------------ */

static double objective(const float *r, const float *c, size_t n, float tau, float lambda, float eta,
                        float t) {
    double price = (double)lambda / (double)n, phi = 0.0;
    for (size_t i = 0; i < n; i++)
        if (r[i] >= t) phi += (double)c[i] + price;
    double d = (double)t - (double)tau;
    return phi + d * d / (2.0 * (double)eta);
}

static void test_prox_brute(void) {
    static const float pool[6] = {0.0f, 0.05f, 0.1f, 0.25f, 0.3f, 0.7f};
    double worst = 0.0;
    int bad_t = 0, unique = 0, unique_wrong = 0, cases = 200;
    for (int k = 0; k < cases; k++) {
        size_t n = (size_t)(urand() * 10.0); /* 0..9 */
        float r[9], c[9], cand[2 * 9 + 2];
        for (size_t i = 0; i < n; i++) {
            r[i] = urand() < 0.5 ? pool[(int)(urand() * 6.0)] : (float)(urand() * 1.2);
            c[i] = urand() < 0.2 ? 0.0f : (float)(2.0 * urand() - 1.0);
        }
        float lambda = urand() < 0.5 ? 0.0f : (float)(2.0 * urand());
        float eta = (float)(0.001 + 0.5 * urand());
        double u = urand();
        float tau = n && u < 0.3 ? r[(size_t)(urand() * (double)n)] : (u < 0.4 ? 0.0f : (float)(1.2 * urand()));

        float t = NAN;
        if (tk_gate_prox(r, c, n, tau, lambda, eta, &t) != 0) {
            bad_t++;
            continue;
        }
        if (n == 0) {
            if (t != tau) bad_t++;
            continue;
        }
        if (!(t >= 0.0f) || !isfinite(t)) {
            bad_t++;
            continue;
        }
        /* the minimiser is the clamp of tau to one interval of constant Phi: one of these */
        size_t nc = 0;
        for (size_t i = 0; i < n; i++) {
            cand[nc++] = r[i];
            cand[nc++] = nextafterf(r[i], INFINITY);
        }
        cand[nc++] = tau;
        cand[nc++] = 0.0f;
        double best = INFINITY, second = INFINITY, obj[2 * 9 + 2];
        float best_t = 0.0f;
        int in_set = 0;
        for (size_t j = 0; j < nc; j++) {
            obj[j] = objective(r, c, n, tau, lambda, eta, cand[j]);
            in_set |= cand[j] == t;
            if (obj[j] < best) best = obj[j], best_t = cand[j];
        }
        for (size_t j = 0; j < nc; j++)
            if (cand[j] != best_t && obj[j] < second) second = obj[j];
        double got = objective(r, c, n, tau, lambda, eta, t);
        double excess = got - best;
        worst = excess > worst ? excess : worst;
        if (!in_set) bad_t++;
        if (second - best > 1e-9) { /* a unique minimiser: it must be returned exactly */
            unique++;
            if (t != best_t) unique_wrong++;
        }
    }
    report("prox brute force (200 cases): objective(t) - min over candidates", worst, 1e-12);
    char name[128];
    snprintf(name, sizeof name, "prox brute force: t >= 0, one of the candidates (%d bad)", bad_t);
    report_bool(name, bad_t == 0);
    snprintf(name, sizeof name, "prox brute force: unique minimiser returned exactly (%d/%d wrong)",
             unique_wrong, unique);
    report_bool(name, unique_wrong == 0 && unique > cases / 2);
}

/* ---- surrogate -------------------------------------------------------------------------------- */

static void test_surrogate(void) {
    /* r = tau: S~ = 1/2, dS~/dtau = -(1/4)/beta = -25 (beta 0.01). grad = c (-25) + lambda (-25)/1
     * = -30 for c = 1, lambda 0.2; tau' = 0.5 + 0.01 * 30 = 0.8. */
    {
        float r[1] = {0.5f}, c[1] = {1.0f};
        float t = tk_gate_surrogate(r, c, 1, 0.5f, 0.2f, 0.01f, 0.01f);
        report("surrogate: r = tau, c = 1, lambda 0.2 -> 0.8", fabs((double)t - 0.8), 1e-6);
    }
    /* r = tau +- beta ln 3: S~ = 3/4 and 1/4, both dS~/dtau = -(3/16)/beta = -1.875 (beta 0.1).
     * c = {2, -1}, lambda 0.5: sum c dS = (2 - 1)(-1.875) = -1.875; lambda mean dS = -0.9375;
     * grad -2.8125; tau' = 1 + 0.05 * 2.8125 = 1.140625. */
    {
        float d = (float)(0.1 * log(3.0));
        float r[2] = {1.0f + d, 1.0f - d}, c[2] = {2.0f, -1.0f};
        float t = tk_gate_surrogate(r, c, 2, 1.0f, 0.5f, 0.05f, 0.1f);
        report("surrogate: r = tau +- beta ln3, c = {2,-1}, lambda 0.5 -> 1.140625",
               fabs((double)t - 1.140625), 1e-6);
    }
    /* helpful tokens at tau: grad = 2 (-1)(-25) = 50; tau' = 0.5 - 0.1 * 50 = -4.5 -> clamped to 0 */
    {
        float r[2] = {0.5f, 0.5f}, c[2] = {-1.0f, -1.0f};
        float t = tk_gate_surrogate(r, c, 2, 0.5f, 0.0f, 0.1f, 0.01f);
        report_bool("surrogate: step below 0 is clamped to exactly 0", t == 0.0f);
    }
    /* far from every r (|r - tau| = 50 beta): dS~ ~ e^-50 / beta: tau unchanged to float precision */
    {
        float r[2] = {0.0f, 1.0f}, c[2] = {5.0f, -5.0f};
        float t = tk_gate_surrogate(r, c, 2, 0.5f, 1.0f, 0.05f, 0.01f);
        report("surrogate: r far from tau -> unchanged", fabs((double)t - 0.5), 1e-7);
    }
    report_bool("surrogate: n = 0 -> unchanged", tk_gate_surrogate(NULL, NULL, 0, 0.3f, 1.0f, 1.0f, 0.01f) == 0.3f);
}

/* ---- statistics and tk_gate_update ------------------------------------------------------------ */

static void push(tk_gate_stats *st, float r, int kept, float c) {
    tk_err err = {{0}};
    if (tk_gate_stats_push_r(st, r, kept, &err) || tk_gate_stats_push_c(st, c, &err)) {
        fprintf(stderr, "test_gate: push failed: %s\n", err.msg);
        exit(1);
    }
}

static void test_stats(void) {
    tk_gate_stats st = {0};
    tk_err err = {{0}};
    int ok = 1;
    for (int i = 0; i < 3000; i++) { /* past the first capacity (1024) twice */
        ok &= tk_gate_stats_push_r(&st, (float)i, i % 3 == 0 ? 1 : (i % 3 == 1 ? 5 : 0), &err) == 0;
        if (i < 2500) ok &= tk_gate_stats_push_c(&st, -(float)i, &err) == 0;
    }
    ok &= st.n == 3000 && st.n_c == 2500 && st.kept == 2000; /* kept counts nonzero flags */
    for (int i = 0; i < 3000; i++) ok &= st.r[i] == (float)i && (i >= 2500 || st.c[i] == -(float)i);
    report_bool("stats: push 3000 r / 2500 c, growth keeps values, kept counts kept != 0", ok);
    size_t cap = st.cap;
    tk_gate_stats_reset(&st);
    report_bool("stats: reset zeroes n, n_c, kept and keeps the buffers",
                st.n == 0 && st.n_c == 0 && st.kept == 0 && st.cap == cap && st.r && st.c);
    push(&st, 0.5f, 1, 0.25f);
    report_bool("stats: push after reset starts at index 0",
                st.n == 1 && st.n_c == 1 && st.kept == 1 && st.r[0] == 0.5f && st.c[0] == 0.25f);
    tk_gate_stats_free(&st);
    report_bool("stats: free clears the struct", st.r == NULL && st.c == NULL && st.n == 0 && st.cap == 0);
    tk_gate_stats_free(NULL);
}

/* tk_gate_update with st->n_c != st->n must abort (TK_ASSERT). */
static int update_mismatch_aborts(void) {
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) return 0;
    if (pid == 0) {
        if (!freopen("/dev/null", "w", stderr)) _exit(3);
        alarm(5);
        tk_gate_stats st = {0};
        tk_err err = {{0}};
        tk_gate_stats_push_r(&st, 0.5f, 1, &err);
        tk_gate_config cfg = tk_gate_config_default();
        cfg.enabled = 1;
        float tau = 0.0f, lambda = 0.0f;
        tk_gate_update(&cfg, &st, 1, &tau, &lambda);
        _exit(0);
    }
    int status = 0;
    if (waitpid(pid, &status, 0) != pid) return 0;
    return WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT;
}

static void test_update(void) {
    tk_gate_config d = tk_gate_config_default();
    report_bool("config defaults: disabled, prox, lambda .05, eta .05, tau0 0, rho 0, eta_l .05, beta .01, K 0",
                d.enabled == 0 && d.rule == TK_GATE_PROX && d.lambda == 0.05f && d.eta_tau == 0.05f &&
                    d.tau0 == 0.0f && d.target_keep == 0.0f && d.eta_lambda == 0.05f && d.beta == 0.01f &&
                    d.warmup_steps == 0);
    tk_gate_rule rr = TK_GATE_PROX;
    int ok = tk_gate_rule_parse("surrogate", &rr) == 0 && rr == TK_GATE_SURROGATE &&
             tk_gate_rule_parse("prox", &rr) == 0 && rr == TK_GATE_PROX &&
             tk_gate_rule_parse("Prox", &rr) == -1 && tk_gate_rule_parse("", &rr) == -1 &&
             strcmp(tk_gate_rule_name(TK_GATE_SURROGATE), "surrogate") == 0 &&
             strcmp(tk_gate_rule_name(TK_GATE_PROX), "prox") == 0;
    report_bool("rule names: parse and print prox / surrogate, reject others", ok);

    /* Statistics of case 3 plus one token: r = {0.30, 0.31, 0.9, 0.95}, c = {1, 1, 0, 0}, kept 3 of
     * 4 (keep 0.75). With tau 0.29, lambda 0, eta 0.05 the prox step goes to next(0.31) (as case 3:
     * the extra c = 0 token changes nothing). */
    tk_gate_stats st = {0};
    push(&st, 0.30f, 1, 1.0f);
    push(&st, 0.31f, 1, 1.0f);
    push(&st, 0.9f, 1, 0.0f);
    push(&st, 0.95f, 0, 0.0f);
    float want_tau = nextafterf(0.31f, INFINITY);

    tk_gate_config cfg = tk_gate_config_default();
    cfg.enabled = 1;
    cfg.lambda = 0.0f;
    cfg.eta_tau = 0.05f;
    cfg.warmup_steps = 2;
    cfg.target_keep = 0.5f;
    cfg.eta_lambda = 0.2f;

    /* disabled: nothing moves */
    tk_gate_config off = cfg;
    off.enabled = 0;
    float tau = 0.29f, lambda = 0.0f;
    ok = tk_gate_update(&off, &st, 5, &tau, &lambda) == 0 && tau == 0.29f && lambda == 0.0f;
    report_bool("update: disabled gate leaves tau and lambda", ok);

    /* warm-up: steps 1 and 2 (<= 2) leave tau and lambda; step 3 moves both */
    ok = 1;
    for (int step = 1; step <= 2; step++)
        ok &= tk_gate_update(&cfg, &st, step, &tau, &lambda) == 0 && tau == 0.29f && lambda == 0.0f;
    report_bool("update: warm-up steps 1..2 leave tau and lambda", ok);
    /* step 3: tau by prox with the lambda of the step (0); then lambda' = max(0, 0 + 0.2 (0.75 - 0.5))
     * = 0.05 */
    ok = tk_gate_update(&cfg, &st, 3, &tau, &lambda) == 0;
    report_bool("update: step 3 (after warm-up) takes the prox step", ok && tau == want_tau);
    report("update: dual lambda' = 0 + 0.2 (0.75 - 0.5) = 0.05", fabs((double)lambda - 0.05), 1e-7);

    /* The tau step uses lambda as it was before this step's dual update (the dual moves "after every
     * step"). lambda 0, rho 0.5, eta_lambda 100: lambda' = 0 + 100 (0.75 - 0.5) = 25. With lambda 0
     * the step is next(0.31) as above; with lambda 25 (6.25 per kept token) it would drop all four:
     * t = next(0.95): 0 + 0.66^2/0.1 = 4.36 beats next(0.31): 12.5 + 0.004. */
    {
        tk_gate_config big = cfg;
        big.eta_lambda = 100.0f;
        float t25 = -1.0f;
        tk_gate_prox(st.r, st.c, st.n, 0.29f, 25.0f, 0.05f, &t25);
        tau = 0.29f, lambda = 0.0f;
        ok = tk_gate_update(&big, &st, 10, &tau, &lambda) == 0 && tau == want_tau &&
             t25 == nextafterf(0.95f, INFINITY);
        report_bool("update: the prox step uses lambda before its dual update", ok);
        report("update: dual lambda' = 0 + 100 (0.75 - 0.5) = 25", fabs((double)lambda - 25.0), 1e-6);
    }
    /* clamping: rho 1.0, keep 0.75: lambda' = max(0, 0.03 + 0.2 (0.75 - 1)) = max(0, -0.02) = 0 */
    {
        tk_gate_config hi = cfg;
        hi.target_keep = 1.0f;
        tau = 0.29f, lambda = 0.03f;
        ok = tk_gate_update(&hi, &st, 10, &tau, &lambda) == 0 && lambda == 0.0f;
        report_bool("update: dual lambda clamps at exactly 0", ok);
    }
    /* no target (rho 0): lambda is a fixed constant */
    {
        tk_gate_config fixed = cfg;
        fixed.target_keep = 0.0f;
        tau = 0.29f, lambda = 0.7f;
        ok = tk_gate_update(&fixed, &st, 10, &tau, &lambda) == 0 && lambda == 0.7f;
        report_bool("update: without a target keep ratio lambda stays fixed", ok);
    }
    /* surrogate rule through update == tk_gate_surrogate */
    {
        tk_gate_config sur = cfg;
        sur.rule = TK_GATE_SURROGATE;
        sur.target_keep = 0.0f;
        sur.beta = 0.05f;
        tau = 0.29f, lambda = 0.4f;
        float want = tk_gate_surrogate(st.r, st.c, st.n, 0.29f, 0.4f, 0.05f, 0.05f);
        ok = tk_gate_update(&sur, &st, 10, &tau, &lambda) == 0 && tau == want && want != 0.29f;
        report_bool("update: surrogate rule == tk_gate_surrogate (and moves tau)", ok);
    }
    /* no tokens this step: unchanged */
    {
        tk_gate_stats empty = {0};
        tau = 0.29f, lambda = 0.4f;
        ok = tk_gate_update(&cfg, &empty, 10, &tau, &lambda) == 0 && tau == 0.29f && lambda == 0.4f;
        report_bool("update: n = 0 leaves tau and lambda", ok);
    }
    report_bool("update: n_c != n aborts (TK_ASSERT)", update_mismatch_aborts());
    tk_gate_stats_free(&st);
}

/* ---- study rules ------------------------------------------------------------------------------ */

/* Brute force of the weighted step with the dropped count in [lo, hi]: every candidate t (each r, the
 * float above it, tau, 0) whose dropped count is allowed; the best objective. */
static double weighted_best(const float *r, const double *w, size_t n, float tau, float eta, size_t lo, size_t hi,
                            float *best_t) {
    double best = INFINITY;
    float cand[2 * 12 + 2];
    size_t nc = 0;
    for (size_t i = 0; i < n; i++) {
        cand[nc++] = r[i];
        cand[nc++] = nextafterf(r[i], INFINITY);
    }
    cand[nc++] = tau;
    cand[nc++] = 0.0f;
    for (size_t j = 0; j < nc; j++) {
        double phi = 0.0;
        size_t dropped = 0;
        for (size_t i = 0; i < n; i++) {
            if (r[i] >= cand[j]) phi += w[i];
            else dropped++;
        }
        if (dropped < lo || dropped > hi) continue;
        double d = (double)cand[j] - tau, obj = phi + d * d / (2.0 * (double)eta);
        if (obj < best) best = obj, *best_t = cand[j];
    }
    return best;
}

static void test_weighted_trust_brute(void) {
    double worst = 0.0;
    int bad = 0, cases = 300, constrained = 0;
    for (int k = 0; k < cases; k++) {
        size_t n = 1 + (size_t)(urand() * 12.0); /* 1..12 */
        float r[12];
        double w[12];
        for (size_t i = 0; i < n; i++) {
            r[i] = urand() < 0.3 ? (float)((int)(urand() * 4.0)) * 0.25f : (float)(urand() * 1.5);
            w[i] = 2.0 * urand() - 1.0;
        }
        float eta = (float)(0.001 + 0.5 * urand()), tau = (float)(1.5 * urand());
        size_t dropped = 0;
        for (size_t i = 0; i < n; i++) dropped += r[i] < tau;
        size_t lo = 0, hi = n;
        if (urand() < 0.7) { /* a trust region of +-d tokens around the current count */
            size_t d = (size_t)(urand() * 3.0);
            lo = dropped > d ? dropped - d : 0;
            hi = dropped + d < n ? dropped + d : n;
            constrained++;
        }
        float t = NAN, bt = NAN;
        if (tk_gate_prox_weighted(r, w, n, tau, eta, lo, hi, &t) != 0) {
            bad++;
            continue;
        }
        double best = weighted_best(r, w, n, tau, eta, lo, hi, &bt);
        size_t got_dropped = 0;
        double phi = 0.0;
        for (size_t i = 0; i < n; i++) {
            if (r[i] >= t) phi += w[i];
            else got_dropped++;
        }
        if (got_dropped < lo || got_dropped > hi || !(t >= 0.0f)) {
            bad++;
            continue;
        }
        double d = (double)t - tau, excess = phi + d * d / (2.0 * (double)eta) - best;
        if (excess > worst) worst = excess;
    }
    report("weighted prox + trust region brute force (300 cases): objective - best allowed", worst, 1e-12);
    char name[128];
    snprintf(name, sizeof name, "weighted prox: dropped count inside the region, t >= 0 (%d bad, %d constrained)", bad,
             constrained);
    report_bool(name, bad == 0 && constrained > cases / 2);
}

/* One threshold step from tau 0 at step 1 (after any warm-up of 0) must give exactly want. */
static void expect_update(const char *name, const tk_gate_config *cfg, const tk_gate_stats *st, float lambda,
                          float want) {
    float tau = 0.0f;
    int ok = tk_gate_update(cfg, st, 1, &tau, &lambda) == 0 && tau == want;
    printf("%-70s got %.9g want %.9g  %s\n", name, (double)tau, (double)want, ok ? "ok" : "FAIL");
    if (!ok) g_failures++;
}

/* Statistics of n tokens, every one kept in the forward. */
static tk_gate_stats stats_of(const float *r, const float *c, size_t n) {
    tk_gate_stats st = {0};
    for (size_t i = 0; i < n; i++) push(&st, r[i], 1, c[i]);
    return st;
}

static void test_study_rules(void) {
    /* The weighted step with w = c + lambda/n is the reference step, bit for bit. */
    {
        float r[5] = {0.1f, 0.4f, 0.4f, 0.8f, 1.3f}, c[5] = {0.3f, -0.2f, 0.05f, -1.0f, 0.1f};
        double w[5];
        for (int i = 0; i < 5; i++) w[i] = (double)c[i] + 0.7 / 5.0;
        float a = -1.0f, b = -2.0f;
        tk_gate_prox(r, c, 5, 0.35f, 0.7f, 0.05f, &a);
        tk_gate_prox_weighted(r, w, 5, 0.35f, 0.05f, 0, 5, &b);
        report_bool("weighted prox with w = c + lambda/n equals tk_gate_prox exactly", a == b);
    }
    tk_gate_config cfg = tk_gate_config_default();
    cfg.enabled = 1;
    cfg.eta_tau = 10.0f; /* a weak proximal term: the weights decide */
    /* importance: |c| = {0.1, 0.1, 0.4, 0.4}, sum 1, lambda 1 (price 0.25 a token): w = {0.15, 0.15,
     * -0.15, -0.15}. Dropping the two small tokens (t = next(0.2)) gives Phi -0.3, the best; the sign
     * of c does not matter (c = {-0.1, 0.1, 0.4, -0.4}). With a trust region of 1/4 of the tokens it
     * may drop only one. A step with every c = 0 (a fresh LoRA) carries no information: tau stays. */
    {
        float r[4] = {0.1f, 0.2f, 0.5f, 0.6f}, c[4] = {-0.1f, 0.1f, 0.4f, -0.4f}, z[2] = {0.0f, 0.0f};
        tk_gate_stats st = stats_of(r, c, 4), zs = stats_of(z, z, 2);
        tk_gate_config imp = cfg;
        imp.rule = TK_GATE_IMPORTANCE;
        expect_update("importance: drops the tokens below the mean |c|", &imp, &st, 1.0f, nextafterf(0.2f, INFINITY));
        imp.trust = 0.25f;
        expect_update("importance + trust region 0.25: one token at most", &imp, &st, 1.0f, nextafterf(0.1f, INFINITY));
        imp.trust = 0.0f;
        expect_update("importance: a step with every c = 0 leaves tau", &imp, &zs, 1.0f, 0.0f);
        tk_gate_stats_free(&st);
        tk_gate_stats_free(&zs);
    }
    /* scaled: c = {1, 1, -1, -1} (mean 0, sd 1), n 4. lambda 2: price 2 * 1 / 2 = 1 a token, w = {2, 2, 0, 0}:
     * dropping the two tokens with c = 1 (lowest r) wins (dropping all four ties at Phi 0 but is farther
     * from tau). lambda 6: price 3, w = {4, 4, 2, 2}: every token goes. */
    {
        float r[4] = {0.1f, 0.2f, 0.5f, 0.6f}, c[4] = {1.0f, 1.0f, -1.0f, -1.0f};
        tk_gate_stats st = stats_of(r, c, 4);
        tk_gate_config sc = cfg;
        sc.rule = TK_GATE_SCALED;
        expect_update("scaled: price lambda sd(c)/sqrt(n)", &sc, &st, 2.0f, nextafterf(0.2f, INFINITY));
        expect_update("scaled: a high price drops every token", &sc, &st, 6.0f, nextafterf(0.6f, INFINITY));
        tk_gate_stats_free(&st);
    }
    /* energy: r = {0.1, 0.2, 0.4, 0.8} (r^2 = {.01, .04, .16, .64}, sum .85), lambda 1 (price .25 a token):
     * w = {.25-.0118, .25-.0471, .25-.188, .25-.753}: the first three are positive, so dropping them
     * (t = next(0.4)) is best; lambda 0.5 (price .125): only r .8 and .4 (w = -.063) stay (t = next(0.2)).
     * c plays no part. Every r = 0: tau stays. */
    {
        float r[4] = {0.1f, 0.2f, 0.4f, 0.8f}, c[4] = {-5.0f, 3.0f, 0.0f, 7.0f}, z[1] = {0.0f}, one[1] = {1.0f};
        tk_gate_stats st = stats_of(r, c, 4), zs = stats_of(z, one, 1);
        tk_gate_config en = cfg;
        en.rule = TK_GATE_ENERGY;
        expect_update("energy: lambda 1 keeps the tokens above the mean r^2", &en, &st, 1.0f, nextafterf(0.4f, INFINITY));
        expect_update("energy: lambda 0.5 keeps two", &en, &st, 0.5f, nextafterf(0.2f, INFINITY));
        expect_update("energy: a step with every r = 0 leaves tau", &en, &zs, 0.5f, 0.0f);
        tk_gate_stats_free(&st);
        tk_gate_stats_free(&zs);
    }
    /* random: tau never moves; decisions are a hash of (key, row) at the asked rate */
    {
        tk_gate_stats st = {0};
        push(&st, 0.1f, 1, 1.0f);
        tk_gate_config rnd = cfg;
        rnd.rule = TK_GATE_RANDOM;
        rnd.keep = 0.3f;
        float tau = 0.25f, lambda = 5.0f;
        int ok = tk_gate_update(&rnd, &st, 1, &tau, &lambda) == 0 && tau == 0.25f && lambda == 5.0f;
        report_bool("random: the threshold step leaves tau", ok);
        tk_gate_stats_free(&st);
        size_t kept = 0, n = 200000, same = 0, agree = 0;
        for (size_t i = 0; i < n; i++) {
            int a = tk_gate_random_keep(0x1234u, i, 0.3f);
            kept += (size_t)a;
            same += a == tk_gate_random_keep(0x1234u, i, 0.3f);
            agree += a == tk_gate_random_keep(0x1235u, i, 0.3f);
        }
        report("random: keep rate 0.3 over 200000 rows", fabs((double)kept / (double)n - 0.3), 0.005);
        report_bool("random: the same key and row decide the same", same == n);
        /* independent keys agree on 0.3^2 + 0.7^2 = 0.58 of the rows */
        report("random: another key is independent (agreement 0.58)", fabs((double)agree / (double)n - 0.58), 0.01);
        report_bool("random: keep 1 keeps every row", tk_gate_random_keep(99u, 7, 1.0f) && tk_gate_random_keep(5u, 0, 1.0f));
    }
    tk_gate_rule rr = TK_GATE_PROX;
    tk_tau_scope sc = TK_TAU_MODULE;
    int ok = 1;
    const char *names[] = {"prox", "surrogate", "importance", "scaled", "random", "energy"};
    for (int k = 0; k < 6; k++)
        ok &= tk_gate_rule_parse(names[k], &rr) == 0 && (int)rr == k && strcmp(tk_gate_rule_name(rr), names[k]) == 0;
    ok &= tk_gate_rule_parse("trust", &rr) == -1;
    ok &= tk_tau_scope_parse("layer", &sc) == 0 && sc == TK_TAU_LAYER && tk_tau_scope_parse("module", &sc) == 0 &&
          sc == TK_TAU_MODULE && tk_tau_scope_parse("model", &sc) == -1 && strcmp(tk_tau_scope_name(TK_TAU_LAYER), "layer") == 0;
    report_bool("study rule and scope names parse and print, others refused", ok);
}

int main(void) {
    double t0 = tk_time();
    test_prox_hand();
    test_prox_brute();
    test_surrogate();
    test_stats();
    test_update();
    test_weighted_trust_brute();
    test_study_rules();
    printf("test_gate: %d failure(s), %.2f s\n", g_failures, tk_time() - t0);
    return g_failures ? 1 : 0;
}
