#!/usr/bin/python3
"""End-to-end training, reload and generation of tspeft on a tiny random LLaMA.

    /usr/bin/python3 tests/e2e/test_train_e2e.py --tspeft build/tspeft [--keep]

(a) a real 60-step run of a NEW gated LoRA adapter (all 7 projections) on a learnable counting
    dataset: the loss falls (train_summary.json and the progress lines agree), the output is a PEFT
    directory with exactly the expected keys, shapes and dtypes, ts_tau tensors and "ts_peft".
(b) reload identity: `train --adapter OUT --steps 1 --lr 0 --dump` reproduces the summary's
    final_loss_step1_batches bit for bit (as float32).
(c) the same for DoRA, the bottleneck Adapter (shorter runs) and --gate off (dense LoRA: no ts_peft,
    no ts_tau, and the reloaded adapter is ungated).
(d) `generate` (KV cache, gate applied) equals a greedy decode of the PyTorch reference that reruns
    the full sequence every step; with and without --adapter.
(e) --lr-scheduler cosine/linear --warmup-steps, --grad-accum 2 (== one batch of the union, and a
    training run), --shuffle, --config FILE (command line overrides it), --train-tensors
    model.norm.weight, --adapter-type none --train-tensors (dense baseline).
(f) two identical runs (same --seed and --threads) write byte-identical adapters; another seed
    does not.
Exit status 0 when every check passed, 1 otherwise (2: bad usage).
"""
import argparse
import json
import math
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_util as U  # noqa: E402  (puts tests/parity on sys.path)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import reference as R  # noqa: E402
import st  # noqa: E402

# One thread for the runs and the reference: libgomp spin-waits, so --threads 2 on a 2-core machine
# that is busy with anything else (ctest -j2) runs ~70x slower. (f) also checks --threads 2.
torch.set_num_threads(1)

THREADS = 1
BATCH = 4
SEED = 42


class Ctx:
    def __init__(self, tspeft, tmp, chk):
        self.tspeft = tspeft
        self.tmp = tmp
        self.chk = chk
        self.model = os.path.join(tmp, "model")
        self.data = os.path.join(tmp, "data.jsonl")

    def path(self, *p):
        return os.path.join(self.tmp, *p)

    def train(self, extra, data=None):
        args = ["train", "--model", self.model, "--data", data or self.data, "--threads", THREADS]
        return U.run(self.tspeft, args + list(extra))


def shapes_of(mcfg, name):
    C, F = mcfg["hidden_size"], mcfg["intermediate_size"]
    D = C // mcfg["num_attention_heads"]
    HD, GD = mcfg["num_attention_heads"] * D, mcfg["num_key_value_heads"] * D
    short = name.split(".")[-1]
    return {"q_proj": (HD, C), "k_proj": (GD, C), "v_proj": (GD, C), "o_proj": (C, HD),
            "gate_proj": (F, C), "up_proj": (F, C), "down_proj": (C, F)}[short]   # (out, in)


def expected_tensors(mcfg, kind, r, gated, targets=U.ALL7, save=()):
    """PEFT key -> shape of everything a saved adapter must hold (and nothing else)."""
    exp = {}
    for name in U.module_names(mcfg["num_hidden_layers"]):
        if name.split(".")[-1] not in targets:
            continue
        out, inp = shapes_of(mcfg, name)
        p = U.PEFT + name
        if kind in ("lora", "dora"):
            exp[p + ".lora_A.weight"] = (r, inp)
            exp[p + ".lora_B.weight"] = (out, r)
            if kind == "dora":
                exp[p + ".lora_magnitude_vector"] = (out,)
        else:
            exp[p + ".adapter_down.weight"] = (r, inp)
            exp[p + ".adapter_up.weight"] = (out, r)
        if gated:
            exp[p + ".ts_tau"] = (1,)
    for t in save:
        exp[U.PEFT + t] = tuple(mcfg["_base_shapes"][t])
    return exp


