#!/usr/bin/python3
"""A pre-declared, resumable study of token-gate rules against controls, over seeds, on the demo's
toy LLaVA pipeline (examples/demo.sh): per (method, seed) one stage-2 training run, evaluation on the
image and text sets of one split, and paired bootstrap confidence intervals. Protocol: docs/gate-study.md.

    /usr/bin/python3 examples/gate_study.py --tspeft build/tspeft --out runs/study \\
        [--seeds 5] [--steps 800] [--images 3000] [--methods lora,ts,random,module-off] \\
        [--method NAME="FLAGS" ...] [--ts-flags "--ts-lambda 0.2 --ts-warmup-steps 50"] \\
        [--split val|test] [--threads 2] [--quick] [--check] [--fresh]

Methods (a name plus `tspeft train` flags):
  lora        --gate off (dense LoRA: the baseline every difference is paired against)
  ts          --gate on plus --ts-flags
  random      --gate random --keep P, P = 1 - discarded_fraction_run of the ts run of the same seed
  module-off  dense LoRA on the modules the ts run of the same seed kept: modules ranked by their keep
              over the ts run's last logged steps, the lowest switched off until the switched-off share
              of modules is >= the ts run's discarded fraction (--target-modules @FILE)
  adalora     --gate off, AdaLoRA at LoRA's final budget: --init-r 24 --target-r 16, tinit/tfinal/deltaT
              10%/20%/1.25% of the steps (not in the default list; docs/adalora.md)
  ts-adalora  the same with --gate on plus --ts-flags (TS-AdaLoRA)
  --method NAME="FLAGS" adds a method (repeatable), e.g. --method ts-imp="--gate on --ts-rule importance".
Every method whose flags hold "--gate on" is a gated method: the four readings are given for each
(random and module-off are matched to the ts run; --controls-for names another method).

Output (OUT = --out):
  OUT/prep/                          demo.sh stages 1-6 (data, tokenizer, shards, base, stage-1 projector)
  OUT/runs/<method>/seed<k>/         the training run (train/), its gates.json, run.json; split-independent
  OUT/cells/<split>/<method>/seed<k>/cell.json   one finished (or failed) cell: metrics, per-example
                                     correctness, keep, selectivity, seconds; existing cells are reused
  OUT/<split>/study.md, study.json   the tables, paired differences with 95% CIs, the readings
--quick: 2 seeds, 30 steps, 600 images, lora/ts/random/module-off, short preparation and evaluation on
the first 100 examples: checks the plumbing, not the methods. --check: after the run, validate the
outputs (every row present, every number finite, no failed cell); exit 1 otherwise.
"""
import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS = ("image", "text")
BUILTIN = ("lora", "ts", "random", "module-off", "adalora", "ts-adalora")
DEFAULT_METHODS = ("lora", "ts", "random", "module-off")
DEFAULT_TS_FLAGS = "--ts-lambda 0.2 --ts-warmup-steps 50"
QUICK_TS_FLAGS = "--ts-lambda 0.2 --ts-warmup-steps 10"  # 30 steps: the gate must move before the end
INTERIOR = (0.05, 0.95)  # a module is interior when its keep lies in this range (docs/gates.md)
BOOT_SEED = 20240601


class CellError(Exception):
    pass


def log(msg):
    print(msg, flush=True)


def last_line(text):
    lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
    return lines[-1] if lines else "(no output)"


def run_cmd(cmd, log_path, env=None):
    """Runs cmd with stdout+stderr into log_path; raises CellError with the output's last line."""
    with open(log_path, "w") as f:
        f.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        with open(log_path) as f:
            out = f.read()
        raise CellError("%s %s exited %d: %s" % (os.path.basename(cmd[0]), cmd[1], rc, last_line(out)))


def load_json(path):
    with open(path) as f:
        return json.load(f)


