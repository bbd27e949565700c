#!/usr/bin/python3
"""Data-parallel training over MPI equals single-process training.

    /usr/bin/python3 tests/e2e/test_mpi.py --tspeft build/tspeft     (needs build/tspeft-mpi, mpirun)

`mpirun -np 2 tspeft-mpi train --grad-accum K` against `tspeft train --grad-accum 2K` on the same data,
seed and options: the same micro-batches in the same order make up each optimizer step, so
  * the printed per-step loss, gradient norm and keep ratio are equal,
  * the first step's dump (--dump) has the same loss, the same keep count per gated module and the
    same next tau (exact: the threshold step sees every rank's r_i and c_i in single-process order),
    and gradients equal to 1e-5 relative to each tensor's max magnitude (the all-reduce adds the two
    ranks' partial sums in another order than one process accumulates them),
  * the final adapters agree to 2e-4 relative (the same reassociation, amplified by AdamW's
    normalisation of near-zero gradient elements over 5 steps).
Cases: gated LoRA with dropout (per-micro-batch dropout streams) and a target keep ratio on JSONL;
gated DoRA with the surrogate rule on a shuffled shard. Then: resume with the same P continues bit for
bit; only rank 0 writes into --out. Exit 77 (skipped) when tspeft-mpi or mpirun is absent.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_util as U  # noqa: E402

import numpy as np  # noqa: E402

import st  # noqa: E402

TOL = 1e-5        # one step's gradients: the all-reduce reassociates the sum of two ranks' partial sums
TOL_FINAL = 2e-4  # after 5 AdamW steps: m / sqrt(v) turns tiny differences in near-zero gradient
                  # elements (lora_A's are exactly 0 at step 1, since B starts at 0) into larger ones
ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMP_NUM_THREADS": "1",
       "OMPI_MCA_rmaps_base_oversubscribe": "1"}


def mpirun(tspeft_mpi, n, args, timeout=120):
    e = dict(os.environ)
    e.update(ENV)
    return subprocess.run(["mpirun", "-np", str(n), tspeft_mpi] + [str(a) for a in args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout, env=e)


def rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    scale = max(float(np.max(np.abs(a))) if a.size else 0.0, 1e-30)
    return float(np.max(np.abs(a - b))) / scale if a.size else 0.0


def compare_tensors(chk, what, A, B, exact_suffixes=(), tol=TOL):
    chk.ok(sorted(A) == sorted(B), "%s: the same tensor names (%d)" % (what, len(A)),
           "only single: %s; only mpi: %s" % (sorted(set(A) - set(B))[:5], sorted(set(B) - set(A))[:5]))
    worst, worst_name, exact_bad = 0.0, "", []
    for k in sorted(set(A) & set(B)):
        if k.endswith(exact_suffixes):
            if not np.array_equal(A[k], B[k]):
                exact_bad.append("%s: %s vs %s" % (k, A[k].ravel()[:4], B[k].ravel()[:4]))
            continue
        e = rel_err(A[k], B[k])
        if e > worst:
            worst, worst_name = e, k
    chk.ok(worst <= tol, "%s: max relative error %.2e <= %.0e (%s)" % (what, worst, tol, worst_name or "-"))
    if exact_suffixes:
        chk.ok(not exact_bad, "%s: %s equal exactly" % (what, " ".join(exact_suffixes)), "\n".join(exact_bad[:8]))


def progress_eq(chk, what, single, multi):
    a, b = U.progress(single), U.progress(multi)
    chk.ok(len(a) > 0 and len(a) == len(b), "%s: %d progress lines each" % (what, len(a)), multi)
    keys = ("loss", "gnorm", "keep")
    same = all(x[k] == y[k] for x, y in zip(a, b) for k in keys)
    chk.ok(same, "%s: printed loss, gnorm and keep equal at every step" % what,
           "\n".join("%s | %s" % (x, y) for x, y in zip(a, b)))


def case(chk, ctx, name, common, k_single, k_multi, n=2):
    tmp = ctx["tmp"]
    outs, dumps = os.path.join(tmp, name + "-single"), os.path.join(tmp, name + "-dsingle")
    outm, dumpm = os.path.join(tmp, name + "-multi"), os.path.join(tmp, name + "-dmulti")
    p1 = U.run(ctx["tspeft"], ["train"] + common + ["--grad-accum", k_single, "--out", outs, "--dump", dumps],
               env={"OMP_NUM_THREADS": "1"})
    chk.ok(p1.returncode == 0, "%s: single process, grad-accum %d, exits 0" % (name, k_single), p1.stderr)
    p2 = mpirun(ctx["mpi"], n, ["train"] + common + ["--grad-accum", k_multi, "--out", outm, "--dump", dumpm])
    chk.ok(p2.returncode == 0, "%s: mpirun -np %d, grad-accum %d, exits 0" % (name, n, k_multi), p2.stderr)
    if p1.returncode or p2.returncode:
        return
    progress_eq(chk, name, p1.stderr, p2.stderr)
    chk.ok(p2.stderr.count("tspeft train: adapter written") == 1, "%s: only rank 0 reports and writes" % name,
           p2.stderr)
    d1 = st.load(os.path.join(dumps, "step1.safetensors"))
    d2 = st.load(os.path.join(dumpm, "step1.safetensors"))
    d1 = {k: v for k, v in d1.items() if not k.startswith("logits.")}  # rank 0 holds its own logits only
    d2 = {k: v for k, v in d2.items() if not k.startswith("logits.")}
    chk.ok(abs(float(d1["loss"][0]) - float(d2["loss"][0])) <= 1e-6 * abs(float(d1["loss"][0])),
           "%s: step-1 loss %.7f vs %.7f" % (name, float(d1["loss"][0]), float(d2["loss"][0])))
    compare_tensors(chk, name + " step-1 dump", d1, d2, exact_suffixes=(".keep", ".ts_tau.next"))
    a1 = st.load(os.path.join(outs, "adapter_model.safetensors"))
    a2 = st.load(os.path.join(outm, "adapter_model.safetensors"))
    compare_tensors(chk, name + " final adapter", a1, a2, tol=TOL_FINAL)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tspeft", required=True)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    mpi = os.path.join(os.path.dirname(os.path.abspath(a.tspeft)), "tspeft-mpi")
    if not os.path.exists(mpi) or shutil.which("mpirun") is None:
        print("SKIP: %s or mpirun not found (configure with -DTSPEFT_MPI=ON; `make test` does)" % mpi)
        return 77
    chk = U.Checks("test_mpi")
    tmp = tempfile.mkdtemp(prefix="tk_mpi_")
    ctx = {"tspeft": a.tspeft, "mpi": mpi, "tmp": tmp}
    try:
        model = os.path.join(tmp, "model")
        U.tiny_model(model, seed=7)
        data = os.path.join(tmp, "data.jsonl")
        rows = U.pattern_data(data, n_rows=40, seed=3)
        base = ["--model", model, "--threads", 1, "--steps", 5, "--batch-size", 2, "--lr", "1e-2", "--seed", 11]

        chk.section("gated LoRA, dropout 0.1, target keep 0.6, JSONL: 2 ranks x 2 vs 1 x 4")
        case(chk, ctx, "lora", base + ["--data", data, "--target-modules", "all", "--dropout", "0.1",
                                       "--ts-target-keep", "0.6", "--shuffle"], 4, 2)

        chk.section("gated DoRA, surrogate rule, shuffled shard: 2 ranks x 1 vs 1 x 2")
        shard = os.path.join(tmp, "data.shard")
        U.make_shard(a.tspeft, shard, rows)
        case(chk, ctx, "dora", base + ["--data", shard, "--adapter-type", "dora", "--ts-rule", "surrogate",
                                       "--ts-lambda", "0.3", "--shuffle"], 2, 1)

        chk.section("resume with the same P continues bit for bit")
        common = base + ["--data", data, "--target-modules", "all", "--dropout", "0.1", "--grad-accum", 2]
        full, part = os.path.join(tmp, "r-full"), os.path.join(tmp, "r-part")
        p = mpirun(mpi, 2, ["train"] + common + ["--out", full])
        chk.ok(p.returncode == 0, "uninterrupted 2-rank run", p.stderr)
        p = mpirun(mpi, 2, ["train"] + common + ["--steps", 5, "--save-every", 2, "--out", part])
        chk.ok(p.returncode == 0 and os.path.isdir(os.path.join(part, "checkpoint-2")), "2-rank run with checkpoints",
               p.stderr)
        shutil.rmtree(os.path.join(part, "checkpoint-4"), ignore_errors=True)
        os.remove(os.path.join(part, "adapter_model.safetensors"))
        p = mpirun(mpi, 2, ["train"] + common + ["--out", part, "--resume", os.path.join(part, "checkpoint-2")])
        chk.ok(p.returncode == 0 and "resuming" in p.stderr, "resumed from checkpoint-2 on 2 ranks", p.stderr)
        chk.ok(U.read_bytes(os.path.join(full, "adapter_model.safetensors")) ==
               U.read_bytes(os.path.join(part, "adapter_model.safetensors")),
               "resumed adapter is byte-identical to the uninterrupted one")
        p = mpirun(mpi, 3, ["train"] + common + ["--out", part, "--resume", os.path.join(part, "checkpoint-2")])
        chk.ok(p.returncode != 0 and "world_size" in p.stderr, "resuming with another P is refused naming world_size",
               p.stderr[-600:])
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print("kept", tmp)
    return chk.finish()


if __name__ == "__main__":
    sys.exit(main())