def load_summary(chk, out, what):
    path = os.path.join(out, "train_summary.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        chk.ok(False, "%s: %s parses" % (what, path), e)
        return None


def check_run_output(cx, p, out, what, steps, kind, r, gated, targets=U.ALL7, save=(),
                     fall=None, mcfg=None):
    """Exit status, progress lines vs summary, loss fall (fall = max last/first ratio), the
    adapter files. Returns the summary dict (or None)."""
    chk = cx.chk
    if not chk.ok(p.returncode == 0, "%s: train exits 0" % what, p.stderr):
        return None
    s = load_summary(chk, out, what)
    if s is None:
        return None
    prog = U.progress(p.stderr)
    chk.ok([x["step"] for x in prog] == list(range(1, steps + 1)) and
           all(x["steps"] == steps for x in prog),
           "%s: one progress line per step 1..%d" % (what, steps), p.stderr)
    chk.ok(s.get("steps") == steps, "%s: summary steps == %d" % (what, steps), s.get("steps"))
    f, l, fin = s.get("first_step_loss"), s.get("last_step_loss"), s.get("final_loss_step1_batches")
    ok_num = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (f, l, fin))
    if not chk.ok(ok_num, "%s: summary has finite first/last/final losses" % what, s):
        return None
    if prog:
        # progress prints "%.4f" of the same double
        chk.ok(abs(prog[0]["loss"] - f) <= 5.001e-5 and abs(prog[-1]["loss"] - l) <= 5.001e-5,
               "%s: progress loss of step 1 / step %d (%.4f / %.4f) == summary (%.6f / %.6f)"
               % (what, steps, prog[0]["loss"], prog[-1]["loss"], f, l))
    if fall is not None:
        tail = [x["loss"] for x in prog[-5:]] or [l]
        chk.ok(l <= fall * f and np.mean(tail) <= fall * f and fin <= fall * f,
               "%s: loss falls: first %.4f -> last %.4f (mean of last 5 %.4f, final on step-1 rows "
               "%.4f), each <= %.2f x first" % (what, f, l, float(np.mean(tail)), fin, fall))
    hdr = [ln for ln in p.stderr.splitlines() if ln.startswith("tspeft train: ") and "adapter (" in ln]
    chk.ok(len(hdr) == 1 and (("TS-gated" in hdr[0]) == gated),
           "%s: header line says %s" % (what, "TS-gated" if gated else "dense"), p.stderr)

    cfg_path = os.path.join(out, "adapter_config.json")
    st_path = os.path.join(out, "adapter_model.safetensors")
    if not chk.ok(os.path.isfile(cfg_path) and os.path.isfile(st_path),
                  "%s: adapter_config.json and adapter_model.safetensors exist" % what):
        return s
    with open(cfg_path) as fh:
        cfg = json.load(fh)
    tens, _ = st.read(st_path)
    exp = expected_tensors(mcfg, kind, r, gated, targets, save)
    got = {k: tuple(v[1].shape) for k, v in tens.items()}
    missing = sorted(set(exp) - set(got))
    extra = sorted(set(got) - set(exp))
    chk.ok(not missing and not extra,
           "%s: adapter keys == the %d expected PEFT keys (e.g. %s)" % (what, len(exp), sorted(exp)[0]),
           "missing %s\nunexpected %s" % (missing[:8], extra[:8]))
    bad = [k for k in exp if k in got and (got[k] != exp[k] or tens[k][0] != "F32")]
    chk.ok(not bad, "%s: every tensor F32 with its PEFT shape" % what,
           ["%s %s %s want %s" % (k, tens[k][0], got[k], exp[k]) for k in bad[:8]])
    nonfinite = [k for k, v in tens.items() if not np.all(np.isfinite(v[1]))]
    chk.ok(not nonfinite, "%s: every saved value finite" % what, nonfinite[:8])

    want_type = "BOTTLENECK" if kind == "bottleneck" else "LORA"
    chk.ok(cfg.get("peft_type") == want_type and cfg.get("task_type") == "CAUSAL_LM",
           "%s: adapter_config peft_type %s, task_type CAUSAL_LM" % (what, want_type), cfg)
    if kind != "none":
        chk.ok(set(cfg.get("target_modules") or []) == set(targets),
               "%s: adapter_config target_modules == %s" % (what, ",".join(targets)),
               cfg.get("target_modules"))
    if kind in ("lora", "dora"):
        chk.ok(cfg.get("r") == r and cfg.get("use_dora") is (kind == "dora"),
               "%s: adapter_config r %d, use_dora %s" % (what, r, kind == "dora"), cfg)
    elif kind == "bottleneck":
        chk.ok(cfg.get("bottleneck_size") == r and cfg.get("use_parallel_adapter") is True,
               "%s: adapter_config bottleneck_size %d, use_parallel_adapter true" % (what, r), cfg)
    chk.ok((cfg.get("modules_to_save") or []) == list(save),
           "%s: adapter_config modules_to_save == %s" % (what, list(save)), cfg.get("modules_to_save"))
    ts = cfg.get("ts_peft")
    if gated:
        chk.ok(isinstance(ts, dict) and ts.get("rule") == "prox" and
               abs(ts.get("lambda", -1) - 0.05) < 1e-6 and abs(ts.get("eta_tau", -1) - 0.05) < 1e-6
               and ts.get("tau0") == 0 and ts.get("target_keep") is None,
               "%s: \"ts_peft\" object with the default rule/lambda/eta_tau/tau0" % what, ts)
        taus = {k[len(U.PEFT):-len(".ts_tau")]: float(v[1].reshape(-1)[0])
                for k, v in tens.items() if k.endswith(".ts_tau")}
        chk.ok(all(t >= 0 for t in taus.values()) and any(t > 0 for t in taus.values()),
               "%s: ts_tau all >= 0 and the gate learned (max tau %.4g)"
               % (what, max(taus.values()) if taus else float("nan")), taus)
        gates = {g["module"]: g["tau"] for g in s.get("gates", [])}
        chk.ok(set(gates) == set(taus) and
               all(np.float32(gates[k]) == np.float32(taus[k]) for k in taus),
               "%s: summary gates[].tau == the saved ts_tau (float32-exact)" % what, gates)
    else:
        chk.ok("ts_peft" not in cfg and not s.get("gates"),
               "%s: no \"ts_peft\" in adapter_config.json, no gates in the summary" % what, cfg)
    return s


