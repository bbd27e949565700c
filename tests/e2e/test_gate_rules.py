#!/usr/bin/python3
"""The study rules and controls of the token gate, end to end on a tiny random LLaMA.

    /usr/bin/python3 tests/e2e/test_gate_rules.py --tspeft build/tspeft [--keep]

(a) --gate random --keep P: over a run's token decisions (gates.jsonl) the kept share is P within
    sampling error, tau never moves, ts_peft says rule "random" and keep P; the same seed repeats
    the decisions exactly, another seed does not; the saved adapter reloads and trains; `info` names it.
(b) --ts-tau-scope layer: at every step the modules of one layer log the same tau; the layers'
    thresholds move and differ; ts_peft says tau_scope "layer".
(c) --ts-rule importance, scaled and energy: the thresholds move after the warm-up, the rule is saved and
    reloaded (a reload's ts_peft names it again).
(d) --ts-straight-through: with every token gated off (tau0 above every r, frozen by the warm-up)
    lora_B stays exactly zero without it (no token trains the branch) and moves with it.
(e) examples/gate_rc.py on a one-step dump of a trained adapter: one row per module with the rank
    correlation it prints equal to numpy's on the dump's ts_r and ts_c.
Exit status 0 when every check passed, 1 otherwise (2: bad usage).
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_util as U  # noqa: E402  (puts tests/parity on sys.path)

import numpy as np  # noqa: E402

import st  # noqa: E402


def gates_log(out):
    with open(os.path.join(out, "gates.jsonl")) as f:
        lines = [json.loads(x) for x in f if x.strip()]
    return lines[0], lines[1:]


def ts_peft(out):
    with open(os.path.join(out, "adapter_config.json")) as f:
        return json.load(f).get("ts_peft") or {}


def train(tspeft, model, data, out, extra, steps=20):
    args = ["train", "--model", model, "--data", data, "--steps", steps, "--batch-size", 4, "--lr", 3e-3,
            "--target-modules", "all", "--r", 4, "--threads", 1, "--quiet", "--out", out] + list(extra)
    return U.run(tspeft, args, timeout=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tspeft", required=True)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = ap.parse_args()
    chk = U.Checks("test_gate_rules")
    tmp = tempfile.mkdtemp(prefix="tspeft_gate_rules_")
    try:
        model, data = os.path.join(tmp, "model"), os.path.join(tmp, "data.jsonl")
        U.tiny_model(model)
        U.pattern_data(data, n_rows=32)
        T = a.tspeft

        # (a) the random control
        runs = {}
        for name, seed in (("r1", 5), ("r1b", 5), ("r2", 6)):
            out = os.path.join(tmp, name)
            p = train(T, model, data, out, ["--gate", "random", "--keep", "0.3", "--seed", seed])
            chk.ok(p.returncode == 0, "(a) --gate random --keep 0.3 (seed %d) trains" % seed, p.stderr)
            runs[name] = gates_log(out) if p.returncode == 0 else None
        if runs["r1"]:
            head, steps = runs["r1"]
            kept = sum(sum(sum(k) for k in s["kept"]) for s in steps)
            seen = sum(sum(s["n"]) for s in steps) * len(head["modules"])
            share = kept / seen
            sd = math.sqrt(0.3 * 0.7 / seen)
            chk.ok(abs(share - 0.3) < 5 * sd, "(a) kept share %.4f of %d decisions is 0.3 within 5 sd (%.4f)"
                   % (share, seen, 5 * sd))
            chk.ok(all(t == 0 for s in steps for t in s["tau"]), "(a) tau stays 0 under the random gate")
            g = ts_peft(os.path.join(tmp, "r1"))
            chk.ok(g.get("rule") == "random" and abs(g.get("keep", 0) - 0.3) < 1e-6,
                   "(a) ts_peft: rule random, keep 0.3 (%s)" % g)
            per_module = [sum(sum(s["kept"][m]) for s in steps) / (seen / len(head["modules"]))
                          for m in range(len(head["modules"]))]
            chk.ok(min(per_module) > 0.15 and max(per_module) < 0.45,
                   "(a) every module keeps about 0.3 (%.3f..%.3f)" % (min(per_module), max(per_module)))
        if runs["r1"] and runs["r1b"] and runs["r2"]:
            k1 = [s["kept"] for s in runs["r1"][1]]
            chk.ok(k1 == [s["kept"] for s in runs["r1b"][1]], "(a) the same seed repeats every decision count")
            chk.ok(k1 != [s["kept"] for s in runs["r2"][1]], "(a) another seed draws other decisions")
            out = os.path.join(tmp, "r1_reload")
            p = U.run(T, ["train", "--model", model, "--data", data, "--adapter", os.path.join(tmp, "r1"), "--steps",
                          3, "--batch-size", 4, "--lr", 1e-3, "--threads", 1, "--quiet", "--out", out])
            chk.ok(p.returncode == 0 and ts_peft(out).get("rule") == "random",
                   "(a) the random adapter reloads, trains and stays random", p.stderr)
            p = U.run(T, ["info", "--model", model, "--adapter", os.path.join(tmp, "r1")])
            chk.ok(p.returncode == 0 and "gate random (keep 0.3)" in p.stdout,
                   "(a) tspeft info names the random gate and its keep", p.stdout + p.stderr)

        # (b) one threshold per layer
        out = os.path.join(tmp, "layer")
        p = train(T, model, data, out, ["--ts-tau-scope", "layer", "--ts-lambda", "0.5", "--ts-warmup-steps", 5],
                  steps=30)
        if chk.ok(p.returncode == 0, "(b) --ts-tau-scope layer trains", p.stderr):
            head, steps = gates_log(out)
            layer_of = [int(m.split(".")[2]) for m in head["modules"]]
            same = all(len({s["tau"][m] for m in range(len(layer_of)) if layer_of[m] == L}) == 1
                       for s in steps for L in set(layer_of))
            chk.ok(same, "(b) the modules of a layer log one tau at every step")
            last = steps[-1]["tau"]
            chk.ok(any(t > 0 for t in last), "(b) the layer thresholds moved (%s)" % sorted(set(last)))
            chk.ok(ts_peft(out).get("tau_scope") == "layer", "(b) ts_peft: tau_scope layer")
            ref = os.path.join(tmp, "module")
            p = train(T, model, data, ref, ["--ts-lambda", "0.5", "--ts-warmup-steps", 5], steps=30)
            if chk.ok(p.returncode == 0, "(b) the same run with a threshold per module trains", p.stderr):
                _, steps_m = gates_log(ref)
                chk.ok(len(set(steps_m[-1]["tau"])) > len(set(last)),
                       "(b) per module: more distinct thresholds (%d) than per layer (%d)"
                       % (len(set(steps_m[-1]["tau"])), len(set(last))))

        # (c) the importance and scaled rules
        for rule, lam in (("importance", "1"), ("scaled", "0.5"), ("energy", "1")):
            out = os.path.join(tmp, rule)
            p = train(T, model, data, out, ["--ts-rule", rule, "--ts-lambda", lam, "--ts-warmup-steps", 5], steps=30)
            if chk.ok(p.returncode == 0, "(c) --ts-rule %s trains" % rule, p.stderr):
                head, steps = gates_log(out)
                chk.ok(all(t == 0 for s in steps[:5] for t in s["tau"]), "(c) %s: tau frozen during the warm-up" % rule)
                chk.ok(any(t > 0 for s in steps[5:] for t in s["tau"]), "(c) %s: tau moves after it" % rule)
                chk.ok(ts_peft(out).get("rule") == rule and head.get("rule") == rule,
                       "(c) %s: named in ts_peft and in the gate log" % rule)
                out2 = out + "_reload"
                p = U.run(T, ["train", "--model", model, "--data", data, "--adapter", out, "--steps", 2, "--batch-size",
                              4, "--lr", 1e-3, "--threads", 1, "--quiet", "--out", out2])
                chk.ok(p.returncode == 0 and ts_peft(out2).get("rule") == rule,
                       "(c) %s: a reload keeps the rule" % rule, p.stderr)

        # (d) straight-through
        b_abs = {}
        for st_on in ("off", "on"):
            out = os.path.join(tmp, "st_" + st_on)
            p = train(T, model, data, out, ["--ts-tau0", "1e9", "--ts-warmup-steps", 1000,
                                            "--ts-straight-through", st_on], steps=8)
            if chk.ok(p.returncode == 0, "(d) every token gated off, straight-through %s, trains" % st_on, p.stderr):
                t = st.load(os.path.join(out, "adapter_model.safetensors"))
                b_abs[st_on] = max(float(np.abs(v).max()) for k, v in t.items() if k.endswith("lora_B.weight"))
                _, steps = gates_log(out)
                chk.ok(all(sum(map(sum, s["kept"])) == 0 for s in steps),
                       "(d) straight-through %s: no token's update applied in the forward" % st_on)
        if len(b_abs) == 2:
            chk.ok(b_abs["off"] == 0.0, "(d) without straight-through lora_B stays exactly 0 (max |B| %g)" % b_abs["off"])
            chk.ok(b_abs["on"] > 1e-4, "(d) with it lora_B learns from the gated-off tokens (max |B| %g)" % b_abs["on"])
            chk.ok(ts_peft(os.path.join(tmp, "st_on")).get("straight_through") is True,
                   "(d) ts_peft: straight_through true")

        # (e) the r-versus-c analysis of a dump
        trained = os.path.join(tmp, "importance")
        dump = os.path.join(tmp, "dump")
        p = U.run(T, ["train", "--model", model, "--data", data, "--adapter", trained, "--steps", 1, "--batch-size", 8,
                      "--lr", 0, "--threads", 1, "--quiet", "--dump", dump])
        if chk.ok(p.returncode == 0, "(e) one-step dump of the importance run", p.stderr):
            script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "gate_rc.py")
            q = subprocess.run([sys.executable, script, os.path.join(dump, "step1.safetensors")],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
            rows = [x.split() for x in q.stdout.splitlines() if x.startswith("model.layers.")]
            chk.ok(q.returncode == 0 and len(rows) == 14, "(e) gate_rc.py: a row per module (%d)" % len(rows), q.stderr)
            if rows:
                t = st.load(os.path.join(dump, "step1.safetensors"))
                name = U.PEFT + rows[0][0]
                r, c = t[name + ".ts_r"].astype(np.float64), np.abs(t[name + ".ts_c"].astype(np.float64))
                rr, rc = np.argsort(np.argsort(r, kind="stable")), np.argsort(np.argsort(c, kind="stable"))
                want = float(np.corrcoef(rr, rc)[0, 1])
                chk.ok(abs(float(rows[0][2]) - want) < 0.006, "(e) gate_rc.py: rank correlation %s == %.3f" % (rows[0][2], want))
    finally:
        if a.keep:
            print("kept", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return chk.finish()


if __name__ == "__main__":
    sys.exit(main())
