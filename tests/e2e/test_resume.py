#!/usr/bin/python3
"""Checkpoints, exact --resume, signals, kill -9, full disk and the non-finite policy of `tspeft train`,
on tiny random LLaMAs.

    /usr/bin/python3 tests/e2e/test_resume.py --tspeft build/tspeft [--keep]

(1) exact resume: an uninterrupted 12-step run (gated LoRA, dropout 0.1, --shuffle, --grad-accum 2,
    --ts-target-keep 0.5, cosine with warm-up) versus the same command with --save-every 4
    --keep-checkpoints 0, resumed from checkpoint-4 (later checkpoint deleted) and, via `latest`, from
    the run directory: the progress lines of the resumed steps (loss, lr, gnorm, keep as printed) equal
    the uninterrupted run's and the final adapter_model.safetensors and adapter_config.json are
    byte-identical; a re-saved checkpoint equals the original one. DoRA and bottleneck variants.
(2) checkpoint contents: the four files, PEFT keys + ts_tau + ts_lambda, AdamW moments for every
    trainable tensor, trainer_state.json (global_step, rng_state, loader_cursor, config), `latest`,
    --keep-checkpoints 2 and the default 3.
(3) SIGINT / SIGTERM during a run: exit 130 / 143, a final line naming the step and how to resume,
    `latest` names that complete checkpoint, and resuming gives the uninterrupted run's adapter. A
    SIGINT during the LAST step: doing what the run then says must still end with the final adapter.
(4) kill -9 at seeded random moments of a --save-every 1 run whose saves take most of the time (6
    after a save began, 1 in the final adapter write, 1 anywhere): `latest` always names a complete
    checkpoint, resuming gives the uninterrupted adapter byte for byte, and no checkpoint-*.tmp.*
    directory of a dead process survives the resumed run. Where strace works, the save protocol is
    also checked call by call (fsync before every rename, a checkpoint directory renamed only when
    complete, `latest` replaced only after the directory it names is in place), since a kill can
    land between any two system calls. Other leftovers of a killed run (OUT/latest.tmp.<pid>,
    OUT/.staging.<pid>) are printed as notes.
(5) full disk (RLIMIT_FSIZE below the adapter's size): a checkpoint save and the final --out write fail
    with exit 1 and one line naming the file and "File too large"; nothing saved before changes and no
    temporary file or directory remains.
(6) --nonfinite: a NaN embedding row used by exactly one data row: stop (default) exits 1 naming the
    step; skip completes, reports every affected step, counts them in skipped_steps, changes nothing at
    those steps and saves only finite tensors.
(7) resume mismatches (--batch-size, --seed, --data) and a checkpoint already at --steps fail with exit
    1 and a message naming the key and both values / "nothing left to do", changing nothing.
(8) exact resume from shards (two weighted datasets, one a glob of two shards, --shuffle-window 2,
    crossing a loader epoch; and --pack): the checkpoint holds loader_cursor.json; resuming from
    checkpoint-4 or the run directory (also with --prefetch 0) prints the same steps and writes the same
    adapter bytes as the uninterrupted run; --batch-size 1 on resume continues the same sample stream;
    another --shuffle-window, a shard changed under the same name, or JSONL data are refused with exit 1.
Exit status 0 when every check passed, 1 otherwise.
"""
import argparse
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_util as U  # noqa: E402  (puts tests/parity on sys.path)

import numpy as np  # noqa: E402

import st  # noqa: E402

THREADS = 1
CKPT_FILES = ("adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "trainer_state.json")
FINAL_FILES = ("adapter_model.safetensors", "adapter_config.json", "train_summary.json")
PROG_RAW = re.compile(r"^step (\d+)/(\d+)  loss (\S+)  lr (\S+)  gnorm (\S+)  keep (\S+)  ")


# ------------------------------------------------------------------------------------------------
# helpers

class Ctx:
    def __init__(self, tspeft, tmp, chk):
        self.tspeft = tspeft
        self.tmp = tmp
        self.chk = chk
        self.model = os.path.join(tmp, "model")
        self.data = os.path.join(tmp, "data.jsonl")
        self.big = os.path.join(tmp, "big_model")       # hidden 256: an r 64 checkpoint is ~6 MB

    def path(self, *p):
        return os.path.join(self.tmp, *p)

    def args(self, extra, model=None, data=None):
        return ["train", "--model", model or self.model, "--data", data or self.data,
                "--threads", str(THREADS)] + [str(a) for a in extra]

    def train(self, extra, model=None, data=None, fsize=None):
        """Runs `tspeft train`; fsize sets RLIMIT_FSIZE in the child (a full disk)."""
        argv = [self.tspeft] + self.args(extra, model, data)
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "2")
        pre = None
        if fsize is not None:
            def pre():
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120,
                              env=env, preexec_fn=pre)


def prog_raw(stderr):
    """step -> (loss, lr, gnorm, keep) exactly as printed."""
    out = {}
    order = []
    for line in stderr.splitlines():
        m = PROG_RAW.match(line)
        if m:
            out[int(m.group(1))] = m.group(3, 4, 5, 6)
            order.append(int(m.group(1)))
    return out, order


def snapshot(d):
    """relative path -> bytes of every file below d (directories as entries ending in '/')."""
    snap = {}
    for root, dirs, files in os.walk(d):
        rel = os.path.relpath(root, d)
        for x in dirs:
            snap[os.path.normpath(os.path.join(rel, x)) + "/"] = None
        for x in files:
            snap[os.path.normpath(os.path.join(rel, x))] = U.read_bytes(os.path.join(root, x))
    return snap


def snap_diff(a, b):
    """Human-readable differences of two snapshots (empty when identical)."""
    out = []
    for k in sorted(set(a) | set(b)):
        if k not in a:
            out.append("new: %s" % k)
        elif k not in b:
            out.append("gone: %s" % k)
        elif a[k] != b[k]:
            out.append("changed: %s" % k)
    return out


def read_latest(out):
    try:
        with open(os.path.join(out, "latest")) as f:
            return f.read().strip()
    except OSError:
        return None


def load_json(path):
    with open(path) as f:
        return json.load(f)


def same_file(a, b):
    try:
        return U.read_bytes(a) == U.read_bytes(b)
    except OSError:
        return False


def last_line(stderr):
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def tmp_entries(out):
    try:
        return sorted(x for x in os.listdir(out) if ".tmp." in x or x.startswith(".staging"))
    except OSError:
        return []


def checkpoint_problems(ck, step=None):
    """Everything wrong with a checkpoint directory (empty when complete): the four files, the adapter
    and optimizer loadable with matching keys and shapes, trainer_state.json parses (global_step ==
    step when given)."""
    bad = []
    for fn in CKPT_FILES:
        if not os.path.isfile(os.path.join(ck, fn)):
            bad.append("%s missing" % fn)
    if bad:
        return bad
    try:
        load_json(os.path.join(ck, "adapter_config.json"))
        ad = st.load(os.path.join(ck, "adapter_model.safetensors"))
        opt = st.load(os.path.join(ck, "optimizer.safetensors"))
        ts = load_json(os.path.join(ck, "trainer_state.json"))
    except Exception as e:  # noqa: BLE001  (any parse error is the finding)
        return ["does not load: %r" % e]
    params = {k: v for k, v in ad.items() if not k.endswith((".ts_tau", ".ts_lambda"))}
    want = set()
    for k, v in params.items():
        for s in ("exp_avg", "exp_avg_sq"):
            want.add(k + "." + s)
            if k + "." + s in opt and opt[k + "." + s].shape != v.shape:
                bad.append("%s.%s shape %s != param %s" % (k, s, opt[k + "." + s].shape, v.shape))
    if set(opt) != want:
        bad.append("optimizer keys: missing %s, unexpected %s"
                   % (sorted(want - set(opt))[:4], sorted(set(opt) - want)[:4]))
    if not params:
        bad.append("no trainable tensors in the adapter")
    if not isinstance(ts, dict) or not isinstance(ts.get("global_step"), int):
        bad.append("trainer_state.json has no integer global_step")
    elif step is not None and ts["global_step"] != step:
        bad.append("global_step %s != %d" % (ts["global_step"], step))
    return bad


