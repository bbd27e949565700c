#!/usr/bin/python3
"""`tspeft train --data` on shards (docs/shards.md "Training from shards"), on a tiny random LLaMA.

    /usr/bin/python3 tests/e2e/test_train_shards.py --tspeft build/tspeft [--keep]

Shards are written by the test helper BUILD/tests/make_shard (tests/tools/make_shard.c).
(1) the same rows as JSONL and as one shard, in file order (--grad-accum 2, wrapping past an epoch):
    identical printed steps and a byte-identical adapter; the format is told by the magic, not the
    name (a shard named .jsonl, JSONL named .shard give the same run); shard runs print the epoch.
(2) several datasets: a glob and a directory of the same shards are one dataset each and give the
    same run; the start line counts datasets, shards and records; another weight changes the run.
(3) --pack: micro-batches have exactly --max-seq-len columns (from --dump's logits), and the packed
    loss equals the loss of a JSONL file holding the same rows built here in Python (records laid
    greedily in file order, each packed record's first label -100, one plain causal row with
    continuous positions), i.e. packing = TRL-style concatenation under the plain causal mask.
(4) errors (exit 1, one line): a batch with images names the shard and the record; a glob matching
    nothing; weight 0; JSONL mixed with shards; --pack with JSONL. --help documents the conventions.
Exit status 0 when every check passed, 1 otherwise.
"""
import argparse
import json
import os
import re
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_util as U  # noqa: E402  (puts tests/parity on sys.path)

import numpy as np  # noqa: E402

import st  # noqa: E402

PROG = re.compile(r"^step (\d+)/(\d+)  loss (\S+)  lr (\S+)  gnorm (\S+)  keep (\S+)  ")
BASE = ["--target-modules", "all", "--r", 4, "--lr", 1e-2, "--threads", 1]


def prog(stderr):
    return [m.group(0) for m in map(PROG.match, stderr.splitlines()) if m]


def same_file(a, b):
    try:
        return U.read_bytes(a) == U.read_bytes(b)
    except OSError:
        return False


def last_line(s):
    lines = [x for x in s.splitlines() if x.strip()]
    return lines[-1] if lines else ""


def train(tspeft, model, datas, extra):
    args = ["train", "--model", model]
    for d in datas:
        args += ["--data", d]
    return U.run(tspeft, args + BASE + [str(a) for a in extra])


