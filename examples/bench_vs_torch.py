#!/usr/bin/env python3
"""One configuration, timed in tspeft and in PyTorch side by side in one run; prints the ratios listed below
with PASS/FAIL against their targets, and the gate's keep 1.0 vs 0.5 comparison.

    python3 examples/bench_vs_torch.py [--tspeft build/tspeft] [--threads 1,2] [--steps 5] [--compute bf16]
        [--dim 768 --layers 12 --heads 12 --ffn 2048 --vocab 32000 --seq 512 --r 16] [--json FILE]

--compute bf16 times mixed precision instead: tspeft `bench --compute bf16` (frozen products in BF16 with
fp32 accumulation on AVX512-BF16) against PyTorch under torch.autocast("cpu", dtype=torch.bfloat16) at
each thread setting, plus tspeft in fp32, in this order: tspeft bf16, tspeft fp32, PyTorch's runs,
tspeft bf16 and fp32 again (each tspeft figure is over both of its runs, which bracket PyTorch's). Reported:
  * tokens/s of tspeft bf16 / tokens/s of the best PyTorch autocast thread setting   >= 2
  * tokens/s of tspeft bf16 / tokens/s of tspeft fp32                                 >= 1.6
  * the peak RSS of each, and where tspeft bf16's step goes.
On a CPU without AVX512-BF16 tspeft runs in fp32 (its JSON says "compute": "fp32") and a line says so.
Without --compute bf16:

PyTorch runs the same model (LLaMA with LoRA r on all seven projections, the TS-PEFT gate applied as a
per-token mask, frozen fp32 base weights so autograd skips their weight gradients, AdamW on the
adapters) at each thread count in a fresh process (torch.set_num_threads); tspeft runs `tspeft bench`
at its thread count, in this order: every token kept; PyTorch's runs; every token kept again, with
`--sgemm-beside` (--no-beside skips this run), so that tspeft's keep-1.0 steps bracket PyTorch's in
time; then the thresholds forced to keep half (and a quarter), each alternated step by step with
keep 1.0 in the same run (`--keep-also 1.0`), so that the gate's saving is measured side by side.
Reported, with the targets:
  * tokens/s of tspeft (keep 1.0, both runs) / tokens/s of the best PyTorch thread setting   >= 1.6
  * achieved GFLOP/s against the 2048^3 sgemm, two ways, each with its verdict:
      - side by side: each step of the `--sgemm-beside` run against the sgemm's rate measured right
        after it for as long, the median over the steps                               >= 0.75
      - against the best reading: the first run's mean step against the best 2048^3 sgemm reading
        of all the tspeft runs                                                        >= 0.75
    with, beside the second, the sgemm's own mean rate in the beside run against that same reading:
    on a shared host whose speed drifts, what code running exactly at the sgemm's rate would show
  * peak RSS of tspeft / peak RSS of that PyTorch run                              <= 0.5
  * keep 1.0 vs 0.5: step time and adapter backward time (the saving must be >= 5%, beyond the
    run-to-run noise of this figure); keep 0.25 too
and where tspeft's step goes: the frozen matmuls (with their GFLOP/s), attention, the adapter
branches and the rest, with the share of the peak the step would reach if everything but the frozen
matmuls were free.
The FLOPs are those of a dense reference step (docs/performance.md). On a shared machine the figures
move with the other load: they are indicative; rerun on a quiet machine before quoting them.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

TORCH_CHILD = r'''
import json, math, os, resource, sys, time
import torch
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
torch.manual_seed(0)
C, L, H, F, V, T, R = (cfg[k] for k in ("dim", "layers", "heads", "ffn", "vocab", "seq", "r"))
D = C // H
def w(o, i):
    return torch.empty(o, i).uniform_(-0.0346, 0.0346)
class Lin(torch.nn.Module):
    def __init__(s, i, o):
        super().__init__()
        s.w = torch.nn.Parameter(w(o, i), requires_grad=False)
        s.A = torch.nn.Parameter(torch.empty(R, i).uniform_(-1 / math.sqrt(i), 1 / math.sqrt(i)))
        s.B = torch.nn.Parameter(torch.empty(o, R).uniform_(-0.01, 0.01))
        s.tau = 0.0
    def forward(s, x):
        b = x @ s.w.t()
        m = (x @ s.A.t()) @ s.B.t() * (cfg["alpha"] / R)
        with torch.no_grad():
            r = m.norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-6)
            S = (r >= s.tau).to(x.dtype).unsqueeze(-1)
        return b + S * m
def rms(x, g):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * g
inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
ang = torch.arange(T).float()[:, None] * inv[None]
cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
def rope(x):
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin
class Layer(torch.nn.Module):
    def __init__(s):
        super().__init__()
        s.q, s.k, s.v, s.o = Lin(C, C), Lin(C, C), Lin(C, C), Lin(C, C)
        s.g, s.u, s.d = Lin(C, F), Lin(C, F), Lin(F, C)
        s.n1 = torch.nn.Parameter(torch.ones(C), requires_grad=False)
        s.n2 = torch.nn.Parameter(torch.ones(C), requires_grad=False)
    def forward(s, x):
        h = rms(x, s.n1)
        q = rope(s.q(h).view(1, T, H, D).transpose(1, 2))
        k = rope(s.k(h).view(1, T, H, D).transpose(1, 2))
        v = s.v(h).view(1, T, H, D).transpose(1, 2)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True) \
            if hasattr(torch.nn.functional, "scaled_dot_product_attention") else \
            torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(
                torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")), -1) @ v
        x = x + s.o(a.transpose(1, 2).reshape(1, T, C))
        h = rms(x, s.n2)
        return x + s.d(torch.nn.functional.silu(s.g(h)) * s.u(h))
class Model(torch.nn.Module):
    def __init__(s):
        super().__init__()
        s.emb = torch.nn.Parameter(w(V, C), requires_grad=False)
        s.layers = torch.nn.ModuleList([Layer() for _ in range(L)])
        s.norm = torch.nn.Parameter(torch.ones(C), requires_grad=False)
        s.head = torch.nn.Parameter(w(V, C), requires_grad=False)
    def forward(s, ids):
        x = s.emb[ids]
        for l in s.layers:
            x = l(x)
        return rms(x, s.norm) @ s.head.t()
m = Model()
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
ids = torch.randint(0, V, (1, T))
times = []
# mixed precision as a PyTorch user turns it on: autocast around the forward and the loss (the backward
# runs in the forward's dtypes; parameters, gradients and AdamW stay fp32)
import contextlib
amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if cfg.get("autocast") else contextlib.nullcontext
for s in range(cfg["warmup"] + cfg["steps"]):
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with amp():
        logits = m(ids)
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.requires_grad], 1.0)
    opt.step()
    if s >= cfg["warmup"]:
        times.append(time.perf_counter() - t)
mean = sum(times) / len(times)
print(json.dumps({"threads": cfg["threads"], "autocast_bf16": bool(cfg.get("autocast")), "step_seconds": mean, "tokens_per_second": T / mean,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                  "torch": torch.__version__, "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE")}))
'''


def run_tspeft(a, shape, keep, more=()):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        cmd = [a.tspeft, "bench", "--threads", str(a.tspeft_threads), "--steps", str(a.steps), "--warmup",
               str(a.warmup), "--json", out, "--alpha", str(a.alpha), "--keep", str(keep)] + list(more) + a.extra
        for k in ("dim", "layers", "heads", "ffn", "vocab", "seq", "r"):
            cmd += ["--" + k, str(shape[k])]
        print("running: " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        with open(out) as f:
            return json.load(f)


def run_torch(a, shape, torch_env, autocast):
    """PyTorch at each thread setting of --threads, each in a fresh process."""
    runs = []
    for t in [int(x) for x in a.threads.split(",")]:
        cfg = dict(shape, threads=t, steps=a.steps, warmup=a.warmup, alpha=a.alpha, autocast=autocast)
        p = subprocess.run([sys.executable, "-c", TORCH_CHILD, json.dumps(cfg)], capture_output=True, text=True,
                           env=torch_env)
        if p.returncode != 0:
            sys.exit("PyTorch run failed: " + p.stderr[-2000:])
        r = json.loads(p.stdout.strip().splitlines()[-1])
        runs.append(r)
        print("pytorch %s%s, %d threads: step %.3f s, %.0f tokens/s, peak RSS %.0f MiB" %
              (r["torch"], " autocast bf16" if autocast else "", t, r["step_seconds"], r["tokens_per_second"],
               r["peak_rss_mib"]))
    return runs


def torch_env_for(ts):
    """PyTorch (Debian's) calls the same OpenBLAS: give it the kernels tspeft ran with, so that a CPU model
    the library does not know (its SSE3 fallback; src/cli/blas_core.c) slows neither side."""
    env = dict(os.environ)
    if "openblas_core" in ts and "OPENBLAS_CORETYPE" not in os.environ:
        env["OPENBLAS_CORETYPE"] = ts["openblas_core"]
    print("OpenBLAS kernels for both: %s%s" % (ts.get("openblas_core", "?"), " (the library alone read this CPU as "
          + ts["openblas_core_detected"] + ")" if "openblas_core_detected" in ts else ""))
    return env


def tokens_per_second(runs):
    """All tokens over all step time of runs of the same shape."""
    return len(runs) / sum(1.0 / r["tokens_per_second"] for r in runs)


def main_bf16(a, shape):
    """--compute bf16: tspeft bf16 and fp32 bracketing PyTorch autocast bf16 at each thread setting."""
    bf = [run_tspeft(a, shape, 1.0, ["--compute", "bf16"])]
    fp = [run_tspeft(a, shape, 1.0, ["--compute", "fp32"])]
    torch_runs = run_torch(a, shape, torch_env_for(bf[0]), True)
    bf.append(run_tspeft(a, shape, 1.0, ["--compute", "bf16"]))
    fp.append(run_tspeft(a, shape, 1.0, ["--compute", "fp32"]))
    best = max(torch_runs, key=lambda r: r["tokens_per_second"])
    bf_tps, fp_tps = tokens_per_second(bf), tokens_per_second(fp)
    vs_torch, vs_fp32 = bf_tps / best["tokens_per_second"], bf_tps / fp_tps
    if any(r.get("compute") != "bf16" for r in bf):
        print("NOTE tspeft ran --compute bf16 in fp32: this CPU has no AVX512-BF16 (the ratios below compare fp32)")
    for name, runs, tps in (("bf16", bf, bf_tps), ("fp32", fp, fp_tps)):
        print("tspeft %s, %d threads: %.0f tokens/s (%s in its runs before and after PyTorch's), peak RSS %.0f MiB" %
              (name, runs[0]["threads"], tps, " and ".join("%.0f" % r["tokens_per_second"] for r in runs),
               max(r["peak_rss_mib"] for r in runs)))
    b0 = bf[0]
    if "frozen_matmul_seconds" in b0:
        tf, ta = b0["frozen_matmul_seconds"], b0["attention_seconds"]
        tb = b0["adapter_forward_seconds"] + b0["adapter_backward_seconds"]
        f0 = fp[0]
        print("     where tspeft bf16's step goes: frozen matmuls %.3f s (%.1f GFLOP/s; fp32 run: %.3f s), attention "
              "%.3f s, adapter branches %.3f s, the rest %.3f s" %
              (tf, b0["frozen_matmul_flops"] / tf / 1e9, f0["frozen_matmul_seconds"], ta, tb,
               b0["step_seconds"] - tf - ta - tb))
    print("%s tokens/s tspeft bf16 / best PyTorch autocast bf16 (%d threads) = %.2fx (target >= 2)" %
          (verdict(vs_torch >= 2.0), best["threads"], vs_torch))
    print("%s tokens/s tspeft bf16 / tspeft fp32 = %.2fx (target >= 1.6)" % (verdict(vs_fp32 >= 1.6), vs_fp32))
    print("     peak RSS tspeft bf16 / PyTorch autocast = %.2f (%.0f / %.0f MiB)" %
          (b0["peak_rss_mib"] / best["peak_rss_mib"], b0["peak_rss_mib"], best["peak_rss_mib"]))
    print("(one run on this machine: indicative only when other jobs share it)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"compute": "bf16", "tspeft_bf16": bf, "tspeft_fp32": fp, "pytorch_autocast": torch_runs,
                       "tspeft_bf16_tokens_per_second": bf_tps, "tspeft_fp32_tokens_per_second": fp_tps,
                       "ratio_vs_autocast": vs_torch, "ratio_vs_fp32": vs_fp32}, f, indent=2)


def gate_saving(run):
    """A --keep K --keep-also 1.0 run: K's steps, keep 1.0's, and the adapter backward's saving at K."""
    k, full = run["by_keep"][0], run["by_keep"][1]
    return k, full, 1.0 - k["adapter_backward_seconds"] / full["adapter_backward_seconds"]


def verdict(ok):
    return "PASS" if ok else "FAIL"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tspeft", default="build/tspeft")
    ap.add_argument("--threads", default="1,2", help="PyTorch thread settings to try")
    ap.add_argument("--tspeft-threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    for k, v in (("dim", 768), ("layers", 12), ("heads", 12), ("ffn", 2048), ("vocab", 32000), ("seq", 512), ("r", 16)):
        ap.add_argument("--" + k, type=int, default=v)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--tspeft-args", default="", help="extra `tspeft bench` options, e.g. \"--attention full\"")
    ap.add_argument("--keep-low", type=float, default=0.25, help="also time this forced keep ratio (0: skip)")
    ap.add_argument("--no-beside", dest="beside", action="store_false",
                    help="skip the diagnostic run with `--sgemm-beside` (each step against the sgemm rate right after it)")
    ap.add_argument("--compute", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: tspeft --compute bf16 against PyTorch autocast bf16, plus tspeft fp32")
    ap.add_argument("--json", help="write all figures here")
    a = ap.parse_args()
    a.extra = a.tspeft_args.split()
    shape = {k: getattr(a, k) for k in ("dim", "layers", "heads", "ffn", "vocab", "seq", "r")}
    if a.compute == "bf16":
        return main_bf16(a, shape)
    ts = run_tspeft(a, shape, 1.0)
    torch_runs = run_torch(a, shape, torch_env_for(ts), False)
    # keep 1.0 again right after PyTorch, each step against the sgemm's rate measured right after it
    beside = run_tspeft(a, shape, 1.0, ["--sgemm-beside"]) if a.beside else None
    half = run_tspeft(a, shape, 0.5, ["--keep-also", "1.0"])
    low = run_tspeft(a, shape, a.keep_low, ["--keep-also", "1.0"]) if a.keep_low > 0 else None
    best = max(torch_runs, key=lambda r: r["tokens_per_second"])
    # tspeft's keep-1.0 steps before and after PyTorch's: all of their tokens over all of their time
    keep_full = [r for r in (ts, beside) if r]
    ts_tps = len(keep_full) / sum(1.0 / r["tokens_per_second"] for r in keep_full)
    speed = ts_tps / best["tokens_per_second"]
    # the peak is measured in each tspeft run: take the best (a loaded machine lowers single measurements)
    readings = [r["sgemm_peak_gflops"] for r in (ts, beside, half, low) if r]
    peak = max(readings)
    eff = ts["gflops"] / peak
    mem = ts["peak_rss_mib"] / best["peak_rss_mib"]
    hk, hf, save = gate_saving(half)
    print("tspeft, %d threads: step %.3f s (min %.3f), %.0f tokens/s, %.1f GFLOP/s, peak RSS %.0f MiB (%s attention)" %
          (ts["threads"], ts["step_seconds"], ts["step_seconds_min"], ts["tokens_per_second"], ts["gflops"],
           ts["peak_rss_mib"], ts.get("attention", "?")))
    print("  phases: forward %.3f s, loss %.3f s, backward %.3f s, optimizer %.3f s; %.1f GFLOP per step" %
          (ts["forward_seconds"], ts["loss_seconds"], ts["backward_seconds"], ts["optimizer_seconds"],
           ts["flops_per_step"] / 1e9))
    print("%s tokens/s tspeft / best PyTorch (%d threads) = %.2fx (target >= 1.6; tspeft %.0f tokens/s over %s)" %
          (verdict(speed >= 1.6), best["threads"], speed, ts_tps,
           " and ".join("%.0f" % r["tokens_per_second"] for r in keep_full) + " in its runs before and after PyTorch's"
           if beside else "its run"))
    # side by side: each step against the sgemm's rate at its own moment (a shared host's speed moves
    # by a third within a minute, and with it both the steps and the sgemm)
    eff_beside = beside["share_of_sgemm_beside_median"] if beside else None
    if beside:
        print("%s achieved / sgemm side by side = median %.0f%% over the steps (%.0f-%.0f%%; target >= 75%%): each "
              "step against the 2048^3 sgemm run right after it for as long (%.0f-%.0f GFLOP/s)" %
              (verdict(eff_beside >= 0.75), 100 * eff_beside, 100 * min(beside["share_of_sgemm_beside"]),
               100 * max(beside["share_of_sgemm_beside"]), min(beside["sgemm_beside_gflops"]),
               max(beside["sgemm_beside_gflops"])))
    # against the best reading: the mean step against the best of all the short sgemm readings; the
    # fastest step against that reading, and the sgemm's own mean rate in the beside run, beside it
    eff_fast = ts["flops_per_step"] / ts["step_seconds_min"] / 1e9 / peak
    self_share = beside["sgemm_beside_mean_gflops"] / peak if beside else None
    print("%s achieved / best sgemm reading = %.0f%% of %.1f GFLOP/s (target >= 75%%; the fastest step: %.0f%%%s)" %
          (verdict(eff >= 0.75), 100 * eff, peak, 100 * eff_fast,
           "; the sgemm itself, run beside the steps, averaged %.0f%% of that reading" % (100 * self_share)
           if beside else ""))
    print("%s peak RSS tspeft / PyTorch = %.2f (%.0f / %.0f MiB, target <= 0.5)" %
          (verdict(mem <= 0.5), mem, ts["peak_rss_mib"], best["peak_rss_mib"]))
    print("%s gate keep 1.0 vs 0.5, alternated in one run (measured %.3f / %.3f): step %.3f / %.3f s, adapter "
          "backward %.3f / %.3f s (saving %.0f%%), adapter forward %.3f / %.3f s" %
          (verdict(save >= 0.05), hf["keep_ratio"], hk["keep_ratio"], hf["step_seconds"], hk["step_seconds"],
           hf["adapter_backward_seconds"], hk["adapter_backward_seconds"], 100 * save,
           hf["adapter_forward_seconds"], hk["adapter_forward_seconds"]))
    if low:
        lk, lf, save_low = gate_saving(low)
        print("     gate keep 1.0 vs %.2f, alternated in one run (measured %.3f / %.3f): step %.3f / %.3f s, adapter "
              "backward %.3f / %.3f s (saving %.0f%%)" %
              (a.keep_low, lf["keep_ratio"], lk["keep_ratio"], lf["step_seconds"], lk["step_seconds"],
               lf["adapter_backward_seconds"], lk["adapter_backward_seconds"], 100 * save_low))
    if "frozen_matmul_seconds" in ts:
        tf, ta = ts["frozen_matmul_seconds"], ts["attention_seconds"]
        tb = ts["adapter_forward_seconds"] + ts["adapter_backward_seconds"]
        rest = ts["step_seconds"] - tf - ta - tb
        print("     where the step goes: frozen matmuls %.3f s (%.1f GFLOP/s, %.0f%% of the peak), attention %.3f s, "
              "adapter branches %.3f s, the rest %.3f s; frozen matmuls alone would give %.0f%% of the peak" %
              (tf, ts["frozen_matmul_flops"] / tf / 1e9, 100 * ts["frozen_matmul_flops"] / tf / 1e9 / peak, ta, tb,
               rest, 100 * ts["flops_per_step"] / tf / 1e9 / peak))
    # readings far apart mean the host's speed moved during the script, and so did every time above
    # (the steps, PyTorch's runs): say so beside the verdicts
    drift = max(readings) / min(readings) - 1.0
    if drift > 0.15:
        print("WARNING the host's speed moved during this script: the peak read %s GFLOP/s in the tspeft runs "
              "(%.0f%% apart); the ratios above mix its fast and slow moments: rerun on a quieter machine" %
              (" / ".join("%.0f" % x for x in readings), 100 * drift))
    print("(one run on this machine: indicative only when other jobs share it)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"tspeft": ts, "tspeft_keep_half": half, "tspeft_keep_low": low, "tspeft_sgemm_beside": beside,
                       "pytorch": torch_runs,
                       "sgemm_peak_gflops": peak, "speed_ratio": speed,
                       "tspeft_tokens_per_second": ts_tps, "peak_fraction_beside": eff_beside,
                       "peak_fraction": eff, "peak_fraction_fastest_step": eff_fast, "peak_readings": readings,
                       "sgemm_self_fraction": self_share,
                       "rss_ratio": mem, "adapter_backward_saving": save}, f, indent=2)


if __name__ == "__main__":
    main()
