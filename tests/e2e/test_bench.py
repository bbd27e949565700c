#!/usr/bin/python3
"""`tspeft bench` on a tiny random LLaMA (docs/performance.md). No timing is asserted: only what the
figures must satisfy whatever the machine's speed.

    /usr/bin/python3 tests/e2e/test_bench.py --tspeft build/tspeft

(a) --json holds every figure; flops_per_step, frozen_matmul_flops and attention_flops equal the
    dense-step count recomputed here from the shapes (frozen linears 4 N I O, adapters 6 N R (I + O),
    causal attention 12 P D per head and layer with P = B T (T + 1) / 2).
(b) --keep K: the keep ratio measured over the timed steps is K to within two tokens per module
    (thresholds are re-set before every step), for K = 1, 0.5 and 0.25; keep 0 keeps nothing.
(b2) --keep 0.5 --keep-also 1.0,0.25 alternates the three ratios step by step in one run: by_keep
    lists them in that order, each measured within two tokens per module of its target, and the
    headline figures are --keep's (its step time and keep ratio equal by_keep's first entry).
(c) the time parts (frozen matmuls, attention, adapter branches) are non-negative and sum to no
    more than the step; the phases sum to no more than the step either.
(d) the memory model adds up and peak RSS is at least the weights it holds; the printed report names
    the shape.
(f) OpenBLAS's kernels: on a CPU with AVX2 and FMA the run reports (openblas_core) kernels of that
    level or better, never the library's pre-AVX2 fallback (src/cli/blas_core.c); a user's own
    OPENBLAS_CORETYPE is kept as given, and the restart keeps the arguments (the shape is reported).
(g) --sgemm-beside: one sgemm rate and one share per timed step (positive), the median share is their
    median, the mean rate is their mean, and share x rate gives back each step's time, whose mean is
    step_seconds; without the option the JSON has none of it.
(e) bad options (--keep 1.5, --keep-also 2 or 0.5,x, --seq 1, dim not divisible by heads) exit
    non-zero with one line.
Exit status 0 when every check passed, 1 otherwise.
"""
import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_util as U  # noqa: E402

SHAPE = {"dim": 64, "layers": 2, "heads": 4, "ffn": 96, "vocab": 300, "seq": 48, "batch": 2, "r": 4}
fails = 0


def check(ok, what):
    global fails
    print("%s %s" % ("ok  " if ok else "FAIL", what))
    fails += not ok


def bench(tspeft, tmp, keep, extra=(), env=None):
    out = os.path.join(tmp, "bench-%s%s.json" % (keep, "-".join(extra)))
    args = ["bench", "--steps", 2, "--warmup", 1, "--threads", 2, "--keep", keep, "--json", out]
    for k, v in SHAPE.items():
        args += ["--" + k, v]
    p = U.run(tspeft, args + list(extra), timeout=120, env=env)
    if p.returncode != 0:
        check(False, "bench --keep %s exits 0 (got %d: %s)" % (keep, p.returncode, p.stderr.strip()))
        return None, p
    with open(out) as f:
        return json.load(f), p


def dense_flops():
    C, L, H, F, V, T, B, R = (SHAPE[k] for k in ("dim", "layers", "heads", "ffn", "vocab", "seq", "batch", "r"))
    N, D = B * T, C // H
    shapes = [(C, C)] * 4 + [(C, F)] * 2 + [(F, C)]  # (in, out) of q k v o gate up down
    lin = L * sum(i * o for i, o in shapes) + V * C
    ad = L * sum(R * (i + o) for i, o in shapes)
    pairs = B * T * (T + 1) / 2
    attn = 12.0 * pairs * D * H * L
    return 4.0 * N * lin + attn + 6.0 * N * ad, 4.0 * N * lin, attn


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


PRE_AVX2 = {"Unknown", "Katmai", "Coppermine", "Northwood", "Prescott", "Banias", "Atom", "Core2", "Penryn",
            "Dunnington", "Nehalem", "Sandybridge", "Opteron", "Opteron(SSE3)", "Barcelona", "Nano", "Bobcat",
            "Bulldozer"}


