"""Shared helpers of the end-to-end tests (tests/e2e/test_*.py): running the binary, tiny fixtures
built with tests/parity (fixtures.py, st.py, reference.py; not modified), and a check counter.

    import e2e_util as U
    chk = U.Checks("test_train_e2e")
    U.tiny_model(os.path.join(tmp, "model"), seed=7)
    U.pattern_data(os.path.join(tmp, "data.jsonl"), n_rows=16, seed=3)
    p = U.run(tspeft, ["train", "--model", ...])      # subprocess.CompletedProcess (text)
    chk.ok(p.returncode == 0, "train exits 0", p.stderr)
    sys.exit(chk.finish())                              # 1 when any check failed
"""
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PARITY = os.path.join(os.path.dirname(HERE), "parity")
if PARITY not in sys.path:
    sys.path.insert(0, PARITY)

import numpy as np  # noqa: E402

import fixtures as FX  # noqa: E402

PEFT = "base_model.model."
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]

# Tiny LLaMA of the e2e tests: hidden 64, 4 heads / 2 kv heads (GQA), 2 layers, vocab 128.
MODEL_KW = dict(hidden=64, heads=4, kv_heads=2, inter=128, layers=2, vocab=128)
VOCAB = MODEL_KW["vocab"]


def module_names(layers=2):
    out = []
    for L in range(layers):
        out += ["model.layers.%d.self_attn.%s" % (L, p) for p in ATTN]
        out += ["model.layers.%d.mlp.%s" % (L, p) for p in ("gate_proj", "up_proj", "down_proj")]
    return out


def tiny_model(d, seed=7, **kw):
    """Random HF LLaMA directory (tests/parity/fixtures.make_model) with MODEL_KW; returns config."""
    args = dict(MODEL_KW)
    args.update(kw)
    return FX.make_model(d, seed, **args)


def pattern_row(start, length, prompt=3, vocab=VOCAB):
    """A counting row start, start+1, ... over the ids 3..vocab-1 (cyclic); the first `prompt`
    labels are -100 (the prompt part), the rest equal input_ids."""
    span = vocab - 3
    ids = [3 + (start - 3 + k) % span for k in range(length)]
    labels = [-100] * prompt + ids[prompt:]
    return {"input_ids": ids, "labels": labels}


def pattern_data(path, n_rows=16, seed=3, vocab=VOCAB):
    """A learnable JSONL set: each row counts upwards from an EVEN start (so a prompt starting at an
    odd id never shares a prefix with a training row). Ids 1 and 2 never occur. Returns the rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_rows):
        start = 4 + 2 * int(rng.integers(0, 48))
        rows.append(pattern_row(start, int(rng.integers(10, 17)), vocab=vocab))
    write_jsonl(path, rows)
    return rows


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def run(tspeft, args, timeout=60, env=None):
    """Runs the binary; never raises on a non-zero exit. Returns CompletedProcess (text)."""
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "2")
    if env:
        e.update(env)
    return subprocess.run([tspeft] + [str(a) for a in args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=timeout, env=e)


PROGRESS_RE = re.compile(r"^step (\d+)/(\d+)  loss (\S+)  lr (\S+)  gnorm (\S+)  keep (\S+)  ")


def progress(stderr):
    """The progress lines of `tspeft train`: list of dicts step, steps, loss, lr, gnorm, keep."""
    out = []
    for line in stderr.splitlines():
        m = PROGRESS_RE.match(line)
        if m:
            out.append({"step": int(m.group(1)), "steps": int(m.group(2)), "loss": float(m.group(3)),
                        "lr": float(m.group(4)), "gnorm": float(m.group(5)),
                        "keep": float(m.group(6))})
    return out


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


class Checks:
    """Counts checks; every check prints one line (ok / FAIL) so a log shows what was verified."""

    def __init__(self, name):
        self.name = name
        self.failed = []
        self.n = 0
        self.t0 = time.time()

    def ok(self, cond, what, detail=None):
        self.n += 1
        if cond:
            print("  ok    %s" % what)
        else:
            print("  FAIL  %s" % what)
            if detail:
                for line in str(detail).rstrip().splitlines()[-25:]:
                    print("        | %s" % line)
            self.failed.append(what)
        sys.stdout.flush()
        return bool(cond)

    def section(self, title):
        print("%s (%.1fs)" % (title, time.time() - self.t0))
        sys.stdout.flush()

    def finish(self):
        dt = time.time() - self.t0
        if self.failed:
            print("%s: %d of %d checks FAILED (%.1fs):" % (self.name, len(self.failed), self.n, dt))
            for f in self.failed:
                print("  - %s" % f)
            return 1
        print("%s: all %d checks passed (%.1fs)" % (self.name, self.n, dt))
        return 0


def make_shard(tspeft, path, rows, frame_target=256):
    """Writes rows (dicts: input_ids, labels, optional kinds / images / meta) as a shard with the test
    helper built beside the binary (BUILD/tests/make_shard, tests/tools/make_shard.c). Raises on
    failure (a broken fixture is not a finding)."""
    tool = os.path.join(os.path.dirname(os.path.abspath(tspeft)), "tests", "make_shard")
    src = path + ".src.jsonl"
    write_jsonl(src, rows)
    p = subprocess.run([tool, path, src, "--frame-target", str(frame_target)], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=60)
    os.remove(src)
    if p.returncode != 0:
        raise RuntimeError("make_shard %s failed: %s" % (path, p.stderr.strip()))
    return path
