#!/usr/bin/python3
"""Data-parallel scaling on this machine: the same training (global batch fixed) as one process and
as P = 2 MPI ranks, one thread per rank, side by side in one run (docs/distributed.md).

    /usr/bin/python3 examples/bench_mpi.py [--build build] [--hidden 384 --layers 6 --seq 256 --steps 6]

Prints tokens/s for P = 1 (1 thread), P = 2 (1 thread each) and, for reference, 1 process with 2
threads; the scaling efficiency tok/s(P=2) / (2 tok/s(P=1)); and the bytes rank 0 sent per optimizer
step (gradient all-reduce + gate statistics), beside the trainable parameter count.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
           OMPI_MCA_rmaps_base_oversubscribe="1")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(os.path.dirname(HERE), "build"))
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer step (all ranks)")
    a = ap.parse_args()
    tspeft, mpi = os.path.join(a.build, "tspeft"), os.path.join(a.build, "tspeft-mpi")
    if not os.path.exists(mpi):
        sys.exit("bench_mpi: %s not found (configure with -DTSPEFT_MPI=ON; `make build` does)" % mpi)
    tmp = tempfile.mkdtemp(prefix="tk_bench_mpi_")
    model, data = os.path.join(tmp, "model"), os.path.join(tmp, "data.jsonl")
    subprocess.run([sys.executable, os.path.join(HERE, "make_random_llama.py"), model, "--hidden", str(a.hidden),
                    "--layers", str(a.layers), "--heads", str(a.hidden // 64), "--kv-heads", str(a.hidden // 64),
                    "--intermediate", str(a.hidden * 8 // 3), "--vocab", "32000", "--max-pos", str(a.seq)],
                   check=True, stdout=subprocess.DEVNULL)
    with open(data, "w") as f:
        for i in range(64):
            ids = [(17 + 31 * i + 7 * t) % 31990 + 3 for t in range(a.seq)]
            f.write(json.dumps({"input_ids": ids, "labels": ids}) + "\n")
    common = ["train", "--model", model, "--data", data, "--steps", str(a.steps), "--batch-size", "1",
              "--lr", "1e-4", "--target-modules", "all", "--log-every", "1000"]

    def run(cmd, label):
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        if p.returncode:
            sys.exit("bench_mpi: %s failed:\n%s" % (label, p.stderr[-2000:]))
        # steady state: the per-step times after the first (warm-up) step
        times = [float(x) for x in re.findall(r"  step ([0-9.]+)s  eta", p.stderr)]
        sent = re.search(r"rank 0 sent (\d+) bytes per optimizer step \((\d+) trainable", p.stderr)
        return times, sent

    tok_per_step = a.accum * a.seq
    rows = []
    t1, _ = run([tspeft] + common + ["--grad-accum", str(a.accum), "--threads", "1", "--log-every", "1"], "P=1")
    t2, sent = run(["mpirun", "-np", "2", mpi] + common + ["--grad-accum", str(a.accum // 2), "--threads", "1",
                                                          "--log-every", "1"], "P=2")
    tt, _ = run([tspeft] + common + ["--grad-accum", str(a.accum), "--threads", "2", "--log-every", "1"], "1x2")
    for label, t in (("P=1, 1 thread", t1), ("P=2, 1 thread each", t2), ("P=1, 2 threads", tt)):
        s = sorted(t[1:])[len(t[1:]) // 2] if len(t) > 1 else t[0]
        rows.append((label, s, tok_per_step / s))
    print("model: hidden %d, %d layers, vocab 32000, seq %d; LoRA r 16 on all 7 projections, TS gate on" %
          (a.hidden, a.layers, a.seq))
    print("global batch: %d micro-batches of 1 x %d tokens per optimizer step; median step time after warm-up\n" %
          (a.accum, a.seq))
    print("%-22s %10s %10s" % ("run", "step s", "tok/s"))
    for label, s, tps in rows:
        print("%-22s %10.3f %10.0f" % (label, s, tps))
    eff = rows[1][2] / (2 * rows[0][2])
    print("\nscaling efficiency P=2 vs P=1: %.2f" % eff)
    if sent:
        print("bytes sent by rank 0 per optimizer step: %s (%s trainable fp32 values = %d bytes of gradient)" %
              (sent.group(1), sent.group(2), 4 * int(sent.group(2))))


if __name__ == "__main__":
    main()