def no_nan(x):
    """JSON has no NaN: a non-finite float becomes null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: no_nan(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [no_nan(v) for v in x]
    return x


def write_json(path, obj):
    tmp = path + ".part"
    with open(tmp, "w") as f:
        json.dump(no_nan(obj), f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ---- configuration ------------------------------------------------------------------------------

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tspeft", default="build/tspeft", help="the tspeft binary")
    ap.add_argument("--out", default="runs/study", help="study directory (resumed when it exists)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds 1..N (default 5; --quick 2)")
    ap.add_argument("--steps", type=int, default=None, help="stage-2 steps per run (default 800; --quick 30)")
    ap.add_argument("--images", type=int, default=None, help="training images (default 3000; --quick 600)")
    ap.add_argument("--methods", nargs="+", default=None,
                    help="methods to run, comma or space separated (default lora,ts,random,module-off "
                         "and every --method)")
    ap.add_argument("--method", action="append", default=[], metavar='NAME="FLAGS"',
                    help="an extra method: a name and its tspeft train flags (repeatable)")
    ap.add_argument("--ts-flags", default=None, help='flags of the ts method besides --gate on (default "%s")'
                    % DEFAULT_TS_FLAGS)
    ap.add_argument("--controls-for", default="ts", help="the gated method random and module-off are matched to")
    ap.add_argument("--split", choices=("val", "test"), default="val",
                    help="val: choose settings here; test: the held-out sets, reported once")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bootstrap", type=int, default=2000, help="paired bootstrap resamples (default 2000)")
    ap.add_argument("--eval-limit", type=int, default=None,
                    help="evaluate only the first N examples per task (default 0: all; --quick 100)")
    ap.add_argument("--pretrain-steps", type=int, default=None, help="demo.sh stage 5 steps (default demo's)")
    ap.add_argument("--stage1-steps", type=int, default=None, help="demo.sh stage 6 steps (default demo's)")
    ap.add_argument("--tower-steps", type=int, default=None,
                    help="demo.sh stage 4's tower pretraining steps (default demo's; --quick 30)")
    ap.add_argument("--quick", action="store_true",
                    help="a plumbing check: defaults of 2 seeds, 30 steps, 600 images, 30 tower, 60 pretraining and "
                         "60 stage-1 steps, 100 examples per task, ts warm-up 10 steps (explicit options win)")
    ap.add_argument("--check", action="store_true",
                    help="after the run, validate the outputs; exit 1 on a missing row, a non-finite value or a failed cell")
    ap.add_argument("--fresh", action="store_true", help="delete --out first (nothing is reused)")
    a = ap.parse_args(argv)
    defaults = {"seeds": 5, "steps": 800, "images": 3000, "eval_limit": 0, "ts_flags": DEFAULT_TS_FLAGS}
    if a.quick:
        defaults.update(seeds=2, steps=30, images=600, eval_limit=100, ts_flags=QUICK_TS_FLAGS,
                        pretrain_steps=60, stage1_steps=60, tower_steps=30)
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.seeds < 1 or a.steps < 1 or a.images < 1 or a.threads < 1 or a.bootstrap < 100 or a.eval_limit < 0:
        ap.error("--seeds, --steps, --images, --threads must be >= 1, --eval-limit >= 0 and --bootstrap >= 100")
    extra = {}
    for m in a.method:
        name, eq, flags = m.partition("=")
        name = name.strip()
        if not eq or not name or "/" in name or name.startswith("."):
            ap.error('--method: expected NAME="FLAGS", got %r' % m)
        if name in BUILTIN:
            ap.error("--method %s: the built-in methods are %s" % (name, ", ".join(BUILTIN)))
        extra[name] = shlex.split(flags)
    if a.methods is None:
        names = list(DEFAULT_METHODS) + list(extra)
    else:
        names = [n for part in a.methods for n in part.split(",") if n]
    unknown = [n for n in names if n not in BUILTIN and n not in extra]
    if unknown:
        ap.error("--methods: unknown %s (built-in: %s; add others with --method NAME=\"FLAGS\")"
                 % (", ".join(unknown), ", ".join(BUILTIN)))
    if "lora" not in names:
        names.insert(0, "lora")  # every difference is paired against it
    names = list(dict.fromkeys(names))
    a.method_names = names
    a.extra = extra
    if ("random" in names or "module-off" in names) and a.controls_for not in names:
        ap.error("random and module-off are matched to --controls-for %s, which is not among the methods"
                 % a.controls_for)
    return a


def adalora_flags(a):
    """AdaLoRA at LoRA's final parameter budget (target_r 16 = the lora rows' r, init_r 1.5x as in the
    AdaLoRA paper), its schedule scaled to the run: tinit 10% of the steps, tfinal 20%, a masking every
    1.25% (docs/adalora.md)."""
    return ["--adapter-type", "adalora", "--init-r", "24", "--target-r", "16", "--tinit", str(a.steps // 10),
            "--tfinal", str(a.steps // 5), "--delta-t", str(max(1, a.steps // 80))]


def method_flags(name, a):
    """The method's own flags; None for the controls, whose flags depend on the paired gated run."""
    if name == "lora":
        return ["--gate", "off"]
    if name == "ts":
        return ["--gate", "on"] + shlex.split(a.ts_flags)
    if name == "adalora":
        return ["--gate", "off"] + adalora_flags(a)
    if name == "ts-adalora":
        return ["--gate", "on"] + shlex.split(a.ts_flags) + adalora_flags(a)
    if name in ("random", "module-off"):
        return None
    return list(a.extra[name])


def is_gated(name, a):
    f = method_flags(name, a)
    if f is None:
        return False
    return any(f[i] == "--gate" and i + 1 < len(f) and f[i + 1] == "on" for i in range(len(f))) or \
        "--gate=on" in f


# ---- preparation (demo.sh stages 1-6) -----------------------------------------------------------

