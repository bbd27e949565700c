#!/usr/bin/python3
"""examples/bench_vs_torch.py end to end on a tiny shape (one step each side): the script runs, prints
its verdict lines, and its JSON agrees with itself. No timing is asserted.

    /usr/bin/python3 tests/e2e/test_bench_vs_torch.py --tspeft build/tspeft

(a) exit 0; the five verdict lines (tokens/s, share of the sgemm side by side and against the best
    reading, peak RSS, gate keep 1.0 vs 0.5) each read PASS or FAIL; the keep-1.0 runs bracket
    PyTorch's (the first tspeft run before them, the --sgemm-beside run after);
(b) PyTorch ran with the OpenBLAS kernels tspeft ran with (OPENBLAS_CORETYPE in the child's
    environment equals tspeft's openblas_core, or the caller's own setting when there is one);
(c) the JSON's ratios are those of its figures: speed = tspeft's tokens/s over both keep-1.0 runs
    (all tokens over all step time) / the best PyTorch setting's, RSS ratio against that setting, peak =
    the best of the tspeft runs' readings, share = GFLOP/s / peak, the side-by-side share = the beside
    run's median, the sgemm's own share = its mean beside rate / peak, and the gate saving from the
    keep-0.5 run's two by_keep entries;
(d) with --compute bf16: exit 0; the two verdict lines (tspeft bf16 / best PyTorch autocast, tspeft bf16 /
    tspeft fp32) read PASS or FAIL; tspeft bf16 and fp32 run before PyTorch's two autocast runs and again
    after them; the ratios in the JSON are those of its figures; tspeft's bf16 runs computed in BF16 where
    this CPU has AVX512-BF16, and otherwise a NOTE line says they ran in fp32.
Exit 0 when every check passed, 1 otherwise, 77 (skipped) without python3-torch.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "..", "examples", "bench_vs_torch.py")
SHAPE = ["--dim", "64", "--layers", "1", "--heads", "4", "--ffn", "96", "--vocab", "300", "--seq", "32", "--r", "4"]
fails = 0


def check(ok, what):
    global fails
    print("%s %s" % ("ok  " if ok else "FAIL", what))
    fails += not ok


def close(a, b):
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


def bf16_cpu():
    """The CPU has what --compute bf16 needs (the flags Linux reports for AVX-512F, BW and BF16)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((l.split(":", 1)[1].split() for l in f if l.startswith("flags")), [])
    except OSError:
        return False
    return all(x in flags for x in ("avx512f", "avx512bw", "avx512_bf16")) and os.environ.get("TSPEFT_BF16DOT") != "0"


