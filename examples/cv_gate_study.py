#!/usr/bin/python3
"""A pre-declared, resumable study of TS-LoRA on a CLIP vision tower for image classification, over
seeds and against controls: transfer of a tower pretrained on Fashion-MNIST classes 0-4 to a new
5-way classifier of classes 5-9. Per (method, seed) one `tspeft train --task image-classification`
run, evaluation on one split, paired bootstrap confidence intervals over seeds and examples.
Protocol: docs/gate-study.md, "Image classification on the tower (transfer to new classes)".

    /usr/bin/python3 examples/cv_gate_study.py --tspeft build/tspeft --out runs/cv-study            # validation
    /usr/bin/python3 examples/cv_gate_study.py --tspeft build/tspeft --out runs/cv-study --split test   # once
    /usr/bin/python3 examples/cv_gate_study.py --tspeft build/tspeft --out /tmp/q --quick --check   # plumbing

Methods (common flags: --steps 150 --batch-size 32 --lr 3e-3 --seed k; LoRA r 8 on all twelve tower
projections):
  probe       --adapter-type none: the new classifier alone on the frozen tower
  lora        --gate off: dense LoRA, the baseline every difference is paired against
  ts-l005, ts-l02, ts-l05   --gate on --ts-lambda 0.05 / 0.2 / 0.5 --ts-warmup-steps 20: the candidates
  random      --gate random --keep P, P = the chosen candidate's kept share of the same seed
  module-off  --gate off --target-modules @FILE: the chosen candidate's lowest-keep modules switched off
              until the switched-off share >= its discarded share (= lora when none)
  (--controls-for NAME matches the controls to another candidate: a further question, in its own --out)
On --split val, the candidate is chosen by the declared rule (among candidates whose CI lower bound
against lora is >= -1 point, the one discarding most; else the most accurate), then its controls run.
On --split test, the validation study's choice is read and probe, lora, the chosen candidate and its
controls are evaluated with the same trained runs.

Output (OUT = --out):
  OUT/prep/                       class folders, shards (pre, train, val, test), the random and the
                                  pretrained tower (prep/pretrain/vision_tower), study_prep.json
  OUT/runs/<method>/seed<k>/      train/ (tspeft train --out), train.log, gates.json, run.json
  OUT/cells/<split>/<method>/seed<k>/   eval.json, eval.samples.jsonl, eval.log, cell.json
  OUT/<split>/study.md, study.json      the tables, paired differences with 95% CIs, the readings
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gate_study import (BOOT_SEED, INTERIOR, CellError, ci, command_key, finite, fmt, gate_stats,  # noqa: E402
                        load_json, log, mean_or_none, modules_to_keep, open_study, paired_bootstrap, pts,
                        reusable_cell, reusable_run, run_cmd, save_gates_json, write_json)

# Fashion-MNIST class names as `tspeft convert --format fashion-mnist --layout image-folder` writes them
FM_CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
PRE_CLASSES, NEW_CLASSES = FM_CLASSES[:5], FM_CLASSES[5:]
CANDIDATES = (("ts-l005", "0.05"), ("ts-l02", "0.2"), ("ts-l05", "0.5"))
CONTROLS = ("random", "module-off")
TOWER = dict(kind="clip", hidden=96, layers=2, heads=4, intermediate=256, image=28, patch=7, seed=0)
CHOICE_LO = -0.01  # the choice rule's bound on the CI lower bound vs lora (accuracy units: -1 point)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tspeft", default="build/tspeft", help="the tspeft binary")
    ap.add_argument("--out", default="runs/cv-study", help="study directory (resumed when it exists)")
    ap.add_argument("--split", choices=("val", "test"), default="val",
                    help="val: choose the candidate here; test: the held-out images, once, with that choice")
    ap.add_argument("--seeds", type=int, default=None, help="seeds 1..N (default 5; --quick 2)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 150; --quick 30)")
    ap.add_argument("--warmup", type=int, default=None, help="the candidates' --ts-warmup-steps (default 20; --quick 5)")
    ap.add_argument("--tower-steps", type=int, default=None, help="tower pretraining steps (default 300; --quick 40)")
    ap.add_argument("--per-class", type=int, default=None,
                    help="at most N images per class in each set (default 0: all; --quick 60)")
    ap.add_argument("--controls-for", default=None, choices=[n for n, _ in CANDIDATES],
                    help="match random and module-off (and the readings) to this candidate instead of the one the "
                         "choice rule takes: a further question, reported as such, not the declared study")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bootstrap", type=int, default=2000, help="paired bootstrap resamples (default 2000)")
    ap.add_argument("--quick", action="store_true",
                    help="a plumbing check: 2 seeds, 30 steps, warm-up 5, 40 tower steps, 60 images per class")
    ap.add_argument("--check", action="store_true",
                    help="after the run, validate the outputs; exit 1 on a missing row, a non-finite value or a failed cell")
    ap.add_argument("--fresh", action="store_true", help="delete --out first (nothing is reused)")
    a = ap.parse_args(argv)
    defaults = {"seeds": 5, "steps": 150, "warmup": 20, "tower_steps": 300, "per_class": 0}
    if a.quick:
        defaults.update(seeds=2, steps=30, warmup=5, tower_steps=40, per_class=60)
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.seeds < 1 or a.steps < 1 or a.tower_steps < 1 or a.threads < 1 or a.warmup < 0 or a.per_class < 0 \
            or a.bootstrap < 100:
        ap.error("--seeds, --steps, --tower-steps, --threads must be >= 1, --warmup and --per-class >= 0, "
                 "--bootstrap >= 100")
    return a


def method_flags(name, a):
    """The method's own train flags; None for the controls (they depend on the chosen run)."""
    if name == "probe":
        return ["--adapter-type", "none"]
    if name == "lora":
        return ["--target-modules", "all", "--gate", "off"]
    for n, lam in CANDIDATES:
        if name == n:
            return ["--target-modules", "all", "--gate", "on", "--ts-lambda", lam, "--ts-warmup-steps", str(a.warmup)]
    return None


