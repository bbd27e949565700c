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
    keep-0.5 run's two by_keep entries.
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
    print("all passed" if not fails else "FAILED (%d)" % fails)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