def prepare(a, out):
    prep = os.path.join(out, "prep")
    want = {"images": a.images, "pretrain_steps": a.pretrain_steps, "stage1_steps": a.stage1_steps,
            "tower_steps": a.tower_steps}
    record = os.path.join(prep, "study_prep.json")
    if os.path.exists(os.path.join(prep, "stage1", "mm_projector.safetensors")):
        if os.path.exists(record):
            have = load_json(record)
            diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
            if diff:
                sys.exit("gate_study: %s was prepared with other settings (%s): use another --out" %
                         (prep, ", ".join("%s %s, now %s" % (k, h, w) for k, (h, w) in diff.items())))
        log("prep: reusing %s" % prep)
        return prep
    fmnist = os.environ.get("FMNIST_DIR", "/usr/share/datasets/fashion-mnist")
    missing = [p for p in (os.path.join(fmnist, "train-images-idx3-ubyte.gz"),) if not os.path.exists(p)]
    if shutil.which("spm_train") is None:
        missing.append("spm_train (Debian package sentencepiece)")
    if missing:  # 77: ctest's skip code (tests/CMakeLists.txt)
        log("gate_study: skipped: the preparation needs %s (make deps installs them)" % ", ".join(missing))
        sys.exit(77)
    env = dict(os.environ, DEMO_UNTIL="6", DEMO_IMAGES=str(a.images), THREADS=str(a.threads))
    for k, v in (("DEMO_PRETRAIN_STEPS", a.pretrain_steps), ("DEMO_STAGE1_STEPS", a.stage1_steps),
                 ("DEMO_TOWER_STEPS", a.tower_steps)):
        if v is not None:
            env[k] = str(v)
        else:
            env.pop(k, None)
    t0 = time.time()
    log("prep: examples/demo.sh stages 1-6 (%d images) into %s" % (a.images, prep))
    try:
        run_cmd([os.path.join(HERE, "demo.sh"), a.tspeft, prep], os.path.join(out, "prep.log"), env=env)
    except CellError as e:
        sys.exit("gate_study: preparation failed (%s); log: %s" % (e, os.path.join(out, "prep.log")))
    for split in ("train", "val", "test"):
        for task in TASKS:
            p = os.path.join(prep, "shards", "%s_%s.shard" % (task, split))
            if not os.path.exists(p):
                sys.exit("gate_study: preparation did not write %s (is examples/demo.sh current?)" % p)
    write_json(record, dict(want, seconds=round(time.time() - t0, 1)))
    log("prep: done in %.0f s" % (time.time() - t0))
    return prep


# ---- gate statistics ----------------------------------------------------------------------------

def gate_stats(g):
    """Keep, discarded share, interior share and kind spread from `tspeft gates --format json`."""
    d_run = g.get("discarded_fraction_run")
    d_win = g.get("discarded_fraction_window")
    mods = g.get("modules", [])
    keeps = [m.get("keep") for m in mods]
    sel = g.get("selectivity")
    if isinstance(sel, dict) and "interior_share" in sel:
        interior, interior_src = sel.get("interior_share"), "tspeft gates selectivity"
        spread = sel.get("kind_spread_mean")
    else:
        ok = [k for k in keeps if finite(k)]
        interior = (sum(1 for k in ok if INTERIOR[0] <= k <= INTERIOR[1]) / len(ok)) if ok else None
        interior_src = "computed from the modules' window keep"
        kinds = [k for k, v in g.get("kinds", {}).items() if v.get("tokens", 0) > 0]
        spreads = []
        for m in mods:
            vals = [m.get("keep_" + k) for k in kinds]
            vals = [v for v in vals if finite(v)]
            if len(vals) >= 1:
                spreads.append(max(vals) - min(vals))
        spread = sum(spreads) / len(spreads) if spreads else None
    return {"discarded_run": d_run, "discarded_window": d_win,
            "keep_run": (1.0 - d_run) if finite(d_run) else None,
            "interior_share": interior, "interior_source": interior_src, "kind_spread": spread,
            "kinds_keep": {k: v.get("keep") for k, v in g.get("kinds", {}).items() if v.get("tokens", 0) > 0},
            "modules": len(mods)}


def modules_to_keep(ts_gates):
    """module-off: the ts run's modules ranked by window keep; the lowest are switched off until the
    switched-off share of modules is >= the ts run's discarded fraction (over the run)."""
    mods = ts_gates["modules"]
    d = ts_gates["discarded_fraction_run"]
    if not finite(d):
        raise CellError("the paired ts run's gates have no discarded_fraction_run")
    M = len(mods)
    n_off = min(M, int(math.ceil(d * M - 1e-9)))
    order = sorted(range(M), key=lambda i: (mods[i]["keep"] if finite(mods[i]["keep"]) else 1.0, i))
    off = set(order[:n_off])
    kept = [mods[i]["module"] for i in range(M) if i not in off]
    return kept, [mods[i]["module"] for i in sorted(off)], n_off / M if M else 0.0, d


# ---- one cell -----------------------------------------------------------------------------------

def command_key(cmd, out):
    """cmd as compared on resuming: the binary's path and the study's place are left out (another build,
    a moved study directory: the same run)."""
    return [os.path.basename(c) if i == 0 else c.replace(out, "OUT") for i, c in enumerate(cmd)]


def reusable_run(rdir, tdir, key, prog):
    """rdir's run record when it finished with the same command key; else None, with an unfinished run's
    tdir removed and rdir made. A run trained with another command stops the study."""
    rec_path = os.path.join(rdir, "run.json")
    if os.path.exists(rec_path):
        rec = load_json(rec_path)
        if rec.get("command_key") == key:
            return rec
        sys.exit("%s: %s was trained with another command (settings changed?): use another --out or delete it\n"
                 "  was: %s\n  now: %s" % (prog, rdir, " ".join(rec.get("command_key", [])), " ".join(key)))
    if os.path.exists(tdir):
        shutil.rmtree(tdir)  # an unfinished run: start it again
    os.makedirs(rdir, exist_ok=True)
    return None


