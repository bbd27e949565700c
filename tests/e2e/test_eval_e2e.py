#!/usr/bin/python3
"""`tspeft eval` end to end: a tiny random LLaMA (examples/make_random_llama.py) with a TS-gated LoRA,
a tokenizer trained here with spm_train, and BoolQ (../shared/data/csr/boolq/test.json, --limit 8; a
generated BoolQ-style file when that data is absent).

    /usr/bin/python3 tests/e2e/test_eval_e2e.py --tspeft build/tspeft [--keep]

Checks:
  (a) --mode both: exit 0, the table (task row, both metric families, the "not comparable" footer),
      results JSON (n, metrics, protocol settings) and per-sample JSONL consistent: each accuracy ==
      the mean of "correct" over its lines; prompts == LLM-Adapters' commonsense_evaluate.py
      generate_prompt (copied here); gold == the data's answer; extracted == re.findall(pattern,
      generation)[0] (or ""); correct == (extracted == gold); ll choices == argmax of the logliks and of
      loglik / len(continuation);
  (b) generations == an independent greedy decode with the plain-torch reference (tests/parity) on
      ids from Python sentencepiece, decoded and split as LLM-Adapters does; log-likelihoods == the
      reference to 1e-4 (prompt + continuation encoded by Python sentencepiece in one call, the
      continuation's tokens found from the byte offsets: the eval prompt ends in 16 spaces, so its
      last space merges into the continuation's first token "▁the");
  (c) --beams 4 and several --task/--data pairs in one run (a PIQA-style file with --task piqa);
  (d) GLUE (RTE, STS-B) from TSV files in their original layout, when datasets/glue.h's reader is
      built in: accuracy == mean correct, Pearson from the JSONL == nlu_pearson;
  (e) bad input: missing data file, unknown task, a tokenizer larger than the model's vocabulary,
      a missing tokenizer: one line on stderr, non-zero exit, an existing --out file left untouched.
Exit status 0 when every check passed (or SKIP: a build without the dataset readers), 1 otherwise.
"""
import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import e2e_util as U  # noqa: E402

import numpy as np  # noqa: E402
import sentencepiece as spm  # noqa: E402
import torch  # noqa: E402

import fixtures as FX  # noqa: E402
import reference as R  # noqa: E402

torch.set_num_threads(2)
BOOLQ = "/work/shared/data/csr/boolq/test.json"
if not os.path.isfile(BOOLQ):
    BOOLQ = os.path.join(os.path.dirname(ROOT), "shared", "data", "csr", "boolq", "test.json")
NEW = 10  # new tokens of the checked generations (the default, 32, is checked in (c))
N_REF = 4  # generations decoded again with the plain-torch reference (it reruns the whole sequence)
PATTERN = {"boolq": ["true", "false"], "piqa": ["solution1", "solution2"]}


def generate_prompt(instruction, input=None):
    """LLM-Adapters commonsense_evaluate.py generate_prompt, copied as it stands."""
    if input:
        return f"""Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

                ### Instruction:
                {instruction}

                ### Input:
                {input}

                ### Response:
                """  # noqa: E501
    else:
        return f"""Below is an instruction that describes a task. Write a response that appropriately completes the request. 

                ### Instruction:
                {instruction}

                ### Response:
                """  # noqa: E501,W291


def boolq_rows(n, seed):
    rng = np.random.default_rng(seed)
    words = "does the river flow north is water wet can a bird fly was the war long are cats mammals".split()
    rows = []
    for i in range(n):
        q = " ".join(rng.choice(words, int(rng.integers(4, 9))))
        a = "true" if rng.random() < 0.5 else "false"
        rows.append({"instruction": "Please answer the following question with true or false, question: %s?\n\n"
                                    "Answer format: true/false" % q, "input": "",
                     "output": "the correct answer is %s" % a, "answer": a})
    return rows