def check_bf16(a, tmp):
    out = os.path.join(tmp, "vs_bf16.json")
    p = subprocess.run([sys.executable, SCRIPT, "--tspeft", a.tspeft, "--threads", "1,2", "--steps", "1",
                        "--warmup", "0", "--compute", "bf16", "--json", out] + SHAPE, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=600)
    check(p.returncode == 0, "--compute bf16: the script exits 0 (%d: %s)" % (p.returncode, p.stderr.strip()[-300:]))
    if p.returncode != 0:
        return
    for what in ("tokens/s tspeft bf16 / best PyTorch autocast bf16", "tokens/s tspeft bf16 / tspeft fp32"):
        check(re.search(r"^(PASS|FAIL) " + re.escape(what), p.stdout, re.M) is not None, "verdict line: %s" % what)
    lines = p.stdout.splitlines()
    order = [("bf16" if "--compute bf16" in l else "fp32") if l.startswith("running: ") else "torch"
             for l in lines if l.startswith("running: ") or l.startswith("pytorch ")]
    check(order == ["bf16", "fp32", "torch", "torch", "bf16", "fp32"],
          "tspeft bf16 and fp32, PyTorch at 1 and 2 threads, tspeft bf16 and fp32 again (%s)" % order)
    with open(out) as f:
        j = json.load(f)
    bf, fp, tr = j["tspeft_bf16"], j["tspeft_fp32"], j["pytorch_autocast"]
    check(all(r["autocast_bf16"] for r in tr) and len(tr) == 2, "PyTorch ran under autocast bf16")
    both = lambda runs: len(runs) / sum(1.0 / r["tokens_per_second"] for r in runs)
    best = max(r["tokens_per_second"] for r in tr)
    check(len(bf) == 2 and len(fp) == 2 and close(j["ratio_vs_autocast"], both(bf) / best) and
          close(j["ratio_vs_fp32"], both(bf) / both(fp)),
          "ratios = tspeft bf16 tokens/s over both runs / best autocast, / tspeft fp32 over both runs")
    want = "bf16" if bf16_cpu() else "fp32"
    check(all(r["compute"] == want for r in bf) and all(r["compute"] == "fp32" for r in fp) and
          (("NOTE tspeft ran --compute bf16 in fp32" in p.stdout) == (want == "fp32")),
          "tspeft's bf16 runs computed in %s on this CPU, and the NOTE line says so exactly when fp32" % want)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tspeft", required=True)
    a = ap.parse_args()
    try:
        import torch  # noqa: F401
    except ImportError:
        print("skipped: python3-torch is not installed")
        return 77
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "vs.json")
        p = subprocess.run([sys.executable, SCRIPT, "--tspeft", a.tspeft, "--threads", "1,2", "--steps", "1",
                            "--warmup", "0", "--json", out] + SHAPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, timeout=600)
        check(p.returncode == 0, "the script exits 0 (%d: %s)" % (p.returncode, p.stderr.strip()[-300:]))
        if p.returncode != 0:
            return 1
        for what in ("tokens/s tspeft / best PyTorch", "achieved / sgemm side by side", "achieved / best sgemm reading",
                     "peak RSS tspeft / PyTorch", "gate keep 1.0 vs 0.5"):
            check(re.search(r"^(PASS|FAIL) " + re.escape(what), p.stdout, re.M) is not None,
                  "verdict line: %s" % what)
        lines = p.stdout.splitlines()
        runs_at = [i for i, l in enumerate(lines) if l.startswith("running: ")]
        torch_at = [i for i, l in enumerate(lines) if l.startswith("pytorch ")]
        beside_at = [i for i in runs_at if "--sgemm-beside" in lines[i]]
        check(len(runs_at) == 4 and len(torch_at) == 2 and runs_at[0] < torch_at[0] and len(beside_at) == 1 and
              beside_at[0] > torch_at[-1] and runs_at[1] == beside_at[0] and " --keep 1.0" in lines[runs_at[0]],
              "keep 1.0 first, PyTorch, then keep 1.0 with --sgemm-beside, then the gate runs")
        with open(out) as f:
            j = json.load(f)
        ts, half, torch_runs = j["tspeft"], j["tspeft_keep_half"], j["pytorch"]
        want = os.environ.get("OPENBLAS_CORETYPE") or ts.get("openblas_core")
        check(all(r.get("openblas_coretype") == want for r in torch_runs),
              "PyTorch ran with tspeft's OpenBLAS kernels (%s; children: %s)" %
              (want, [r.get("openblas_coretype") for r in torch_runs]))
        best = max(torch_runs, key=lambda r: r["tokens_per_second"])
        bs = j["tspeft_sgemm_beside"]
        both = 2.0 / (1.0 / ts["tokens_per_second"] + 1.0 / bs["tokens_per_second"])
        check(close(j["tspeft_tokens_per_second"], both) and
              close(j["speed_ratio"], both / best["tokens_per_second"]),
              "speed ratio = tspeft tokens/s over both keep-1.0 runs / best PyTorch tokens/s")
        check(close(j["rss_ratio"], ts["peak_rss_mib"] / best["peak_rss_mib"]), "RSS ratio against that setting")
        runs = [r for r in (ts, half, j["tspeft_keep_low"], j["tspeft_sgemm_beside"]) if r]
        check(len(runs) == 4 and close(j["sgemm_peak_gflops"], max(r["sgemm_peak_gflops"] for r in runs)) and
              sorted(j["peak_readings"]) == sorted(r["sgemm_peak_gflops"] for r in runs),
              "peak = the best of the four tspeft runs' readings")
        check(close(j["peak_fraction"], ts["gflops"] / j["sgemm_peak_gflops"]), "share = GFLOP/s / peak")
        check(close(j["peak_fraction_beside"], bs["share_of_sgemm_beside_median"]),
              "side-by-side share = the beside run's median")
        check(close(j["sgemm_self_fraction"], bs["sgemm_beside_mean_gflops"] / j["sgemm_peak_gflops"]),
              "the sgemm's own share = its mean beside rate / peak")
        hk, hf = half["by_keep"]
        check(hk["keep"] == 0.5 and hf["keep"] == 1.0 and
              close(j["adapter_backward_saving"], 1 - hk["adapter_backward_seconds"] / hf["adapter_backward_seconds"]),
              "gate saving from the keep-0.5 run's by_keep (0.5 against 1.0)")
        check_bf16(a, tmp)
    print("all passed" if not fails else "FAILED (%d)" % fails)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
