#!/usr/bin/env python3
"""Toy sequence tasks for the smallest end-to-end run, and their evaluation through `tspeft generate`.

Vocabulary (64 ids): 0 pad, 1 BOS, 2 EOS, 3 SEP, 4..63 the numbers 0..59.
  pretrain   BOS a, a+d, a+2d, ... (mod 60), strides d in 1..4, every token a target
  finetune   BOS a, a+d, ..., a+(k-1)d SEP a+kd ... a+(k+5)d EOS with k in 2..5: a new format (SEP and
             EOS never occur in pretraining); the prompt (up to SEP) is masked with -100
  eval       40 held-out (a, d, k) prompts; exact match of the 6 generated numbers

    python3 examples/toy_tasks.py make DIR [--seed 0]
    python3 examples/toy_tasks.py eval --tspeft build/tspeft --model M [--adapter A] --data DIR/eval.jsonl
"""
import argparse
import json
import os
import random
import subprocess
import sys

BOS, EOS, SEP, NUM0, MOD = 1, 2, 3, 4, 60


def prog(a, d, n):
    return [NUM0 + (a + i * d) % MOD for i in range(n)]


def make(out, seed):
    os.makedirs(out, exist_ok=True)
    rng = random.Random(seed)
    with open(os.path.join(out, "pretrain.jsonl"), "w") as f:
        for _ in range(2000):
            ids = [BOS] + prog(rng.randrange(MOD), rng.randint(1, 4), 16)
            f.write(json.dumps({"input_ids": ids}) + "\n")
    triples = [(a, d, k) for a in range(MOD) for d in (1, 2, 3, 4) for k in (2, 3, 4, 5)]
    rng.shuffle(triples)
    held, train = triples[:40], triples[40:]

    def row(a, d, k):
        p = [BOS] + prog(a, d, k) + [SEP]
        y = prog(a + k * d, d, 6) + [EOS]
        return {"input_ids": p + y, "labels": [-100] * len(p) + y}

    for name, rows in (("finetune", train), ("eval", held)):
        with open(os.path.join(out, name + ".jsonl"), "w") as f:
            for t in rows:
                f.write(json.dumps(row(*t)) + "\n")
    print("wrote %s: pretrain 2000 rows, finetune %d rows, eval %d rows" % (out, len(train), len(held)))


def evaluate(a):
    rows = [json.loads(l) for l in open(a.data) if l.strip()]
    hit = 0
    for r in rows:
        n_prompt = r["labels"].index(next(x for x in r["labels"] if x != -100))
        prompt, want = r["input_ids"][:n_prompt], r["input_ids"][n_prompt:n_prompt + 6]
        cmd = [a.tspeft, "generate", "--model", a.model, "--ids", ",".join(map(str, prompt)),
               "--max-new-tokens", "6", "--threads", str(a.threads)]
        if a.adapter:
            cmd += ["--adapter", a.adapter]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit("toy_tasks eval: tspeft generate failed: " + p.stderr.strip())
        got = [int(x) for x in p.stdout.split()]
        hit += got == want
    acc = hit / len(rows)
    print(json.dumps({"exact_match": acc, "n": len(rows)}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("out")
    m.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("eval")
    e.add_argument("--tspeft", required=True)
    e.add_argument("--model", required=True)
    e.add_argument("--adapter")
    e.add_argument("--data", required=True)
    e.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    make(a.out, a.seed) if a.cmd == "make" else evaluate(a)


if __name__ == "__main__":
    main()