def state_core(ts):
    """trainer_state.json fields that an exact resume must reproduce (not the wall-clock seconds)."""
    keys = ("global_step", "rng_state", "loader_cursor", "first_loss", "last_loss", "tokens", "skipped_steps")
    return {k: ts.get(k) for k in keys}


def rows_used(ts):
    cur = ts.get("loader_cursor") or {}
    v = cur.get("rows_used")
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def shapes_of(mcfg, short):
    C, F = mcfg["hidden_size"], mcfg["intermediate_size"]
    D = C // mcfg["num_attention_heads"]
    HD, GD = mcfg["num_attention_heads"] * D, mcfg["num_key_value_heads"] * D
    return {"q_proj": (HD, C), "k_proj": (GD, C), "v_proj": (GD, C), "o_proj": (C, HD),
            "gate_proj": (F, C), "up_proj": (F, C), "down_proj": (C, F)}[short]   # (out, in)


def expected_lora_keys(mcfg, r, targets, gated, duals):
    exp = {}
    for name in U.module_names(mcfg["num_hidden_layers"]):
        short = name.split(".")[-1]
        if short not in targets:
            continue
        out, inp = shapes_of(mcfg, short)
        p = U.PEFT + name
        exp[p + ".lora_A.weight"] = (r, inp)
        exp[p + ".lora_B.weight"] = (out, r)
        if gated:
            exp[p + ".ts_tau"] = (1,)
        if duals:
            exp[p + ".ts_lambda"] = (1,)
    return exp


def remove_final(out):
    for fn in FINAL_FILES:
        try:
            os.remove(os.path.join(out, fn))
        except OSError:
            pass


# ------------------------------------------------------------------------------------------------
# (1) exact resume + (2) checkpoint contents

LORA1 = ["--adapter-type", "lora", "--r", 8, "--alpha", 16, "--target-modules", "all", "--dropout", 0.1,
         "--shuffle", "--batch-size", 2, "--grad-accum", 2, "--ts-target-keep", 0.5,
         "--lr-scheduler", "cosine", "--warmup-steps", 3, "--lr", 3e-3, "--steps", 12, "--seed", 42,
         "--log-every", 1]
SAVE4 = ["--save-every", 4, "--keep-checkpoints", 0]


def compare_resumed(cx, what, p, ref_prog, first, last, out, ref_out):
    """Exit 0, progress lines of exactly first..last equal to the reference's as printed, final
    adapter files byte-identical."""
    chk = cx.chk
    if not chk.ok(p.returncode == 0, "%s: resumed run exits 0" % what, p.stderr):
        return
    chk.ok(("resuming" in p.stderr) and ("at step %d" % first) in p.stderr,
           "%s: says it resumes at step %d" % (what, first), p.stderr)
    prog, order = prog_raw(p.stderr)
    chk.ok(order == list(range(first, last + 1)),
           "%s: progress lines for exactly steps %d..%d" % (what, first, last), order)
    diff = ["step %d: resumed %s, uninterrupted %s" % (s, prog.get(s), ref_prog.get(s))
            for s in range(first, last + 1) if prog.get(s) is None or prog.get(s) != ref_prog.get(s)]
    chk.ok(not diff, "%s: steps %d..%d print the same loss, lr, gnorm and keep strings as the uninterrupted "
           "run (e.g. step %d loss %s)" % (what, first, last, last, (ref_prog.get(last) or ("?",))[0]),
           "\n".join(diff))
    for fn in ("adapter_model.safetensors", "adapter_config.json"):
        chk.ok(same_file(os.path.join(out, fn), os.path.join(ref_out, fn)),
               "%s: final %s byte-identical to the uninterrupted run's" % (what, fn))


def test_exact_resume(cx, mcfg):
    chk = cx.chk
    chk.section("(1) exact resume: gated LoRA, dropout, shuffle, grad-accum, target keep, cosine warm-up")
    A, B = cx.path("r1_A"), cx.path("r1_B")
    pa = cx.train(LORA1 + ["--out", A])
    pb = cx.train(LORA1 + SAVE4 + ["--out", B])
    if not (chk.ok(pa.returncode == 0, "(1) uninterrupted 12-step run exits 0", pa.stderr) and
            chk.ok(pb.returncode == 0, "(1) the same run with --save-every 4 --keep-checkpoints 0 exits 0",
                   pb.stderr)):
        return None
    progA, orderA = prog_raw(pa.stderr)
    progB, _ = prog_raw(pb.stderr)
    chk.ok(orderA == list(range(1, 13)), "(1) uninterrupted run prints steps 1..12", orderA)
    chk.ok(progA == progB, "(1) saving checkpoints does not change the printed steps")
    chk.ok(same_file(os.path.join(A, "adapter_model.safetensors"), os.path.join(B, "adapter_model.safetensors")),
           "(1) saving checkpoints does not change the final adapter")
    chk.ok(sorted(x for x in os.listdir(B) if x.startswith("checkpoint-")) == ["checkpoint-4", "checkpoint-8"],
           "(1) --save-every 4 over 12 steps writes checkpoint-4 and checkpoint-8 (none at the last step)",
           os.listdir(B))
    pd = cx.train([a if a != 0.1 else 0.0 for a in LORA1] + ["--out", cx.path("r1_nodrop")])
    chk.ok(pd.returncode == 0 and not same_file(os.path.join(A, "adapter_model.safetensors"),
                                                os.path.join(cx.path("r1_nodrop"), "adapter_model.safetensors")),
           "(1) dropout 0.1 changes the result (so the restored dropout RNG is tested)", pd.stderr)

    # resume from checkpoint-4, the later checkpoint deleted
    R1 = cx.path("r1_R1")
    shutil.copytree(B, R1)
    shutil.rmtree(os.path.join(R1, "checkpoint-8"))
    remove_final(R1)
    p = cx.train(LORA1 + SAVE4 + ["--out", R1, "--resume", os.path.join(R1, "checkpoint-4")])
    compare_resumed(cx, "(1) --resume OUT/checkpoint-4", p, progA, 5, 12, R1, A)
    if p.returncode == 0:
        for fn in ("adapter_model.safetensors", "optimizer.safetensors", "adapter_config.json"):
            chk.ok(same_file(os.path.join(R1, "checkpoint-8", fn), os.path.join(B, "checkpoint-8", fn)),
                   "(1) the re-saved checkpoint-8/%s is byte-identical to the original" % fn)
        try:
            s1 = load_json(os.path.join(R1, "checkpoint-8", "trainer_state.json"))
            s0 = load_json(os.path.join(B, "checkpoint-8", "trainer_state.json"))
            chk.ok(state_core(s1) == state_core(s0),
                   "(1) the re-saved checkpoint-8 trainer_state (step, rng, cursor, losses, tokens) equals the "
                   "original", "%s\n%s" % (state_core(s1), state_core(s0)))
        except (OSError, ValueError) as e:
            chk.ok(False, "(1) re-saved checkpoint-8/trainer_state.json parses", e)
        chk.ok(read_latest(R1) == "checkpoint-8", "(1) latest names the re-saved checkpoint-8", read_latest(R1))

    # resume from the run directory (latest -> checkpoint-8)
    R2 = cx.path("r1_R2")
    shutil.copytree(B, R2)
    remove_final(R2)
    p = cx.train(LORA1 + SAVE4 + ["--out", R2, "--resume", R2])
    compare_resumed(cx, "(1) --resume OUT (latest = checkpoint-8)", p, progA, 9, 12, R2, A)

    # DoRA and bottleneck: 8 steps, resumed from checkpoint-4
    for kind, extra in (("dora", ["--adapter-type", "dora", "--r", 4, "--alpha", 8, "--target-modules",
                                  "q_proj,v_proj,up_proj,down_proj", "--lr", 1e-2]),
                        ("bottleneck", ["--adapter-type", "bottleneck", "--r", 8, "--target-modules", "all",
                                        "--bottleneck-act", "relu", "--ts-target-keep", 0.6, "--lr", 1e-2])):
        chk.section("(1) exact resume: %s" % kind)
        cmd = extra + ["--dropout", 0.1, "--shuffle", "--batch-size", 2, "--grad-accum", 2, "--steps", 8,
                       "--seed", 11, "--lr-scheduler", "linear", "--warmup-steps", 2]
        a, b = cx.path("r1_%s_A" % kind), cx.path("r1_%s_B" % kind)
        pa2 = cx.train(cmd + ["--out", a])
        pb2 = cx.train(cmd + SAVE4 + ["--out", b])
        if not chk.ok(pa2.returncode == 0 and pb2.returncode == 0 and
                      os.path.isdir(os.path.join(b, "checkpoint-4")),
                      "(1) %s: uninterrupted run and --save-every 4 run exit 0, checkpoint-4 written" % kind,
                      pa2.stderr + pb2.stderr):
            continue
        remove_final(b)
        p = cx.train(cmd + SAVE4 + ["--out", b, "--resume", os.path.join(b, "checkpoint-4")])
        compare_resumed(cx, "(1) %s --resume checkpoint-4" % kind, p, prog_raw(pa2.stderr)[0], 5, 8, b, a)
    return B


