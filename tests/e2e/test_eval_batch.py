#!/usr/bin/python3
"""`tspeft eval --eval-batch N` (records decoded together, a record's beams as one batch) against
`--eval-batch 1` (one record, one beam at a time): the per-sample JSONL and the metrics must be
byte-identical. Fixture: test_eval_e2e.py's tiny random LLaMA with a TS-gated LoRA (one module gated
off), a tokenizer trained here, BoolQ's first 24 records (a generated BoolQ-style file when
../shared/data is absent).

    /usr/bin/python3 tests/e2e/test_eval_batch.py --tspeft build/tspeft

Checks:
  (a) greedy, --mode both, batches of 5 (the last one short) and of 24, against one at a time; the eos
      is a token that the model emits early in record 0, so that rows leave the batch at different
      steps (checked: some generations stop before --max-new-tokens and some do not);
  (b) --beams 4 with the beams batched against one beam at a time (the eos as in (a));
  (c) --eval-batch 0 and 65: one-line usage error, exit 2;
  (d) a record longer than the model's positions: the same error line (file, record) at --eval-batch 1
      and 4, no output written.
Exit status 0 when every check passed, 1 otherwise.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import e2e_util as U  # noqa: E402
import sentencepiece as spm  # noqa: E402

import test_eval_e2e as E  # noqa: E402  (its fixture builders; its checks do not run on import)

N_REC = 24
NEW = 12


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tspeft", required=True)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    chk = U.Checks("test_eval_batch")
    probe = U.run(args.tspeft, ["eval", "--data", "x"])
    if "no dataset readers" in probe.stderr:
        print("SKIP test_eval_batch: %s" % probe.stderr.strip())
        return 0
    tmp = tempfile.mkdtemp(prefix="tspeft-evalbatch-")
    try:
        run_checks(chk, os.path.abspath(args.tspeft), tmp)
    finally:
        if args.keep:
            print("kept %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return chk.finish()


def run_checks(chk, tspeft, tmp):
    if os.path.isfile(E.BOOLQ):
        with open(E.BOOLQ) as f:
            rows = json.load(f)[:N_REC]
        chk.section("setup: real BoolQ (%s, first %d records)" % (E.BOOLQ, N_REC))
    else:
        rows = E.boolq_rows(N_REC, 1)
        chk.section("setup: ../shared/data absent: generated BoolQ-style data")
    os.makedirs(os.path.join(tmp, "boolq"))
    data = os.path.join(tmp, "boolq", "test.json")
    with open(data, "w") as f:
        json.dump(rows, f)
    tok = E.train_tokenizer(tmp, rows + E.boolq_rows(40, 9))
    sp = spm.SentencePieceProcessor(model_file=tok)
    model, adapter = os.path.join(tmp, "model"), os.path.join(tmp, "adapter")
    E.make_model(model, sp.get_piece_size())
    E.make_adapter(adapter, model)

    # the eos: record 0's fifth generated token (so record 0 stops early and others need not)
    ids = [sp.bos_id()] + sp.encode(E.generate_prompt(rows[0]["instruction"], rows[0]["input"]))
    p = U.run(tspeft, ["generate", "--model", model, "--adapter", adapter, "--ids", ",".join(map(str, ids)),
                       "--max-new-tokens", NEW, "--eos", -1])
    if not chk.ok(p.returncode == 0, "tspeft generate --ids for record 0 exits 0", p.stderr):
        return
    gen0 = [int(t) for t in p.stdout.replace(",", " ").split()]
    eos = gen0[4]

    def run_eval(tag, extra):
        out = os.path.join(tmp, tag + ".json")
        p = U.run(tspeft, ["eval", "--model", model, "--adapter", adapter, "--tokenizer", tok, "--data", data,
                           "--max-new-tokens", NEW, "--eos", eos, "--out", out] + extra, timeout=300)
        if not chk.ok(p.returncode == 0, "eval %s exits 0" % " ".join(map(str, extra)), p.stderr):
            return None
        with open(out) as f:
            res = json.load(f)
        with open(out[:-5] + ".samples.jsonl", "rb") as f:
            return res["tasks"], f.read()

    chk.section("(a) greedy, --mode both: batches of 5 and 24 against one record at a time")
    one = run_eval("one", ["--mode", "both", "--eval-batch", 1])
    if one:
        lines = [json.loads(l) for l in one[1].decode().splitlines()]
        n_new = [l["new_tokens"] for l in lines if l["protocol"] == "gen"]
        chk.ok(len(n_new) == N_REC and min(n_new) < NEW and max(n_new) == NEW,
               "(a) rows finish at different steps (new tokens %s, eos %d)" % (n_new, eos))
    for eb in (5, 24):
        got = run_eval("b%d" % eb, ["--mode", "both", "--eval-batch", eb])
        if one and got:
            chk.ok(got[1] == one[1], "(a) --eval-batch %d: per-sample JSONL byte-identical to --eval-batch 1" % eb)
            chk.ok(got[0][0]["metrics"] == one[0][0]["metrics"], "(a) --eval-batch %d: metrics identical" % eb)

    chk.section("(b) --beams 4: the beams as one batch against one beam at a time")
    one = run_eval("beam1", ["--limit", 6, "--beams", 4, "--eval-batch", 1])
    got = run_eval("beam4", ["--limit", 6, "--beams", 4, "--eval-batch", 8])
    if one and got:
        chk.ok(got[1] == one[1], "(b) beam search batched: per-sample JSONL byte-identical")
        n_new = [json.loads(l)["new_tokens"] for l in one[1].decode().splitlines()]
        chk.ok(min(n_new) < NEW, "(b) some beam searches end before %d tokens (%s)" % (NEW, n_new))

    chk.section("(c) bad --eval-batch")
    for v in (0, 65):
        p = U.run(tspeft, ["eval", "--model", model, "--tokenizer", tok, "--data", data, "--eval-batch", v])
        chk.ok(p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "--eval-batch" in p.stderr,
               "(c) --eval-batch %d: one-line usage error, exit 2" % v, p.stderr)

    chk.section("(d) a record longer than the model's positions: the same error batched or not")
    long_rows = [dict(r) for r in rows[:6]]
    long_rows[3]["instruction"] += " very" * 1500
    os.makedirs(os.path.join(tmp, "long", "boolq"))
    long_data = os.path.join(tmp, "long", "boolq", "test.json")
    with open(long_data, "w") as f:
        json.dump(long_rows, f)
    errs = []
    for eb in (1, 4):
        out = os.path.join(tmp, "long%d.json" % eb)
        p = U.run(tspeft, ["eval", "--model", model, "--adapter", adapter, "--tokenizer", tok, "--data", long_data,
                           "--eval-batch", eb, "--out", out])
        last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
        chk.ok(p.returncode != 0 and "record 3" in last and long_data in last and not os.path.exists(out),
               "(d) --eval-batch %d: exits non-zero naming the file and record 3, writes nothing" % eb, p.stderr)
        errs.append(last)
    chk.ok(errs[0] == errs[1], "(d) the error line is the same at --eval-batch 1 and 4", "\n".join(errs))


if __name__ == "__main__":
    sys.exit(main())
