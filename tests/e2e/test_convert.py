#!/usr/bin/python3
"""`tspeft convert` for the text formats: LLM-Adapters / Alpaca JSON(L), GLUE TSV and
pre-tokenized JSONL into shards, read back with tests/dump_shard and checked against an independent
computation (Python sentencepiece on LLM-Adapters' training prompt, written out here from its
finetune.py), plus truncation/drop counts, shard rolling, metadata, malformed inputs, and a training run
on the result.

    /usr/bin/python3 tests/e2e/test_convert.py --tspeft build/tspeft [--keep]

Real data: /work/shared/data/csr (or ../shared/data/csr beside the checkout) when present; generated
records of the same schema otherwise. Exit 1 when a check failed.
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_util as U  # noqa: E402

import sentencepiece as spm  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IND = " " * 16


def llm_adapters_prompt(instruction, inp, output):
    """finetune.py's generate_prompt (LLM-Adapters), its whitespace written out."""
    if inp:
        return ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request. \n\n" + IND + "### Instruction:\n" + IND +
                instruction + "\n" + IND + "\n" + IND + "### Input:\n" + IND + inp + "\n" + IND + "\n" + IND +
                "### Response:\n" + IND + output)
    return ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.  \n\n" + IND + "### Instruction:\n" + IND + instruction + "\n" + IND + "\n" + IND +
            "### Response:\n" + IND + output)


def csr_dir():
    for d in ("/work/shared/data/csr", os.path.join(os.path.dirname(ROOT), "shared", "data", "csr")):
        if os.path.isfile(os.path.join(d, "boolq", "test.json")):
            return d
    return None