def reload_identity(cx, out, summary, what, extra_args, gated):
    """Reloading OUT and running one --lr 0 step over the same rows must reproduce the summary's
    final_loss_step1_batches.

    Why exact: the summary value is the double sum of the per-token losses of step 1's micro-batches
    under the final parameters divided by the target count, printed by cJSON with up to 17
    significant digits (a double round-trips). The reload recomputes that same double from the same
    float32 parameters (adapter tensors and ts_tau are saved as F32, i.e. the in-memory values), the
    same rows in the same micro-batches and the same --threads (same BLAS/OpenMP partitioning), and
    the dump stores (float) of it. So float32(summary) must equal the dump's loss bit for bit; any
    tolerance would hide e.g. a tau, magnitude vector or a train/eval forward difference that only
    moves the loss by a few ulps."""
    chk = cx.chk
    dump = cx.path("dump_" + what.replace(" ", "_").replace("/", "_"))
    p = cx.train(["--adapter", out, "--steps", 1, "--lr", 0, "--dump", dump] + list(extra_args))
    if not chk.ok(p.returncode == 0, "%s: reload + 1 step --lr 0 --dump exits 0" % what, p.stderr):
        return
    d = st.load(os.path.join(dump, "step1.safetensors"))
    want = np.float32(summary["final_loss_step1_batches"])
    got = np.float32(d["loss"].reshape(-1)[0])
    chk.ok(got.tobytes() == want.tobytes(),
           "%s: reloaded dump loss %r == float32(final_loss_step1_batches %r) bit for bit"
           % (what, float(got), summary["final_loss_step1_batches"]))
    keeps = [k for k in d if k.endswith(".keep")]
    chk.ok(bool(keeps) == gated, "%s: reloaded adapter is %s (%d gate entries in the dump)"
           % (what, "gated" if gated else "ungated", len(keeps)))


# ------------------------------------------------------------------------------------------------
# (d) generation against the reference

