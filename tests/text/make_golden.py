#!/usr/bin/python3
"""Golden test of text/ (tokenizer C API and prompt templates) against Python sentencepiece and the
reference prompt code (LLM-Adapters, LLaVA, Meta's LLaMA-2), on tokenizers trained at test time.

    /usr/bin/python3 tests/text/make_golden.py --helper build/tests/text_golden [--keep DIR]

(ctest runs it through tests/e2e/test_tokenizer_golden.py.) Steps:
  1. trains three small sentencepiece models into a temporary directory with the `spm_train` CLI
     (python's trainer when the CLI is absent), on text generated here plus the instructions of
     ../shared/data/csr/*/train.json when that data is present (skipped quietly when absent):
       llama    BPE with LLaMA's settings: byte fallback, identity normalization, no whitespace
                folding, whitespace-only pieces, split digits; unk 0, bos 1, eos 2, no pad
       nfkc     unigram with spm_train's defaults (nmt_nfkc, folds and strips spaces, no byte
                fallback: emoji become unk); a pad id
       nospec   BPE without BOS and EOS (bos/eos -1): templates and add_bos must be refused
  2. encodes a list of tricky strings (ASCII, accents composed and combining, CJK, Hangul, Arabic,
     emoji with ZWJ and skin tones, fullwidth forms, NBSP, whitespace runs, leading/trailing spaces,
     newlines, tabs, CRLF, the empty string, "<s>" written as text, long runs) with Python
     sentencepiece, and builds prompt examples for every template with independent Python references;
  3. runs the C helper (tests/text/text_golden.c) on the same requests and compares: ids exactly,
     token source offsets, decode, piece <-> id over the whole vocabulary, special ids; for the
     templates the rendered bytes, input_ids, labels, kinds and spans; plus a truncated / empty /
     garbage model, each of which must give one error line naming the file.
Exit status 0 when every check passed, 1 otherwise.
"""
import argparse
import glob
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

import sentencepiece as spm

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSR = os.path.join(os.path.dirname(ROOT), "shared", "data", "csr")

IGNORE = -100
PAD, PROMPT, RESPONSE, IMAGE = 0, 1, 2, 3


class Checks:
    def __init__(self, name):
        self.name, self.n, self.failed = name, 0, []

    def ok(self, cond, what, detail=None):
        self.n += 1
        if cond:
            print("  ok    %s" % what)
        else:
            print("  FAIL  %s" % what)
            if detail is not None:
                for line in str(detail).rstrip().splitlines()[-20:]:
                    print("        | %s" % line)
            self.failed.append(what)
        sys.stdout.flush()
        return bool(cond)

    def finish(self):
        if self.failed:
            print("%s: %d of %d checks FAILED" % (self.name, len(self.failed), self.n))
            for f in self.failed:
                print("  - %s" % f)
            return 1
        print("%s: all %d checks passed" % (self.name, self.n))
        return 0


# ---- training data and models -------------------------------------------------------------------

TRICKY = [
    "", " ", "  ", "\n", "\n\n", "\t", "a", "Hello world", "hello  world", "  leading spaces",
    "trailing spaces  ", "   both sides   ", "line1\nline2\r\nline3\n", "tabs\tand\tspaces",
    "multiple     spaces    here", "café naïve résumé Ångström", "e\u0301 combining acute",
    "日本語のテキストです", "中文汉字测试 中文", "한국어 텍스트", "Русский текст", "العربية",
    "emoji 😀🎉👍🏽 ok", "family 👨\u200d👩\u200d👧\u200d👦", "mixed ASCII 和 中文 and emoji 🚀!",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３", "ﬁ ligature ﬂ", "\u00a0nbsp\u00a0", "\u3000ideographic space",
    "zero\u200bwidth", "numbers 12345 3.14159 -7e10", "punct!?.,;:'\"()[]{}<>@#$%^&*",
    "<s> </s> <unk> written as text", "\u2581 lower one eighth block \u2581\u2581",
    "### Response:\n                the correct answer is answer2",
    "a" * 300, "The quick brown fox jumps over the lazy dog. " * 20,
]

WORDS = ("the a an of to in is was for on with as by at from that this it be are answer question "
         "correct solution option ending true false please choose which what when where why how "
         "people water energy light plant animal earth heat move change cause effect because "
         "response instruction input output below describes task write appropriately completes "
         "request chat curious user human assistant helpful detailed polite").split()