def is_gated(name):
    return name in dict(CANDIDATES)


# ---- preparation ------------------------------------------------------------------------------------

def prepare(a, out):
    """Class folders and shards of the four disjoint sets, the random tower and its pretraining."""
    prep = os.path.join(out, "prep")
    want = {"tower_steps": a.tower_steps, "per_class": a.per_class, "tower": TOWER}
    record = os.path.join(prep, "study_prep.json")
    tower = os.path.join(prep, "pretrain", "vision_tower")
    if os.path.exists(record):
        have = load_json(record)
        diff = [k for k in want if have.get(k) != want[k]]
        if diff:
            sys.exit("cv_gate_study: %s was prepared with other settings (%s): use another --out" %
                     (prep, ", ".join("%s %r, now %r" % (k, have.get(k), want[k]) for k in diff)))
        log("prep: reusing %s" % prep)
        return prep, tower
    fmnist = os.environ.get("FMNIST_DIR", "/usr/share/datasets/fashion-mnist")
    if not os.path.exists(os.path.join(fmnist, "train-images-idx3-ubyte.gz")):  # 77: ctest's skip code
        log("cv_gate_study: skipped: %s has no Fashion-MNIST (make deps installs dataset-fashion-mnist)" % fmnist)
        sys.exit(77)
    if os.path.exists(prep):
        shutil.rmtree(prep)  # an unfinished preparation: start it again
    os.makedirs(prep)
    t0 = time.time()
    plog = os.path.join(out, "prep.log")
    logf = open(plog, "w")

    def step(cmd):
        logf.write("$ " + " ".join(cmd) + "\n")
        logf.flush()
        rc = subprocess.call(cmd, stdout=logf, stderr=subprocess.STDOUT)
        if rc != 0:
            logf.close()
            sys.exit("cv_gate_study: preparation failed (%s %s exited %d); log: %s" % (
                os.path.basename(cmd[0]), cmd[1], rc, plog))

    # every image of the train split's first 12000 and the test split's first 2000, as class folders
    for split, n in (("train", 12000), ("test", 2000)):
        step([a.tspeft, "convert", "--format", "fashion-mnist", "--input", fmnist, "--out",
              os.path.join(prep, "fm_" + split), "--split", split, "--limit", str(n), "--layout", "image-folder",
              "--quiet"])
    # the four sets, by class and by the item index in the file name (train_01234.png): linked, not copied
    sets = {"pre": ("train", PRE_CLASSES, 0, None), "train": ("train", NEW_CLASSES, 3000, 9000),
            "val": ("train", NEW_CLASSES, 9000, 12000), "test": ("test", NEW_CLASSES, 0, 2000)}
    counts = {}
    for name, (split, classes, lo, hi) in sets.items():
        counts[name] = {}
        for c in classes:
            src = os.path.join(prep, "fm_" + split, c)
            files = sorted(f for f in os.listdir(src) if f.endswith(".png"))
            idx = [(int(f.split("_")[1].split(".")[0]), f) for f in files]
            chosen = [f for i, f in idx if i >= lo and (hi is None or i < hi)]
            if name == "pre":
                chosen = chosen[:600]  # the first 3000 images of classes 0-4 (600 a class; see the doc)
            if a.per_class:
                chosen = chosen[:a.per_class]
            dst = os.path.join(prep, "sets", name, c)
            os.makedirs(dst)
            for f in chosen:
                os.link(os.path.join(src, f), os.path.join(dst, f))
            counts[name][c] = len(chosen)
        step([a.tspeft, "convert", "--format", "image-folder", "--input", os.path.join(prep, "sets", name),
              "--out", os.path.join(prep, "shards", name + ".shard"), "--quiet"])
    t = dict(TOWER)
    step(["/usr/bin/python3", os.path.join(HERE, "make_random_vit.py"), os.path.join(prep, "tower_random"),
          "--kind", t["kind"], "--hidden", str(t["hidden"]), "--layers", str(t["layers"]), "--heads", str(t["heads"]),
          "--intermediate", str(t["intermediate"]), "--image", str(t["image"]), "--patch", str(t["patch"]),
          "--seed", str(t["seed"])])
    # every tensor of the tower (and a 5-way classifier, not used afterwards), as examples/demo.sh does
    step([a.tspeft, "train", "--task", "image-classification", "--model", os.path.join(prep, "tower_random"),
          "--data", os.path.join(prep, "shards", "pre.shard"), "--adapter-type", "none", "--tune-vision-tower",
          "--steps", str(a.tower_steps), "--batch-size", "32", "--lr", "3e-3", "--lr-scheduler", "cosine",
          "--warmup-steps", "20", "--out", os.path.join(prep, "pretrain"), "--log-every", "100",
          "--threads", str(a.threads)])
    logf.close()
    for split in ("fm_train", "fm_test"):
        shutil.rmtree(os.path.join(prep, split))  # the sets hold links to what is used
    write_json(record, dict(want, counts=counts, seconds=round(time.time() - t0, 1)))
    log("prep: done in %.0f s (%s)" % (time.time() - t0, ", ".join(
        "%s %d images" % (k, sum(v.values())) for k, v in counts.items())))
    return prep, tower