def save_gates_json(tspeft, tdir, rdir):
    """`tspeft gates TDIR --format json` into RDIR/gates.json (CellError when it fails)."""
    g = subprocess.run([tspeft, "gates", tdir, "--format", "json", "--plots", "off"], capture_output=True, text=True)
    if g.returncode != 0:
        raise CellError("tspeft gates exited %d: %s" % (g.returncode, last_line(g.stderr + g.stdout)))
    json.loads(g.stdout)
    with open(os.path.join(rdir, "gates.json"), "w") as f:
        f.write(g.stdout)


def train_run(a, prep, out, method, seed, flags, extra_record):
    """The stage-2 training run of (method, seed), reused when it finished with the same command."""
    rdir = os.path.join(out, "runs", method, "seed%d" % seed)
    tdir = os.path.join(rdir, "train")
    cmd = [a.tspeft, "train", "--model", os.path.join(prep, "base"), "--vision-tower", os.path.join(prep, "tower"),
           "--projector", os.path.join(prep, "stage1", "mm_projector.safetensors"), "--stage", "2",
           "--data", os.path.join(prep, "shards", "image_train.shard") + ":2",
           "--data", os.path.join(prep, "shards", "text_train.shard") + ":1"]
    if "--target-modules" not in flags:
        cmd += ["--target-modules", "all"]
    if "adalora" not in flags:  # AdaLoRA's rank is --init-r / --target-r
        cmd += ["--r", "16"]
    cmd += ["--alpha", "32"] + flags + [
        "--steps", str(a.steps), "--batch-size", "16", "--lr", "2e-3", "--lr-scheduler", "cosine",
        "--warmup-steps", "20", "--shuffle", "--seed", str(seed), "--max-seq-len", "128", "--out", tdir,
        "--log-every", "100", "--threads", str(a.threads)]
    key = command_key(cmd, out)
    rec = reusable_run(rdir, tdir, key, "gate_study")
    if rec is not None:
        return rdir, rec, True
    run_cmd(cmd, os.path.join(rdir, "train.log"))
    summ = load_json(os.path.join(tdir, "train_summary.json"))
    save_gates_json(a.tspeft, tdir, rdir)
    rec = dict(extra_record, method=method, seed=seed, command=cmd, command_key=key,
               train_seconds=summ.get("seconds"), tokens_per_second=summ.get("tokens_per_second"),
               last_step_loss=summ.get("last_step_loss"))
    write_json(os.path.join(rdir, "run.json"), rec)
    return rdir, rec, False


def evaluate(a, prep, rdir, cdir, task, split):
    data = os.path.join(prep, "shards", "%s_%s.shard" % (task, split))
    res = os.path.join(cdir, "eval_%s.json" % task)
    cmd = [a.tspeft, "eval", "--model", os.path.join(prep, "base"), "--adapter", os.path.join(rdir, "train"),
           "--tokenizer", os.path.join(prep, "tokenizer.model"), "--vision-tower", os.path.join(prep, "tower"),
           "--task", "vqa", "--data", data, "--max-new-tokens", "8", "--threads", str(a.threads), "--out", res]
    if a.eval_limit:
        cmd += ["--limit", str(a.eval_limit)]
    run_cmd(cmd, os.path.join(cdir, "eval_%s.log" % task))
    r = load_json(res)
    tasks = r.get("tasks", r.get("results", []))
    if len(tasks) != 1:
        raise CellError("%s: expected one task, found %d" % (res, len(tasks)))
    metrics = tasks[0].get("metrics", {})
    samples = []
    with open(os.path.join(cdir, "eval_%s.samples.jsonl" % task)) as f:
        for line in f:
            if line.strip():
                samples.append(json.loads(line))
    samples.sort(key=lambda s: s["record"])
    if [s["record"] for s in samples] != list(range(len(samples))) or len(samples) != tasks[0].get("n"):
        raise CellError("%s: the per-sample lines do not cover records 0..%s" % (res, tasks[0].get("n")))
    correct = [1 if s["mc_correct"] else 0 for s in samples]
    acc = metrics.get("vqa_mc_acc")
    if not finite(acc) or abs(acc - sum(correct) / max(1, len(correct))) > 1e-9:
        raise CellError("%s: vqa_mc_acc %s disagrees with the per-sample mc_correct" % (res, acc))
    return {"data": data, "n": len(samples), "mc_acc": acc, "em": metrics.get("vqa_em"),
            "seconds": tasks[0].get("seconds"), "correct": correct,
            "em_correct": [1 if s["em"] else 0 for s in samples], "gold": [s["gold"] for s in samples]}


def reusable_cell(cpath, want, prog):
    """The cell.json at cpath when it finished (status ok) with the settings in want, marked reused;
    None when it is absent or failed. A cell made with other settings stops the study."""
    if not os.path.exists(cpath):
        return None
    c = load_json(cpath)
    diff = [k for k, v in want.items() if c.get(k) != v]
    if diff:
        sys.exit("%s: %s was made with other settings (%s): use another --out or delete it"
                 % (prog, cpath, ", ".join("%s %r, now %r" % (k, c.get(k), want[k]) for k in diff)))
    if c.get("status") != "ok":
        return None
    c["reused"] = True
    return c


