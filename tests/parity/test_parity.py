#!/usr/bin/python3
"""Whole-step parity: the C program's gradient dump against the PyTorch reference.

    /usr/bin/python3 tests/parity/test_parity.py --tspeft build/tspeft            # everything
    /usr/bin/python3 tests/parity/test_parity.py --tspeft build/tspeft --case d_dora --keep
    /usr/bin/python3 tests/parity/test_parity.py --self-checks-only                 # no binary

For each case a fixture (model, adapter, JSONL) is built in a fresh temporary directory, the binary
runs `train --steps 1 --lr 0 --dump OUT`, and OUT/step1.safetensors is compared with reference.py.
Exit status 1 when any self-check or case fails (or the binary fails), 2 on bad usage.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import fixtures as FX  # noqa: E402
import reference as R  # noqa: E402
import selfchecks  # noqa: E402
import st  # noqa: E402

torch.set_num_threads(2)

TOL = {
    "loss": 1e-5,      # relative
    "logits": 1e-4,    # max abs err / max abs value, per micro-batch
    "grad": 1e-4,      # max abs err / max |ref|, per tensor
    "r": 1e-4,         # elementwise relative
    "c": 1e-3,         # max abs err / max |c|, per module
    "tau": 1e-4,       # relative, or absolute 1e-7
    "lambda": 1e-4,    # relative, or absolute 1e-7
}

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ts_cfg(**kw):
    d = {"rule": "prox", "lambda": 0.05, "eta_tau": 0.05, "tau0": 0.0, "target_keep": None,
         "eta_lambda": 0.05, "beta": 0.01, "warmup_steps": 0}
    d.update(kw)
    return d


CASES = [
    dict(name="a_lora_f32_gqa", seed=101, model=dict(dtype="F32", kv_heads=2),
         adapter=dict(kind="lora", targets=ALL7, ts=ts_cfg(**{"lambda": 0.05}))),
    # BF16 base weights and BF16 adapter tensors (thresholds stay F32)
    dict(name="b_lora_bf16", seed=202, model=dict(dtype="BF16", kv_heads=2),
         adapter=dict(kind="lora", targets=ALL7, dtype="BF16")),
    # the same with the base matrices kept BF16 in memory (--bf16-weights), tied embeddings and the
    # bottleneck adapter on top: conversion is exact, so the tolerances are unchanged
    dict(name="b2_bf16_resident_tied", seed=212, model=dict(dtype="BF16", kv_heads=2, tie=True),
         adapter=dict(kind="lora", targets=ALL7), args=["--bf16-weights"]),
    dict(name="b3_bf16_resident_bottleneck_save", seed=213, model=dict(dtype="BF16", kv_heads=1),
         adapter=dict(kind="bottleneck", targets=["up_proj", "down_proj"], act="relu",
                      modules_to_save=["model.norm.weight", "lm_head.weight"]), args=["--bf16-weights"]),
    # ts_peft with only "rule": every other field takes its documented default
    dict(name="c_tied_mha_defaults", seed=303, model=dict(kv_heads=4, tie=True),
         adapter=dict(kind="lora", targets=["q_proj", "v_proj", "o_proj", "down_proj"],
                      ts={"rule": "prox"})),
    dict(name="d_dora", seed=404,
         adapter=dict(kind="dora", targets=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])),
    dict(name="e_bottleneck_tanh", seed=505,
         adapter=dict(kind="bottleneck", targets=["up_proj", "down_proj"], act="tanh", scaling=0.7)),
    # 3 rows, B=2, K=2: micro-batch 0 = rows 0,1 (T=11), micro-batch 1 = rows 2,0 (T=9, wraps)
    dict(name="f_grad_accum2", seed=606, rows=[6, 11, 9], batch_size=2, grad_accum=2,
         adapter=dict(kind="lora", targets=ALL7)),
    # dual lambda: per-module initial ts_lambda for some modules (None: config lambda)
    dict(name="g_target_keep", seed=707,
         adapter=dict(kind="lora", targets=["q_proj", "v_proj", "gate_proj", "down_proj"],
                      ts=ts_cfg(target_keep=0.5, eta_lambda=0.2), ts_lambda=[None, 0.02, 0.0])),
    dict(name="h_rslora_layer1", seed=808,
         adapter=dict(kind="lora", targets=ALL7, rslora=True, alpha=4, layers=[1])),
    dict(name="i_sharded", seed=909, model=dict(shards=2),
         adapter=dict(kind="lora", targets=["q_proj", "k_proj", "o_proj", "up_proj"])),
    dict(name="j_modules_to_save_norm", seed=1010,
         adapter=dict(kind="lora", targets=["q_proj", "v_proj", "down_proj"],
                      modules_to_save=["model.norm.weight"])),
    # one common tau0 > 0 and no ts_tau tensors: tau.next == tau == tau0 under either reading
    dict(name="k_warmup_lambda0", seed=1111,
         adapter=dict(kind="lora", targets=["q_proj", "v_proj"], gate="common_tau0",
                      ts=ts_cfg(**{"lambda": 0.0, "warmup_steps": 1}))),
    # beyond the brief's list
    dict(name="l_surrogate", seed=1212,
         adapter=dict(kind="lora", targets=ALL7, ts=ts_cfg(rule="surrogate", beta=0.05))),
    dict(name="m_llama3_rope_headdim16_f16", seed=1313,
         model=dict(dtype="F16", head_dim=16,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
         adapter=dict(kind="lora", targets=["q_proj", "k_proj", "v_proj", "o_proj"])),
    # plain PEFT adapter (no ts_peft): ungated, so no gate entries in the dump
    dict(name="n_plain_peft_ungated", seed=1414, adapter=dict(kind="lora", targets=ALL7, ts=None)),
    dict(name="o_bottleneck_relu_mqa_layer0", seed=1515, model=dict(kv_heads=1),
         adapter=dict(kind="bottleneck", targets=["o_proj", "gate_proj", "down_proj"], act="relu",
                      scaling=1.0, layers=0)),
    # memory options (docs/performance.md): the tiled attention kernel over several query and key
    # blocks (64 x 256) with padding, and activation recomputation (exact, so the same tolerances)
    dict(name="p_tiled_attention_multiblock", seed=1616, rows=[70, 300, 129],
         model=dict(kv_heads=2, layers=3, max_pos=512), adapter=dict(kind="lora", targets=ALL7),
         args=["--attention", "tiled"]),
    dict(name="q_recompute_all_tiled_dora_accum", seed=1717, rows=[6, 11, 9], batch_size=2, grad_accum=2,
         model=dict(layers=3), adapter=dict(kind="dora", targets=["q_proj", "v_proj", "o_proj", "down_proj"]),
         args=["--recompute", "all", "--attention", "tiled"]),
    dict(name="r_recompute2_of3_bottleneck_full", seed=1818, model=dict(kv_heads=1, layers=3),
         adapter=dict(kind="bottleneck", targets=["k_proj", "gate_proj", "down_proj"], act="tanh"),
         args=["--recompute", "2", "--attention", "full"]),
]


def rel_err(got, ref, floor=1e-30):
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    if ref.size == 0:
        return 0.0
    den = max(float(np.max(np.abs(ref))), floor)
    return float(np.max(np.abs(got - ref))) / den


def scalar_ok(got, want, rel, abs_=1e-7):
    return abs(float(got) - float(want)) <= max(abs_, rel * abs(float(want)))


def expected_dtype(name):
    return "I64" if name.endswith(".keep") else "F32"


def compare(ref, res, exp, dump_path):
    """Returns (errors, stats) comparing the dump at dump_path with the expected dict."""
    errors = []
    stats = {"grad": 0.0, "logits": 0.0, "r": 0.0, "c": 0.0, "tau": 0.0, "lambda": 0.0, "loss": 0.0}
    raw, _ = st.read(dump_path)
    got = {k: v[1] for k, v in raw.items()}
    missing = sorted(set(exp) - set(got))
    extra = sorted(set(got) - set(exp))
    if missing:
        errors.append("missing from dump (%d): %s" % (len(missing), ", ".join(missing[:8])))
    if extra:
        errors.append("unexpected in dump (%d): %s" % (len(extra), ", ".join(extra[:8])))
    gated = set()
    for k in sorted(set(exp) & set(got)):
        dt = raw[k][0]
        if dt != expected_dtype(k):
            errors.append("%s: dtype %s, expected %s" % (k, dt, expected_dtype(k)))
            continue
        if tuple(got[k].shape) != tuple(exp[k].shape):
            errors.append("%s: shape %s, expected %s" % (k, list(got[k].shape), list(exp[k].shape)))
            continue
        g, e = got[k], exp[k]
        if not np.all(np.isfinite(g.astype(np.float64))):
            errors.append("%s: non-finite values" % k)
            continue
        if k == "loss":
            err = abs(float(g[0]) - float(e[0])) / abs(float(e[0]))
            stats["loss"] = err
            if err > TOL["loss"]:
                errors.append("loss %.9g vs reference %.9g (rel %.2g)" % (g[0], e[0], err))
        elif k.startswith("logits."):
            err = rel_err(g, e)
            stats["logits"] = max(stats["logits"], err)
            if err > TOL["logits"]:
                # where: real or pad positions
                mb = int(k.split(".")[1])
                _, _, msk = res["micro"][mb]
                diff = np.abs(g.astype(np.float64) - e).max(-1)
                at_pad = bool((diff[msk == 0] > TOL["logits"] * np.abs(e).max()).any()) if \
                    (msk == 0).any() else False
                at_real = bool((diff[msk == 1] > TOL["logits"] * np.abs(e).max()).any())
                errors.append("%s: rel err %.3g (mismatch at real positions: %s, at pads: %s)"
                              % (k, err, at_real, at_pad))
        elif k.endswith(".grad"):
            err = rel_err(g, e, floor=1e-12)
            stats["grad"] = max(stats["grad"], err)
            if err > TOL["grad"]:
                errors.append("%s: rel err %.3g (max |ref| %.3g)" % (k, err, np.abs(e).max()))
        elif k.endswith(".keep"):
            gated.add(k[:-len(".keep")])
            if int(g[0]) != int(e[0]):
                errors.append("%s: %d, reference %d" % (k, int(g[0]), int(e[0])))
        elif k.endswith(".ts_r"):
            den = np.maximum(np.abs(e), 1e-6 * max(np.abs(e).max(), 1e-30))
            err = float(np.max(np.abs(g - e) / den)) if e.size else 0.0
            stats["r"] = max(stats["r"], err)
            if err > TOL["r"]:
                errors.append("%s: rel err %.3g" % (k, err))
        elif k.endswith(".ts_c"):
            err = rel_err(g, e, floor=1e-12)
            stats["c"] = max(stats["c"], err)
            if err > TOL["c"]:
                errors.append("%s: err / max|c| %.3g" % (k, err))
    # thresholds and duals: accept the step computed from the reference's r, c or from the dump's own
    # r, c (so a near-tie of the prox objective cannot flip the verdict spuriously)
    for name, info in res["gate"].items():
        p = R.PEFT_PREFIX + name
        kt = p + ".ts_tau.next"
        if kt not in got or got[kt].shape != (1,):
            continue
        gt = float(got[kt][0])
        alt = None
        if p + ".ts_r" in got and p + ".ts_c" in got and got[p + ".ts_r"].shape == info["r"].shape \
                and got[p + ".ts_c"].shape == info["r"].shape:
            keep_c = int(got[p + ".keep"][0]) if p + ".keep" in got else info["keep"]
            alt = ref.update_tau(got[p + ".ts_r"].astype(np.float32),
                                 got[p + ".ts_c"].astype(np.float64), keep_c, info["N"],
                                 info["tau"], info["lambda"], 1)
        want = float(info["tau_next"])
        ok = scalar_ok(gt, want, TOL["tau"]) or (alt is not None and
                                                  scalar_ok(gt, alt["tau_next"], TOL["tau"]))
        stats["tau"] = max(stats["tau"], abs(gt - want) / max(abs(want), 1e-7))
        if not ok:
            errors.append("%s: %.9g, reference %.9g (from the dump's own r, c: %s; tau was %.9g)"
                          % (kt, gt, want, "n/a" if alt is None else "%.9g" % alt["tau_next"],
                             info["tau"]))
        kl = p + ".ts_lambda.next"
        if "lambda_next" in info and kl in got and got[kl].shape == (1,):
            gl = float(got[kl][0])
            want = float(info["lambda_next"])
            ok = scalar_ok(gl, want, TOL["lambda"]) or (alt is not None and
                                                         scalar_ok(gl, alt["lambda_next"], TOL["lambda"]))
            stats["lambda"] = max(stats["lambda"], abs(gl - want) / max(abs(want), 1e-7))
            if not ok:
                errors.append("%s: %.9g, reference %.9g" % (kl, gl, want))
    return errors, stats


def run_case(spec, tspeft, keep=False, timeout=120):
    t0 = time.time()
    root = tempfile.mkdtemp(prefix="tspeft_parity_%s_" % spec["name"])
    ok = False
    try:
        fx = FX.build_case(spec, root)
        out = os.path.join(root, "dump")
        prog = list(tspeft) if isinstance(tspeft, (list, tuple)) else [tspeft]
        cmd = prog + ["train", "--model", fx["model"], "--adapter", fx["adapter"], "--data", fx["data"],
                      "--steps", "1", "--batch-size", str(fx["batch_size"]), "--lr", "0",
                      "--grad-accum", str(fx["grad_accum"]), "--dump", out, "--threads", "2",
                      "--seed", "0"] + list(spec.get("args", []))
        env = dict(os.environ, OMP_NUM_THREADS="2")
        try:
            p = subprocess.run(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            print("FAIL %-30s binary timed out after %ds: %s" % (spec["name"], timeout, " ".join(cmd)))
            return False
        ref = R.Reference(fx["model"], fx["adapter"])
        micro = R.make_microbatches(R.load_rows(fx["data"]), fx["batch_size"], fx["grad_accum"])
        res = ref.step(micro)
        res["micro"] = micro
        exp = R.to_dump(res, ref.ad.gated)
        dump = os.path.join(out, "step1.safetensors")
        if p.returncode != 0 or not os.path.exists(dump):
            print("FAIL %-30s binary exit %d%s\n  cmd: %s\n  stderr:\n%s" % (
                spec["name"], p.returncode, "" if os.path.exists(dump) else ", no step1.safetensors",
                " ".join(cmd), _indent(p.stderr.decode("utf-8", "replace")[-4000:])))
            return False
        try:
            errors, s = compare(ref, res, exp, dump)
        except Exception as e:  # noqa: BLE001
            errors, s = ["cannot read the dump: %s: %s" % (type(e).__name__, e)], {}
        ng = sum(1 for k in exp if k.endswith(".grad"))
        gate = res["gate"]
        moved = sum(1 for g in gate.values() if g["tau_next"] != g["tau"])
        kept = sum(g["keep"] for g in gate.values())
        tot = sum(g["N"] for g in gate.values())
        line = ("loss %.1e logits %.1e grad %.1e (%d tensors)" % (s.get("loss", 0), s.get("logits", 0),
                                                                 s.get("grad", 0), ng))
        if ref.ad.gated:
            line += " | %d gates keep %d/%d r %.1e c %.1e tau %.1e (moved %d)" % (
                len(gate), kept, tot, s.get("r", 0), s.get("c", 0), s.get("tau", 0), moved)
            if ref.ad.ts["target_keep"] is not None:
                line += " lambda %.1e" % s.get("lambda", 0)
        else:
            line += " | ungated"
        if errors:
            print("FAIL %-30s %s [%.1fs]" % (spec["name"], line, time.time() - t0))
            for e in errors[:25]:
                print("     " + e)
            if len(errors) > 25:
                print("     ... %d more" % (len(errors) - 25))
            if p.stderr:
                print("  binary stderr (tail):\n" + _indent(p.stderr.decode("utf-8", "replace")[-2000:]))
            return False
        ok = True
        print("ok   %-30s %s [%.1fs]" % (spec["name"], line, time.time() - t0))
        return True
    except Exception as e:  # noqa: BLE001
        import traceback
        print("FAIL %-30s %s: %s" % (spec["name"], type(e).__name__, e))
        traceback.print_exc()
        return False
    finally:
        if keep or not ok:
            print("     files kept in %s" % root)
        else:
            shutil.rmtree(root, ignore_errors=True)
        sys.stdout.flush()


def check_harness(tmp):
    """The comparator flags each kind of defect, and a run of fake_tspeft.py (the reference in fp64)
    passes end to end while a failing binary fails."""
    import contextlib
    import io
    spec = next(c for c in CASES if c["name"].startswith("g_"))
    fx = FX.build_case(spec, os.path.join(tmp, "fx"))
    ref = R.Reference(fx["model"], fx["adapter"])
    micro = R.make_microbatches(R.load_rows(fx["data"]), fx["batch_size"], fx["grad_accum"])
    res = ref.step(micro)
    res["micro"] = micro
    exp = R.to_dump(res)
    path = os.path.join(tmp, "step1.safetensors")

    def first(suffix):
        return sorted(k for k in exp if k.endswith(suffix))[0]

    def errors_of(mutate):
        d = {k: v.copy() for k, v in exp.items()}
        mutate(d)
        st.save(path, {k: v if isinstance(v, tuple) or v.dtype == np.int64 else v.astype(np.float32)
                       for k, v in d.items()})
        return compare(ref, res, exp, path)[0]

    assert errors_of(lambda d: None) == [], errors_of(lambda d: None)

    def scale(key_suffix, f):
        def m(d):
            k = first(key_suffix)
            d[k] = f(d[k])
        return m

    def pad_logit(d):
        _, _, msk = micro[0]
        b, t = np.argwhere(msk == 0)[0]
        d["logits.0"][b, t, 0] += 0.01 * np.abs(d["logits.0"]).max()

    mutations = {
        "loss": scale("loss", lambda v: v * (1 + 1e-4)),
        "logit at a pad": pad_logit,
        "grad": scale(".grad", lambda v: v * (1 + 1e-3)),
        "missing grad": lambda d: d.pop(first(".grad")),
        "extra key": lambda d: d.__setitem__("base_model.model.lm_head.weight.grad",
                                             np.zeros(3, np.float32)),
        "keep": scale(".keep", lambda v: v + 1),
        "keep dtype": scale(".keep", lambda v: ("F32", v.astype(np.float32))),
        "r": scale(".ts_r", lambda v: v * (1 + 1e-3)),
        "c": scale(".ts_c", lambda v: v + 3e-3 * np.abs(v).max()),
        "tau": scale(".ts_tau.next", lambda v: v * (1 + 1e-3) + 1e-6),
        "tau shape": scale(".ts_tau.next", lambda v: v.reshape(())),
        "lambda": scale(".ts_lambda.next", lambda v: v + 1e-3),
        "NaN grad": scale(".grad", lambda v: v * np.nan),
    }
    for what, m in mutations.items():
        assert errors_of(m), "comparator missed: " + what
    fake = [sys.executable, os.path.join(HERE, "fake_tspeft.py")]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ok = run_case(spec, fake)
    assert ok, "fake binary run failed:\n" + buf.getvalue()
    old = os.environ.get("FAKE_TSPEFT_MUTATE")
    os.environ["FAKE_TSPEFT_MUTATE"] = "exit"
    try:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            ok = run_case(spec, fake)
        assert not ok and "failing on purpose" in buf.getvalue(), buf.getvalue()
        for line in buf.getvalue().splitlines():
            if "files kept in" in line:
                shutil.rmtree(line.split("files kept in")[1].strip(), ignore_errors=True)
    finally:
        if old is None:
            del os.environ["FAKE_TSPEFT_MUTATE"]
        else:
            os.environ["FAKE_TSPEFT_MUTATE"] = old
    return "%d injected dump defects caught; fake binary passes, failing binary fails" % len(mutations)


selfchecks.CHECKS.append(("parity_harness", check_harness))


def _indent(s):
    return "\n".join("    " + line for line in s.rstrip().splitlines())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tspeft", help="path of the tspeft binary")
    ap.add_argument("--case", action="append", help="run only this case (repeatable; prefix match)")
    ap.add_argument("--list", action="store_true", help="list the cases and self-checks")
    ap.add_argument("--keep", action="store_true", help="keep each case's temporary directory")
    ap.add_argument("--self-checks-only", action="store_true", help="reference self-checks only")
    ap.add_argument("--no-self-checks", action="store_true", help="skip the reference self-checks")
    args = ap.parse_args()
    if args.list:
        for c in CASES:
            print("case", c["name"])
        for n, _ in selfchecks.CHECKS:
            print("self-check", n)
        return 0
    if not args.self_checks_only and not args.tspeft:
        print("error: --tspeft PATH is required (or --self-checks-only)")
        return 2
    cases = CASES
    if args.case:
        cases = [c for c in CASES if any(c["name"].startswith(x) for x in args.case)]
        if not cases:
            print("error: no case matches %s" % args.case)
            return 2
    t0 = time.time()
    failed = 0
    if not args.no_self_checks and not args.case:
        failed += selfchecks.run_all()
    if not args.self_checks_only:
        tspeft = os.path.abspath(args.tspeft)
        if not (os.path.isfile(tspeft) and os.access(tspeft, os.X_OK)):
            print("FAIL: tspeft binary not found or not executable: %s" % tspeft)
            return 1
        for c in cases:
            if not run_case(c, tspeft, keep=args.keep):
                failed += 1
    print("%s: %d failure(s) [%.1fs]" % ("FAILED" if failed else "passed", failed, time.time() - t0))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