def test_contents(cx, mcfg, B):
    chk = cx.chk
    chk.section("(2) checkpoint contents")
    exp = expected_lora_keys(mcfg, 8, U.ALL7, True, True)
    for step in (4, 8):
        ck = os.path.join(B, "checkpoint-%d" % step)
        what = "(2) checkpoint-%d" % step
        files = sorted(os.listdir(ck)) if os.path.isdir(ck) else []
        if not chk.ok(files == sorted(CKPT_FILES), "%s holds exactly %s" % (what, ", ".join(CKPT_FILES)), files):
            continue
        cfg = load_json(os.path.join(ck, "adapter_config.json"))
        ts_cfg = cfg.get("ts_peft") or {}
        chk.ok(cfg.get("peft_type") == "LORA" and cfg.get("r") == 8 and
               abs(float(cfg.get("lora_dropout", -1)) - 0.1) < 1e-6 and
               abs(float(ts_cfg.get("target_keep") or -1) - 0.5) < 1e-6,
               "%s: adapter_config.json is the PEFT config (LORA, r 8, lora_dropout 0.1, ts_peft.target_keep "
               "0.5)" % what, cfg)
        tens, _ = st.read(os.path.join(ck, "adapter_model.safetensors"))
        got = {k: tuple(v[1].shape) for k, v in tens.items()}
        chk.ok(got == exp and all(v[0] == "F32" for v in tens.values()),
               "%s: adapter_model.safetensors holds exactly the %d PEFT keys (lora_A/B, ts_tau, ts_lambda) "
               "as F32 with their shapes" % (what, len(exp)),
               "missing %s\nunexpected %s" % (sorted(set(exp) - set(got))[:6], sorted(set(got) - set(exp))[:6]))
        lam = [float(v[1][0]) for k, v in tens.items() if k.endswith(".ts_lambda")]
        chk.ok(lam and any(abs(x - 0.05) > 1e-6 for x in lam),
               "%s: the duals ts_lambda moved away from lambda0 0.05 (so saving them matters)" % what, lam)
        opt, meta = st.read(os.path.join(ck, "optimizer.safetensors"))
        params = {k: v[1] for k, v in tens.items() if not k.endswith((".ts_tau", ".ts_lambda"))}
        want = {k + s: v.shape for k, v in params.items() for s in (".exp_avg", ".exp_avg_sq")}
        gotopt = {k: v[1].shape for k, v in opt.items()}
        chk.ok(gotopt == want and all(v[0] == "F32" for v in opt.values()),
               "%s: optimizer.safetensors holds <param>.exp_avg and .exp_avg_sq (F32, the param's shape) for "
               "all %d trainable tensors and nothing else" % (what, len(params)),
               "missing %s\nunexpected %s" % (sorted(set(want) - set(gotopt))[:6],
                                             sorted(set(gotopt) - set(want))[:6]))
        if gotopt == want:
            sq_ok = all(np.all(opt[k][1] >= 0) for k in opt if k.endswith(".exp_avg_sq"))
            nz = sum(int(np.any(opt[k][1] != 0)) for k in opt)
            chk.ok(sq_ok and nz == len(opt),
                   "%s: moments are non-trivial (%d of %d non-zero) and exp_avg_sq >= 0" % (what, nz, len(opt)))
        ts = load_json(os.path.join(ck, "trainer_state.json"))
        chk.ok(ts.get("global_step") == step, "%s: trainer_state global_step == %d" % (what, step),
               ts.get("global_step"))
        rng = ts.get("rng_state")
        chk.ok(isinstance(rng, str) and re.fullmatch(r"[0-9a-f]{32}", rng or "") is not None,
               "%s: rng_state is 128 bits of hex" % what, rng)
        chk.ok(rows_used(ts) == step * 2 * 2,
               "%s: loader_cursor.rows_used == step x grad_accum x batch_size == %d" % (what, step * 4),
               ts.get("loader_cursor"))
        c = ts.get("config") or {}
        want_cfg = {"steps": 12, "batch_size": 2, "grad_accum": 2, "shuffle": True, "lr_scheduler": "cosine",
                    "warmup_steps": 3, "seed": 42, "threads": 1, "nonfinite": "stop",
                    "data": cx.data, "model": cx.model}
        bad = {k: c.get(k) for k in want_cfg if c.get(k) != want_cfg[k]}
        if not isinstance(c.get("lr"), (int, float)) or abs(c["lr"] - 3e-3) > 1e-9:
            bad["lr"] = c.get("lr")
        chk.ok(not bad, "%s: trainer_state config holds the effective options (steps, batch_size, grad_accum, "
               "shuffle, lr, lr_scheduler, warmup_steps, seed, threads, nonfinite, data, model)" % what, bad)
    try:
        s4 = load_json(os.path.join(B, "checkpoint-4", "trainer_state.json"))
        s8 = load_json(os.path.join(B, "checkpoint-8", "trainer_state.json"))
        chk.ok(s4.get("rng_state") != s8.get("rng_state"),
               "(2) the dropout rng_state advances between checkpoint-4 and checkpoint-8")
    except (OSError, ValueError) as e:
        chk.ok(False, "(2) trainer states parse", e)
    chk.ok(read_latest(B) == "checkpoint-8", "(2) latest names the newest checkpoint (checkpoint-8)",
           read_latest(B))

    small = ["--r", 4, "--batch-size", 2, "--lr", 1e-3, "--save-every", 2]
    for keep, steps, want in ((2, 9, [6, 8]), (None, 11, [6, 8, 10])):
        out = cx.path("r2_keep%s" % keep)
        p = cx.train(small + ["--steps", steps, "--out", out] + (["--keep-checkpoints", keep] if keep else []))
        got = sorted((x for x in os.listdir(out) if x.startswith("checkpoint-")),
                     key=lambda x: int(x.split("-")[1])) if os.path.isdir(out) else []
        label = ("--keep-checkpoints %d" % keep) if keep else "the default --keep-checkpoints (3)"
        chk.ok(p.returncode == 0 and got == ["checkpoint-%d" % s for s in want] and
               read_latest(out) == "checkpoint-%d" % want[-1] and
               all(not checkpoint_problems(os.path.join(out, g)) for g in got),
               "(2) %s --save-every 2 --steps %d leaves exactly %s, complete, latest = the newest"
               % (label, steps, ", ".join("checkpoint-%d" % s for s in want)), "%s\n%s" % (got, p.stderr))