def check_blas_core(tspeft, tmp):
    flags = cpu_flags()
    saved = {k: os.environ.pop(k, None) for k in ("OPENBLAS_CORETYPE", "TSPEFT_BLAS_CORE_DETECTED")}
    try:
        j, p = bench(tspeft, tmp, 1.0, ("--layers", "1"))
        if j is not None:
            core = j.get("openblas_core")
            check(core is not None and "OpenBLAS kernels: %s" % core in p.stdout and "dim 64, 1 layers" in p.stdout,
                  "the run reports OpenBLAS's kernels (%s) and the shape it was given" % core)
            if {"avx2", "fma"} <= flags:
                check(core not in PRE_AVX2, "a CPU with AVX2+FMA runs OpenBLAS kernels of that level: %s%s" %
                      (core, " (the library chose %s)" % j["openblas_core_detected"]
                       if "openblas_core_detected" in j else ""))
                j2, p2 = bench(tspeft, tmp, 1.0, ("--layers", "1", "--seed", "1"), env={"OPENBLAS_CORETYPE": "Haswell"})
                if j2 is not None:
                    check(j2.get("openblas_core") == "Haswell" and "openblas_core_detected" not in j2,
                          "OPENBLAS_CORETYPE=Haswell is kept as given (got %s)" % j2.get("openblas_core"))
    finally:
        for k, v in saved.items():
            if v is not None:
                os.environ[k] = v


