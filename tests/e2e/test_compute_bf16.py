#!/usr/bin/python3
"""--compute fp32|bf16 on train and generate, end to end on a tiny model.

    /usr/bin/python3 tests/e2e/test_compute_bf16.py --tspeft build/tspeft

On every CPU:
  (a) `--compute bf16` with TSPEFT_BF16DOT=0 (as on a CPU without AVX512-BF16): exactly one line says the
      run computes in fp32, training continues, train_summary.json records "compute": "fp32", and the
      adapter and the progress lines are those of a --compute fp32 run, byte for byte; generate prints the
      same ids as with fp32;
  (b) a --config file may give "compute";
  (c) --compute fp32 is recorded as "compute": "fp32".
Where the CPU has AVX512-BF16 (else skipped, saying so):
  (d) `train --compute bf16` says the frozen products ran in BF16, records "compute": "bf16", its losses
      stay within 1e-2 relative of the fp32 run's step by step, and its gate keeps within 5 points;
  (e) `generate --compute bf16` runs and prints as many ids as asked.
Exit 0 when every check passed, 1 otherwise.
"""
import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_util as U  # noqa: E402

NOTE = "no AVX512-BF16"


def bf16_cpu():
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((l.split(":", 1)[1].split() for l in f if l.startswith("flags")), [])
    except OSError:
        return False
    return all(x in flags for x in ("avx512f", "avx512bw", "avx512_bf16")) and os.environ.get("TSPEFT_BF16DOT") != "0"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tspeft", required=True)
    a = ap.parse_args()
    chk = U.Checks("test_compute_bf16")
    with tempfile.TemporaryDirectory() as tmp:
        model, data = os.path.join(tmp, "model"), os.path.join(tmp, "data.jsonl")
        U.tiny_model(model, seed=11)
        U.pattern_data(data, n_rows=16, seed=5)

        def train(name, extra, env=None):
            out = os.path.join(tmp, name)
            p = U.run(a.tspeft, ["train", "--model", model, "--data", data, "--steps", 6, "--batch-size", 2,
                                 "--lr", 3e-3, "--target-modules", ",".join(U.ALL7), "--threads", 2, "--seed", 1,
                                 "--out", out] + extra, env=env)
            summary = None
            if p.returncode == 0:
                with open(os.path.join(out, "train_summary.json")) as f:
                    summary = json.load(f)
            return p, out, summary

        def adapter_bytes(out):
            return U.read_bytes(os.path.join(out, "adapter_model.safetensors"))

        def gen(extra, env=None):
            return U.run(a.tspeft, ["generate", "--model", model, "--ids", "5,6,7", "--max-new-tokens", 6] + extra,
                         env=env)

        pf, of, sf = train("fp32", ["--compute", "fp32"])
        chk.ok(pf.returncode == 0 and sf and sf.get("compute") == "fp32",
               "(c) --compute fp32 trains and records compute fp32", pf.stderr)
        pn, on, sn = train("fallback", ["--compute", "bf16"], env={"TSPEFT_BF16DOT": "0"})
        notes = [l for l in pn.stderr.splitlines() if NOTE in l]
        chk.ok(pn.returncode == 0 and len(notes) == 1 and notes[0].startswith("note: --compute bf16"),
               "(a) without AVX512-BF16: one line says so, training continues", pn.stderr)
        if pf.returncode == 0 and pn.returncode == 0:
            chk.ok(sn.get("compute") == "fp32" and adapter_bytes(on) == adapter_bytes(of) and
                   U.progress(pn.stderr) == U.progress(pf.stderr),
                   "(a) ... records compute fp32, and the adapter and losses are the fp32 run's exactly")
        gf = gen(["--compute", "fp32"])
        gn = gen(["--compute", "bf16"], env={"TSPEFT_BF16DOT": "0"})
        chk.ok(gf.returncode == 0 and gn.returncode == 0 and gn.stdout == gf.stdout and
               sum(NOTE in l for l in gn.stderr.splitlines()) == 1,
               "(a) generate without AVX512-BF16: one note, the fp32 ids", gn.stderr)
        cfg = os.path.join(tmp, "config.json")
        with open(cfg, "w") as f:
            json.dump({"compute": "bf16"}, f)
        pc, _, sc = train("config", ["--config", cfg], env={"TSPEFT_BF16DOT": "0"})
        chk.ok(pc.returncode == 0 and sum(NOTE in l for l in pc.stderr.splitlines()) == 1 and sc["compute"] == "fp32",
               "(b) --config gives compute (bf16 requested, fp32 here by TSPEFT_BF16DOT=0)", pc.stderr)

        if not bf16_cpu():
            print("skipped (d), (e): this CPU has no AVX512-BF16 (or TSPEFT_BF16DOT=0)")
        else:
            pb, ob, sb = train("bf16", ["--compute", "bf16"])
            chk.ok(pb.returncode == 0 and sb and sb.get("compute") == "bf16" and
                   "frozen products in BF16" in pb.stderr and NOTE not in pb.stderr,
                   "(d) --compute bf16 trains in BF16 and records compute bf16", pb.stderr)
            if pb.returncode == 0 and pf.returncode == 0:
                lb, lf = U.progress(pb.stderr), U.progress(pf.stderr)
                worst = max(abs(x["loss"] - y["loss"]) / abs(y["loss"]) for x, y in zip(lb, lf))
                dkeep = max(abs(x["keep"] - y["keep"]) for x, y in zip(lb, lf))
                chk.ok(len(lb) == len(lf) == 6 and worst <= 1e-2 and dkeep <= 0.05,
                       "(d) losses within 1e-2 of fp32 at every step (worst %.1e), keeps within 0.05 (%.3f)" %
                       (worst, dkeep))
            gb = gen(["--compute", "bf16"])
            chk.ok(gb.returncode == 0 and len(gb.stdout.split()) == 6,
                   "(e) generate --compute bf16 prints 6 ids (%s)" % gb.stdout.strip(), gb.stderr)
    return chk.finish()


if __name__ == "__main__":
    sys.exit(main())