# ------------------------------------------------------------------------------------------------
# (3) SIGINT / SIGTERM

def start(cx, extra, errfile, model=None):
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    fe = open(errfile, "w")
    pr = subprocess.Popen([cx.tspeft] + cx.args(extra, model), stdout=subprocess.DEVNULL, stderr=fe, env=env)
    fe.close()
    return pr


def wait_for(pred, proc, timeout=60.0, poll=0.0005):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        if proc.poll() is not None:
            return pred()
        time.sleep(poll)
    return False


def file_has(path, s):
    try:
        with open(path) as f:
            return s in f.read()
    except OSError:
        return False


def read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def test_signals(cx):
    chk = cx.chk
    chk.section("(3) SIGINT / SIGTERM")
    total = 1000
    cmd = ["--target-modules", "all", "--batch-size", 4, "--lr", 1e-3, "--steps", total, "--seed", 3,
           "--dropout", 0.05, "--shuffle", "--log-every", 500]
    ref = cx.path("r3_ref")
    t0 = time.time()
    p = cx.train(cmd + ["--out", ref])
    t_ref = time.time() - t0
    if not chk.ok(p.returncode == 0, "(3) uninterrupted %d-step run exits 0 (%.2fs)" % (total, t_ref), p.stderr):
        return
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        name = signal.Signals(sig).name
        out = cx.path("r3_" + name)
        errf = cx.path("r3_%s.stderr" % name)
        pr = start(cx, cmd + ["--out", out], errf)
        started = wait_for(lambda: file_has(errf, "step 1/"), pr)
        time.sleep(0.35 * t_ref)
        alive = pr.poll() is None
        if alive:
            pr.send_signal(sig)
        try:
            rc = pr.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pr.kill()
            rc = pr.wait()
        err = read_text(errf)
        if not chk.ok(started and alive, "(3) %s: sent mid-run (%.2fs after step 1)" % (name, 0.35 * t_ref), err):
            continue
        chk.ok(rc == code, "(3) %s: exit status %d" % (name, code), "rc %s\n%s" % (rc, err))
        last = last_line(err)
        m = re.search(r"after step (\d+)\b", last)
        n = int(m.group(1)) if m else None
        chk.ok(m is not None and "--resume" in last and out in last and ("signal %d" % int(sig)) in last,
               "(3) %s: the final stderr line names the signal, the step and how to resume: %r"
               % (name, last), err)
        if n is None:
            continue
        chk.ok(1 <= n < total, "(3) %s: stopped at step %d of %d" % (name, n, total))
        lat = read_latest(out)
        ck = os.path.join(out, lat or "-")
        probs = checkpoint_problems(ck, n) if lat else ["no latest"]
        chk.ok(lat == "checkpoint-%d" % n and not probs,
               "(3) %s: latest names checkpoint-%d, complete, global_step %d" % (name, n, n), "%s %s" % (lat, probs))
        chk.ok(not tmp_entries(out), "(3) %s: no temporary files left" % name, tmp_entries(out))
        p = cx.train(cmd + ["--out", out, "--resume", out])
        chk.ok(p.returncode == 0 and ("at step %d" % (n + 1)) in p.stderr and
               same_file(os.path.join(out, "adapter_model.safetensors"), os.path.join(ref, "adapter_model.safetensors"))
               and same_file(os.path.join(out, "adapter_config.json"), os.path.join(ref, "adapter_config.json")),
               "(3) %s: resuming from the run directory at step %d to %d gives the uninterrupted run's adapter "
               "byte for byte" % (name, n + 1, total), p.stderr)


def test_signal_last_step(cx):
    """A signal that arrives during the LAST step: whatever the run does (finish and write the adapter,
    or stop with a checkpoint and advise --resume), following what it says must end with the final
    adapter in OUT."""
    chk = cx.chk
    chk.section("(3) SIGINT during the last step")
    cmd = ["--r", 64, "--target-modules", "all", "--batch-size", 16, "--grad-accum", 8, "--steps", 1,
           "--lr", 1e-3, "--seed", 42]
    ref = cx.path("r3_last_ref")
    t0 = time.time()
    p = cx.train(cmd + ["--out", ref], model=cx.big)
    t_ref = time.time() - t0
    if not chk.ok(p.returncode == 0, "(3) last step: a 1-step run of 128 rows exits 0 (%.2fs)" % t_ref, p.stderr):
        return
    out = cx.path("r3_last")
    errf = out + ".stderr"
    pr = start(cx, cmd + ["--out", out], errf, model=cx.big)
    wait_for(lambda: file_has(errf, "adapter ("), pr)        # the header: training starts right after it
    time.sleep(0.25 * t_ref)
    alive = pr.poll() is None
    if alive:
        pr.send_signal(signal.SIGINT)
    rc = pr.wait()
    err = read_text(errf)
    if not chk.ok(alive and rc in (0, 130) and "step 1/1" in err,
                  "(3) last step: SIGINT sent during step 1 of 1 (exit %s)" % rc, err):
        return
    last = last_line(err)
    what = "exit %d" % rc
    if rc == 130 and "--resume" in last:
        p = cx.train(cmd + ["--out", out, "--resume", out], model=cx.big)
        what += ", then the advised --resume: exit %d %r" % (p.returncode, last_line(p.stderr))
        ok = p.returncode == 0
    else:
        ok = True
    ok = ok and same_file(os.path.join(out, "adapter_model.safetensors"), os.path.join(ref, "adapter_model.safetensors"))
    chk.ok(ok, "(3) last step: following the stop message (%s) leaves the final adapter in OUT, byte-identical "
           "to the uninterrupted run's" % what, "%s\n%s" % (err, sorted(os.listdir(out))))


# ------------------------------------------------------------------------------------------------
# (4) kill -9 during saves