def check_sgemm_beside(tspeft, tmp, total):
    j, p = bench(tspeft, tmp, 1.0, ("--sgemm-beside", "--steps", "3"))
    if j is None:
        return
    rates, shares = j.get("sgemm_beside_gflops", []), j.get("share_of_sgemm_beside", [])
    ok = len(rates) == 3 and len(shares) == 3 and all(x > 0 for x in rates + shares)
    check(ok, "--sgemm-beside: 3 rates and 3 shares, positive (%s, %s)" % (rates, shares))
    if not ok:
        return
    check(j["share_of_sgemm_beside_median"] == sorted(shares)[1], "--sgemm-beside: the median share is the median")
    times = [total / (s * r * 1e9) for s, r in zip(shares, rates)]
    mean = sum(times) / 3
    check(abs(mean - j["step_seconds"]) <= 1e-9 + 1e-6 * j["step_seconds"],
          "--sgemm-beside: share x rate gives the steps' times (mean %.6f s == step %.6f s)" % (mean, j["step_seconds"]))
    check(abs(j["sgemm_beside_mean_gflops"] - sum(rates) / 3) <= 1e-9 * sum(rates),
          "--sgemm-beside: the mean beside rate is the mean of the rates")
    check("sgemm beside each step" in p.stdout, "--sgemm-beside: reported")
    j2, _ = bench(tspeft, tmp, 1.0, ("--steps", "3"))
    if j2 is not None:
        check("sgemm_beside_gflops" not in j2 and "share_of_sgemm_beside" not in j2,
              "without --sgemm-beside the JSON has no beside figures")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tspeft", required=True)
    a = ap.parse_args()
    N = SHAPE["seq"] * SHAPE["batch"]
    total, frozen, attn = dense_flops()
    with tempfile.TemporaryDirectory() as tmp:
        for keep in (1.0, 0.5, 0.25, 0.0):
            j, p = bench(a.tspeft, tmp, keep)
            if j is None:
                continue
            need = ["step_seconds", "tokens_per_second", "gflops", "sgemm_peak_gflops", "peak_rss_mib", "keep_ratio",
                    "adapter_forward_seconds", "adapter_backward_seconds", "frozen_matmul_seconds",
                    "attention_seconds", "forward_seconds", "loss_seconds", "backward_seconds",
                    "optimizer_seconds", "model_weights_mib", "model_trainable_mib", "model_activations_mib",
                    "model_adapter_state_mib"]
            missing = [k for k in need if k not in j]
            check(not missing, "keep %.2f: --json has every figure (missing: %s)" % (keep, missing))
            if missing:
                continue
            if keep == 1.0:
                check(abs(j["flops_per_step"] - total) <= 1e-9 * total,
                      "flops_per_step %.6g == dense count %.6g" % (j["flops_per_step"], total))
                check(abs(j["frozen_matmul_flops"] - frozen) <= 1e-9 * frozen and
                      abs(j["attention_flops"] - attn) <= 1e-9 * attn,
                      "frozen %.6g / attention %.6g FLOPs == %.6g / %.6g" %
                      (j["frozen_matmul_flops"], j["attention_flops"], frozen, attn))
                check(abs(j["gflops"] - total / j["step_seconds"] / 1e9) <= 1e-6 * j["gflops"],
                      "gflops == FLOPs / step time")
                check("dim 64, 2 layers, 4 heads" in p.stdout and "time: frozen matmuls" in p.stdout,
                      "the report names the shape and where the step goes")
            tol = 2.0 / N  # thresholds re-set before each step: at most a token or two off per module
            check(abs(j["keep_ratio"] - keep) <= tol, "keep %.2f forced: measured %.4f (tolerance %.4f)" %
                  (keep, j["keep_ratio"], tol))
            parts = [j["frozen_matmul_seconds"], j["attention_seconds"], j["adapter_forward_seconds"],
                     j["adapter_backward_seconds"]]
            step = j["step_seconds"]
            check(all(x >= 0 for x in parts) and sum(parts) <= step * 1.001 + 1e-4,
                  "keep %.2f: time parts %.4f s fit in the step %.4f s" % (keep, sum(parts), step))
            phases = j["forward_seconds"] + j["loss_seconds"] + j["backward_seconds"] + j["optimizer_seconds"]
            check(phases <= step * 1.001 + 1e-4, "keep %.2f: phases %.4f s fit in the step" % (keep, phases))
            model = (j["model_weights_mib"] + j["model_trainable_mib"] + j["model_activations_mib"] +
                     j["model_adapter_state_mib"])
            check(model > 0 and j["peak_rss_mib"] >= j["model_weights_mib"],
                  "keep %.2f: memory model %.1f MiB, peak RSS %.1f MiB >= weights" %
                  (keep, model, j["peak_rss_mib"]))
        j, p = bench(a.tspeft, tmp, 0.5, ("--keep-also", "1.0,0.25"))
        if j is not None:
            bk = j.get("by_keep", [])
            tol = 2.0 / N
            check([e["keep"] for e in bk] == [0.5, 1.0, 0.25],
                  "--keep-also: by_keep lists 0.5, 1.0, 0.25 (got %s)" % [e.get("keep") for e in bk])
            if len(bk) == 3:
                check(all(abs(e["keep_ratio"] - e["keep"]) <= tol for e in bk),
                      "--keep-also: each ratio measured within %.4f (%s)" %
                      (tol, ", ".join("%.4f" % e["keep_ratio"] for e in bk)))
                check(j["keep_ratio"] == bk[0]["keep_ratio"] and
                      abs(j["step_seconds"] - bk[0]["step_seconds"]) <= 1e-12 * max(1.0, j["step_seconds"]),
                      "--keep-also: the headline figures are --keep's steps")
                check(all(e["step_seconds"] > 0 and e["adapter_backward_seconds"] >= 0 for e in bk) and
                      "in turn with 0.50" in p.stdout, "--keep-also: times positive, each ratio reported")
        check_blas_core(a.tspeft, tmp)
        check_sgemm_beside(a.tspeft, tmp, total)
        for bad, what in ((["--keep", "1.5"], "--keep 1.5"), (["--keep-also", "2"], "--keep-also 2"),
                          (["--keep-also", "0.5,x"], "--keep-also 0.5,x"), (["--seq", "1"], "--seq 1"),
                          (["--dim", "66", "--heads", "4"], "dim 66 with 4 heads")):
            p = U.run(a.tspeft, ["bench", "--steps", 1, "--warmup", 0] + bad, timeout=60)
            lines = [x for x in p.stderr.splitlines() if x.strip()]
            check(p.returncode != 0 and len(lines) == 1, "%s refused with one line: %s" %
                  (what, lines[0] if lines else "(nothing)"))
    print("all passed" if not fails else "FAILED (%d)" % fails)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