def ref_greedy_check(cx, ref, prompt, c_tokens, what):
    """Teacher-forced along the C tokens: at every step the reference (full-sequence forward, no
    cache) must put its argmax on the C token. The weakest top-2 logit gap and gate margin
    |r - tau| / tau are checked too, so that an ambiguous fixture is reported instead of passing or
    failing by rounding (fp32 C vs torch differ by ~1e-6 relative). Returns the number of gated-off
    (module, position) pairs of the final sequence."""
    seq = list(prompt)
    worst_gap, worst_gate, offs, mism = np.inf, np.inf, 0, []
    for i, tok in enumerate(c_tokens):
        rows = [{"input_ids": seq, "labels": seq, "attention_mask": [1] * len(seq)}]
        res = ref.step([R.pad_rows(rows)], backward=False)
        lg = res["logits"][0][0, -1].numpy().astype(np.float64)
        best = int(np.argmax(lg))
        srt = np.sort(lg)
        worst_gap = min(worst_gap, float(srt[-1] - srt[-2]))
        if best != tok:
            mism.append("step %d: C %d (logit %.6f), reference %d (logit %.6f)"
                        % (i, tok, lg[tok], best, lg[best]))
        if ref.ad.gated:
            for name, recs in res["recs"].items():
                tau = float(ref.ad.tau[name])
                if tau > 0:
                    r = recs[0]["r"].numpy().astype(np.float64)
                    worst_gate = min(worst_gate, float(np.min(np.abs(r - tau))) / tau)
                    if i == len(c_tokens) - 1:
                        offs += int((r < tau).sum())
        seq.append(tok)
    chk = cx.chk
    chk.ok(worst_gap > 1e-3 and (not ref.ad.gated or worst_gate > 1e-5),
           "%s: fixture unambiguous (min top-2 logit gap %.3g > 1e-3, min |r - tau|/tau %.3g > 1e-5)"
           % (what, worst_gap, worst_gate))
    chk.ok(not mism, "%s: C tokens %s == reference greedy decode" % (what, c_tokens), "\n".join(mism))
    return offs


def generate(cx, ids, adapter=None, n=8):
    args = ["generate", "--model", cx.model, "--ids", ",".join(map(str, ids)),
            "--max-new-tokens", n, "--threads", THREADS]
    if adapter:
        args += ["--adapter", adapter]
    p = U.run(cx.tspeft, args)
    toks = None
    if p.returncode == 0:
        try:
            toks = [int(x) for x in p.stdout.split()]
        except ValueError:
            toks = None
    return p, toks