def test_kill9(cx):
    chk = cx.chk
    chk.section("(4) kill -9 during --save-every 1 saves")
    big = cx.big
    steps = 14
    cmd = ["--r", 64, "--alpha", 16, "--target-modules", "all", "--batch-size", 1, "--lr", 1e-3,
           "--steps", steps, "--seed", 42, "--dropout", 0.1, "--save-every", 1]
    ref = cx.path("r4_ref")
    t0 = time.time()
    p = cx.train(cmd + ["--out", ref], model=big)
    t_save = time.time() - t0
    t0 = time.time()
    p0 = cx.train(cmd[:-2] + ["--out", cx.path("r4_nosave")], model=big)     # without --save-every 1
    t_nosave = time.time() - t0
    if not chk.ok(p.returncode == 0 and p0.returncode == 0, "(4) reference runs with and without saves exit 0",
                  p.stderr + p0.stderr):
        return
    size = os.path.getsize(os.path.join(ref, "checkpoint-%d" % (steps - 1), "adapter_model.safetensors")) + \
        os.path.getsize(os.path.join(ref, "checkpoint-%d" % (steps - 1), "optimizer.safetensors"))
    per_save = max((t_save - t_nosave) / (steps - 1), 0.0)
    chk.ok(size > 4e6, "(4) a checkpoint is %.1f MB (adapter + moments); a save takes ~%.1f ms, %.0f%% of the run"
           % (size / 1e6, per_save * 1e3, 100 * (t_save - t_nosave) / max(t_save, 1e-9)))
    rng = random.Random(20261128)
    # 6 kills once the save of a random checkpoint has begun (+ a random delay of up to 1.3 saves),
    # 1 during the final adapter write (OUT/.staging.<pid>), 1 at a random moment of the whole run
    kinds = ["save"] * 6 + ["final", "any"]
    mid_write = 0
    for t, kind in enumerate(kinds):
        out = cx.path("r4_trial%d" % t)
        errf = out + ".stderr"
        for attempt in range(4):                  # a moment after the run ended is drawn again, earlier
            shutil.rmtree(out, ignore_errors=True)
            pr = start(cx, cmd + ["--out", out], errf, model=big)
            if kind == "save":
                s = rng.randint(1, steps - 2)
                pre = "checkpoint-%d.tmp." % s
                delay = rng.uniform(0.0, 1.3 * per_save) / (2 ** attempt)
                wait_for(lambda: os.path.isdir(out) and any(x.startswith(pre) or x == "checkpoint-%d" % s
                                                            for x in os.listdir(out)), pr)
                how = "%.1f ms after the save of checkpoint-%d began" % (delay * 1e3, s)
            elif kind == "final":
                delay = rng.uniform(0.0, 0.15 * per_save) / (2 ** attempt)
                wait_for(lambda: os.path.isdir(out) and any(x.startswith(".staging.") for x in os.listdir(out)), pr)
                how = "%.1f ms into the final adapter write" % (delay * 1e3)
            else:
                delay = rng.uniform(0.0, 0.9 * t_save) / (2 ** attempt)
                how = "%.0f ms after the start" % (delay * 1e3)
            time.sleep(delay)
            alive = pr.poll() is None
            if alive:
                pr.send_signal(signal.SIGKILL)
            rc = pr.wait()
            if alive:
                break
        if not chk.ok(alive and rc == -signal.SIGKILL, "(4) trial %d: SIGKILL %s" % (t, how),
                      "rc %s\n%s" % (rc, read_text(errf))):
            continue
        ents = sorted(os.listdir(out)) if os.path.isdir(out) else []
        tmps = [x for x in ents if x.startswith("checkpoint-") and ".tmp." in x]
        mid_write += bool(tmps)
        lat = read_latest(out)
        done = sorted(int(x.split("-")[1]) for x in ents if re.fullmatch(r"checkpoint-\d+", x))
        state = "latest %s, checkpoints %s, temporary %s" % (lat, done, tmps)
        if lat is not None:
            m = re.fullmatch(r"checkpoint-(\d+)", lat)
            probs = checkpoint_problems(os.path.join(out, lat), int(m.group(1))) if m else ["bad name"]
            chk.ok(not probs, "(4) trial %d: latest names a complete checkpoint (%s)" % (t, state), probs)
            resume = ["--resume", out]
        else:
            chk.ok(not done, "(4) trial %d: no latest before the first complete checkpoint (%s)" % (t, state))
            resume = []
        p = cx.train(cmd + ["--out", out] + resume, model=big)
        ok = p.returncode == 0 and same_file(os.path.join(out, "adapter_model.safetensors"),
                                             os.path.join(ref, "adapter_model.safetensors"))
        chk.ok(ok, "(4) trial %d: %s completes and the adapter is byte-identical to the uninterrupted run's"
               % (t, "resuming from the run directory" if resume else "rerunning (no checkpoint yet)"), p.stderr)
        left = [x for x in os.listdir(out) if x.startswith("checkpoint-") and ".tmp." in x]
        chk.ok(not left, "(4) trial %d: no checkpoint-*.tmp.* directory of the dead process remains" % t, left)
        other = [x for x in tmp_entries(out) if x not in left]
        if other:
            print("        note: other temporary leftovers of the killed run: %s" % other)
    chk.ok(mid_write >= 2, "(4) at least 2 of %d kills landed in the middle of writing a checkpoint (%d did)"
           % (len(kinds), mid_write))


STRACE_RE = re.compile(r'^(\d+)\s+(\w+)\((.*)\)\s+=\s+(-?\d+)')
QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def test_save_order(cx):
    """The save protocol, seen in the system calls (strace): a kill -9 lands between two of them, so
    this checks every moment a kill could hit. Every file is fsync'ed before it is renamed into place,
    a checkpoint directory is renamed into place only holding all four files and after an fsync of
    the directory, and `latest` is replaced only after the directory it names is in place."""
    chk = cx.chk
    chk.section("(4) save protocol order under strace")
    strace = shutil.which("strace")
    probe = subprocess.run([strace, "-qq", "-o", os.devnull, "true"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL).returncode if strace else 1
    if probe != 0:
        print("  skip  (4) save protocol order: strace %s" % ("cannot trace here" if strace else "not installed"))
        return
    out = cx.path("r4_strace")
    log = cx.path("r4_strace.log")
    argv = [strace, "-f", "-qq", "-s", "64", "-o", log, "-e",
            "trace=open,openat,creat,close,write,fsync,fdatasync,rename,renameat,renameat2", cx.tspeft] + \
        cx.args(["--target-modules", "all", "--batch-size", 2, "--lr", 1e-3, "--steps", 4, "--save-every", 1,
                 "--keep-checkpoints", 2, "--out", out])
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    # LeakSanitizer cannot run under ptrace (a sanitizer build would fail at exit)
    env["ASAN_OPTIONS"] = ":".join(x for x in (env.get("ASAN_OPTIONS"), "detect_leaks=0") if x)
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120, env=env)
    if not chk.ok(p.returncode == 0 and os.path.isfile(log), "(4) strace'd run with --save-every 1 exits 0",
                  p.stderr):
        return
    fds = {}              # (pid, fd) -> path
    fsynced = set()       # paths fsync'ed (files and directories)
    written = {}          # path -> text written (small files only)
    placed = {}           # directory -> set of names renamed into it
    ck_in_place = set()
    bad = []
    n_ck = n_latest = 0
    with open(log) as f:
        for line in f:
            m = STRACE_RE.match(line)
            if not m or int(m.group(4)) < 0:
                continue
            pid, call, args, ret = m.group(1), m.group(2), m.group(3), int(m.group(4))
            q = QUOTED.findall(args)
            if call in ("open", "openat", "creat") and q:
                fds[(pid, ret)] = q[0]
                if "O_TRUNC" in args or call == "creat":
                    written[q[0]] = ""
                    fsynced.discard(q[0])
            elif call == "close":
                fds.pop((pid, int(args.split(",")[0])), None)
            elif call in ("fsync", "fdatasync"):
                path = fds.get((pid, int(args.split(",")[0])))
                if path:
                    fsynced.add(path)
            elif call == "write" and q:
                path = fds.get((pid, int(args.split(",")[0])))
                if path:
                    written[path] = written.get(path, "") + q[0]
            elif call.startswith("rename") and len(q) == 2:
                src, dst = q
                d, name = os.path.split(dst)
                if src in fsynced:                # the flushed file now lives at dst
                    fsynced.add(dst)
                placed.setdefault(d, set()).add(name)
                if re.fullmatch(r"checkpoint-\d+", name):
                    n_ck += 1
                    have = placed.get(src, set())
                    if not set(CKPT_FILES) <= have:
                        bad.append("%s renamed into place holding only %s" % (dst, sorted(have)))
                    if src not in fsynced:
                        bad.append("%s renamed into place without an fsync of the directory" % dst)
                    ck_in_place.add(dst)
                else:
                    if src not in fsynced:
                        bad.append("%s renamed to %s without an fsync" % (src, dst))
                    if name == "latest":
                        n_latest += 1
                        target = written.get(src, "").replace("\\n", "").strip()
                        if os.path.join(d, target) not in ck_in_place:
                            bad.append("latest replaced by %r before %s was in place" % (target, target))
    chk.ok(n_ck == 3 and n_latest == 3 and not bad,
           "(4) save protocol: %d checkpoint and %d latest renames, each file fsync'ed before its rename, each "
           "directory complete and fsync'ed before its rename, latest replaced only after its checkpoint"
           % (n_ck, n_latest), "\n".join(bad[:10]))