# ---- one cell ---------------------------------------------------------------------------------------

def train_run(a, prep, tower, out, method, seed, flags, extra):
    rdir = os.path.join(out, "runs", method, "seed%d" % seed)
    tdir = os.path.join(rdir, "train")
    cmd = [a.tspeft, "train", "--task", "image-classification", "--model", tower,
           "--data", os.path.join(prep, "shards", "train.shard")] + flags
    if "none" not in flags:
        cmd += ["--r", "8"]
    cmd += ["--steps", str(a.steps), "--batch-size", "32", "--lr", "3e-3", "--seed", str(seed), "--out", tdir,
            "--quiet", "--threads", str(a.threads)]
    key = command_key(cmd, out)
    rec = reusable_run(rdir, tdir, key, "cv_gate_study")
    if rec is not None:
        return rdir, rec, True
    run_cmd(cmd, os.path.join(rdir, "train.log"))
    steps = [json.loads(x) for x in open(os.path.join(tdir, "train_log.jsonl")) if x.strip()]
    gates = os.path.exists(os.path.join(tdir, "gates.jsonl"))
    if gates:
        save_gates_json(a.tspeft, tdir, rdir)
    rec = dict(extra, method=method, seed=seed, command=cmd, command_key=key, gates=gates,
               train_seconds=sum(s.get("seconds", 0) for s in steps),
               last_loss=float(np.mean([s["loss"] for s in steps[-10:]])) if steps else None)
    write_json(os.path.join(rdir, "run.json"), rec)
    return rdir, rec, False