def piqa_rows(n, seed):
    rng = np.random.default_rng(seed)
    words = "put the cup on a table use water to clean wood glue paper cut it with scissors".split()
    rows = []
    for i in range(n):
        g = " ".join(rng.choice(words, 5))
        s1, s2 = " ".join(rng.choice(words, 6)), " ".join(rng.choice(words, 6))
        a = "solution1" if rng.random() < 0.5 else "solution2"
        rows.append({"instruction": "Please choose the correct solution to the question: %s\n\nSolution1: %s\n\n"
                                    "Solution2: %s\n\nAnswer format: solution1/solution2" % (g, s1, s2),
                     "input": "", "output": "the correct answer is %s" % a, "answer": a})
    return rows


def train_tokenizer(tmp, rows):
    lines = []
    for r in rows:
        lines += [l for l in r["instruction"].split("\n") if l.strip()] + [r["output"]]
    lines += ["Below is an instruction that describes a task. Write a response that appropriately completes "
              "the request.", "### Instruction:", "### Response:", "the correct answer is true",
              "the correct answer is false", "entailment not_entailment yes no 0.0 1.5 2.5 5.0"] * 20
    corpus = os.path.join(tmp, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    prefix = os.path.join(tmp, "tok")
    args = dict(input=corpus, model_prefix=prefix, model_type="bpe", vocab_size=320, byte_fallback="true",
                normalization_rule_name="identity", remove_extra_whitespaces="false",
                allow_whitespace_only_pieces="true", split_digits="true", unk_id=0, bos_id=1, eos_id=2,
                pad_id=-1, character_coverage=1.0)
    spm_train = shutil.which("spm_train")
    if spm_train:
        p = subprocess.run([spm_train] + ["--%s=%s" % kv for kv in args.items()] + ["--minloglevel=2"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            raise RuntimeError("spm_train failed:\n" + p.stderr[-2000:])
    else:
        spm.SentencePieceTrainer.train(**args, minloglevel=2)
    return prefix + ".model"


def make_model(d, vocab, seed=3):
    subprocess.run([sys.executable, os.path.join(ROOT, "examples", "make_random_llama.py"), d, "--hidden", "32",
                    "--layers", "2", "--heads", "4", "--kv-heads", "2", "--intermediate", "64", "--vocab",
                    str(vocab), "--max-pos", "1024", "--std", "0.3", "--seed", str(seed)], check=True,
                   stdout=subprocess.DEVNULL)


def make_adapter(d, model_dir):
    cfg = FX.adapter_config("lora", ["q_proj", "v_proj", "up_proj"], model_dir=model_dir,
                            ts={"rule": "prox", "lambda": 0.05, "eta_tau": 0.05, "tau0": 0.0,
                                "target_keep": None, "eta_lambda": 0.05, "beta": 0.01, "warmup_steps": 0})
    tens = FX.make_adapter_tensors(cfg, model_dir, 5)
    # one module gated off entirely (tau far above any r), the rest open: the gate is applied
    tens[R.PEFT_PREFIX + "model.layers.1.mlp.up_proj.ts_tau"] = np.array([1000.0], np.float32)
    FX.write_adapter(d, cfg, tens)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def findall0(alts, s):
    m = re.findall("|".join(alts), s)
    return m[0] if m else ""


class Ctx:
    pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tspeft", required=True)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    chk = U.Checks("test_eval_e2e")
    probe = U.run(args.tspeft, ["eval", "--data", "x"])
    if "no dataset readers" in probe.stderr:
        # datasets/instruct.h, csr_tasks.h, glue.h (tspeft convert) are not in this tree yet
        print("SKIP test_eval_e2e: %s" % probe.stderr.strip())
        return 0
    tmp = tempfile.mkdtemp(prefix="tspeft-eval-")
    cx = Ctx()
    cx.chk, cx.tspeft, cx.tmp = chk, os.path.abspath(args.tspeft), tmp
    try:
        setup(cx)
        part_a_b(cx)
        part_c(cx)
        part_d(cx)
        part_e(cx)
    finally:
        if args.keep:
            print("kept %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return chk.finish()


def setup(cx):
    chk, tmp = cx.chk, cx.tmp
    real = os.path.isfile(BOOLQ)
    if real:
        with open(BOOLQ) as f:
            cx.boolq = json.load(f)[:8]
        cx.boolq_path = BOOLQ
        chk.section("setup: real BoolQ (%s, --limit 8)" % BOOLQ)
    else:
        cx.boolq = boolq_rows(8, 1)
        os.makedirs(os.path.join(tmp, "boolq"))
        cx.boolq_path = os.path.join(tmp, "boolq", "test.json")
        with open(cx.boolq_path, "w") as f:
            json.dump(cx.boolq, f)
        chk.section("setup: ../shared/data absent: generated BoolQ-style data (SKIPPED the real-data run)")
    cx.piqa = piqa_rows(3, 2)
    cx.piqa_path = os.path.join(tmp, "piqa_small.json")
    with open(cx.piqa_path, "w") as f:
        json.dump(cx.piqa, f)
    cx.tok = train_tokenizer(tmp, cx.boolq + boolq_rows(40, 9) + cx.piqa)
    cx.sp = spm.SentencePieceProcessor(model_file=cx.tok)
    cx.model = os.path.join(tmp, "model")
    make_model(cx.model, cx.sp.get_piece_size())
    cx.adapter = os.path.join(tmp, "adapter")
    make_adapter(cx.adapter, cx.model)


def run_eval(cx, extra, timeout=120):
    return U.run(cx.tspeft, ["eval", "--model", cx.model, "--adapter", cx.adapter, "--tokenizer", cx.tok] + extra,
                 timeout=timeout)


def part_a_b(cx):
    chk, tmp = cx.chk, cx.tmp
    chk.section("(a) --mode both on BoolQ")
    out = os.path.join(tmp, "res.json")
    p = run_eval(cx, ["--data", cx.boolq_path, "--limit", 8, "--mode", "both", "--max-new-tokens", NEW, "--out", out])
    if not chk.ok(p.returncode == 0, "(a) eval exits 0", p.stderr):
        return
    chk.ok(re.search(r"^boolq\s+8\s+\d+\.\d\d\s+\d+\.\d\d\s+\d+\.\d\d\s*$", p.stdout, re.M) is not None,
           "(a) table row: boolq, n 8, three metric values", p.stdout)
    chk.ok("csr_gen_acc" in p.stdout and "csr_ll_acc_norm" in p.stdout and "NOT comparable" in p.stdout,
           "(a) table header has both metric families and the footer says they are not comparable", p.stdout)
    chk.ok(re.search(r"^eval boolq 8/8 .* samples/s +ETA", p.stderr, re.M) is not None,
           "(a) progress line: done/total, running accuracy, samples/s, ETA", p.stderr)
    samples = out[:-5] + ".samples.jsonl"
    if not chk.ok(os.path.isfile(out) and os.path.isfile(samples), "(a) results JSON and %s written" % samples):
        return
    with open(out) as f:
        res = json.load(f)
    lines = read_jsonl(samples)
    t = res["tasks"][0]
    pr = res["protocol"]
    chk.ok(t["task"] == "boolq" and t["n"] == 8 and t["kind"] == "csr", "(a) results: task boolq, n 8")
    chk.ok(pr["beams"] == 1 and pr["max_new_tokens"] == NEW and pr["mode"] == "both" and pr["eos_id"] == 2
           and pr["limit"] == 8 and pr["ts_gate_applied"] is True and "generate_prompt" in pr["prompt"],
           "(a) results: protocol settings (greedy, %d new tokens, eos 2, limit 8, gate applied, prompt)" % NEW, pr)
    gen = [l for l in lines if l["protocol"] == "gen"]
    ll = [l for l in lines if l["protocol"] == "ll"]
    chk.ok(len(gen) == 8 and len(ll) == 8 and len(lines) == 16, "(a) JSONL: 8 gen + 8 ll lines")
    keys = {"task", "id", "prompt", "generation", "extracted", "gold", "correct"}
    chk.ok(all(keys <= set(l) for l in lines), "(a) every line has id, prompt, generation, extracted, gold, correct")
    m = t["metrics"]
    chk.ok(abs(m["csr_gen_acc"] - np.mean([l["correct"] for l in gen])) < 1e-12 and
           abs(m["csr_ll_acc"] - np.mean([l["correct"] for l in ll])) < 1e-12 and
           abs(m["csr_ll_acc_norm"] - np.mean([l["correct_norm"] for l in ll])) < 1e-12,
           "(a) csr_gen_acc, csr_ll_acc, csr_ll_acc_norm == means of correct / correct_norm (%s)" % m)
    chk.ok(all(l["prompt"] == generate_prompt(r["instruction"], r["input"]) for l, r in zip(gen, cx.boolq)),
           "(a) prompts == LLM-Adapters' generate_prompt")
    chk.ok(all(l["gold"] == r["answer"] for l, r in zip(gen, cx.boolq)) and
           all(l["gold"] == r["answer"] for l, r in zip(ll, cx.boolq)), "(a) gold == the data's answer")
    chk.ok(all(l["extracted"] == findall0(PATTERN["boolq"], l["generation"]) for l in gen),
           "(a) extracted == re.findall('true|false', generation)[0] or ''")
    chk.ok(all(l["correct"] == (l["extracted"] == l["gold"]) for l in gen), "(a) correct == (extracted == gold)")
    conts = ["the correct answer is " + c for c in PATTERN["boolq"]]
    chk.ok(all(l["extracted"] == PATTERN["boolq"][int(np.argmax(l["loglik"]))] and
               l["choice_norm"] == PATTERN["boolq"][int(np.argmax([v / len(c) for v, c in zip(l["loglik"], conts)]))]
               for l in ll), "(a) ll choices == argmax loglik and argmax loglik / len(continuation)")

    chk.section("(b) against the plain-torch reference")
    ref = R.Reference(cx.model, cx.adapter)
    bos, eos = cx.sp.bos_id(), cx.sp.eos_id()
    bad_gen, worst, n_ll, n_skip = [], 0.0, 0, 0
    for l, r in list(zip(gen, cx.boolq))[:N_REF]:
        prompt = generate_prompt(r["instruction"], r["input"])
        ids = [bos] + cx.sp.encode(prompt)
        seq = list(ids)
        for _ in range(NEW):
            x = np.array([seq], np.int64)
            lg = ref.step([(x, x.copy(), np.ones_like(x))], backward=False)["logits"][0][0, -1]
            nxt = int(torch.argmax(lg))
            seq.append(nxt)
            if nxt == eos:
                break
        text = cx.sp.decode([i for i in seq if i not in (bos, eos)])
        resp = text.split("### Response:")[1].strip().replace("\x00", "\u2400")  # JSONL shows NUL as U+2400
        if resp != l["generation"]:
            bad_gen.append("%s: C %r, reference %r" % (l["id"], l["generation"], resp))
    chk.ok(not bad_gen, "(b) %d greedy generations (%d new tokens, gate applied) == reference decode + split + strip" % (N_REF, NEW),
           "\n".join(bad_gen))
    for l, r in zip(ll, cx.boolq):
        prompt = generate_prompt(r["instruction"], r["input"])
        for c, got in zip(conts, l["loglik"]):
            # prompt + continuation in one encode call; the continuation's tokens are those whose last
            # source byte lies in it (text/template.h), found from sentencepiece's byte offsets
            proto = cx.sp.encode(prompt + c, out_type="immutable_proto")
            P = len(prompt.encode())
            pieces = list(proto.pieces)
            full = [bos] + [q.id for q in pieces]
            first = [k for k, q in enumerate(pieces) if q.end > P]
            if not first:
                n_skip += 1
                continue
            b = 1 + first[0]
            x = np.array([full], np.int64)
            lg = ref.step([(x, x.copy(), np.ones_like(x))], backward=False)["logits"][0][0].double()
            lp = torch.log_softmax(lg, -1)
            want = sum(float(lp[t - 1, full[t]]) for t in range(b, len(full)))
            worst = max(worst, abs(want - got) / max(1.0, abs(want)))
            n_ll += 1
    chk.ok(n_ll >= 8 and worst <= 1e-4, "(b) %d continuation log-likelihoods == reference (continuation split on byte offsets): "
           "max rel err %.2e" % (n_ll, worst))


def part_c(cx):
    chk, tmp = cx.chk, cx.tmp
    chk.section("(c) beam search, several datasets in one run")
    out = os.path.join(tmp, "res_c.json")
    p = run_eval(cx, ["--task", "boolq", "--data", cx.boolq_path, "--data", cx.piqa_path, "--task", "piqa",
                      "--limit", 2, "--beams", 4, "--max-new-tokens", 8, "--out", out])
    if not chk.ok(p.returncode == 0, "(c) eval --beams 4 with two --task/--data pairs exits 0", p.stderr):
        return
    with open(out) as f:
        res = json.load(f)
    lines = read_jsonl(out[:-5] + ".samples.jsonl")
    chk.ok([t["task"] for t in res["tasks"]] == ["boolq", "piqa"] and [t["n"] for t in res["tasks"]] == [2, 2],
           "(c) two result rows: boolq (n 2), piqa (n 2)")
    chk.ok(res["protocol"]["beams"] == 4 and res["protocol"]["max_new_tokens"] == 8 and
           res["protocol"]["decoding"].startswith("beam"), "(c) protocol records beams 4, 8 new tokens")
    piqa = [l for l in lines if l["task"] == "piqa"]
    chk.ok(len(piqa) == 2 and all(l["extracted"] == findall0(PATTERN["piqa"], l["generation"]) for l in piqa),
           "(c) piqa lines use the solution1|solution2 pattern")
    chk.ok(all(abs(t["metrics"]["csr_gen_acc"] - np.mean([l["correct"] for l in lines if l["task"] == t["task"]]))
               < 1e-12 for t in res["tasks"]), "(c) per-task accuracy == mean correct")
    # the task is guessed from the path (boolq/test.json); piqa_small.json names piqa too
    out = os.path.join(tmp, "res_c2.json")
    p = run_eval(cx, ["--data", cx.boolq_path, "--limit", 1, "--out", out])
    chk.ok(p.returncode == 0 and re.search(r"^boolq\s+1\s", p.stdout, re.M), "(c) task guessed from the path",
           p.stdout + p.stderr)
    if p.returncode == 0:
        with open(out) as f:
            pr = json.load(f)["protocol"]
        chk.ok(pr["max_new_tokens"] == 32 and pr["beams"] == 1 and pr["mode"] == "gen",
               "(c) defaults: greedy, 32 new tokens, mode gen", pr)


def write_tsv(path, header, rows):
    with open(path, "w") as f:
        if header:
            f.write("\t".join(header) + "\n")
        for r in rows:
            f.write("\t".join(str(x) for x in r) + "\n")


def part_d(cx):
    chk, tmp = cx.chk, cx.tmp
    chk.section("(d) GLUE from TSV")
    rte = os.path.join(tmp, "RTE", "dev.tsv")
    stsb = os.path.join(tmp, "STS-B", "dev.tsv")
    os.makedirs(os.path.dirname(rte))
    os.makedirs(os.path.dirname(stsb))
    write_tsv(rte, ["index", "sentence1", "sentence2", "label"],
              [(i, "the cat sat on the mat number %d" % i, "a cat is sitting %d" % i,
                "entailment" if i % 2 else "not_entailment") for i in range(5)])
    write_tsv(stsb, ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
                     "sentence2", "score"],
              [(i, "main-captions", "MSRvid", "2012test", "%04d" % i, "none", "none", "a man plays a guitar %d" % i,
                "a person plays music %d" % (i * 7), "%.3f" % (i * 1.1)) for i in range(5)])
    out = os.path.join(tmp, "res_d.json")
    p = run_eval(cx, ["--data", rte, "--task", "rte", "--data", stsb, "--task", "stsb", "--out", out])
    if not chk.ok(p.returncode == 0, "(d) eval on RTE and STS-B TSV files exits 0", p.stderr):
        return
    with open(out) as f:
        res = json.load(f)
    lines = read_jsonl(out[:-5] + ".samples.jsonl")
    t = {x["task"]: x for x in res["tasks"]}
    rte_l = [l for l in lines if l["task"] == t.get("rte", {}).get("task")]
    chk.ok("rte" in t and t["rte"]["n"] == 5 and len(rte_l) == 5, "(d) RTE: 5 examples, 5 lines")
    if rte_l:
        chk.ok(abs(t["rte"]["metrics"]["nlu_acc"] - np.mean([l["correct"] for l in rte_l])) < 1e-12,
               "(d) RTE nlu_acc == mean correct")
        chk.ok([l["gold"] for l in rte_l] == ["not_entailment", "entailment"] * 2 + ["not_entailment"],
               "(d) RTE gold verbalizers follow the TSV labels", [l["gold"] for l in rte_l])
    st_l = [l for l in lines if l["task"] == t.get("stsb", {}).get("task")]
    if chk.ok("stsb" in t and len(st_l) == 5, "(d) STS-B: 5 lines"):
        x = np.array([l["pred_score"] for l in st_l])
        y = np.array([l["gold_score"] for l in st_l])
        pear = float(np.corrcoef(x, y)[0, 1])
        chk.ok(abs(pear - t["stsb"]["metrics"]["nlu_pearson"]) < 1e-9 and np.allclose(y, [i * 1.1 for i in range(5)],
                                                                                      atol=1e-6),
               "(d) STS-B nlu_pearson == Pearson of the JSONL predictions (%.4f)" % pear)
        chk.ok(all(0.0 <= v <= 5.0 for v in x), "(d) STS-B predictions lie in [0, 5]")


def one_line_error(p):
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    return p.returncode != 0 and len(lines) >= 1 and lines[-1].startswith("tspeft eval: ")


def part_e(cx):
    chk, tmp = cx.chk, cx.tmp
    chk.section("(e) bad input")
    out = os.path.join(tmp, "keep.json")
    with open(out, "w") as f:
        f.write('{"old": true}\n')
    before = U.read_bytes(out)
    p = run_eval(cx, ["--data", os.path.join(tmp, "nope", "boolq.json"), "--out", out])
    chk.ok(one_line_error(p) and "nope/boolq.json" in p.stderr, "(e) missing data file: one line naming it",
           p.stderr)
    chk.ok(U.read_bytes(out) == before, "(e) the existing --out file is untouched")
    p = run_eval(cx, ["--data", cx.boolq_path, "--task", "no_such_task"])
    chk.ok(one_line_error(p) and "no_such_task" in p.stderr and p.returncode == 2, "(e) unknown task: usage error",
           p.stderr)
    p = run_eval(cx, ["--data", os.path.join(tmp, "data.json")])
    chk.ok(one_line_error(p) and "cannot tell the task" in p.stderr, "(e) no task in the path and no --task", p.stderr)
    small = os.path.join(tmp, "small_model")
    make_model(small, 100)
    p = U.run(cx.tspeft, ["eval", "--model", small, "--tokenizer", cx.tok, "--data", cx.boolq_path, "--limit", 1])
    chk.ok(one_line_error(p) and "vocab" in p.stderr, "(e) tokenizer larger than the model's vocabulary: one line",
           p.stderr)
    p = run_eval(cx, ["--data", cx.boolq_path]) if False else U.run(
        cx.tspeft, ["eval", "--model", cx.model, "--tokenizer", os.path.join(tmp, "none.model"), "--data", cx.boolq_path])
    chk.ok(one_line_error(p) and "none.model" in p.stderr, "(e) missing tokenizer: one line naming it", p.stderr)
    p = run_eval(cx, ["--data", cx.boolq_path, "--mode", "sample"])
    chk.ok(one_line_error(p) and p.returncode == 2, "(e) bad --mode: usage error", p.stderr)


if __name__ == "__main__":
    sys.exit(main())