def run_cell(a, prep, out, method, seed, cells):
    """Trains (or reuses) and evaluates one cell; returns its cell.json object (status ok or failed)."""
    cdir = os.path.join(out, "cells", a.split, method, "seed%d" % seed)
    cpath = os.path.join(cdir, "cell.json")
    want = {"steps": a.steps, "images": a.images, "eval_limit": a.eval_limit}
    if method_flags(method, a) is not None:
        want["flags"] = method_flags(method, a)
    c = reusable_cell(cpath, want, "gate_study")
    if c is not None:
        return c
    os.makedirs(cdir, exist_ok=True)
    t0 = time.time()
    cell = {"method": method, "seed": seed, "split": a.split, "steps": a.steps, "images": a.images,
            "eval_limit": a.eval_limit, "flags": method_flags(method, a), "status": "failed", "error": None}
    try:
        extra = {}
        flags = method_flags(method, a)
        note = ""
        if flags is None:  # a control matched to the gated run of the same seed
            paired = cells.get((a.controls_for, seed))
            if not paired or paired.get("status") != "ok":
                raise CellError("the paired %s run (seed %d) failed or is missing" % (a.controls_for, seed))
            pg = load_json(os.path.join(out, "runs", a.controls_for, "seed%d" % seed, "gates.json"))
            if method == "random":
                p = paired["gates"]["keep_run"]
                if not finite(p):
                    raise CellError("the paired %s run has no keep (discarded_fraction_run)" % a.controls_for)
                p = min(1.0, max(1e-6, p))
                flags = ["--gate", "random", "--keep", "%.6g" % p]
                extra = {"keep_p": float("%.6g" % p)}
                note = "keep %.3f (= %s)" % (p, a.controls_for)
            else:
                kept, off, share_off, d = modules_to_keep(pg)
                if not kept:
                    raise CellError("the paired %s run discarded %.1f%%: every module would be switched off"
                                    % (a.controls_for, 100 * d))
                rdir = os.path.join(out, "runs", method, "seed%d" % seed)
                os.makedirs(rdir, exist_ok=True)
                mfile = os.path.join(rdir, "modules.txt")
                with open(mfile, "w") as f:
                    f.write("".join(k + "\n" for k in kept))
                flags = ["--gate", "off", "--target-modules", "@" + mfile]
                extra = {"modules_kept": len(kept), "modules_off": off, "share_off": share_off,
                         "paired_discarded": d, "equals_lora": not off}
                note = ("= lora (nothing switched off)" if not off else
                        "%d of %d modules off" % (len(off), len(off) + len(kept)))
        cell["flags"] = flags
        cell["note"] = note
        cell.update(extra)
        rdir, rec, reused = train_run(a, prep, out, method, seed, flags, extra)
        cell["train_reused"] = reused
        cell["train_seconds"] = rec.get("train_seconds")
        cell["tokens_per_second"] = rec.get("tokens_per_second")
        cell["gates"] = gate_stats(load_json(os.path.join(rdir, "gates.json")))
        if method == "module-off":  # whole modules discard: the share of modules off, not gate decisions
            cell["gates"]["discarded_run"] = cell["share_off"]
            cell["gates"]["keep_run"] = 1.0 - cell["share_off"]
        cell["tasks"] = {t: evaluate(a, prep, rdir, cdir, t, a.split) for t in TASKS}
        cell["status"] = "ok"
    except CellError as e:
        cell["error"] = str(e)
    except (OSError, ValueError, KeyError) as e:
        cell["error"] = "%s: %s" % (type(e).__name__, e)
    cell["seconds"] = round(time.time() - t0, 1)
    write_json(cpath, cell)
    return cell


# ---- statistics ---------------------------------------------------------------------------------

def paired_bootstrap(d, B, rng):
    """d: [S, N] per-seed, per-example differences. Resamples seeds and examples with replacement
    (one example resample per bootstrap draw, shared by the seeds: the pairs stay paired) and returns
    (mean, 2.5th, 97.5th percentile) of the mean over the resampled (seed, example) pairs."""
    S, N = d.shape
    ws = rng.multinomial(S, np.full(S, 1.0 / S), size=B) / S  # [B, S] seed weights
    we = rng.multinomial(N, np.full(N, 1.0 / N), size=B) / N  # [B, N] example weights
    stats = np.einsum("bs,sn,bn->b", ws, d, we)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)


def mean_or_none(xs):
    xs = [x for x in xs if finite(x)]
    return sum(xs) / len(xs) if xs else None