def evaluate(a, prep, tower, rdir, cdir, split):
    res = os.path.join(cdir, "eval.json")
    run_cmd([a.tspeft, "eval", "--task", "image-classification", "--model", tower, "--adapter",
             os.path.join(rdir, "train"), "--data", os.path.join(prep, "shards", split + ".shard"), "--out", res,
             "--threads", str(a.threads)], os.path.join(cdir, "eval.log"))
    r = load_json(res)["tasks"][0]
    rows = [json.loads(x) for x in open(os.path.join(cdir, "eval.samples.jsonl")) if x.strip()]
    if [x["index"] for x in rows] != list(range(r["n"])):
        raise CellError("%s: the per-image lines do not cover images 0..%d" % (res, r["n"] - 1))
    correct = [int(x["correct"]) for x in rows]
    acc = r["metrics"]["top1_acc"]
    if abs(acc - sum(correct) / max(1, len(correct))) > 1e-9:
        raise CellError("%s: top1_acc %s disagrees with the per-image results" % (res, acc))
    return {"n": r["n"], "acc": acc, "keep": r["metrics"].get("keep"), "seconds": r.get("seconds"),
            "correct": correct, "gold": [x["label"] for x in rows], "keep_per_image": [x.get("keep") for x in rows]}


def run_cell(a, prep, tower, out, method, seed, controls_for, cells):
    cdir = os.path.join(out, "cells", a.split, method, "seed%d" % seed)
    cpath = os.path.join(cdir, "cell.json")
    want = {"steps": a.steps, "controls_for": controls_for if method in CONTROLS else None}
    if method_flags(method, a) is not None:
        want["flags"] = method_flags(method, a)
    c = reusable_cell(cpath, want, "cv_gate_study")
    if c is not None:
        return c
    os.makedirs(cdir, exist_ok=True)
    t0 = time.time()
    cell = dict(want, method=method, seed=seed, split=a.split, flags=method_flags(method, a), status="failed",
                error=None, note="")
    try:
        flags, extra = method_flags(method, a), {}
        if flags is None:  # a control matched to the chosen candidate of the same seed
            paired = cells.get((controls_for, seed))
            if not paired or paired.get("status") != "ok":
                raise CellError("the paired %s run (seed %d) failed or is missing" % (controls_for, seed))
            pg = load_json(os.path.join(out, "runs", controls_for, "seed%d" % seed, "gates.json"))
            if method == "random":
                p = min(1.0, max(1e-6, paired["gates"]["keep_run"]))
                flags = ["--target-modules", "all", "--gate", "random", "--keep", "%.6g" % p]
                extra = {"keep_p": float("%.6g" % p)}
                cell["note"] = "keep %.3f (= %s)" % (p, controls_for)
            else:
                kept, off, share_off, d = modules_to_keep(pg)
                if not kept:
                    raise CellError("the paired %s run discarded %.1f%%: every module would be switched off"
                                    % (controls_for, 100 * d))
                rdir = os.path.join(out, "runs", method, "seed%d" % seed)
                os.makedirs(rdir, exist_ok=True)
                mfile = os.path.join(rdir, "modules.txt")
                with open(mfile, "w") as f:
                    f.write("".join(k + "\n" for k in kept))
                flags = ["--target-modules", "@" + mfile, "--gate", "off"]
                extra = {"modules_kept": len(kept), "modules_off": off, "share_off": share_off,
                         "paired_discarded": d, "equals_lora": not off}
                cell["note"] = "= lora (nothing switched off)" if not off else "%d of %d modules off" % (
                    len(off), len(off) + len(kept))
        cell["flags"] = flags
        cell.update(extra)
        rdir, rec, reused = train_run(a, prep, tower, out, method, seed, flags, extra)
        cell["train_reused"] = reused
        cell["train_seconds"] = rec.get("train_seconds")
        cell["last_loss"] = rec.get("last_loss")
        if rec.get("gates"):
            cell["gates"] = gate_stats(load_json(os.path.join(rdir, "gates.json")))
        else:  # the probe: no adapter, nothing gated
            cell["gates"] = {"discarded_run": 0.0, "keep_run": 1.0, "interior_share": 0.0, "modules": 0}
        if method == "module-off":  # whole modules discard: the share of modules off
            cell["gates"]["discarded_run"] = cell["share_off"]
            cell["gates"]["keep_run"] = 1.0 - cell["share_off"]
        cell["eval"] = evaluate(a, prep, tower, rdir, cdir, a.split)
        cell["status"] = "ok"
    except CellError as e:
        cell["error"] = str(e)
    except (OSError, ValueError, KeyError, TypeError) as e:
        cell["error"] = "%s: %s" % (type(e).__name__, e)
    cell["seconds"] = round(time.time() - t0, 1)
    write_json(cpath, cell)
    return cell