# ------------------------------------------------------------------------------------------------
# (5) full disk

def test_full_disk(cx):
    chk = cx.chk
    chk.section("(5) full disk (RLIMIT_FSIZE)")
    out = cx.path("r5")
    cmd = ["--target-modules", "all", "--batch-size", 2, "--lr", 1e-3, "--seed", 4, "--save-every", 2,
           "--keep-checkpoints", 2]
    p = cx.train(cmd + ["--steps", 6, "--out", out])
    if not chk.ok(p.returncode == 0 and read_latest(out) == "checkpoint-4",
                  "(5) a 6-step run with --save-every 2 leaves checkpoint-2, -4 and latest", p.stderr):
        return
    ad = os.path.getsize(os.path.join(out, "checkpoint-4", "adapter_model.safetensors"))
    biggest_small = max(os.path.getsize(os.path.join(out, "checkpoint-4", f))
                        for f in ("adapter_config.json", "trainer_state.json"))
    limit = ad // 2
    chk.ok(biggest_small < limit < ad, "(5) limit %d bytes: above the JSON files (%d), below adapter_model "
           "(%d)" % (limit, biggest_small, ad))
    before = snapshot(out)
    p = cx.train(cmd + ["--steps", 12, "--out", out, "--resume", out], fsize=limit)
    last = last_line(p.stderr)
    efbig = [ln for ln in p.stderr.splitlines() if "File too large" in ln]
    chk.ok(p.returncode == 1 and "adapter_model.safetensors" in last and "File too large" in last and
           len(efbig) == 1,
           "(5) a resumed run that must save checkpoint-6 fails with exit 1 and one line naming "
           "adapter_model.safetensors and \"File too large\": %r" % last, "rc %s\n%s" % (p.returncode, p.stderr))
    diff = snap_diff(before, snapshot(out))
    chk.ok(not diff, "(5) after the failed save the run directory is unchanged (checkpoints byte-identical, "
           "latest still checkpoint-4, no temporary files or directories)", "\n".join(diff))

    # the final --out write under the limit: the previous adapter in OUT survives
    before = snapshot(out)
    p = cx.train(["--target-modules", "all", "--batch-size", 2, "--lr", 1e-3, "--seed", 9, "--steps", 3,
                  "--out", out], fsize=limit)
    last = last_line(p.stderr)
    chk.ok(p.returncode == 1 and "adapter_model.safetensors" in last and "File too large" in last,
           "(5) the final --out write under the limit fails with exit 1 naming the file: %r" % last, p.stderr)
    diff = snap_diff(before, snapshot(out))
    chk.ok(not diff, "(5) after the failed --out write OUT is unchanged (previous adapter, config and summary "
           "byte-identical, no staging or temporary files)", "\n".join(diff))
    # and without the limit the same directory still works
    p = cx.train(cmd + ["--steps", 8, "--out", out, "--resume", out])
    chk.ok(p.returncode == 0 and read_latest(out) == "checkpoint-6" and not tmp_entries(out),
           "(5) without the limit the run resumes from checkpoint-4 and saves checkpoint-6", p.stderr)


# ------------------------------------------------------------------------------------------------
# (6) non-finite policy

def test_nonfinite(cx):
    chk = cx.chk
    chk.section("(6) --nonfinite stop | skip")
    bad_id = 120
    nanm = cx.path("nan_model")
    shutil.copytree(cx.model, nanm)
    t = st.load(os.path.join(nanm, "model.safetensors"))
    t["model.embed_tokens.weight"][bad_id, :] = np.nan
    st.save(os.path.join(nanm, "model.safetensors"), t, metadata={"format": "pt"})
    rng = np.random.default_rng(5)
    rows = []
    for i in range(6):
        ids = [int(x) for x in rng.integers(3, 100, size=12)]
        if i == 2:
            ids[5] = bad_id
        rows.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    data = cx.path("nan_data.jsonl")
    U.write_jsonl(data, rows)
    steps = 9                                 # batch 1, file order: row 2 at steps 3 and 9
    affected = [3, 9]
    cmd = ["--target-modules", "all", "--batch-size", 1, "--lr", 1e-3, "--steps", steps, "--seed", 1]
    p = cx.train(cmd + ["--out", cx.path("r6_stop")], model=nanm, data=data)
    last = last_line(p.stderr)
    chk.ok(p.returncode == 1 and re.search(r"\bstep 3\b", last) and "not finite" in last and "loss" in last,
           "(6) default --nonfinite stop: exit 1, one line saying the loss of step 3 is not finite: %r" % last,
           "rc %s\n%s" % (p.returncode, p.stderr))
    prog, order = prog_raw(p.stderr)
    chk.ok(order == [1, 2], "(6) stop: steps 1 and 2 ran, nothing after step 3", order)
    chk.ok(not os.path.exists(os.path.join(cx.path("r6_stop"), "adapter_model.safetensors")),
           "(6) stop: no adapter written")

    out = cx.path("r6_skip")
    p = cx.train(cmd + ["--nonfinite", "skip", "--out", out, "--save-every", 1, "--keep-checkpoints", 0],
                 model=nanm, data=data)
    if not chk.ok(p.returncode == 0, "(6) --nonfinite skip: exit 0", p.stderr):
        return
    skipped = [int(m.group(1)) for m in re.finditer(r"^step (\d+)/%d .*step skipped" % steps, p.stderr, re.M)]
    chk.ok(skipped == affected, "(6) skip: a 'step skipped' line for exactly steps %s" % affected,
           "%s\n%s" % (skipped, p.stderr))
    prog, order = prog_raw(p.stderr)
    chk.ok(order == [s for s in range(1, steps + 1) if s not in affected] and
           all(v[0] not in ("nan", "-nan", "inf") for v in prog.values()),
           "(6) skip: finite progress lines for every other step", order)
    try:
        summ = load_json(os.path.join(out, "train_summary.json"))
    except (OSError, ValueError) as e:
        summ = {}
        chk.ok(False, "(6) skip: train_summary.json parses", e)
    chk.ok(summ.get("skipped_steps") == len(affected),
           "(6) skip: summary skipped_steps == %d" % len(affected), summ.get("skipped_steps"))
    nonfin = []
    for rel in ["adapter_model.safetensors"] + ["checkpoint-%d/%s" % (s, f) for s in range(1, steps)
                                                for f in ("adapter_model.safetensors", "optimizer.safetensors")]:
        try:
            for k, v in st.load(os.path.join(out, rel)).items():
                if not np.all(np.isfinite(v)):
                    nonfin.append("%s: %s" % (rel, k))
        except (OSError, ValueError) as e:
            nonfin.append("%s: %r" % (rel, e))
    chk.ok(not nonfin, "(6) skip: every tensor of the adapter and of all checkpoints is finite", nonfin[:8])
    for f in ("adapter_model.safetensors", "optimizer.safetensors"):
        chk.ok(same_file(os.path.join(out, "checkpoint-2", f), os.path.join(out, "checkpoint-3", f)) and
               not same_file(os.path.join(out, "checkpoint-3", f), os.path.join(out, "checkpoint-4", f)),
               "(6) skip: the skipped step 3 changes no %s (checkpoint-2 == checkpoint-3 != checkpoint-4)" % f)
    try:
        ts = load_json(os.path.join(out, "checkpoint-3", "trainer_state.json"))
        chk.ok(ts.get("skipped_steps") == 1 and ts.get("global_step") == 3,
               "(6) skip: checkpoint-3 records global_step 3, skipped_steps 1", ts.get("skipped_steps"))
    except (OSError, ValueError) as e:
        chk.ok(False, "(6) checkpoint-3/trainer_state.json parses", e)