def test_generation(cx, out_a, rows):
    chk = cx.chk
    cx.chk.section("(d) generate == PyTorch reference greedy decode")
    ref = R.Reference(cx.model, out_a)
    chk.ok(ref.ad.gated, "(d) the reference loads the trained adapter as gated")
    ungated_differs = False
    for prompt in ([1, 2, 3], [51, 52, 53]):
        p, toks = generate(cx, prompt, out_a)
        if not chk.ok(toks is not None and len(toks) == 8,
                      "(d) generate --adapter --ids %s --max-new-tokens 8 prints 8 ids"
                      % ",".join(map(str, prompt)), p.stderr + p.stdout):
            continue
        offs = ref_greedy_check(cx, ref, prompt, toks, "(d) adapter, ids %s" % prompt)
        chk.ok(offs > 0, "(d) ids %s: the gate switches %d (module, token) updates off" % (prompt, offs))
        ref.ad.gated = False                 # what a decoder ignoring the gate would produce
        res = ref.step([R.pad_rows([{"input_ids": prompt + toks, "labels": prompt + toks,
                                     "attention_mask": [1] * (len(prompt) + len(toks))}])],
                       backward=False)
        ref.ad.gated = True
        am = res["logits"][0][0].argmax(-1).numpy()[len(prompt) - 1:-1].tolist()
        ungated_differs |= am != toks
    chk.ok(ungated_differs, "(d) an ungated decode would differ (so the gate in inference is tested)")

    # a prompt taken from a training row: the trained adapter continues the counting pattern
    right = total = 0
    starts = set()
    for row in rows:
        ids = row["input_ids"]
        if ids[0] in starts or len(starts) == 4:
            continue
        starts.add(ids[0])
        p, toks = generate(cx, ids[:4], out_a)
        if toks is None:
            chk.ok(False, "(d) generate from a training prefix", p.stderr)
            continue
        want = ids[4:12]
        total += len(want)
        right += sum(int(a == b) for a, b in zip(toks, want))
        ref_greedy_check(cx, ref, ids[:4], toks, "(d) training prefix %s" % ids[:4])
    chk.ok(total > 0 and right >= 0.75 * total,
           "(d) the trained adapter continues training rows: %d of %d tokens right" % (right, total))

    # without --adapter: a reference with an empty (no target) adapter is the plain model
    empty = cx.path("empty_adapter")
    os.makedirs(empty, exist_ok=True)
    with open(os.path.join(empty, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": []}, f)
    st.save(os.path.join(empty, "adapter_model.safetensors"), {}, metadata={"format": "pt"})
    ref0 = R.Reference(cx.model, empty)
    for prompt in ([1, 2, 3], [7, 100, 5, 9, 64]):
        p, toks = generate(cx, prompt, None)
        if chk.ok(toks is not None and len(toks) == 8,
                  "(d) generate without --adapter --ids %s prints 8 ids" % prompt, p.stderr):
            ref_greedy_check(cx, ref0, prompt, toks, "(d) base model, ids %s" % prompt)
    # --eos stops after the eos id (the base decode of 1,2,3 is known now)
    p, base = generate(cx, [1, 2, 3], None)
    if base:
        eos = base[2]
        first = base.index(eos)
        p2 = U.run(cx.tspeft, ["generate", "--model", cx.model, "--ids", "1,2,3", "--max-new-tokens", 8,
                               "--eos", eos, "--threads", THREADS])
        chk.ok(p2.returncode == 0 and p2.stdout.split() == [str(t) for t in base[:first + 1]],
               "(d) --eos %d stops right after it: %s" % (eos, p2.stdout.strip()), p2.stderr)


# ------------------------------------------------------------------------------------------------

def lr_factor(kind, step, warm, total):
    """transformers' LambdaLR multiplier (optim.c mirrors it); step is 0-based."""
    if step < warm:
        return step / max(1, warm)
    if kind == "linear":
        return max(0.0, (total - step) / max(1, total - warm))
    progress = (step - warm) / max(1, total - warm)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tspeft", required=True, help="path to the tspeft binary")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = ap.parse_args()
    if not os.access(a.tspeft, os.X_OK):
        print("test_train_e2e: %s is not an executable" % a.tspeft)
        return 1
    tspeft = os.path.abspath(a.tspeft)
    chk = U.Checks("test_train_e2e")
    tmp = tempfile.mkdtemp(prefix="tspeft_e2e_")
    cx = Ctx(tspeft, tmp, chk)
    try:
        run_all(cx)
    except Exception:
        import traceback
        traceback.print_exc()
        chk.ok(False, "the test itself raised")
    rc = chk.finish()
    if a.keep or rc:
        print("files kept in %s" % tmp)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return rc


def run_all(cx):
    chk = cx.chk
    mcfg = U.tiny_model(cx.model, seed=7)
    mcfg["_base_shapes"] = {k: v.shape for k, v in st.load(os.path.join(cx.model, "model.safetensors")).items()}
    rows = U.pattern_data(cx.data, n_rows=16, seed=3)
    new_lora = ["--adapter-type", "lora", "--r", 8, "--alpha", 16, "--target-modules", "all"]
    common = ["--batch-size", BATCH, "--seed", SEED]

    # (a) + (b) ---------------------------------------------------------------------------------
    chk.section("(a) 60-step gated LoRA run on the counting data")
    out_a = cx.path("out_lora")
    p = cx.train(new_lora + common + ["--steps", 60, "--lr", 3e-3, "--out", out_a])
    s = check_run_output(cx, p, out_a, "(a) lora", 60, "lora", 8, True, fall=0.25, mcfg=mcfg)
    if s:
        chk.ok(s.get("trainable_parameters") == 16384,
               "(a) trainable_parameters == 16384 (r 8 x (in + out) over 14 modules)",
               s.get("trainable_parameters"))
        chk.section("(b) reload identity")
        reload_identity(cx, out_a, s, "(b) lora", common, True)

    # (c) ---------------------------------------------------------------------------------------
    chk.section("(c) DoRA, bottleneck, --gate off")
    out_d = cx.path("out_dora")
    p = cx.train(["--adapter-type", "dora", "--r", 4, "--alpha", 8, "--target-modules",
                  "q_proj,v_proj,up_proj,down_proj"] + common + ["--steps", 30, "--lr", 1e-2, "--out", out_d])
    s = check_run_output(cx, p, out_d, "(c) dora", 30, "dora", 4, True,
                         targets=["q_proj", "v_proj", "up_proj", "down_proj"], fall=0.4, mcfg=mcfg)
    if s:
        reload_identity(cx, out_d, s, "(c) dora", common, True)
    out_b = cx.path("out_bottleneck")
    p = cx.train(["--adapter-type", "bottleneck", "--r", 8, "--target-modules", "all",
                  "--bottleneck-act", "relu", "--bottleneck-scaling", 0.5] + common +
                 ["--steps", 30, "--lr", 1e-2, "--out", out_b])
    s = check_run_output(cx, p, out_b, "(c) bottleneck", 30, "bottleneck", 8, True, fall=0.4, mcfg=mcfg)
    if s:
        with open(os.path.join(out_b, "adapter_config.json")) as f:
            bc = json.load(f)
        chk.ok(bc.get("non_linearity") == "relu" and abs(bc.get("scaling", 0) - 0.5) < 1e-7,
               "(c) bottleneck: non_linearity relu, scaling 0.5 saved", bc)
        reload_identity(cx, out_b, s, "(c) bottleneck", common, True)
    out_g = cx.path("out_gate_off")
    p = cx.train(new_lora + ["--gate", "off"] + common + ["--steps", 30, "--lr", 3e-3, "--out", out_g])
    s = check_run_output(cx, p, out_g, "(c) lora --gate off", 30, "lora", 8, False, fall=0.5, mcfg=mcfg)
    if s:
        reload_identity(cx, out_g, s, "(c) lora --gate off", common, False)

    # (d) ---------------------------------------------------------------------------------------
    if os.path.isfile(os.path.join(out_a, "adapter_model.safetensors")):
        test_generation(cx, out_a, rows)

    # (e) ---------------------------------------------------------------------------------------
    chk.section("(e) schedules")
    for kind, steps in (("cosine", 20), ("linear", 12)):
        out = cx.path("out_" + kind)
        p = cx.train(new_lora + common + ["--steps", steps, "--lr", 3e-3, "--lr-scheduler", kind,
                                          "--warmup-steps", 5, "--out", out])
        s = check_run_output(cx, p, out, "(e) %s" % kind, steps, "lora", 8, True, mcfg=mcfg)
        if s:
            prog = U.progress(p.stderr)
            bad = []
            for x in prog:
                want = 3e-3 * lr_factor(kind, x["step"] - 1, 5, steps)
                if abs(x["lr"] - want) > 0.0051 * want + 1e-12:    # printed with 3 digits
                    bad.append("step %d: lr %.3g want %.4g" % (x["step"], x["lr"], want))
            chk.ok(not bad and len(prog) == steps,
                   "(e) %s: printed lr follows warm-up 5 then %s decay (step 1 lr 0, peak at step 6)"
                   % (kind, kind), "\n".join(bad))
            chk.ok(s.get("lr_scheduler") == kind and s.get("warmup_steps") == 5,
                   "(e) %s: summary lr_scheduler / warmup_steps" % kind, s)
            reload_identity(cx, out, s, "(e) %s" % kind, common, True)

    chk.section("(e) --grad-accum 2")
    d1, d2 = cx.path("dump_b4k1"), cx.path("dump_b2k2")
    p1 = cx.train(new_lora + ["--seed", SEED, "--steps", 1, "--lr", 0, "--batch-size", 4, "--dump", d1])
    p2 = cx.train(new_lora + ["--seed", SEED, "--steps", 1, "--lr", 0, "--batch-size", 2,
                              "--grad-accum", 2, "--dump", d2])
    if chk.ok(p1.returncode == 0 and p2.returncode == 0, "(e) B=4 K=1 and B=2 K=2 dumps written",
              p1.stderr + p2.stderr):
        x1 = st.load(os.path.join(d1, "step1.safetensors"))
        x2 = st.load(os.path.join(d2, "step1.safetensors"))
        l1, l2 = float(x1["loss"][0]), float(x2["loss"][0])
        chk.ok(abs(l1 - l2) <= 1e-6 * abs(l1), "(e) loss of 2 micro-batches == loss of their union "
               "(%.8f vs %.8f, rel 1e-6)" % (l1, l2))
        grads = [k for k in x1 if k.endswith(".grad")]
        worst = max(float(np.max(np.abs(x1[k] - x2[k]))) / max(float(np.max(np.abs(x1[k]))), 1e-30)
                    for k in grads)
        chk.ok(set(k for k in x2 if k.endswith(".grad")) == set(grads) and worst <= 1e-5,
               "(e) %d gradients equal (max rel err %.2g <= 1e-5)" % (len(grads), worst))
        keeps = [k for k in x1 if k.endswith(".keep")]
        chk.ok(keeps and all(int(x1[k][0]) == int(x2[k][0]) for k in keeps) and
               all(x1[k.replace(".keep", ".ts_tau.next")][0] == x2[k.replace(".keep", ".ts_tau.next")][0]
                   for k in keeps),
               "(e) keep counts and new thresholds equal")
        chk.ok(x2["logits.0"].shape[0] == 2 and "logits.1" in x2 and "logits.1" not in x1,
               "(e) the K=2 dump holds logits.0 and logits.1 of 2 rows each")
    out = cx.path("out_accum")
    ga = ["--batch-size", 2, "--grad-accum", 2, "--seed", SEED]
    p = cx.train(new_lora + ga + ["--steps", 40, "--lr", 3e-3, "--out", out])
    s = check_run_output(cx, p, out, "(e) grad-accum 2", 40, "lora", 8, True, fall=0.5, mcfg=mcfg)
    if s:
        chk.ok(s.get("grad_accum") == 2 and s.get("batch_size") == 2,
               "(e) summary grad_accum 2, batch_size 2", s)
        reload_identity(cx, out, s, "(e) grad-accum 2", ga, True)

    chk.section("(e) --shuffle")
    out = cx.path("out_shuffle")
    p = cx.train(new_lora + common + ["--shuffle", "--steps", 40, "--lr", 3e-3, "--out", out])
    s = check_run_output(cx, p, out, "(e) shuffle", 40, "lora", 8, True, fall=0.5, mcfg=mcfg)
    if s:
        reload_identity(cx, out, s, "(e) shuffle", common + ["--shuffle"], True)
        sa = load_summary(chk, out_a, "(a)")
        if sa:
            chk.ok(sa["first_step_loss"] != s["first_step_loss"],
                   "(e) --shuffle changes step 1's rows (first loss %.6f vs file order %.6f)"
                   % (s["first_step_loss"], sa["first_step_loss"]))
        p2 = cx.train(new_lora + common + ["--shuffle", "--steps", 40, "--lr", 3e-3,
                                           "--out", out + "_again"])
        chk.ok(p2.returncode == 0 and
               U.read_bytes(os.path.join(out, "adapter_model.safetensors")) ==
               U.read_bytes(os.path.join(out + "_again", "adapter_model.safetensors")),
               "(e) --shuffle runs with the same seed are byte-identical", p2.stderr)

    chk.section("(e) --config FILE")
    conf = cx.path("opts.json")
    with open(conf, "w") as f:
        json.dump({"_comment": "defaults for the e2e test", "steps": 9, "lr": 0.002, "batch-size": 2,
                   "target-modules": "q_proj,v_proj", "r": 4, "lr-scheduler": "linear",
                   "gate": False, "seed": 5}, f)
    out = cx.path("out_config")
    p = cx.train(["--config", conf, "--steps", 6, "--r", 2, "--out", out])
    s = check_run_output(cx, p, out, "(e) config", 6, "lora", 2, False, targets=["q_proj", "v_proj"],
                         mcfg=mcfg)
    if s:
        chk.ok(s.get("batch_size") == 2 and abs(s.get("lr", 0) - 0.002) < 1e-9 and
               s.get("lr_scheduler") == "linear" and s.get("seed") == 5,
               "(e) config: batch-size, lr, lr-scheduler, seed taken from the file; --steps 6 and "
               "--r 2 from the command line", s)
    out2 = cx.path("out_config_gate")
    p = cx.train(["--config", conf, "--gate", "on", "--out", out2])
    s = check_run_output(cx, p, out2, "(e) config + --gate on", 9, "lora", 4, True,
                         targets=["q_proj", "v_proj"], mcfg=mcfg)

    chk.section("(e) --train-tensors")
    out = cx.path("out_norm")
    p = cx.train(["--adapter-type", "lora", "--target-modules", "q_proj,v_proj",
                  "--train-tensors", "model.norm.weight"] + common +
                 ["--steps", 30, "--lr", 1e-2, "--out", out])
    s = check_run_output(cx, p, out, "(e) train-tensors norm", 30, "lora", 8, True,
                         targets=["q_proj", "v_proj"], save=("model.norm.weight",), fall=0.5, mcfg=mcfg)
    if s:
        base = st.load(os.path.join(cx.model, "model.safetensors"))["model.norm.weight"]
        got = st.load(os.path.join(out, "adapter_model.safetensors"))[U.PEFT + "model.norm.weight"]
        chk.ok(float(np.max(np.abs(got - base))) > 1e-3,
               "(e) base_model.model.model.norm.weight was trained (max change %.3g)"
               % float(np.max(np.abs(got - base))))
        reload_identity(cx, out, s, "(e) train-tensors norm", common, True)
    out = cx.path("out_none")
    save = ("model.norm.weight", "lm_head.weight")
    p = cx.train(["--adapter-type", "none", "--train-tensors", ",".join(save)] + common +
                 ["--steps", 30, "--lr", 3e-3, "--out", out])
    s = check_run_output(cx, p, out, "(e) adapter-type none", 30, "none", 8, False, targets=[],
                         save=save, fall=0.7, mcfg=mcfg)
    if s:
        chk.ok(s.get("trainable_parameters") == 64 + 128 * 64,
               "(e) none: only norm + lm_head trainable (8256)", s.get("trainable_parameters"))
        reload_identity(cx, out, s, "(e) adapter-type none", common, False)

    # (f) ---------------------------------------------------------------------------------------
    chk.section("(f) reproducibility")
    out_f = cx.path("out_lora_again")
    p = cx.train(new_lora + common + ["--steps", 60, "--lr", 3e-3, "--out", out_f])
    if chk.ok(p.returncode == 0, "(f) second identical run exits 0", p.stderr):
        for fn in ("adapter_model.safetensors", "adapter_config.json"):
            chk.ok(U.read_bytes(os.path.join(out_a, fn)) == U.read_bytes(os.path.join(out_f, fn)),
                   "(f) same --seed %d --threads %d: %s byte-identical" % (SEED, THREADS, fn))
    two = ["--threads", 2, "--steps", 4]      # (cx.train passes --threads 1 first; the last wins)
    o1, o2 = cx.path("out_t2_a"), cx.path("out_t2_b")
    p1 = cx.train(new_lora + common + two + ["--lr", 3e-3, "--out", o1])
    p2 = cx.train(new_lora + common + two + ["--lr", 3e-3, "--out", o2])
    s1 = load_summary(chk, o1, "(f) threads 2") if p1.returncode == 0 else None
    chk.ok(p1.returncode == 0 and p2.returncode == 0 and s1 and s1.get("threads") == 2 and
           U.read_bytes(os.path.join(o1, "adapter_model.safetensors")) ==
           U.read_bytes(os.path.join(o2, "adapter_model.safetensors")),
           "(f) same --seed --threads 2 (4 steps): adapter_model.safetensors byte-identical",
           p1.stderr + p2.stderr)
    out_s = cx.path("out_lora_seed")
    p = cx.train(new_lora + ["--batch-size", BATCH, "--seed", SEED + 1, "--steps", 60, "--lr", 3e-3,
                             "--out", out_s])
    chk.ok(p.returncode == 0 and
           U.read_bytes(os.path.join(out_a, "adapter_model.safetensors")) !=
           U.read_bytes(os.path.join(out_s, "adapter_model.safetensors")),
           "(f) another --seed gives a different adapter (the comparison can fail)", p.stderr)


if __name__ == "__main__":
    sys.exit(main())