# ---- statistics -------------------------------------------------------------------------------------

def summarise(a, names, cells, rng):
    seeds = list(range(1, a.seeds + 1))
    golds = {tuple(c["eval"]["gold"]) for c in cells.values() if c["status"] == "ok"}
    if len(golds) > 1:
        raise SystemExit("cv_gate_study: the evaluation sets differ between cells")

    def pair(m1, m2):
        both = [s for s in seeds if cells[(m1, s)]["status"] == "ok" and cells[(m2, s)]["status"] == "ok"]
        if not both:
            return None
        d = np.array([cells[(m1, s)]["eval"]["correct"] for s in both], float) - \
            np.array([cells[(m2, s)]["eval"]["correct"] for s in both], float)
        mean, lo, hi = paired_bootstrap(d, a.bootstrap, rng)
        return {"a": m1, "b": m2, "seeds": both, "mean": mean, "lo": lo, "hi": hi}

    methods = {}
    for m in names:
        ok = [cells[(m, s)] for s in seeds if cells[(m, s)]["status"] == "ok"]
        accs = [c["eval"]["acc"] for c in ok]
        mm = {"flags": ok[0]["flags"] if ok else method_flags(m, a), "gated": is_gated(m),
              "seeds_ok": [c["seed"] for c in ok],
              "failed": [{"seed": s, "error": cells[(m, s)]["error"]} for s in seeds if cells[(m, s)]["status"] != "ok"],
              "acc_per_seed": accs, "acc_mean": mean_or_none(accs),
              "acc_sd": float(np.std(accs, ddof=1)) if len(accs) > 1 else None,
              "n": ok[0]["eval"]["n"] if ok else None,
              "discarded": mean_or_none([c["gates"]["discarded_run"] for c in ok]),
              "discarded_per_seed": [c["gates"]["discarded_run"] for c in ok],
              "eval_keep": mean_or_none([c["eval"]["keep"] for c in ok]),
              "interior_share": mean_or_none([c["gates"]["interior_share"] for c in ok]),
              "train_seconds": mean_or_none([c.get("train_seconds") for c in ok]),
              "last_loss": mean_or_none([c.get("last_loss") for c in ok]),
              "diff_vs_lora": pair(m, "lora") if m != "lora" else None, "notes": []}
        if m == "random":
            mm["keep_p"] = [c.get("keep_p") for c in ok]
            if ok:
                mm["notes"].append("keep P per seed: %s" % ", ".join("%.3f" % p for p in mm["keep_p"]))
        elif m == "module-off":
            mm["equals_lora_seeds"] = [c["seed"] for c in ok if c.get("equals_lora")]
            if ok:
                mm["notes"].append("modules off per seed: %s" % ", ".join(
                    "%d/%d" % (len(c["modules_off"]), len(c["modules_off"]) + c["modules_kept"]) for c in ok))
            if mm["equals_lora_seeds"]:
                mm["notes"].append("= lora in seed %s" % ",".join(str(s) for s in mm["equals_lora_seeds"]))
        methods[m] = mm
    return methods, pair