def dump(tool, path):
    p = subprocess.run([tool, path], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    if p.returncode:
        raise RuntimeError("dump_shard %s: %s" % (path, p.stderr))
    return [json.loads(line) for line in p.stdout.splitlines()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tspeft", required=True)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    tool = os.path.join(os.path.dirname(os.path.abspath(a.tspeft)), "tests", "dump_shard")
    chk = U.Checks("test_convert")
    tmp = tempfile.mkdtemp(prefix="tk_convert_")
    T = lambda *p: os.path.join(tmp, *p)  # noqa: E731
    try:
        # ---- fixtures: data and a tokenizer trained on it
        cdir = csr_dir()
        if cdir:
            with open(os.path.join(cdir, "boolq", "test.json")) as f:
                boolq = json.load(f)[:40]
            print("real data: %s" % cdir)
        else:
            boolq = [{"instruction": "Please answer the following question with true or false, question: is %d even?"
                      "\n\nAnswer format: true/false" % i, "input": "",
                      "output": "the correct answer is %s" % ("true" if i % 2 == 0 else "false"),
                      "answer": "true" if i % 2 == 0 else "false"} for i in range(40)]
            print("generated data (no ../shared/data)")
        os.makedirs(T("boolq"))
        with open(T("boolq", "test.json"), "w") as f:
            json.dump(boolq, f, indent=2)
        alpaca = [{"instruction": "Translate to French: word %d" % i, "input": ("context %d é ü" % i) if i % 2 else "",
                   "output": "mot numéro %d" % i} for i in range(9)]
        with open(T("alpaca.jsonl"), "w") as f:
            for r in alpaca:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        with open(T("corpus.txt"), "w") as f:
            for r in boolq + alpaca:
                f.write(llm_adapters_prompt(r["instruction"], r["input"], r["output"]) + "\n")
        p = subprocess.run(["spm_train", "--input=" + T("corpus.txt"), "--model_prefix=" + T("tok"), "--vocab_size=400",
                            "--model_type=bpe", "--byte_fallback=true", "--num_threads=1", "--seed_sentencepiece_size=100000"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        if p.returncode:
            raise RuntimeError("spm_train failed: %s" % p.stderr[-500:])
        tok = T("tok.model")
        sp = spm.SentencePieceProcessor(model_file=tok)
        bos, eos = sp.bos_id(), sp.eos_id()

        def expect_ids(r):
            return [bos] + sp.encode(llm_adapters_prompt(r["instruction"], r["input"], r["output"])) + [eos]

        # ---- LLM-Adapters JSON, defaults (labels on every token, as LLM-Adapters trains)
        chk.section("llm-adapters: ids, labels, kinds, metadata")
        p = U.run(a.tspeft, ["convert", "--format", "llm-adapters", "--input", T("boolq", "test.json"), "--tokenizer", tok,
                             "--out", T("out", "boolq.shard"), "--json"])
        chk.ok(p.returncode == 0, "convert exits 0", p.stderr)
        summary = json.loads(p.stdout) if p.returncode == 0 else {}
        recs = dump(tool, T("out", "boolq.shard")) if p.returncode == 0 else []
        chk.ok(len(recs) == len(boolq) and summary.get("records") == len(boolq), "%d records" % len(boolq), p.stdout)
        bad_ids = [i for i, (r, s) in enumerate(zip(boolq, recs)) if s["input_ids"] != expect_ids(r)]
        chk.ok(not bad_ids, "ids == [bos] + sentencepiece(LLM-Adapters prompt + output) + [eos]", bad_ids[:5])
        chk.ok(all(s["labels"] == s["input_ids"] for s in recs), "labels == input_ids (train_on_inputs default)")
        kinds_ok = all(s["kinds"][0] == 1 and s["kinds"][-1] == 2 and s["kinds"] == sorted(s["kinds"]) for s in recs)
        chk.ok(kinds_ok, "kinds: prompt tokens then response tokens")
        resp_ok = all(sp.decode([t for t, k in zip(s["input_ids"], s["kinds"]) if k == 2 and t != eos]).strip()
                      .endswith(r["output"].split()[-1]) for r, s in zip(boolq, recs))
        chk.ok(resp_ok, "the response tokens decode to the output's end")
        meta_ok = all(s["meta"]["task"] == "boolq" and s["meta"]["answer"] == r["answer"] and
                      s["meta"]["choices"] == ["true", "false"] for r, s in zip(boolq, recs))
        chk.ok(meta_ok, "meta: task from the path, gold answer, choices", recs[0]["meta"] if recs else None)
        tokens = sum(len(s["input_ids"]) for s in recs)
        chk.ok(summary.get("tokens") == tokens and summary.get("compression_ratio", 0) > 1, "summary tokens %d, ratio %.2f"
               % (tokens, summary.get("compression_ratio", 0)))

        chk.section("responses only, truncation, drop, rolling shards")
        p = U.run(a.tspeft, ["convert", "--format", "llm-adapters", "--input", T("boolq", "test.json"), "--tokenizer", tok,
                             "--out", T("out", "ro.shard"), "--responses-only"])
        ro = dump(tool, T("out", "ro.shard")) if p.returncode == 0 else []
        ok = len(ro) == len(recs) and all(
            s["input_ids"] == t["input_ids"] and s["labels"] == [(x if k == 2 else -100) for x, k in zip(s["input_ids"], s["kinds"])]
            for s, t in zip(ro, recs))
        chk.ok(p.returncode == 0 and ok, "--responses-only: same ids, labels -100 exactly on prompt tokens", p.stderr)
        lens = [len(s["input_ids"]) for s in recs]
        cut = sorted(lens)[len(lens) // 2]
        p = U.run(a.tspeft, ["convert", "--format", "llm-adapters", "--input", T("boolq", "test.json"), "--tokenizer", tok,
                             "--out", T("out", "tr.shard"), "--max-len", cut, "--json"])
        tr = dump(tool, T("out", "tr.shard")) if p.returncode == 0 else []
        n_over = sum(n > cut for n in lens)
        ok = p.returncode == 0 and json.loads(p.stdout)["truncated"] == n_over and all(
            s["input_ids"] == t["input_ids"][:cut] for s, t in zip(tr, recs))
        chk.ok(ok, "--max-len %d truncates %d records to their first %d tokens" % (cut, n_over, cut), p.stderr)
        p = U.run(a.tspeft, ["convert", "--format", "llm-adapters", "--input", T("boolq", "test.json"), "--tokenizer", tok,
                             "--out", T("out", "dr.shard"), "--max-len", cut, "--overflow", "drop", "--json"])
        dr = dump(tool, T("out", "dr.shard")) if p.returncode == 0 else []
        ok = p.returncode == 0 and json.loads(p.stdout)["dropped"] == n_over and \
            [s["input_ids"] for s in dr] == [t["input_ids"] for t in recs if len(t["input_ids"]) <= cut]
        chk.ok(ok, "--overflow drop drops and counts the same %d" % n_over, p.stderr)
        p = U.run(a.tspeft, ["convert", "--format", "llm-adapters", "--input", T("boolq", "test.json"), "--tokenizer", tok,
                             "--out", T("out", "roll", "part"), "--records-per-shard", 7])
        parts = sorted(glob.glob(T("out", "roll", "part-*.shard")))
        got = [s["input_ids"] for f in parts for s in dump(tool, f)]
        chk.ok(p.returncode == 0 and len(parts) == (len(boolq) + 6) // 7 and got == [s["input_ids"] for s in recs],
               "--records-per-shard 7: %d shards named part-00000.shard ..., records in order" % len(parts), p.stderr)
        # a failing run (second input malformed, after shards of the first were written) leaves the earlier
        # dataset exactly as it was and no staging file; a shorter rerun removes the stale higher shards
        roll2 = lambda pps, *inputs: U.run(a.tspeft, ["convert", "--format", "llm-adapters", "--tokenizer", tok, "--out",  # noqa: E731
                                                     T("out", "roll2", "part"), "--records-per-shard", pps] +
                                           [x for i in inputs for x in ("--input", i)])
        p = roll2(7, T("boolq", "test.json"))
        snap = {f: open(T("out", "roll2", f), "rb").read() for f in os.listdir(T("out", "roll2"))}
        with open(T("late_bad.json"), "w") as f:
            f.write("[{\"instruction\": \"x\", \"output\": 5}]")
        p = roll2(3, T("boolq", "test.json"), T("late_bad.json"))
        now = {f: open(T("out", "roll2", f), "rb").read() for f in os.listdir(T("out", "roll2"))}
        chk.ok(p.returncode == 1 and "late_bad.json: record 0" in p.stderr and now == snap and len(snap) == len(parts),
               "a run failing after %d shards were staged leaves the %d earlier shards untouched, no staging files"
               % ((len(boolq) + 2) // 3, len(snap)), p.stderr + str(sorted(now)))
        p = roll2(30, T("boolq", "test.json"))
        names = sorted(os.listdir(T("out", "roll2")))
        got = [s["input_ids"] for f in names for s in dump(tool, T("out", "roll2", f))]
        chk.ok(p.returncode == 0 and names == ["part-00000.shard", "part-00001.shard"] and got == [s["input_ids"] for s in recs],
               "a rerun with 30 per shard leaves exactly part-00000/00001 (stale part-00002.. removed)", str(names))

        chk.section("alpaca JSONL with input fields, two inputs")
        p = U.run(a.tspeft, ["convert", "--format", "alpaca", "--input", T("alpaca.jsonl"), "--input", T("alpaca.jsonl"),
                             "--tokenizer", tok, "--out", T("out", "alp.shard")])
        al = dump(tool, T("out", "alp.shard")) if p.returncode == 0 else []
        ok = len(al) == 2 * len(alpaca) and all(s["input_ids"] == expect_ids(r) for s, r in zip(al, alpaca + alpaca))
        chk.ok(p.returncode == 0 and ok, "ids with and without input equal LLM-Adapters' prompt (Unicode text)", p.stderr)

        chk.section("GLUE TSV layouts")
        glue = {
            "rte": ("index\tsentence1\tsentence2\tlabel\n0\tA man eats.\tSomeone eats.\tentailment\n"
                    "1\tIt rains.\tThe sun shines.\tnot_entailment\n", ["entailment", "not_entailment"], [0, 1]),
            "cola": ("gj04\t1\t\tThe cat sat.\ngj04\t0\t*\tCat the sat.\n", ["acceptable", "unacceptable"], [1, 0]),
            "mrpc": ("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tHe left.\tHe went away.\n"
                     "0\t3\t4\tShe sings.\tIt is cold.\n", ["equivalent", "not_equivalent"], [1, 0]),
            "stsb": ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
                     "0\tmain\tx\t2012\t1\tnone\tnone\tA dog runs.\tA dog is running.\t4.75\n", ["4.8"], None),
            "qnli": ("index\tquestion\tsentence\tlabel\n0\tWho?\tHim.\tentailment\n", ["entailment"], [0]),
        }
        for task, (text, answers, labels) in glue.items():
            path = T("glue_%s.tsv" % task)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            p = U.run(a.tspeft, ["convert", "--format", "glue", "--task", task, "--input", path, "--tokenizer", tok,
                                 "--out", T("out", "%s.shard" % task), "--responses-only"])
            g = dump(tool, T("out", "%s.shard" % task)) if p.returncode == 0 else []
            ok = [s["meta"]["answer"] for s in g] == answers and (labels is None or [s["meta"]["label"] for s in g] == labels)
            resp = [sp.decode([t for t, k in zip(s["input_ids"], s["kinds"]) if k == 2 and t != eos]).strip() for s in g]
            chk.ok(p.returncode == 0 and ok and resp == answers, "%s: answers %s, trained response tokens decode to them"
                   % (task, answers), p.stderr + str([s["meta"] for s in g]) + str(resp))

        os.makedirs(T("RTE"))
        shutil.copy(T("glue_rte.tsv"), T("RTE", "train.tsv"))
        p = U.run(a.tspeft, ["convert", "--format", "glue", "--input", T("RTE", "train.tsv"), "--tokenizer", tok,
                             "--out", T("out", "rte_path.shard")])
        g = dump(tool, T("out", "rte_path.shard")) if p.returncode == 0 else []
        chk.ok(p.returncode == 0 and [s["meta"]["task"] for s in g] == ["rte", "rte"],
               "glue without --task: the task from the path (RTE/train.tsv)", p.stderr)
        p = U.run(a.tspeft, ["convert", "--format", "glue", "--input", T("alpaca.jsonl"), "--tokenizer", tok,
                             "--out", T("out", "nope.shard")])
        chk.ok(p.returncode != 0 and "--task" in p.stderr and not os.path.exists(T("out", "nope.shard")),
               "glue without --task on a path naming no task: refused", p.stderr)

        chk.section("pre-tokenized JSONL")
        rows = [{"input_ids": [5, 6, 7, 8, 0, 0], "labels": [-100, -100, 7, 8, -100, -100],
                 "attention_mask": [1, 1, 1, 1, 0, 0]}, {"input_ids": [9, 10, 11], "labels": [9, 10, 11]}]
        U.write_jsonl(T("pre.jsonl"), rows)
        p = U.run(a.tspeft, ["convert", "--format", "jsonl", "--input", T("pre.jsonl"), "--vocab-size", 64,
                             "--out", T("out", "pre.shard")])
        pre = dump(tool, T("out", "pre.shard")) if p.returncode == 0 else []
        ok = [(s["input_ids"], s["labels"], s["kinds"]) for s in pre] == [
            ([5, 6, 7, 8], [-100, -100, 7, 8], [1, 1, 2, 2]), ([9, 10, 11], [9, 10, 11], [2, 2, 2])]
        chk.ok(p.returncode == 0 and ok, "padding removed, kinds from labels", p.stderr + str(pre))

        chk.section("malformed inputs: one line naming the file, exit != 0, no shard left")
        bad = {
            "bad.json": ("llm-adapters", "[{\"instruction\": \"x\", \"output\": \"y\"}, {\"instruction\": 3}]", "record 1"),
            "trunc.json": ("llm-adapters", "[{\"instruction\": \"x\", \"output\": ", "invalid JSON"),
            "noout.jsonl": ("alpaca", "{\"instruction\": \"x\"}\n", "missing \"output\""),
            "cols.tsv": ("glue", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\n", "fields"),
            "label.tsv": ("glue", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n", "label \"maybe\""),
        }
        for name, (fmt, text, needle) in bad.items():
            path = T(name)
            with open(path, "w") as f:
                f.write(text)
            out = T("badout", name + ".shard")
            args = ["convert", "--format", fmt, "--input", path, "--tokenizer", tok, "--out", out]
            if fmt == "glue":
                args += ["--task", "rte"]
            p = U.run(a.tspeft, args)
            lines = p.stderr.strip().splitlines()
            left = glob.glob(T("badout", "*"))
            chk.ok(p.returncode != 0 and len(lines) == 1 and path in lines[0] and needle in lines[0] and not left,
                   "%s: %s" % (name, lines[-1] if lines else "(no message)"), p.stderr + str(left))
        p = U.run(a.tspeft, ["convert", "--format", "nope", "--input", T("pre.jsonl"), "--out", T("x.shard")])
        chk.ok(p.returncode == 2 and "unknown --format" in p.stderr, "unknown format: usage error", p.stderr)
        p = U.run(a.tspeft, ["convert", "--format", "llm-adapters", "--input", T("boolq", "test.json"),
                             "--tokenizer", T("corpus.txt"), "--out", T("x.shard")])
        chk.ok(p.returncode == 1 and "corpus.txt" in p.stderr and not os.path.exists(T("x.shard")),
               "a file that is not a tokenizer model is refused naming it", p.stderr)

        chk.section("training on the converted shards")
        U.tiny_model(T("model"), seed=3, vocab=sp.get_piece_size())
        p = U.run(a.tspeft, ["train", "--model", T("model"), "--data", T("out", "roll"), "--steps", 8, "--batch-size", 4,
                             "--max-seq-len", 64, "--lr", "1e-2", "--threads", 2, "--shuffle"], timeout=120)
        prog = U.progress(p.stderr)
        chk.ok(p.returncode == 0 and len(prog) >= 2 and prog[-1]["loss"] < prog[0]["loss"],
               "train --data <directory of converted shards>: loss %s -> %s" %
               (prog[0]["loss"] if prog else "?", prog[-1]["loss"] if prog else "?"), p.stderr)
    finally:
        if a.keep:
            print("kept", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return chk.finish()


if __name__ == "__main__":
    sys.exit(main())