def analyse(a, cells):
    names = a.method_names
    rng = np.random.default_rng(BOOT_SEED)
    seeds = list(range(1, a.seeds + 1))
    res = {"tasks": {}, "methods": {}}
    for m in names:
        cs = [cells[(m, s)] for s in seeds]
        ok = [c for c in cs if c["status"] == "ok"]
        res["methods"][m] = {
            "flags": ok[0]["flags"] if ok else (cs[0].get("flags") or method_flags(m, a)),
            "gated": is_gated(m, a), "seeds_ok": [c["seed"] for c in ok],
            "failed": [{"seed": c["seed"], "error": c["error"]} for c in cs if c["status"] != "ok"],
            "discarded": mean_or_none([c["gates"]["discarded_run"] for c in ok]),
            "interior_share": mean_or_none([c["gates"]["interior_share"] for c in ok]),
            "kind_spread": mean_or_none([c["gates"]["kind_spread"] for c in ok]),
            "train_seconds": mean_or_none([c.get("train_seconds") for c in ok]),
            "notes": [],
        }
        mm = res["methods"][m]
        if m == "random":
            mm["keep_p"] = [c.get("keep_p") for c in ok]
            if ok:
                mm["notes"].append("keep P = %s's, per seed: %s" % (a.controls_for, ", ".join("%.3f" % p for p in mm["keep_p"])))
        elif m == "module-off":
            mm["equals_lora_seeds"] = [c["seed"] for c in ok if c.get("equals_lora")]
            if ok:
                mm["notes"].append("modules off per seed: %s" % ", ".join(
                    "%d/%d" % (len(c["modules_off"]), len(c["modules_off"]) + c["modules_kept"]) for c in ok))
            if mm["equals_lora_seeds"]:
                mm["notes"].append("= lora (nothing switched off) in seed %s" %
                                   ",".join(str(s) for s in mm["equals_lora_seeds"]))
        else:
            mm["notes"] = sorted(set(c.get("note", "") for c in ok if c.get("note")))

    def pair(m1, m2, task):
        both = [s for s in seeds if cells[(m1, s)]["status"] == "ok" and cells[(m2, s)]["status"] == "ok"]
        if not both:
            return None
        c1 = np.array([cells[(m1, s)]["tasks"][task]["correct"] for s in both], dtype=float)
        c2 = np.array([cells[(m2, s)]["tasks"][task]["correct"] for s in both], dtype=float)
        if c1.shape != c2.shape:
            raise SystemExit("gate_study: %s and %s were evaluated on different %s sets" % (m1, m2, task))
        mean, lo, hi = paired_bootstrap(c1 - c2, a.bootstrap, rng)
        return {"a": m1, "b": m2, "seeds": both, "mean": mean, "lo": lo, "hi": hi}

    for t in TASKS:
        golds = {tuple(cells[k]["tasks"][t]["gold"]) for k in cells if cells[k]["status"] == "ok"}
        if len(golds) > 1:
            raise SystemExit("gate_study: the %s evaluation sets differ between cells" % t)
        rows = {}
        for m in names:
            ok = [cells[(m, s)] for s in seeds if cells[(m, s)]["status"] == "ok"]
            accs = [c["tasks"][t]["mc_acc"] for c in ok]
            rows[m] = {"acc_per_seed": accs, "acc_mean": mean_or_none(accs),
                       "acc_sd": float(np.std(accs, ddof=1)) if len(accs) > 1 else None,
                       "n": ok[0]["tasks"][t]["n"] if ok else None,
                       "diff_vs_lora": pair(m, "lora", t) if m != "lora" else None}
        comps = {}
        for g in [m for m in names if res["methods"][m]["gated"]]:
            for ctrl in ("random", "module-off"):
                if ctrl in names:
                    comps["%s-vs-%s" % (g, ctrl)] = pair(g, ctrl, t)
        res["tasks"][t] = {"methods": rows, "comparisons": comps}
    res["readings"] = readings(a, res)
    res["cells_reused"] = sum(1 for c in cells.values() if c.get("reused"))
    res["cells_run"] = len(cells) - res["cells_reused"]
    return res


def pts(x):
    return "%+.1f" % (100 * x)


def readings(a, res):
    out = []
    for g in [m for m in a.method_names if res["methods"][m]["gated"]]:
        meth = res["methods"][g]
        diffs = {t: res["tasks"][t]["methods"][g]["diff_vs_lora"] for t in TASKS}
        d = meth["discarded"]
        if d is None or any(v is None for v in diffs.values()):
            v1, why = "N/A", "no finished %s/lora pairs" % g
        else:
            ok = d >= 0.40 and all(diffs[t]["lo"] >= -0.01 for t in TASKS)
            v1 = "PASS" if ok else "FAIL"
            why = "discarded %.1f%%; CI lower bound %s" % (
                100 * d, ", ".join("%s %s pts" % (t, pts(diffs[t]["lo"])) for t in TASKS))
        out.append({"method": g, "reading": 1, "verdict": v1, "detail": why,
                    "rule": "discards >= 40%% of token updates and the 95%% CI lower bound of (%s - lora) "
                            ">= -1 point on every task" % g})
        for k, ctrl in ((2, "random"), (3, "module-off")):
            rule = "%s beats %s: mean paired difference > 0 on every task" % (g, ctrl)
            if ctrl not in a.method_names:
                out.append({"method": g, "reading": k, "verdict": "N/A", "detail": "%s not run" % ctrl, "rule": rule})
                continue
            cs = {t: res["tasks"][t]["comparisons"].get("%s-vs-%s" % (g, ctrl)) for t in TASKS}
            if any(c is None for c in cs.values()):
                v, why = "N/A", "no finished %s/%s pairs" % (g, ctrl)
            else:
                v = "PASS" if all(cs[t]["mean"] > 0 for t in TASKS) else "FAIL"
                why = "; ".join("%s %s pts [%s, %s]" % (t, pts(cs[t]["mean"]), pts(cs[t]["lo"]), pts(cs[t]["hi"]))
                                for t in TASKS)
            if g != a.controls_for:
                why += " (%s is matched to %s, not to %s)" % (ctrl, a.controls_for, g)
            out.append({"method": g, "reading": k, "verdict": v, "detail": why, "rule": rule})
        i = meth["interior_share"]
        out.append({"method": g, "reading": 4, "verdict": "N/A" if i is None else ("PASS" if i >= 0.5 else "FAIL"),
                    "detail": "interior share %s" % ("-" if i is None else "%.3f" % i),
                    "rule": "interior share (token decisions made in modules whose keep is in [0.05, 0.95]) >= 0.5"})
    return out