def choose(methods):
    """The declared rule: among the candidates whose CI lower bound vs lora is >= -1 point, the one
    discarding the most; if none, the one with the best mean accuracy."""
    cands = [n for n, _ in CANDIDATES if n in methods and methods[n]["acc_mean"] is not None]
    if not cands:
        return None, "no candidate finished"
    ok = [n for n in cands if methods[n]["diff_vs_lora"] and methods[n]["diff_vs_lora"]["lo"] >= CHOICE_LO]
    if ok:
        c = max(ok, key=lambda n: (methods[n]["discarded"], -cands.index(n)))
        return c, ("%s: CI lower bound vs lora >= -1 point for %s; of these it discards the most (%.1f%%)" % (
            c, ", ".join(ok), 100 * methods[c]["discarded"]))
    c = max(cands, key=lambda n: (methods[n]["acc_mean"], -cands.index(n)))
    return c, ("%s: no candidate had a CI lower bound vs lora >= -1 point, so the most accurate one (mean %.3f) "
               "was taken" % (c, methods[c]["acc_mean"]))


def readings(g, methods, comps):
    out = []
    mg, d = methods[g], methods[g]["diff_vs_lora"]
    if d is None or mg["discarded"] is None:
        out.append((1, "N/A", "no finished %s/lora pairs" % g))
    else:
        v = "PASS" if mg["discarded"] >= 0.40 and d["lo"] >= -0.01 else "FAIL"
        out.append((1, v, "discarded %.1f%%; CI lower bound %s pts" % (100 * mg["discarded"], pts(d["lo"]))))
    for k, ctrl in ((2, "random"), (3, "module-off")):
        p = comps.get("%s-vs-%s" % (g, ctrl))
        if p is None:
            out.append((k, "N/A", "%s not run or no finished pairs" % ctrl))
        else:
            out.append((k, "PASS" if p["mean"] > 0 else "FAIL", "%s pts [%s, %s]" % (
                pts(p["mean"]), pts(p["lo"]), pts(p["hi"]))))
    i = mg["interior_share"]
    out.append((4, "N/A" if i is None else ("PASS" if i >= 0.5 else "FAIL"),
                "interior share %s" % ("-" if i is None else "%.3f" % i)))
    rules = {1: "discards >= 40%% of token updates and the 95%% CI lower bound of (%s - lora) >= -1 point" % g,
             2: "%s beats random: mean paired difference > 0" % g,
             3: "%s beats module-off: mean paired difference > 0" % g,
             4: "interior share (token decisions made in modules whose keep is in [0.05, 0.95]) >= 0.5"}
    return [{"method": g, "reading": k, "verdict": v, "detail": det, "rule": rules[k]} for k, v, det in out]


# ---- report -----------------------------------------------------------------------------------------