def pack_rows(rows, L):
    """Greedy packing of the loader (datasets/loader.h, no shuffle): records in file order, a record
    goes into the current row when it fits, else starts the next; first label of each record -100."""
    out, cur = [], None
    for r in rows:
        ids, labels = r["input_ids"][:L], r["labels"][:L]
        if cur is None or len(cur["input_ids"]) + len(ids) > L:
            cur = {"input_ids": [], "labels": []}
            out.append(cur)
        cur["input_ids"] += ids
        cur["labels"] += [-100] + labels[1:]
    for r in out:  # pad to L with masked positions (the loader's rows are exactly L long)
        n = len(r["input_ids"])
        r["attention_mask"] = [1] * n + [0] * (L - n)
        r["input_ids"] += [0] * (L - n)
        r["labels"] += [-100] * (L - n)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tspeft", required=True)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    tspeft = os.path.abspath(a.tspeft)
    chk = U.Checks("test_train_shards")
    tmp = tempfile.mkdtemp(prefix="tspeft_shards_")
    P = lambda *x: os.path.join(tmp, *x)  # noqa: E731
    try:
        model = P("model")
        U.tiny_model(model, seed=7)
        rows = U.pattern_data(P("data.jsonl"), n_rows=16, seed=3)
        U.make_shard(tspeft, P("a.shard"), rows, frame_target=200)

        chk.section("(1) JSONL and a shard of the same rows")
        cmd = ["--batch-size", 2, "--grad-accum", 2, "--steps", 6]   # 24 rows: wraps past the 16
        pj = train(tspeft, model, [P("data.jsonl")], cmd + ["--out", P("o_jsonl")])
        ps = train(tspeft, model, [P("a.shard")], cmd + ["--out", P("o_shard")])
        ok = chk.ok(pj.returncode == 0 and ps.returncode == 0, "(1) both runs exit 0", pj.stderr + ps.stderr)
        if ok:
            chk.ok(prog(pj.stderr) == prog(ps.stderr) and len(prog(ps.stderr)) == 6,
                   "(1) the shard run prints the JSONL run's 6 steps (loss, lr, gnorm, keep)",
                   "\n".join(prog(pj.stderr) + prog(ps.stderr)))
            chk.ok(same_file(P("o_jsonl", "adapter_model.safetensors"), P("o_shard", "adapter_model.safetensors")),
                   "(1) and writes a byte-identical adapter")
            ep = re.findall(r"  epoch (\S+)  ", ps.stderr)
            chk.ok(ep == ["%.3f" % (4 * k / 16) for k in range(1, 7)] and "epoch" not in pj.stderr,
                   "(1) shard progress lines show the epoch (0.250 ... 1.500); JSONL lines do not", ep)
        shutil.copyfile(P("a.shard"), P("disguised.jsonl"))
        shutil.copyfile(P("data.jsonl"), P("disguised.shard"))
        p1 = train(tspeft, model, [P("disguised.jsonl")], cmd)
        p2 = train(tspeft, model, [P("disguised.shard")], cmd)
        chk.ok(p1.returncode == 0 and "1 shard" in p1.stderr and prog(p1.stderr) == prog(ps.stderr),
               "(1) a shard named .jsonl is read as a shard", p1.stderr)
        chk.ok(p2.returncode == 0 and "16 rows" in p2.stderr and prog(p2.stderr) == prog(pj.stderr),
               "(1) JSONL named .shard is read as JSONL", p2.stderr)

        chk.section("(2) several datasets: globs, directories, weights")
        rows_b = U.pattern_data(P("b.jsonl"), n_rows=12, seed=5)
        os.makedirs(P("bdir"))
        U.make_shard(tspeft, P("bdir", "b-0.shard"), rows_b[:6])
        U.make_shard(tspeft, P("bdir", "b-1.shard"), rows_b[6:])
        with open(P("bdir", "README"), "w") as f:
            f.write("not a shard\n")
        mix = ["--shuffle", "--batch-size", 2, "--steps", 5, "--seed", 4]
        pg = train(tspeft, model, [P("a.shard"), P("bdir", "b-*.shard") + ":3"], mix)
        pd = train(tspeft, model, [P("a.shard"), P("bdir") + ":3"], mix)
        pw = train(tspeft, model, [P("a.shard"), P("bdir") + ":0.5"], mix)
        if chk.ok(pg.returncode == 0 and pd.returncode == 0 and pw.returncode == 0,
                  "(2) glob, directory (with a non-shard file in it) and weights run", pg.stderr + pd.stderr + pw.stderr):
            chk.ok("2 datasets, 3 shards, 28 records" in pg.stderr,
                   "(2) the start line says 2 datasets, 3 shards, 28 records", pg.stderr.splitlines()[:1])
            chk.ok(prog(pg.stderr) == prog(pd.stderr), "(2) a glob and a directory of the same shards give the same run")
            chk.ok(prog(pg.stderr) != prog(pw.stderr), "(2) weight 0.5 instead of 3 changes the run")

        chk.section("(3) --pack")
        L = 24
        pp = train(tspeft, model, [P("a.shard")], ["--pack", "--max-seq-len", L, "--batch-size", 3, "--steps", 1,
                                                   "--lr", 0, "--dump", P("dump_pack")])
        packed = pack_rows(rows, L)[:3]
        U.write_jsonl(P("packed.jsonl"), packed)
        pr = train(tspeft, model, [P("packed.jsonl")], ["--batch-size", 3, "--steps", 1, "--lr", 0,
                                                        "--dump", P("dump_ref")])
        if chk.ok(pp.returncode == 0 and pr.returncode == 0, "(3) packed shard run and its JSONL reference exit 0",
                  pp.stderr + pr.stderr):
            dp, dr = st.load(P("dump_pack", "step1.safetensors")), st.load(P("dump_ref", "step1.safetensors"))
            chk.ok(dp["logits.0"].shape == (3, L, U.VOCAB),
                   "(3) packed micro-batch is 3 x %d (rows of exactly --max-seq-len)" % L, dp["logits.0"].shape)
            lp, lr_ = float(dp["loss"][0]), float(dr["loss"][0])
            chk.ok(lp == lr_ and np.array_equal(dp["logits.0"], dr["logits.0"]),
                   "(3) packed loss %.6f == the loss of the same rows concatenated under a plain causal mask "
                   "(%.6f), logits identical" % (lp, lr_))
            unpacked = train(tspeft, model, [P("a.shard")], ["--batch-size", 3, "--steps", 1, "--lr", 0])
            chk.ok(prog(unpacked.stderr) != prog(pp.stderr), "(3) the packed loss differs from the unpacked one")
        chk.ok("TRL" in U.run(tspeft, ["train", "--help"]).stdout,
               "(3) --help says packing is TRL-style (plain causal mask, continuous positions)")

        chk.section("(4) errors")
        img = [dict(r) for r in rows]
        img[5]["images"] = 1
        U.make_shard(tspeft, P("img.shard"), img)
        p = train(tspeft, model, [P("a.shard"), P("img.shard")], ["--steps", 20, "--batch-size", 2, "--out", P("o_img")])
        chk.ok(p.returncode == 1 and re.search(r"img\.shard: record 5 has 1 image.*text-only", last_line(p.stderr)) and
               not os.path.exists(P("o_img", "adapter_model.safetensors")),
               "(4) a batch with an image: exit 1 naming the shard and record, no adapter: %r" % last_line(p.stderr),
               p.stderr)
        cases = (([P("none-*.shard")], "no file matches"),
                 ([P("a.shard") + ":0"], "weight 0 (expected a number > 0)"),
                 ([P("a.shard"), P("data.jsonl")], "JSONL is one dataset on its own"),
                 ([P("missing.shard")], "cannot open"))
        for datas, want in cases:
            p = train(tspeft, model, datas, ["--steps", 1])
            chk.ok(p.returncode == 1 and want in last_line(p.stderr) and len(p.stderr.strip().splitlines()) == 1,
                   "(4) --data %s: exit 1, %r" % (" ".join(os.path.basename(d) for d in datas), last_line(p.stderr)),
                   p.stderr)
        p = train(tspeft, model, [P("data.jsonl")], ["--pack", "--steps", 1])
        chk.ok(p.returncode == 1 and "shards only" in last_line(p.stderr), "(4) --pack with JSONL: exit 1", p.stderr)
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