def corpus_lines(rng):
    lines = []
    for _ in range(4000):
        n = rng.randint(3, 18)
        ws = []
        for _ in range(n):
            w = rng.choice(WORDS)
            if rng.random() < 0.1:
                w = w.capitalize()
            if rng.random() < 0.05:
                w += rng.choice(",.?!:;")
            if rng.random() < 0.03:
                w = str(rng.randint(0, 9999))
            ws.append(w)
        lines.append(" ".join(ws))
    for s in TRICKY:
        if s.strip():
            lines += [s.replace("\n", " ")] * 3
    lines += ["Below is an instruction that describes a task. Write a response that appropriately "
              "completes the request.", "### Instruction:", "### Input:", "### Response:",
              "USER: hello ASSISTANT: hi", "[INST] <<SYS>> <</SYS>> [/INST]"] * 20
    return lines


def csr_lines(limit_bytes=3_000_000):
    """Instruction and output texts of the real CSR train files, when present (else [])."""
    out, size = [], 0
    for path in sorted(glob.glob(os.path.join(CSR, "*", "train.json"))):
        try:
            with open(path, encoding="utf-8") as f:
                rows = json.load(f)
        except (OSError, ValueError):
            continue
        for r in rows[:2000]:
            for key in ("instruction", "output"):
                t = r.get(key) or ""
                for line in t.split("\n"):
                    if line.strip():
                        out.append(line)
                        size += len(line)
            if size > limit_bytes:
                return out
    return out


MODELS = {
    "llama": dict(model_type="bpe", vocab_size=1000, byte_fallback="true", normalization_rule_name="identity",
                  remove_extra_whitespaces="false", allow_whitespace_only_pieces="true", split_digits="true",
                  unk_id=0, bos_id=1, eos_id=2, pad_id=-1),
    "nfkc": dict(model_type="unigram", vocab_size=600, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                 hard_vocab_limit="false"),
    "nospec": dict(model_type="bpe", vocab_size=500, byte_fallback="true", unk_id=0, bos_id=-1, eos_id=-1,
                   pad_id=1),
}