def markdown(a, names, methods, comps, choice, read, elapsed, cells_run, cells_reused):
    L = ["# Image classification on the tower: %s split" % ("validation" if a.split == "val" else "held-out test"), ""]
    L.append("%d seeds (%s), %d steps of 32 images, lr 3e-3, LoRA r 8 on all twelve tower projections, %d threads; "
             "paired bootstrap over seeds and examples, %d resamples; differences in accuracy points (top-1)." % (
                 a.seeds, ", ".join(str(s) for s in range(1, a.seeds + 1)), a.steps, a.threads, a.bootstrap))
    if a.quick:
        L += ["", "**--quick: a plumbing check; the numbers mean nothing.**"]
    L += ["", "Chosen candidate: %s" % choice[1], ""]
    if a.controls_for and a.controls_for != choice[0]:
        L += ["**Controls and readings for %s (--controls-for), not for the chosen candidate: a further question, "
              "outside the declared protocol.**" % a.controls_for, ""]
    n = next((methods[m]["n"] for m in names if methods[m]["n"]), None)
    L.append("| method | seeds | top-1 (mean ± sd) | vs lora, pts [95% CI] | discarded | interior | train s | note |")
    L.append("|---|---|---|---|---|---|---|---|")
    for m in names:
        mm = methods[m]
        notes = list(mm["notes"])
        if mm["failed"]:
            notes.append("failed seed %s: %s" % (",".join(str(f["seed"]) for f in mm["failed"]),
                                                 (mm["failed"][0]["error"] or "").replace("|", "\\|")))
        acc = "-" if mm["acc_mean"] is None else "%.3f ± %s" % (mm["acc_mean"], fmt(mm["acc_sd"]))
        L.append("| %s | %d/%d | %s | %s | %s | %s | %s | %s |" % (
            m, len(mm["seeds_ok"]), a.seeds, acc, "(baseline)" if m == "lora" else ci(mm["diff_vs_lora"]),
            "-" if mm["discarded"] is None else "%.1f%%" % (100 * mm["discarded"]), fmt(mm["interior_share"]),
            fmt(mm["train_seconds"], "%.1f"), "; ".join(notes)))
    L += ["", "%s images (classes 5-9 of Fashion-MNIST, chance 0.200)." % n]
    if comps:
        L += ["", "| paired difference | pts [95% CI] | seeds |", "|---|---|---|"]
        for k, p in comps.items():
            L.append("| %s | %s | %s |" % (k.replace("-vs-", " - ", 1), ci(p), "-" if p is None else len(p["seeds"])))
    if read:
        L += ["", "## Readings", ""]
        for r in read:
            L.append("- **%s reading %d: %s** (%s): %s" % (r["method"], r["reading"], r["verdict"], r["rule"], r["detail"]))
    L += ["", "discarded: share of tower-token updates not applied over training (module-off: share of modules "
          "switched off); interior: share of token decisions made in modules whose window keep is in [0.05, 0.95] "
          "(tspeft gates selectivity); train s: the sum of train_log.jsonl's step seconds. This invocation: %d cells "
          "run, %d reused, %.0f s." % (cells_run, cells_reused, elapsed)]
    return "\n".join(L) + "\n"


def check(a, out, names, study):
    errs = []
    md = open(os.path.join(out, a.split, "study.md")).read()
    for m in names:
        mm = study["methods"].get(m)
        if mm is None or ("| %s |" % m) not in md:
            errs.append("no row for %s" % m)
            continue
        if mm["failed"]:
            errs.append("%s: failed seeds %s (%s)" % (m, [f["seed"] for f in mm["failed"]], mm["failed"][0]["error"]))
        for k in ("acc_mean", "discarded", "interior_share", "train_seconds"):
            if not finite(mm.get(k)):
                errs.append("%s: %s is %r" % (m, k, mm.get(k)))
        if len(mm["acc_per_seed"]) != a.seeds:
            errs.append("%s: %d of %d seeds" % (m, len(mm["acc_per_seed"]), a.seeds))
        p = mm["diff_vs_lora"]
        if m != "lora" and (p is None or not all(finite(p[k]) for k in ("mean", "lo", "hi"))
                            or not p["lo"] <= p["mean"] <= p["hi"]):
            errs.append("%s: difference vs lora %r" % (m, p))
    for k, p in study["comparisons"].items():
        if p is None or not all(finite(p[x]) for x in ("mean", "lo", "hi")):
            errs.append("%s: %r" % (k, p))
    if study["chosen"] is None:
        errs.append("no candidate chosen")
    if len(study["readings"]) != 4 or any(r["verdict"] not in ("PASS", "FAIL") for r in study["readings"]):
        errs.append("readings: %s" % [(r["reading"], r["verdict"]) for r in study["readings"]])
    return errs


# ---- main -------------------------------------------------------------------------------------------