# ---- report -------------------------------------------------------------------------------------

def fmt(x, f="%.3f"):
    return "-" if x is None else f % x


def ci(p):
    if p is None:
        return "-"
    return "%s [%s, %s]" % (pts(p["mean"]), pts(p["lo"]), pts(p["hi"]))


def markdown(a, res, elapsed):
    L = []
    L.append("# Gate study: %s split" % ("validation" if a.split == "val" else "held-out test"))
    L.append("")
    L.append("%d seeds (%s), %d stage-2 steps, %d training images, %d threads; %s examples per task; paired "
             "bootstrap over seeds and examples, %d resamples; differences in accuracy points "
             "(multiple-choice accuracy, vqa_mc_acc)." % (
                 a.seeds, ", ".join(str(s) for s in range(1, a.seeds + 1)), a.steps, a.images, a.threads,
                 "first %d" % a.eval_limit if a.eval_limit else "all", a.bootstrap))
    if a.quick:
        L.append("")
        L.append("**--quick: a plumbing check (30 steps, 2 seeds, 100 examples); the numbers mean nothing.**")
    L.append("")
    L.append("Methods:")
    for m in a.method_names:
        if m == "random":
            L.append("- `random`: `--gate random --keep P`, P = 1 - the discarded share of the %s run of the same seed"
                     % a.controls_for)
        elif m == "module-off":
            L.append("- `module-off`: `--gate off --target-modules @runs/module-off/seed<k>/modules.txt`: the modules "
                     "the %s run of the same seed kept (lowest window keep switched off up to its discarded share)"
                     % a.controls_for)
        else:
            L.append("- `%s`: `%s`" % (m, " ".join(method_flags(m, a))))
    for t in TASKS:
        tr = res["tasks"][t]
        n = next((r["n"] for r in tr["methods"].values() if r["n"]), None)
        L.append("")
        L.append("## %s (%s examples)" % (t, n if n is not None else "-"))
        L.append("")
        L.append("| method | seeds | accuracy (mean ± sd) | vs lora, pts [95% CI] | discarded | interior | "
                 "kind spread | train s | note |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for m in a.method_names:
            r, mm = tr["methods"][m], res["methods"][m]
            notes = list(mm["notes"])
            if mm["failed"]:
                notes.append("failed seed %s: %s" % (",".join(str(f["seed"]) for f in mm["failed"]),
                                                     mm["failed"][0]["error"].replace("|", "\\|")))
            acc = "-" if r["acc_mean"] is None else "%.3f ± %s" % (r["acc_mean"], fmt(r["acc_sd"]))
            L.append("| %s | %d/%d | %s | %s | %s | %s | %s | %s | %s |" % (
                m, len(mm["seeds_ok"]), a.seeds, acc, "(baseline)" if m == "lora" else ci(r["diff_vs_lora"]),
                "-" if mm["discarded"] is None else "%.1f%%" % (100 * mm["discarded"]),
                fmt(mm["interior_share"]), fmt(mm["kind_spread"]),
                fmt(mm["train_seconds"], "%.0f"), "; ".join(notes)))
        if tr["comparisons"]:
            L.append("")
            L.append("| paired difference | pts [95% CI] | seeds |")
            L.append("|---|---|---|")
            for k, p in tr["comparisons"].items():
                L.append("| %s | %s | %s |" % (k.replace("-vs-", " - ", 1), ci(p),
                                              "-" if p is None else len(p["seeds"])))
    L.append("")
    L.append("## Readings")
    L.append("")
    for r in res["readings"]:
        L.append("- **%s reading %d: %s** (%s): %s" % (r["method"], r["reading"], r["verdict"], r["rule"], r["detail"]))
    L.append("")
    L.append("discarded: share of token updates not applied over the run (module-off: share of modules switched "
             "off); interior: share of token decisions made in modules whose window keep is in [0.05, 0.95]; "
             "kind spread: mean over modules of max - min keep over token kinds; train s: training seconds "
             "(train_summary.json). This invocation: %d cells run, %d reused, %.0f s." % (
                 res["cells_run"], res["cells_reused"], elapsed))
    return "\n".join(L) + "\n"


# ---- check --------------------------------------------------------------------------------------

def check(a, out):
    errs = []
    sdir = os.path.join(out, a.split)
    for f in ("study.md", "study.json"):
        if not os.path.exists(os.path.join(sdir, f)):
            errs.append("missing %s" % os.path.join(sdir, f))
    if errs:
        return errs
    try:
        j = load_json(os.path.join(sdir, "study.json"))
    except ValueError as e:
        return ["study.json: %s" % e]
    md = open(os.path.join(sdir, "study.md")).read()
    for m in a.method_names:
        mm = j["methods"].get(m)
        if mm is None:
            errs.append("study.json: no method %s" % m)
            continue
        if mm["failed"]:
            errs.append("%s: failed seeds %s (%s)" % (m, [f["seed"] for f in mm["failed"]], mm["failed"][0]["error"]))
        for k in ("discarded", "interior_share", "kind_spread", "train_seconds"):
            if not finite(mm.get(k)):
                errs.append("%s: %s is %r" % (m, k, mm.get(k)))
        for t in TASKS:
            r = j["tasks"][t]["methods"].get(m)
            if r is None or ("| %s |" % m) not in md:
                errs.append("%s: no %s row" % (m, t))
                continue
            if not finite(r["acc_mean"]) or len(r["acc_per_seed"]) != a.seeds:
                errs.append("%s %s: accuracy %r over %d seeds" % (m, t, r["acc_mean"], len(r["acc_per_seed"])))
            if m != "lora":
                p = r["diff_vs_lora"]
                if p is None or not all(finite(p[k]) for k in ("mean", "lo", "hi")) or not p["lo"] <= p["mean"] <= p["hi"]:
                    errs.append("%s %s: difference vs lora %r" % (m, t, p))
        for s in range(1, a.seeds + 1):
            if not os.path.exists(os.path.join(out, "cells", a.split, m, "seed%d" % s, "cell.json")):
                errs.append("missing cell %s seed %d" % (m, s))
    for t in TASKS:
        for k, p in j["tasks"][t]["comparisons"].items():
            if p is None or not all(finite(p[x]) for x in ("mean", "lo", "hi")):
                errs.append("%s %s: %r" % (t, k, p))
    want = sum(4 for m in a.method_names if j["methods"][m]["gated"])
    if len(j["readings"]) != want or any(r["verdict"] not in ("PASS", "FAIL") for r in j["readings"]):
        errs.append("readings: expected %d verdicts PASS/FAIL, got %s" %
                    (want, [(r["method"], r["reading"], r["verdict"]) for r in j["readings"]]))
    return errs


# ---- main ---------------------------------------------------------------------------------------

def open_study(a, prog):
    """--tspeft made absolute and checked, --out made absolute (emptied first with --fresh) and created;
    returns it. prog names the script in the error."""
    out = os.path.abspath(a.out)
    a.tspeft = os.path.abspath(a.tspeft)
    if not os.access(a.tspeft, os.X_OK):
        sys.exit("%s: %s is not an executable tspeft" % (prog, a.tspeft))
    if a.fresh and os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    return out


def main(argv):
    a = parse_args(argv)
    t0 = time.time()
    out = open_study(a, "gate_study")
    if a.split == "test":
        log("gate_study: the held-out test split: report these numbers once, with the settings chosen on val")
    prep = prepare(a, out)
    # gated runs first within a seed: the controls are matched to them
    order = sorted(a.method_names, key=lambda m: (m in ("random", "module-off"), a.method_names.index(m)))
    cells = {}
    for seed in range(1, a.seeds + 1):
        for m in order:
            c = run_cell(a, prep, out, m, seed, cells)
            cells[(m, seed)] = c
            if c["status"] == "ok":
                log("cell %s/%s/seed%d: %s image %.3f text %.3f, discarded %.1f%%, train %.0f s%s" % (
                    a.split, m, seed, "reused," if c.get("reused") else "done in %.0f s," % c["seconds"],
                    c["tasks"]["image"]["mc_acc"], c["tasks"]["text"]["mc_acc"],
                    100 * (c["gates"]["discarded_run"] or 0), c.get("train_seconds") or 0,
                    " (%s)" % c["note"] if c.get("note") else ""))
            else:
                log("cell %s/%s/seed%d: FAILED: %s" % (a.split, m, seed, c["error"]))
    res = analyse(a, cells)
    elapsed = time.time() - t0
    md = markdown(a, res, elapsed)
    sdir = os.path.join(out, a.split)
    os.makedirs(sdir, exist_ok=True)
    settings = {"split": a.split, "seeds": list(range(1, a.seeds + 1)), "steps": a.steps, "images": a.images,
                "threads": a.threads, "ts_flags": a.ts_flags, "controls_for": a.controls_for,
                "bootstrap_resamples": a.bootstrap, "bootstrap_seed": BOOT_SEED, "eval_limit": a.eval_limit,
                "quick": a.quick, "pretrain_steps": a.pretrain_steps, "stage1_steps": a.stage1_steps,
                "tower_steps": a.tower_steps,
                "interior_range": list(INTERIOR), "tspeft": a.tspeft, "seconds": round(elapsed, 1)}
    study = dict(settings=settings, methods=res["methods"], tasks=res["tasks"], readings=res["readings"],
                 cells={"%s/seed%d" % k: {"status": c["status"], "error": c["error"],
                                          "path": os.path.join("cells", a.split, k[0], "seed%d" % k[1], "cell.json")}
                        for k, c in cells.items()})
    write_json(os.path.join(sdir, "study.json"), study)
    with open(os.path.join(sdir, "study.md"), "w") as f:
        f.write(md)
    print()
    print(md, end="")
    print("\nwritten: %s/study.md, %s/study.json (%.0f s)" % (sdir, sdir, elapsed))
    if a.check:
        errs = check(a, out)
        if errs:
            print("check: FAILED\n  " + "\n  ".join(errs))
            return 1
        print("check: ok (%d methods x %d seeds, both tasks, every number finite)" % (len(a.method_names), a.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