def train_models(tmp):
    rng = random.Random(1234)
    lines = corpus_lines(rng)
    real = csr_lines()
    print("training text: %d generated lines, %d lines of CSR instructions%s" % (
        len(lines), len(real), "" if real else " (../shared/data/csr absent: generated text only)"))
    corpus = os.path.join(tmp, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("\n".join(lines + real) + "\n")
    spm_train = shutil.which("spm_train")
    paths = {}
    for name, opts in MODELS.items():
        prefix = os.path.join(tmp, name)
        args = dict(opts, input=corpus, model_prefix=prefix, character_coverage=1.0,
                    input_sentence_size=200000, shuffle_input_sentence="true")
        if spm_train:
            cmd = [spm_train] + ["--%s=%s" % (k, v) for k, v in args.items()] + ["--minloglevel=2"]
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if p.returncode != 0:
                raise RuntimeError("spm_train failed for %s:\n%s" % (name, p.stderr[-2000:]))
        else:
            spm.SentencePieceTrainer.train(**args, minloglevel=2)
        paths[name] = prefix + ".model"
    return paths


# ---- reference prompt code ----------------------------------------------------------------------
# LLM-Adapters finetune.py, generate_prompt: copied as it stands (the trailing spaces and the
# 16-space blank lines inside the f-strings are part of the prompt).

def generate_prompt(data_point):
    # sorry about the formatting disaster gotta move fast
    if data_point["input"]:
        return f"""Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request. 

                ### Instruction:
                {data_point["instruction"]}
                
                ### Input:
                {data_point["input"]}
                
                ### Response:
                {data_point["output"]}""" # noqa: E501
    else:
        return f"""Below is an instruction that describes a task. Write a response that appropriately completes the request.  

                ### Instruction:
                {data_point["instruction"]}
                
                ### Response:
                {data_point["output"]}""" # noqa: E501


# LLM-Adapters commonsense_evaluate.py, generate_prompt: copied as it stands.

def generate_eval_prompt(instruction, input=None):
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
                """  # noqa: E501


# LLaVA conversation.py: conv_vicuna_v1 / conv_llava_v1 and get_prompt() for SeparatorStyle.TWO.
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def llava_get_prompt(system, messages, sep=" ", sep2="</s>"):
    seps = [sep, sep2]
    ret = system + seps[0]
    for i, (role, message) in enumerate(messages):
        if message:
            ret += role + ": " + message + seps[i % 2]
        else:
            ret += role + ":"
    return ret


# Meta llama/generation.py chat_completion (LLaMA-2).
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def ascii_strip(s):
    return s.strip(" \t\n\v\f\r")


class Ref:
    """Reference tokenization of one example. Runs of (text, boundaries) are encoded once each with
    python sentencepiece; a token belongs to the part holding its last source character (the contract
    of text/template.h, implemented here independently from the token offsets python reports)."""

    def __init__(self, sp):
        self.sp = sp
        self.ids, self.kinds = [], []

    def special(self, which, kind):
        i = self.sp.bos_id() if which == "bos" else self.sp.eos_id()
        if i < 0:
            raise ValueError("no %s" % which)
        self.ids.append(i)
        self.kinds.append(kind)

    def run(self, parts):
        """parts: [(text, kind)], encoded as one call on the joined text."""
        text = "".join(t for t, _ in parts)
        bounds, at = [], 0
        for t, k in parts:
            bounds.append((at, at + len(t), k))
            at += len(t)
        pieces = self.sp.encode(text, out_type="immutable_proto").pieces
        seg = 0
        for p in pieces:
            anchor = p.end - 1 if p.end > p.begin else p.begin
            anchor = min(anchor, len(text) - 1)
            while seg + 1 < len(bounds) and bounds[seg + 1][0] <= anchor:
                seg += 1
            self.ids.append(p.id)
            self.kinds.append(bounds[seg][2])

    def example(self, train_on_inputs, max_tokens):
        ids, kinds = self.ids, self.kinds
        labels = [i if (k == RESPONSE or (k == PROMPT and train_on_inputs)) else IGNORE for i, k in zip(ids, kinds)]
        dropped = 0
        if max_tokens and len(ids) > max_tokens:
            dropped = len(ids) - max_tokens
            ids, kinds, labels = ids[:max_tokens], kinds[:max_tokens], labels[:max_tokens]
        return dict(input_ids=ids, labels=labels, kinds=kinds, n_dropped=dropped)


def reference(sp, req):
    """Expected output of one template request: text (no specials), text_specials, ids, labels, kinds;
    plus 'notes' with comparisons against the original masking code."""
    t, mode = req["template"], req["mode"]
    turns, system, inp = req["turns"], req.get("system"), req.get("input")
    toi, cutoff = req.get("train_on_inputs", 0), req.get("max_tokens", 0)
    r = Ref(sp)
    notes = {}
    if t == "alpaca":
        instr, out = turns[0][0] or "", turns[0][1]
        if mode == "train":
            dp = {"instruction": instr, "input": inp, "output": out if out is not None else ""}
            full = generate_prompt(dp)
            user = generate_prompt({**dp, "output": ""})
            r.special("bos", PROMPT)
            r.run([(user, PROMPT), (full[len(user):], RESPONSE)])
            r.special("eos", RESPONSE)
            text, specials = full, "<s>" + full + "</s>"
            # LLM-Adapters' own tokenize() and its train_on_inputs=False mask (prefix length).
            ids = [sp.bos_id()] + sp.encode(full)
            cut = cutoff if cutoff else 10 ** 9
            ids = ids[:cut]
            if ids[-1] != sp.eos_id() and len(ids) < cut:
                ids.append(sp.eos_id())
            uids = ([sp.bos_id()] + sp.encode(user))[:cut]
            notes["lla_ids"] = ids
            notes["lla_user_len"] = len(uids)
            # LLM-Adapters' mask is well defined when the user prompt's ids are a prefix of the full
            # ids AND cover all of the user prompt (a model that strips trailing spaces leaves the
            # "▁" of "\n    " + output to the full text, where it is prompt text but LLM-Adapters
            # trains it).
            ps = sp.encode(full, out_type="immutable_proto").pieces
            k = len(uids) - 1
            notes["lla_prefix_ok"] = ids[:len(uids)] == uids and (k >= len(ps) or ps[k].begin >= len(user))
        else:
            text = generate_eval_prompt(instr, inp)
            specials = "<s>" + text
            r.special("bos", PROMPT)
            r.run([(text, PROMPT)])
            notes["lla_ids"] = [sp.bos_id()] + sp.encode(text)
    elif t in ("vicuna_v1", "llava_v1"):
        sysp = system if system is not None else (VICUNA_V1_SYSTEM if t == "vicuna_v1" else LLAVA_V1_SYSTEM)
        msgs = []
        for i, (u, a) in enumerate(turns):
            msgs.append(("USER", u))
            last = i + 1 == len(turns)
            msgs.append(("ASSISTANT", None if (mode == "eval" and last) else a))
        specials = "<s>" + llava_get_prompt(sysp, msgs)
        text = specials[3:].replace("</s>", "")  # rendered without specials
        # HF's legacy LLaMA tokenizer: "</s>" in the text is the EOS id; the text between is encoded
        # chunk by chunk (dummy prefix each time).
        r.special("bos", PROMPT)
        chunks = specials[3:].split("</s>")
        for ci, c in enumerate(chunks):
            has_eos = ci + 1 < len(chunks)
            if has_eos:
                b = c.rfind("ASSISTANT:") + len("ASSISTANT:")
                r.run([(c[:b], PROMPT), (c[b:], RESPONSE)])
                r.special("eos", RESPONSE)
            elif c:
                r.run([(c, PROMPT)])
        hf = [sp.bos_id()]
        for ci, c in enumerate(chunks):
            hf += sp.encode(c) if c else []
            if ci + 1 < len(chunks):
                hf.append(sp.eos_id())
        notes["hf_ids"] = hf
        # LLaVA train.py preprocess_v1 (legacy tokenizer branch): mask by re-tokenizing rounds.
        tgt = list(hf)
        cur = 1
        tgt[:cur] = [IGNORE]
        sep = " ASSISTANT: "
        ok = True
        for rou in chunks:
            if rou == "":
                break
            parts = rou.split(sep)
            if len(parts) != 2:
                break
            parts[0] += sep
            round_len = len([0] + sp.encode(rou))
            instr_len = len([0] + sp.encode(parts[0])) - 2
            for k in range(cur, min(cur + instr_len, len(tgt))):
                tgt[k] = IGNORE
            cur += round_len
        for k in range(cur, len(tgt)):
            tgt[k] = IGNORE
        if cur != len(hf):
            ok = False
        notes["llava_labels"] = tgt if ok else None
    elif t == "llama2":
        dialog = []
        if system:
            dialog.append({"role": "system", "content": system})
        for i, (u, a) in enumerate(turns):
            dialog.append({"role": "user", "content": u or ""})
            if not (mode == "eval" and i + 1 == len(turns)):
                dialog.append({"role": "assistant", "content": a})
        if dialog[0]["role"] == "system":
            dialog = [{"role": dialog[1]["role"],
                       "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}] + dialog[2:]
        text, specials = "", ""
        meta = []
        for prompt, answer in zip(dialog[::2], dialog[1::2]):
            head = f"{B_INST} {ascii_strip(prompt['content'])} {E_INST}"
            body = f"{head} {ascii_strip(answer['content'])} "
            meta += [sp.bos_id()] + sp.encode(body) + [sp.eos_id()]
            r.special("bos", PROMPT)
            r.run([(head, PROMPT), (body[len(head):], RESPONSE)])
            r.special("eos", RESPONSE)
            text += body
            specials += "<s>" + body + "</s>"
        if len(dialog) % 2 == 1:
            head = f"{B_INST} {ascii_strip(dialog[-1]['content'])} {E_INST}"
            meta += [sp.bos_id()] + sp.encode(head)
            r.special("bos", PROMPT)
            r.run([(head, PROMPT)])
            text += head
            specials += "<s>" + head
        notes["meta_ids"] = meta
    elif t == "plain":
        parts = []
        for i, (u, a) in enumerate(turns):
            if u:
                parts.append((u, PROMPT))
            if mode == "eval" and i + 1 == len(turns):
                break
            parts.append((a, RESPONSE))
        text = "".join(p for p, _ in parts)
        r.special("bos", PROMPT)
        r.run(parts)
        specials = "<s>" + text
        if mode == "train":
            r.special("eos", RESPONSE)
            specials += "</s>"
    else:
        raise ValueError(t)
    ex = r.example(toi, cutoff)
    ex.update(text=text, text_specials=specials, notes=notes)
    return ex


def template_requests():
    reqs = []
    alpaca = [
        ("Say hello.", None, "Hello!"),
        ("Translate to French.", "The cat sleeps.", "Le chat dort."),
        ("Résumé en 日本語 😀?", "  indented input  \nsecond line", " answer with a leading space"),
        ("Trailing spaces   ", "", "the correct answer is true"),
        ("Empty output", None, ""),
        ("No output given", None, None),
        ("multi\n\nline\ninstruction", "x", "line one\nline two\n"),
    ]
    for rec in csr_records(12):
        alpaca.append(rec)
    for instr, inp, out in alpaca:
        for toi in (0, 1):
            reqs.append(dict(template="alpaca", mode="train", turns=[[instr, out]], input=inp, train_on_inputs=toi))
        reqs.append(dict(template="alpaca", mode="eval", turns=[[instr, None]], input=inp))
    for cut in (5, 30):
        reqs.append(dict(template="alpaca", mode="train", turns=[["Cut me short please", "a fairly long answer"]],
                         train_on_inputs=0, max_tokens=cut))
    convs = [
        [["What is in the image?", "A cat on a mat."]],
        [["Hi", "Hello, how can I help?"], ["Tell me a joke 😀", "Why did the chicken cross the road?"],
         ["日本語で", "はい、どうぞ。"]],
        [["", "empty user"], ["second", "reply"]],
        [["question with  double  spaces ", " answer with spaces "]],
        [["first", ""], ["after an empty answer", "ok"]],
    ]
    for t in ("vicuna_v1", "llava_v1"):
        for c in convs:
            for toi in (0, 1):
                reqs.append(dict(template=t, mode="train", turns=c, train_on_inputs=toi))
            reqs.append(dict(template=t, mode="eval", turns=c[:-1] + [[c[-1][0], None]]))
        reqs.append(dict(template=t, mode="train", system="", turns=convs[0]))
        reqs.append(dict(template=t, mode="train", system="Custom system.", turns=convs[1]))
    for system in (None, "You are terse.", "  padded system  "):
        for c in convs[:4]:
            reqs.append(dict(template="llama2", mode="train", system=system, turns=c, train_on_inputs=0))
            reqs.append(dict(template="llama2", mode="eval", system=system, turns=c[:-1] + [[c[-1][0], None]]))
    reqs.append(dict(template="llama2", mode="train", turns=[["  strip me\n", "\n  and me  "]], train_on_inputs=1))
    reqs.append(dict(template="llama2", mode="train", system="sys only", turns=[["", "answer"]]))
    for c in ([[None, "Just some pretraining text.\nWith two lines."]], [["prompt part ", "response part"]],
              [["a", "b"], [" c", " d "]]):
        for toi in (0, 1):
            reqs.append(dict(template="plain", mode="train", turns=c, train_on_inputs=toi))
        reqs.append(dict(template="plain", mode="eval", turns=c))
    return reqs


def csr_records(n):
    out = []
    for path in sorted(glob.glob(os.path.join(CSR, "*", "train.json"))):
        try:
            with open(path, encoding="utf-8") as f:
                rows = json.load(f)
        except (OSError, ValueError):
            continue
        for r in rows[:n // 4 + 1]:
            out.append((r.get("instruction", ""), r.get("input") or None, r.get("output", "")))
    return out[:n]


# ---- comparison ---------------------------------------------------------------------------------

def byte_offsets(text):
    """char index -> byte offset, for every index 0..len(text)."""
    out, at = [0], 0
    for ch in text:
        at += len(ch.encode("utf-8"))
        out.append(at)
    return out


def run_helper(helper, model, reqs, tmp):
    rq, out = os.path.join(tmp, "req.json"), os.path.join(tmp, "out.json")
    with open(rq, "w", encoding="utf-8") as f:
        json.dump(reqs, f)
    p = subprocess.run([helper, model, rq, out], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    if p.returncode != 0:
        return None, p
    with open(out, "rb") as f:
        return json.loads(f.read().decode("utf-8", errors="surrogateescape")), p


def check_model(chk, helper, name, path, tmp, extra_strings):
    sp = spm.SentencePieceProcessor(model_file=path)
    V = sp.vocab_size()
    strings = TRICKY + extra_strings
    enc = [dict(text=s, bos=b, eos=e) for s in strings for (b, e) in ((0, 0), (1, 0), (1, 1), (0, 1))]
    rng = random.Random(99)
    dec = [sp.encode(s) for s in strings] + [[rng.randrange(V) for _ in range(rng.randint(0, 12))]
                                             for _ in range(40)]
    specials = [i for i in (sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id()) if i >= 0]
    dec += [specials, specials + sp.encode("after specials"), [], [V], [-1]]
    p2i = ["\u2581", "\u2581the", "the", "<unk>", "<s>", "</s>", "<pad>", "not a piece at all", "", "<0x41>"]
    tmpl = template_requests()
    reqs = {"encode": enc, "decode": dec, "piece_to_id": p2i, "templates": tmpl}
    got, proc = run_helper(helper, path, reqs, tmp)
    if not chk.ok(got is not None, "[%s] helper ran" % name, proc.stderr.decode(errors="replace")):
        return

    chk.ok([got["vocab_size"], got["bos"], got["eos"], got["pad"], got["unk"]] ==
           [V, sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id()],
           "[%s] vocab size %d and special ids bos %d eos %d pad %d unk %d" % (
               name, V, sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id()),
           [got["vocab_size"], got["bos"], got["eos"], got["pad"], got["unk"]])
    pieces_py = [sp.id_to_piece(i) for i in range(V)]
    chk.ok(got["pieces"] == pieces_py, "[%s] id_to_piece equals python for all %d ids" % (name, V))
    chk.ok(got["is_control"] == [int(sp.is_control(i)) for i in range(V)], "[%s] is_control equals python" % name)
    chk.ok(got["piece_id_roundtrip"] and got["out_of_range_piece_is_null"],
           "[%s] piece_to_id(id_to_piece(id)) == id for every id; out-of-range ids give NULL" % name)
    chk.ok(got["piece_to_id"] == [sp.piece_to_id(p) for p in p2i],
           "[%s] piece_to_id of pieces and non-pieces (unk) equals python" % name,
           (got["piece_to_id"], [sp.piece_to_id(p) for p in p2i]))

    # encode: ids exactly, offsets as python reports them (chars there, bytes here)
    bad_ids, bad_off, refused = [], [], 0
    for rq, g in zip(enc, got["encode"]):
        s = rq["text"]
        want = ([sp.bos_id()] if rq["bos"] else []) + sp.encode(s) + ([sp.eos_id()] if rq["eos"] else [])
        if -1 in want:  # python inserts -1 for an absent BOS/EOS; the C API refuses
            if "error" in g and "no BOS" in g["error"] or "no EOS" in g.get("error", ""):
                refused += 1
            else:
                bad_ids.append((s, rq, g))
            continue
        if g.get("ids") != want:
            bad_ids.append((s[:60], rq["bos"], rq["eos"], g.get("ids", g.get("error")), want))
            continue
        bo = byte_offsets(s)
        pieces = sp.encode(s, out_type="immutable_proto").pieces
        wb = ([0] if rq["bos"] else []) + [bo[p.begin] for p in pieces] + ([len(s.encode())] if rq["eos"] else [])
        we = ([0] if rq["bos"] else []) + [bo[p.end] for p in pieces] + ([len(s.encode())] if rq["eos"] else [])
        if g["begin"] != wb or g["end"] != we:
            bad_off.append((s[:40], g["begin"][:12], wb[:12], g["end"][:12], we[:12]))
    chk.ok(not bad_ids, "[%s] encode: ids equal python sentencepiece for %d strings x 4 BOS/EOS settings" % (
        name, len(strings)), "\n".join(repr(b) for b in bad_ids[:6]))
    if sp.bos_id() < 0:
        chk.ok(refused == 3 * len(strings), "[%s] add_bos / add_eos refused on a model without them (%d)" % (
            name, refused))
    chk.ok(not bad_off, "[%s] encode: token source offsets equal python's spans" % name,
           "\n".join(repr(b) for b in bad_off[:6]))
    nonempty = sum(1 for s in strings if sp.encode(s))
    visible = sum(1 for s in strings if s.strip())
    chk.ok(nonempty >= visible, "[%s] every string with visible characters encodes to tokens (%d of %d)" % (
        name, nonempty, len(strings)))

    # decode
    bad = []
    for ids, g in zip(dec, got["decode"]):
        try:
            want = sp.decode(ids)
        except (IndexError, RuntimeError) as e:
            want = ("error", str(e))
        if isinstance(want, tuple):
            if "error" not in g or "outside the vocabulary" not in g["error"]:
                bad.append((ids, g, want))
        elif bytes(g.get("bytes", [])) != want.encode("utf-8", "surrogateescape") or g.get("len") != len(
                want.encode("utf-8", "surrogateescape")):
            bad.append((ids, g, want))
    chk.ok(not bad, "[%s] decode equals python for %d id lists (random ids, specials, empty; out-of-range "
           "refused)" % (name, len(dec)), "\n".join(repr(b) for b in bad[:6]))

    # templates
    if sp.bos_id() < 0:
        errs = [g.get("error", "") for g in got["templates"]]
        chk.ok(all(("needs a BOS token" in e or "needs a EOS" in e) and path in e for e in errs),
               "[%s] every template is refused (no BOS/EOS), naming the model" % name, errs[:3])
        return
    by_t = {}
    for rq, g in zip(tmpl, got["templates"]):
        ref = reference(sp, rq)
        key = "%s/%s" % (rq["template"], rq["mode"])
        st = by_t.setdefault(key, dict(n=0, bad=[], straddle=0, lla_prefix=0, lla_agree=0, lla_n=0,
                                       llava_agree=0, llava_n=0, ref_ids=0, dropped=0))
        st["n"] += 1
        if "error" in g:
            st["bad"].append(("error", rq, g["error"]))
            continue
        for field in ("text", "text_specials", "input_ids", "labels", "kinds", "n_dropped"):
            if g[field] != ref[field]:
                st["bad"].append((field, rq, g[field] if not isinstance(g[field], list) else g[field][:40],
                                  ref[field] if not isinstance(ref[field], list) else ref[field][:40]))
                break
        # spans tile [0, n) in segment order and each token's kind is its segment's kind
        n, at, tiled = len(g["input_ids"]), 0, True
        for (b, e), k in zip(g["spans"], g["seg_kinds"]):
            if b != at or e < b or any(g["kinds"][i] != k for i in range(b, e)):
                tiled = False
            at = e
        if not tiled or at != n:
            st["bad"].append(("spans", rq, g["spans"], g["seg_kinds"]))
        st["straddle"] += g["n_straddle"]
        st["dropped"] += g["n_dropped"]
        notes = ref["notes"]
        # the ids equal the original code's tokenization (LLM-Adapters / HF chunks / Meta)
        orig = notes.get("lla_ids") or notes.get("hf_ids") or notes.get("meta_ids")
        if orig is not None:
            cut = rq.get("max_tokens") or 10 ** 9
            if g["input_ids"] == orig[:cut]:
                st["ref_ids"] += 1
            else:
                st["bad"].append(("original ids", rq, g["input_ids"][:40], orig[:40]))
        if "lla_prefix_ok" in notes and not rq.get("train_on_inputs"):
            st["lla_n"] += 1
            L = notes["lla_user_len"]
            lla_labels = [IGNORE] * L + notes["lla_ids"][L:]
            if g["labels"] == lla_labels:
                st["lla_agree"] += 1
            if notes["lla_prefix_ok"]:
                st["lla_prefix"] += 1
                if g["labels"] != lla_labels:
                    st["bad"].append(("LLM-Adapters mask", rq, g["labels"], lla_labels))
        if notes.get("llava_labels") is not None and not rq.get("train_on_inputs") and rq["mode"] == "train":
            st["llava_n"] += 1
            if g["labels"] == notes["llava_labels"]:
                st["llava_agree"] += 1
    for key, st in sorted(by_t.items()):
        chk.ok(not st["bad"], "[%s] %s: %d examples: rendered text, input_ids, labels, kinds, spans equal the "
               "references; ids equal the original code's in %d; %d straddling tokens, %d dropped" % (
                   name, key, st["n"], st["ref_ids"], st["straddle"], st["dropped"]),
               "\n".join(repr(b)[:600] for b in st["bad"][:4]))
        if st["lla_n"]:
            print("        LLM-Adapters' prefix-length mask: well defined (user prompt ids a prefix of the full "
                  "ids, covering the whole user prompt) in %d of %d, and equal to ours there; equal to ours "
                  "in %d of %d overall" % (st["lla_prefix"], st["lla_n"], st["lla_agree"], st["lla_n"]))
        if st["llava_n"]:
            print("        LLaVA preprocess_v1 mask (legacy arithmetic) equals ours in %d of %d" % (
                st["llava_agree"], st["llava_n"]))
        if name == "llama" and key.startswith(("vicuna", "llava")) and key.endswith("train"):
            chk.ok(st["llava_agree"] == st["llava_n"] and st["llava_n"] > 0,
                   "[%s] %s: LLaVA's own preprocess_v1 mask equals ours in all %d responses-only examples" % (
                       name, key, st["llava_n"]))


def check_bad_models(chk, helper, good, tmp):
    data = open(good, "rb").read()
    cases = {
        "truncated_half.model": data[: len(data) // 2],
        "truncated_pieces_only.model": None,  # cut at the end of the last piece: valid protobuf prefix
        "truncated_10.model": data[:10],
        "empty.model": b"",
        "garbage.model": b"this is not a sentencepiece model at all\n" * 10,
    }
    # find the end of the last top-level field 1 (pieces)
    i, last_piece_end = 0, None
    while i < len(data):
        key, i = varint(data, i)
        if key & 7 == 2:
            ln, i = varint(data, i)
            i += ln
            if key >> 3 == 1:
                last_piece_end = i
        else:
            break
    cases["truncated_pieces_only.model"] = data[:last_piece_end]
    probe = spm.SentencePieceProcessor()
    try:
        loaded = probe.load_from_serialized_proto(data[:last_piece_end])
    except Exception:  # noqa: BLE001
        loaded = False
    print("        (python sentencepiece %s the pieces-only prefix)" % ("ACCEPTS" if loaded else "refuses"))
    reqs = {"encode": [{"text": "x"}]}
    for fname, content in cases.items():
        p = os.path.join(tmp, fname)
        with open(p, "wb") as f:
            f.write(content)
        got, proc = run_helper(helper, p, reqs, tmp)
        err = proc.stderr.decode(errors="replace")
        lines = err.strip().splitlines()
        chk.ok(got is None and proc.returncode == 1 and len(lines) == 1 and p in lines[0] and
               "Traceback" not in err and "terminate" not in err,
               "%s: refused with one line naming the file: %s" % (fname, lines[0] if lines else "(nothing)"), err)
    got, proc = run_helper(helper, os.path.join(tmp, "no_such.model"), reqs, tmp)
    err = proc.stderr.decode(errors="replace").strip()
    chk.ok(got is None and proc.returncode == 1 and "no_such.model: cannot open" in err,
           "missing model: %s" % err, err)


def varint(b, i):
    r, s = 0, 0
    while True:
        c = b[i]
        i += 1
        r |= (c & 0x7F) << s
        s += 7
        if not c & 0x80:
            return r, i


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--helper", required=True, help="the text_golden binary (build/tests/text_golden)")
    ap.add_argument("--keep", help="train into this directory and keep it")
    args = ap.parse_args(argv)
    chk = Checks("tokenizer_golden")
    if not os.access(args.helper, os.X_OK):
        chk.ok(False, "helper binary %s exists (build it: cmake --build build)" % args.helper)
        return chk.finish()
    tmp = args.keep or tempfile.mkdtemp(prefix="tk_golden_")
    os.makedirs(tmp, exist_ok=True)
    try:
        models = train_models(tmp)
        extra = [r[0] for r in csr_records(8)] + [r[2] for r in csr_records(8)]
        for name, path in models.items():
            print("model %s (%s)" % (name, path))
            check_model(chk, args.helper, name, path, tmp, extra)
        print("malformed models")
        check_bad_models(chk, args.helper, models["nfkc"], tmp)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return chk.finish()


if __name__ == "__main__":
    sys.exit(main())
