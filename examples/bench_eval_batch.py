#!/usr/bin/env python3
"""Batched evaluation against one record at a time, side by side in one run: `tspeft eval --mode gen`
over the first --limit records of BoolQ with the 134M-shaped random LLaMA, at --eval-batch 1 and then
at each --eval-batch N given, same thread count; prints samples/s of each, each ratio to the first
with PASS/FAIL against the target (>= 3), peak RSS, and whether every per-sample JSONL file is
byte-identical to the first.

    python3 examples/bench_eval_batch.py [--tspeft build/tspeft] [--threads 2] [--limit 200]
        [--eval-batch 16[,64,...]] [--data ../shared/data/csr/boolq/test.json] [--work DIR] [--json FILE]

The model: examples/make_random_llama.py, dim 768, 12 layers, 12 heads, ffn 2048, vocabulary 32000
(134M parameters, F32, seed 0), written into --work (default: a temporary directory; an existing
--work/model134 is reused). The tokenizer: sentencepiece BPE (8000 pieces, byte fallback) trained with
spm_train on the data's instructions, so prompts have realistic lengths (BoolQ: 83-89 tokens, 85 on
average).
A random model never emits its eos, so every record decodes the full 32 new tokens (no row leaves a
batch early). Samples/s = records / the task's seconds in the results
JSON (model loading excluded). On a shared machine both runs move with the other load: they run one
after the other, and the ratio is what is quoted.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = 3.0


def default_data():
    for p in ("/work/shared/data/csr/boolq/test.json",
              os.path.join(os.path.dirname(ROOT), "shared", "data", "csr", "boolq", "test.json")):
        if os.path.isfile(p):
            return p
    return None


def prepare(work, data):
    model = os.path.join(work, "model134")
    if not os.path.isfile(os.path.join(model, "model.safetensors")):
        subprocess.run([sys.executable, os.path.join(ROOT, "examples", "make_random_llama.py"), model, "--hidden", "768",
                        "--layers", "12", "--heads", "12", "--kv-heads", "12", "--intermediate", "2048", "--vocab",
                        "32000", "--max-pos", "1024", "--seed", "0"], check=True, stdout=subprocess.DEVNULL)
    tok = os.path.join(work, "tok.model")
    if not os.path.isfile(tok):
        spm_train = shutil.which("spm_train")
        if not spm_train:
            sys.exit("bench_eval_batch: spm_train (sentencepiece) is needed to train the tokenizer")
        corpus = os.path.join(work, "corpus.txt")
        with open(data) as f, open(corpus, "w") as out:
            for r in json.load(f):
                out.write(r["instruction"].replace("\n", " ") + "\n")
        subprocess.run([spm_train, "--input=" + corpus, "--model_prefix=" + tok[:-6], "--model_type=bpe",
                        "--vocab_size=8000", "--hard_vocab_limit=false", "--byte_fallback=true", "--unk_id=0",
                        "--bos_id=1", "--eos_id=2", "--pad_id=-1", "--character_coverage=1.0", "--num_threads=1",
                        "--minloglevel=2"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return model, tok


def run_eval(args, model, tok, eb, out):
    cmd = [args.tspeft, "eval", "--model", model, "--tokenizer", tok, "--data", args.data, "--mode", "gen",
           "--limit", str(args.limit), "--threads", str(args.threads), "--eval-batch", str(eb), "--out", out]
    print("$ " + " ".join(cmd), flush=True)
    with open(out + ".stderr", "w+") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, ru = os.wait4(p.pid, 0)
        err.seek(0)
        stderr = err.read()
    if status != 0:
        sys.exit("bench_eval_batch: eval --eval-batch %d failed:\n%s" % (eb, stderr[-2000:]))
    with open(out) as f:
        task = json.load(f)["tasks"][0]
    with open(out[:-5] + ".samples.jsonl", "rb") as f:
        samples = f.read()
    return {"eval_batch": eb, "n": task["n"], "seconds": task["seconds"], "samples_per_s": task["n"] / task["seconds"],
            "acc": task["metrics"]["csr_gen_acc"], "peak_rss_mib": ru.ru_maxrss / 1024.0}, samples


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tspeft", default=os.path.join(ROOT, "build", "tspeft"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--eval-batch", default="16", help="batch sizes to measure, comma-separated")
    ap.add_argument("--data", default=default_data())
    ap.add_argument("--work", help="directory for the model and tokenizer (kept; reused when present)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    if not args.data or not os.path.isfile(args.data):
        sys.exit("bench_eval_batch: BoolQ's test.json not found; give --data PATH")
    work = args.work or tempfile.mkdtemp(prefix="tspeft-bench-eval-")
    os.makedirs(work, exist_ok=True)
    sizes = [int(v) for v in args.eval_batch.split(",")]
    try:
        model, tok = prepare(work, args.data)
        one, s1 = run_eval(args, model, tok, 1, os.path.join(work, "one.json"))
        runs = [run_eval(args, model, tok, eb, os.path.join(work, "batch%d.json" % eb)) for eb in sizes]
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print("BoolQ first %d records, --mode gen (greedy, 32 new tokens), 134M random model, %d threads" %
          (args.limit, args.threads))
    same = True
    for r, samples in [(one, s1)] + runs:
        line = "  --eval-batch %-3d %8.3f samples/s  (%.1f s, peak RSS %.0f MiB)" % (
            r["eval_batch"], r["samples_per_s"], r["seconds"], r["peak_rss_mib"])
        if r is not one:
            r["ratio"] = r["samples_per_s"] / one["samples_per_s"]
            r["identical"] = samples == s1
            same = same and r["identical"]
            line += "  ratio %.2f (target >= %.1f) %s  JSONL %s" % (r["ratio"], TARGET, "PASS" if r["ratio"] >= TARGET
                                                                    else "FAIL", "identical" if r["identical"] else "DIFFERS")
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"one": one, "batched": [r for r, _ in runs], "threads": args.threads, "limit": args.limit}, f,
                      indent=1)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