def main(argv):
    a = parse_args(argv)
    t0 = time.time()
    out = open_study(a, "cv_gate_study")
    prep, tower = prepare(a, out)
    cells = {}
    seeds = range(1, a.seeds + 1)

    def run_all(names, controls_for=None):
        for seed in seeds:
            for m in names:
                c = run_cell(a, prep, tower, out, m, seed, controls_for, cells)
                cells[(m, seed)] = c
                if c["status"] == "ok":
                    log("cell %s/%s/seed%d: %s top-1 %.3f, discarded %.1f%%, train %.1f s%s" % (
                        a.split, m, seed, "reused," if c.get("reused") else "done in %.0f s," % c["seconds"],
                        c["eval"]["acc"], 100 * c["gates"]["discarded_run"], c.get("train_seconds") or 0,
                        " (%s)" % c["note"] if c.get("note") else ""))
                else:
                    log("cell %s/%s/seed%d: FAILED: %s" % (a.split, m, seed, c["error"]))

    rng = np.random.default_rng(BOOT_SEED)
    if a.split == "val":
        base = ["probe", "lora"] + [n for n, _ in CANDIDATES]
        run_all(base)
        methods, _ = summarise(a, base, cells, np.random.default_rng(BOOT_SEED))
        choice = choose(methods)
    else:
        vpath = os.path.join(out, "val", "study.json")
        if not os.path.exists(vpath):
            sys.exit("cv_gate_study: --split test needs the validation study's choice (%s): run --split val first" % vpath)
        v = load_json(vpath)
        if v["settings"]["steps"] != a.steps or v["settings"]["seeds"] != list(seeds):
            sys.exit("cv_gate_study: %s was run with other settings (steps, seeds): the held-out run reuses its "
                     "training runs" % vpath)
        choice = (v["chosen"], v["choice_reason"])
        log("cv_gate_study: the held-out test split, once, with the candidate chosen on validation: %s" % choice[0])
        base = ["probe", "lora"] + ([choice[0]] if choice[0] else [])
        run_all(base)
    g = a.controls_for or choice[0]
    if g and g not in base:
        base.append(g)
        run_all([g])
    names = list(base)
    if g:
        run_all(list(CONTROLS), controls_for=g)
        names += list(CONTROLS)
    methods, pair = summarise(a, names, cells, rng)
    comps, read = {}, []
    if g:
        for m1, m2 in ((g, "random"), (g, "module-off"), ("lora", "probe"), (g, "probe")):
            comps["%s-vs-%s" % (m1, m2)] = pair(m1, m2)
        read = readings(g, methods, comps)
    elapsed = time.time() - t0
    n_reused = sum(1 for c in cells.values() if c.get("reused"))
    md = markdown(a, names, methods, comps, choice, read, elapsed, len(cells) - n_reused, n_reused)
    sdir = os.path.join(out, a.split)
    os.makedirs(sdir, exist_ok=True)
    study = {"settings": {"split": a.split, "seeds": list(seeds), "steps": a.steps, "warmup": a.warmup,
                          "tower_steps": a.tower_steps, "per_class": a.per_class, "threads": a.threads,
                          "controls_for": a.controls_for,
                          "bootstrap_resamples": a.bootstrap, "bootstrap_seed": BOOT_SEED, "quick": a.quick,
                          "interior_range": list(INTERIOR), "candidates": dict(CANDIDATES), "tower": TOWER,
                          "tspeft": a.tspeft, "seconds": round(elapsed, 1)},
             "chosen": choice[0], "choice_reason": choice[1], "controls_for": g, "methods": methods,
             "comparisons": comps,
             "readings": read,
             "cells": {"%s/seed%d" % k: {"status": c["status"], "error": c["error"],
                                         "path": os.path.join("cells", a.split, k[0], "seed%d" % k[1], "cell.json")}
                       for k, c in cells.items()}}
    write_json(os.path.join(sdir, "study.json"), study)
    with open(os.path.join(sdir, "study.md"), "w") as f:
        f.write(md)
    print()
    print(md, end="")
    print("\nwritten: %s/study.md, %s/study.json (%.0f s)" % (sdir, sdir, elapsed))
    if a.check:
        errs = check(a, out, names, study)
        if errs:
            print("check: FAILED\n  " + "\n  ".join(errs))
            return 1
        print("check: ok (%d methods x %d seeds, every number finite, four readings)" % (len(names), a.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
