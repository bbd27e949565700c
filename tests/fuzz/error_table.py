#!/usr/bin/python3
"""Runs the real CLI on every committed corpus file and prints the Markdown tables of docs/bad-input.md.

    /usr/bin/python3 tests/fuzz/error_table.py --tspeft build/tspeft > /tmp/tables.md

Each corpus file is put where a user would put it, next to the same fixture the fuzz target uses
(make_corpus.py builds it: tiny LLaMA, DoRA adapter), and one command runs:

  safetensors, llama_open   tspeft info --model M          (M/model.safetensors = the file)
  st_index                  tspeft info --model M          (M/model.safetensors.index.json = the file)
  llama_config              tspeft info --model M          (M/config.json = the file)
  peft_config               tspeft info --model M --adapter A   (A/adapter_config.json = the file)
  adapter                   tspeft generate --model M --adapter A --ids 1,2 --max-new-tokens 2
                                                           (A/adapter_model.safetensors = the file)
  jsonl                     tspeft train --model M32 --data data.jsonl --steps 1 --max-seq-len 8
                                                           (M32: the tiny model with vocabulary 32)
  args_config               tspeft train --config config.json --model M32 --data ok.jsonl --steps 1
  shard                     tspeft train --model M32 --data data.shard --steps 8 --batch-size 1
                                                           (8 steps: every record of a small shard is read)

The other targets (tokenizer, image, the converters' inputs) show the parser's own message, from one run of
build/tests/fuzz/replay_<target> -v over the corpus (a verb prints it after `tspeft <verb>: `),
with the replay's status (0 accepted, 1 rejected) in the exit column.

Temporary paths are shown as M/, A/, M32/ and the file name. A row per file; bit flips and truncations
beyond the first three of each target are summarised, ok_* files in one line. Rows whose stderr is not
exactly one line are marked MULTI-LINE; a run killed by a signal is marked CRASH.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_corpus as MC  # noqa: E402

CORPUS = os.path.join(MC.HERE, "corpus")


def write(path, blob):
    with open(path, "wb") as f:
        f.write(blob)


def make_model(d, vocab=MC.V):
    os.makedirs(d, exist_ok=True)
    cfg = dict(MC.CONFIG, vocab_size=vocab)
    write(os.path.join(d, "config.json"), MC.js(cfg))
    w = MC.model_weights()
    if vocab != MC.V:
        w["model.embed_tokens.weight"] = MC.pattern(vocab * MC.C).reshape(vocab, MC.C)
        w["lm_head.weight"] = MC.pattern(vocab * MC.C, 0.02).reshape(vocab, MC.C)
    write(os.path.join(d, "model.safetensors"), MC.st(w, meta={"format": "pt"}))
    return w


def make_sharded(d):
    """The fuzz_st_index.c fixture: two shards, other.safetensors, config.json, subdir/."""
    os.makedirs(os.path.join(d, "subdir"), exist_ok=True)
    write(os.path.join(d, "config.json"), MC.js(MC.CONFIG))
    w = MC.model_weights()
    s1 = {n: a for n, a in w.items() if "embed" in n or "layers.0." in n}
    s2 = {n: a for n, a in w.items() if n not in s1}
    write(os.path.join(d, "model-00001-of-00002.safetensors"), MC.st(s1))
    write(os.path.join(d, "model-00002-of-00002.safetensors"), MC.st(s2))
    write(os.path.join(d, "other.safetensors"), MC.st({"model.norm.weight": MC.pattern(MC.C, 1.0)}))


def make_adapter(d):
    os.makedirs(d, exist_ok=True)
    write(os.path.join(d, "adapter_config.json"), MC.js(MC.ADAPTER_CONFIG))
    write(os.path.join(d, "adapter_model.safetensors"), MC.st(MC.adapter_weights(), meta={"format": "pt"}))


class Runner:
    def __init__(self, tspeft, tmp):
        self.tspeft = tspeft
        self.tmp = tmp
        self.m = os.path.join(tmp, "M")
        self.m32 = os.path.join(tmp, "M32")
        self.a = os.path.join(tmp, "A")
        self.sh = os.path.join(tmp, "S")
        make_model(self.m)
        make_model(self.m32, vocab=32)
        make_adapter(self.a)
        make_sharded(self.sh)
        self.ok_jsonl = os.path.join(tmp, "ok.jsonl")
        write(self.ok_jsonl, b'{"input_ids": [1, 2, 3, 4]}\n')

    def fresh(self, src, name):
        d = os.path.join(self.tmp, name)
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(src, d)
        return d

    def command(self, target, blob):
        """Places blob and returns (argv, {temp path: shown name})."""
        if target in ("safetensors", "llama_open"):
            m = self.fresh(self.m, "model")
            write(os.path.join(m, "model.safetensors"), blob)
            return ["info", "--model", m], {m: "M"}
        if target == "st_index":
            m = self.fresh(self.sh, "model")
            write(os.path.join(m, "model.safetensors.index.json"), blob)
            return ["info", "--model", m], {m: "M"}
        if target == "llama_config":
            m = self.fresh(self.m, "model")
            write(os.path.join(m, "config.json"), blob)
            return ["info", "--model", m], {m: "M"}
        if target == "peft_config":
            a = self.fresh(self.a, "adapter")
            write(os.path.join(a, "adapter_config.json"), blob)
            return ["info", "--model", self.m, "--adapter", a], {a: "A", self.m: "M"}
        if target == "adapter":
            a = self.fresh(self.a, "adapter")
            write(os.path.join(a, "adapter_model.safetensors"), blob)
            return (["generate", "--model", self.m, "--adapter", a, "--ids", "1,2", "--max-new-tokens", "2",
                     "--threads", "1"], {a: "A", self.m: "M"})
        if target == "jsonl":
            p = os.path.join(self.tmp, "data.jsonl")
            write(p, blob)
            return (["train", "--model", self.m32, "--data", p, "--steps", "1", "--batch-size", "1",
                     "--max-seq-len", "8", "--threads", "1", "--quiet"], {p: "data.jsonl", self.m32: "M32"})
        if target == "shard":
            p = os.path.join(self.tmp, "data.shard")
            write(p, blob)
            return (["train", "--model", self.m32, "--data", p, "--steps", "8", "--batch-size", "1",
                     "--max-seq-len", "32", "--threads", "1", "--quiet"], {p: "data.shard", self.m32: "M32"})
        if target == "args_config":
            p = os.path.join(self.tmp, "config.json")
            write(p, blob)
            return (["train", "--config", p, "--model", self.m32, "--data", self.ok_jsonl, "--steps", "1",
                     "--threads", "1", "--quiet"], {p: "config.json", self.m32: "M32", self.ok_jsonl: "ok.jsonl"})
        raise ValueError(target)

    def run(self, target, blob):
        argv, names = self.command(target, blob)
        p = subprocess.run([self.tspeft] + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        err = p.stderr.decode("utf-8", "backslashreplace")
        for path, short in sorted(names.items(), key=lambda kv: -len(kv[0])):
            err = err.replace(path, short)
        err = err.replace(self.tmp + "/", "")
        shown = " ".join(a if a not in names else names[a] for a in argv[:1])
        return p.returncode, err, shown


def cell(text, limit=320):
    text = text.rstrip("\n")
    flags = ""
    if "\n" in text:
        flags = "MULTI-LINE: "
        text = text.replace("\n", "\u23ce")
    if len(text) > limit:
        text = text[:limit - 40] + " \u2026 " + text[-30:]
    return flags + "`" + text.replace("|", "\\|").replace("`", "'") + "`"


VERBS = {"safetensors": "info", "llama_open": "info", "st_index": "info", "llama_config": "info",
         "peft_config": "info --adapter", "adapter": "generate --adapter", "jsonl": "train", "args_config": "train --config",
         "shard": "train --data"}
# Targets shown through their replay program: the parser's own message, without a verb's prefix.
REPLAYED = {"tokenizer": "tk_tok_open, then encode/decode", "image": "tk_image_load, 2^20-pixel limit",
            "fmnist_images": "tk_convert_fashion_mnist, fixed labels file",
            "fmnist_labels": "tk_convert_fashion_mnist, fixed images file",
            "llava": "tk_convert_llava into one shard",
            "instruct": "tk_instruct_load", "glue": "tk_glue_load as RTE, the other tasks checked"}


class Replayer:
    """Outcomes of replay_<target> -v over a corpus directory: name -> (status, message)."""

    def __init__(self, build):
        self.build = build

    def outcomes(self, target):
        exe = os.path.join(self.build, "tests", "fuzz", "replay_" + target)
        p = subprocess.run([exe, "-v", os.path.join(CORPUS, target)], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
        out = {}
        for line in p.stdout.decode("utf-8", "backslashreplace").splitlines():
            m = re.match(r"^(ok  |FAIL) (\S+): (.*)$", line)
            if not m:
                continue
            name, msg = m.group(2), m.group(3)
            msg = re.sub(r"/\S*/tkfuzz\.[A-Za-z0-9]+/", "", msg)
            if m.group(1) == "FAIL":
                out[name] = (-1, "REPLAY FAILED: " + msg)
            else:
                out[name] = (0, "") if msg == "accepted" else (1, msg)
        return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tspeft", default="build/tspeft")
    ap.add_argument("--target", action="append", help="only these targets")
    a = ap.parse_args()
    tspeft = os.path.abspath(a.tspeft)
    status = 0
    with tempfile.TemporaryDirectory(prefix="tkerr.") as tmp:
        r = Runner(tspeft, tmp)
        replayer = Replayer(os.path.dirname(tspeft))
        for target in a.target or sorted(MC.TARGETS):
            files = sorted(os.listdir(os.path.join(CORPUS, target)))
            replayed = replayer.outcomes(target) if target in REPLAYED else None
            if replayed is not None:
                print("\n### %s (the parser's message: `replay_%s -v`, %s)\n" % (target, target, REPLAYED[target]))
            else:
                print("\n### %s (`tspeft %s`)\n" % (target, VERBS[target]))
            print("| input | exit | message (stderr) |")
            print("|---|---|---|")
            oks, summary = [], {"trunc": [], "any_flip": []}
            for name in files:
                with open(os.path.join(CORPUS, target, name), "rb") as f:
                    blob = f.read()
                if replayed is not None:
                    rc, err = replayed.get(name, (-1, "REPLAY GAVE NO LINE"))
                else:
                    rc, err, _ = r.run(target, blob)
                if rc < 0:
                    status = 1
                if name.startswith("ok_"):
                    # a valid safetensors file or index need not hold a whole model, a valid shard need not
                    # suit the model (vocabulary, images, at least one record): the CLI may still refuse it
                    partial = target in ("safetensors", "st_index", "shard")
                    oks.append("`%s` (%s)" % (name, "exit 0" if rc == 0 else "exit %d%s: %s" % (
                        rc, "" if partial else " UNEXPECTED", cell(err, 200))))
                    if rc != 0 and not partial:
                        status = 1
                    continue
                kind = "trunc" if name.startswith("trunc_") else "any_flip" if name.startswith("any_flip_") else None
                if kind:
                    summary[kind].append((name, rc, err))
                    if len(summary[kind]) > 3:
                        continue
                if replayed is not None and rc < 0:
                    msg = cell(err)
                else:
                    msg = "CRASH (signal %d)" % -rc if rc < 0 else ("(accepted)" if rc == 0 else cell(err))
                print("| `%s` | %d | %s |" % (name, rc, msg))
            for kind, rows in summary.items():
                if len(rows) > 3:
                    codes = sorted(set(rc for _, rc, _ in rows))
                    print("| %d more `%s_*` files | %s | (same kinds of message) |"
                          % (len(rows) - 3, kind, "/".join(str(c) for c in codes)))
            if oks:
                print("\nValid inputs (ok_*): " + "; ".join(oks) + ".")
    return status


if __name__ == "__main__":
    sys.exit(main())