# ------------------------------------------------------------------------------------------------
# (7) resume mismatch

def test_mismatch(cx, B):
    chk = cx.chk
    chk.section("(7) resume mismatches")
    M = cx.path("r7")
    shutil.copytree(B, M)
    before = snapshot(M)
    other = cx.path("other_data.jsonl")
    shutil.copyfile(cx.data, other)            # same rows, another file: still a different --data

    def swap(opt, val):
        a = list(LORA1)
        i = a.index(opt)
        a[i + 1] = val
        return a

    cases = (("batch_size", swap("--batch-size", 4), None, " 2 ", " 4 "),
             ("seed", swap("--seed", 43), None, " 42 ", " 43 "),
             ("data", LORA1, other, cx.data, other))
    for key, cmd, data, old, new in cases:
        p = cx.train(cmd + SAVE4 + ["--out", M, "--resume", M], data=data)
        last = last_line(p.stderr)
        named = re.search(r"\b%s\b.*%s.*%s" % (key, re.escape(old), re.escape(new)), last) is not None
        chk.ok(p.returncode == 1 and named,
               "(7) resuming with another %s fails with exit 1 naming it and both values: %r" % (key, last),
               "rc %s\n%s" % (p.returncode, p.stderr))
        chk.ok(not prog_raw(p.stderr)[1], "(7) %s mismatch: no step was run" % key)
    p = cx.train(swap("--steps", 8) + SAVE4 + ["--out", M, "--resume", os.path.join(M, "checkpoint-8")])
    last = last_line(p.stderr)
    chk.ok(p.returncode == 1 and "nothing left to do" in last,
           "(7) resuming checkpoint-8 with --steps 8 says there is nothing left to do (exit 1): %r" % last,
           p.stderr)
    p = cx.train(swap("--steps", 6) + SAVE4 + ["--out", M, "--resume", M])
    chk.ok(p.returncode == 1 and "nothing left to do" in last_line(p.stderr),
           "(7) resuming checkpoint-8 with --steps 6 (< the checkpoint's step) also exits 1",
           p.stderr)
    diff = snap_diff(before, snapshot(M))
    chk.ok(not diff, "(7) the failed resumes changed nothing in the run directory", "\n".join(diff))


# ------------------------------------------------------------------------------------------------
# (8) exact resume from shards: the loader cursor

SHARD1 = ["--adapter-type", "lora", "--r", 8, "--alpha", 16, "--target-modules", "all", "--dropout", 0.1,
          "--shuffle", "--shuffle-window", 2, "--batch-size", 2, "--grad-accum", 2, "--ts-target-keep", 0.5,
          "--lr-scheduler", "cosine", "--warmup-steps", 2, "--lr", 3e-3, "--steps", 10, "--seed", 9,
          "--log-every", 1]


def make_shards(cx):
    """Dataset a: one shard of the 16 JSONL rows; dataset b: 12 other rows in two shards (a glob).
    28 records, so 10 steps of 4 samples cross a loader epoch."""
    rows_a = [json.loads(x) for x in open(cx.data)]
    U.make_shard(cx.tspeft, cx.path("s_a.shard"), rows_a)
    rows_b = U.pattern_data(cx.path("s_b.jsonl"), n_rows=12, seed=5)
    U.make_shard(cx.tspeft, cx.path("s_b-0.shard"), rows_b[:6])
    U.make_shard(cx.tspeft, cx.path("s_b-1.shard"), rows_b[6:])
    return ["--data", cx.path("s_b-*.shard") + ":3"]   # after --data s_a.shard (Ctx.args puts it first)


def test_shard_resume(cx):
    chk = cx.chk
    chk.section("(8) exact resume from shards (two weighted datasets, a glob, frame-window shuffle)")
    data = make_shards(cx)
    sa = cx.path("s_a.shard")
    A, B = cx.path("r8_A"), cx.path("r8_B")
    pa = cx.train(SHARD1 + data + ["--out", A], data=sa)
    pb = cx.train(SHARD1 + data + SAVE4 + ["--out", B], data=sa)
    if not (chk.ok(pa.returncode == 0, "(8) uninterrupted 10-step run from shards exits 0", pa.stderr) and
            chk.ok(pb.returncode == 0, "(8) the same run with --save-every 4 exits 0", pb.stderr)):
        return
    progA, orderA = prog_raw(pa.stderr)
    chk.ok(orderA == list(range(1, 11)) and progA == prog_raw(pb.stderr)[0],
           "(8) steps 1..10 printed, the same with checkpoints saved", orderA)
    epochs = [float(m.group(1)) for m in re.finditer(r"  epoch (\S+)  ", pa.stderr)]
    chk.ok(len(epochs) == 10 and all(abs(e - 4 * (i + 1) / 28.0) < 1e-3 for i, e in enumerate(epochs)),
           "(8) the progress lines show the fractional epoch: samples / 28 records (%s ... %s)"
           % (epochs[:1], epochs[-1:]), epochs)
    ck4 = os.path.join(B, "checkpoint-4")
    files = sorted(os.listdir(ck4)) if os.path.isdir(ck4) else []
    chk.ok(files == sorted(CKPT_FILES + ("loader_cursor.json",)),
           "(8) a shard checkpoint holds the four files and loader_cursor.json", files)
    try:
        ts = load_json(os.path.join(ck4, "trainer_state.json"))
        cur = load_json(os.path.join(ck4, "loader_cursor.json"))
        lc = ts.get("loader_cursor") or {}
        chk.ok(lc.get("file") == "loader_cursor.json" and lc.get("samples") == "16" and
               cur.get("format") == "tspeft-loader-cursor" and cur.get("samples") == 16 and
               cur.get("batches") == 8 and len(cur.get("sources") or []) == 2,
               "(8) trainer_state names loader_cursor.json; the cursor is at 16 samples, 8 batches, 2 sources",
               "%s\n%s" % (lc, cur))
        chk.ok(ts.get("config", {}).get("data") == [sa, data[1]],
               "(8) the saved config lists both --data specs as given", ts.get("config", {}).get("data"))
    except (OSError, ValueError) as e:
        chk.ok(False, "(8) checkpoint-4 state files parse", e)

    # resume from checkpoint-4 (later checkpoint deleted), then from the run directory with --prefetch 0
    R1 = cx.path("r8_R1")
    shutil.copytree(B, R1)
    shutil.rmtree(os.path.join(R1, "checkpoint-8"))
    remove_final(R1)
    p = cx.train(SHARD1 + data + SAVE4 + ["--out", R1, "--resume", os.path.join(R1, "checkpoint-4")], data=sa)
    compare_resumed(cx, "(8) shards --resume checkpoint-4", p, progA, 5, 10, R1, A)
    if p.returncode == 0:
        chk.ok(same_file(os.path.join(R1, "checkpoint-8", "loader_cursor.json"),
                         os.path.join(B, "checkpoint-8", "loader_cursor.json")),
               "(8) the re-saved checkpoint-8/loader_cursor.json is byte-identical to the original")
    R2 = cx.path("r8_R2")
    shutil.copytree(B, R2)
    remove_final(R2)
    p = cx.train(SHARD1 + data + SAVE4 + ["--out", R2, "--resume", R2, "--prefetch", 0], data=sa)
    compare_resumed(cx, "(8) shards --resume OUT (checkpoint-8) with --prefetch 0", p, progA, 9, 10, R2, A)

    # packed rows
    chk.section("(8) exact resume from shards: --pack")
    pk = [a if a != 10 else 8 for a in SHARD1] + ["--pack", "--max-seq-len", 24]
    a, b = cx.path("r8_pack_A"), cx.path("r8_pack_B")
    pa2 = cx.train(pk + data + ["--out", a], data=sa)
    pb2 = cx.train(pk + data + SAVE4 + ["--out", b], data=sa)
    if chk.ok(pa2.returncode == 0 and pb2.returncode == 0 and os.path.isdir(os.path.join(b, "checkpoint-4")),
              "(8) packed runs exit 0, checkpoint-4 written", pa2.stderr + pb2.stderr):
        cur = load_json(os.path.join(b, "checkpoint-4", "loader_cursor.json"))
        chk.ok(cur.get("samples", 0) > 16,
               "(8) packing puts more than one record in a row (%s samples in 16 rows of 24)" % cur.get("samples"))
        remove_final(b)
        p = cx.train(pk + data + SAVE4 + ["--out", b, "--resume", os.path.join(b, "checkpoint-4")], data=sa)
        compare_resumed(cx, "(8) packed --resume checkpoint-4", p, prog_raw(pa2.stderr)[0], 5, 8, b, a)

    # another batch size continues the same sample stream (shards only)
    p = cx.train([x if x != 2 or i == 0 or SHARD1[i - 1] != "--batch-size" else 1 for i, x in enumerate(SHARD1)] +
                 data + ["--save-every", 2, "--keep-checkpoints", 0, "--out", R2, "--resume",
                         os.path.join(R2, "checkpoint-4")], data=sa)
    try:
        cur6 = load_json(os.path.join(R2, "checkpoint-6", "loader_cursor.json"))
    except (OSError, ValueError):
        cur6 = {}
    chk.ok(p.returncode == 0 and cur6.get("samples") == 16 + 2 * 2 * 1,
           "(8) resuming with --batch-size 1 continues the stream: checkpoint-6 at 16 + 2 x 2 x 1 samples",
           "%s\n%s" % (cur6, p.stderr))

    # mismatches: another shuffle window, a changed shard, JSONL data: exit 1, nothing changed
    chk.section("(8) shard resume mismatches")
    M = cx.path("r8_M")
    shutil.copytree(B, M)
    before = snapshot(M)
    sw = [x if not (i > 0 and SHARD1[i - 1] == "--shuffle-window") else 0 for i, x in enumerate(SHARD1)]
    p = cx.train(sw + data + SAVE4 + ["--out", M, "--resume", M], data=sa)
    chk.ok(p.returncode == 1 and re.search(r"shuffle_window is 2 in the checkpoint but 0 now", last_line(p.stderr)),
           "(8) another --shuffle-window: exit 1 naming shuffle_window and both values: %r" % last_line(p.stderr),
           p.stderr)
    shutil.copyfile(cx.path("s_b-1.shard"), cx.path("s_b-1.keep"))
    rows_b = U.pattern_data(cx.path("s_b.jsonl"), n_rows=12, seed=5)
    U.make_shard(cx.tspeft, cx.path("s_b-1.shard"), rows_b[6:11])   # one record fewer, same name
    p = cx.train(SHARD1 + data + SAVE4 + ["--out", M, "--resume", M], data=sa)
    shutil.move(cx.path("s_b-1.keep"), cx.path("s_b-1.shard"))
    chk.ok(p.returncode == 1 and "another data mix" in last_line(p.stderr) and M in last_line(p.stderr),
           "(8) a shard changed under the same name: the cursor is refused (exit 1): %r" % last_line(p.stderr),
           p.stderr)
    p = cx.train(sw + SAVE4 + ["--out", M, "--resume", M])     # JSONL (and its shuffle window 0)
    chk.ok(p.returncode == 1 and re.search(r"\bdata\b.*s_a\.shard.*%s" % re.escape(cx.data), last_line(p.stderr)),
           "(8) resuming a shard run with JSONL --data: exit 1 naming data and both values", p.stderr)
    diff = snap_diff(before, snapshot(M))
    chk.ok(not diff, "(8) the failed resumes changed nothing in the run directory", "\n".join(diff))


# ------------------------------------------------------------------------------------------------

def run_all(cx):
    mcfg = U.tiny_model(cx.model, seed=7)
    U.pattern_data(cx.data, n_rows=16, seed=3)
    U.tiny_model(cx.big, seed=7, hidden=256, inter=512)
    B = test_exact_resume(cx, mcfg)
    if B:
        test_contents(cx, mcfg, B)
        test_mismatch(cx, B)
    test_shard_resume(cx)
    test_full_disk(cx)
    test_nonfinite(cx)
    test_signals(cx)
    test_signal_last_step(cx)
    test_kill9(cx)
    test_save_order(cx)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tspeft", required=True, help="path to the tspeft binary")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = ap.parse_args()
    if not os.access(a.tspeft, os.X_OK):
        print("test_resume: %s is not an executable" % a.tspeft)
        return 1
    chk = U.Checks("test_resume")
    tmp = tempfile.mkdtemp(prefix="tspeft_resume_")
    cx = Ctx(os.path.abspath(a.tspeft), tmp, chk)
    try:
        run_all(cx)
    except Exception:  # noqa: BLE001
        import traceback
        traceback.print_exc()
        chk.ok(False, "the test itself raised")
    rc = chk.finish()
    if a.keep or rc:
        print("files kept in %s" % tmp)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
