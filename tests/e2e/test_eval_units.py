#!/usr/bin/python3
"""Evaluation units against independent Python computations (src/eval: metrics, answer extraction,
the LLM-Adapters response split), through the C helper built beside tspeft (BUILD/tests/eval_tool).

    /usr/bin/python3 tests/e2e/test_eval_units.py --tspeft build/tspeft

* metrics: accuracy, binary F1, MCC, Pearson, Spearman (ties averaged) of the C code == plain-Python
  implementations written here from the textbook definitions (scikit-learn / scipy conventions: F1 and
  MCC 0 on a zero denominator, Pearson undefined (null) for a constant side), on hand-made edge cases
  and 200 random cases with many ties, to 1e-12;
* extraction == Python `re.findall(pattern, s)[0]` (or "" without a match) for LLM-Adapters' five
  patterns and tricky alternations on 3000+ strings: overlaps ("ttrue", "answer12"), prefixes,
  case, newlines, non-ASCII text;
* response == LLM-Adapters' `o.split("### Response:")[1].strip()`;
* the task pattern: answer1..answer5 for answerK tasks, else the choices.

Exit status 0 when every check passed, 1 otherwise.
"""
import argparse
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import e2e_util as U  # noqa: E402

PATTERNS = [["true", "false"], ["solution1", "solution2"],
            ["answer1", "answer2", "answer3", "answer4", "answer5"],
            ["ending1", "ending2", "ending3", "ending4"], ["option1", "option2"]]
TRICKY = [["a", "ab"], ["ab", "a"], ["true", "tru", "rue"], ["answer1", "answer12"], ["x"]]
PY_SPACE = " \t\n\x0b\x0c\r\x1c\x1d\x1e\x1f"


# ---- independent references ---------------------------------------------------------------------

def acc(p, g):
    return sum(1 for a, b in zip(p, g) if a == b) / len(p) if p else None


def counts(p, g):
    tp = sum(1 for a, b in zip(p, g) if a and b)
    tn = sum(1 for a, b in zip(p, g) if not a and not b)
    fp = sum(1 for a, b in zip(p, g) if a and not b)
    fn = sum(1 for a, b in zip(p, g) if not a and b)
    return tp, tn, fp, fn


def f1(p, g):
    if not p:
        return None
    tp, tn, fp, fn = counts(p, g)
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    return 2 * prec * rec / (prec + rec) if prec + rec else 0.0


def mcc(p, g):
    if not p:
        return None
    tp, tn, fp, fn = counts(p, g)
    den = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return (tp * tn - fp * fn) / math.sqrt(den) if den else 0.0


def pearson(x, y):
    n = len(x)
    if n == 0:
        return None
    mx, my = math.fsum(x) / n, math.fsum(y) / n
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = math.fsum((a - mx) ** 2 for a in x)
    syy = math.fsum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def ranks(x):
    # rank = 1 + (number of smaller values) + (number of equal values - 1) / 2
    return [1 + sum(1 for b in x if b < a) + (sum(1 for b in x if b == a) - 1) / 2 for a in x]


def spearman(x, y):
    return pearson(ranks(x), ranks(y)) if x else None


def findall0(alts, s):
    m = re.findall("|".join(re.escape(a) for a in alts), s)
    return m[0] if m else None


def response(o):
    parts = o.split("### Response:")
    return parts[1].strip(PY_SPACE) if len(parts) > 1 else ""


# ---- cases ----------------------------------------------------------------------------------------

def metric_cases(rng):
    cases = [
        ([1, 1, 0, 0], [1, 0, 1, 0], [1, 2, 3, 4], [1, 2, 3, 4]),
        ([1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 2, 3, 4]),     # constant: MCC 0, Pearson null
        ([0, 0, 0, 0], [1, 1, 0, 0], [1, 2, 2, 3], [3, 2, 2, 1]),     # no positive prediction: F1 0
        ([1, 0], [0, 1], [5.0, 5.0], [1.0, 1.0]),
        ([1], [1], [0.5], [0.25]),
        ([1, 0, 1], [1, 0, 1], [1, 1, 2], [2, 2, 2.5]),
        ([0, 1, 1, 0, 1], [0, 1, 0, 0, 1], [3.2, 1.1, 4.0, 1.1, 1.1], [2.0, 0.4, 5.0, 0.4, 3.0]),
    ]
    for _ in range(200):
        n = rng.randint(1, 60)
        p = [rng.randint(0, 1) for _ in range(n)]
        g = [rng.randint(0, 1) if rng.random() < 0.5 else p[i] for i in range(n)]
        k = rng.choice([2, 3, 6, 26, 1000])                           # few levels: many ties
        x = [rng.randint(0, k - 1) / 5.0 for _ in range(n)]
        y = [xi + rng.gauss(0, 1) if rng.random() < 0.7 else rng.randint(0, k - 1) / 5.0 for xi in x]
        cases.append((p, g, x, y))
    return cases


def random_text(rng):
    atoms = ["true", "false", "tru", "e", "fals", "True", "FALSE", "solution1", "solution2", "solution",
             "answer1", "answer2", "answer3", "answer4", "answer5", "answer12", "answer", "ending1",
             "ending4", "ending5", "option1", "option2", "option", "1", "2", " ", "\n", "\t", ".", ",",
             "the correct answer is ", "é", "漢字", "🙂", "a", "ab", "b", "x", "rue", "ttrue", "aab"]
    return "".join(rng.choice(atoms) for _ in range(rng.randint(0, 12)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tspeft", required=True, help="the tspeft binary; eval_tool is BUILD/tests/eval_tool")
    args = ap.parse_args()
    tool = os.path.join(os.path.dirname(os.path.abspath(args.tspeft)), "tests", "eval_tool")
    chk = U.Checks("test_eval_units")
    if not chk.ok(os.path.isfile(tool), "eval_tool exists at %s" % tool):
        return chk.finish()
    rng = random.Random(11)
    mcases = metric_cases(rng)
    texts = ["", "true", "false", "truefalse", "falsetrue", "the correct answer is true",
             "tRUE true", "ttrue", "fals true", "answer12", "answer5answer1", "solution3 solution2",
             "\ntrue\n", "untrue", "ending5 ending4", "option1option2", "é true 漢字 false"]
    texts += [random_text(rng) for _ in range(600)]
    ext = [(alts, s) for s in texts for alts in PATTERNS + TRICKY]
    resp_cases = ["### Response:\n true \n", "x ### Response:the correct answer is false",
                  "a### Response:b### Response:c", "no marker", "### Response:", "### Response:\x1c t \x0b",
                  "### Response: é \u00a0"]
    resp_cases += ["pre ### Response:" + random_text(rng) + ("### Response:" + random_text(rng) if i % 3 == 0 else "")
                   for i in range(200)]
    pattern_cases = PATTERNS + [["answer1", "answer2", "answer3"], ["A", "B"]]
    req = {"metrics": [{"pred": p, "gold": g, "x": x, "y": y} for p, g, x, y in mcases],
           "extract": [{"text": s, "alts": alts} for alts, s in ext],
           "response": resp_cases, "pattern": pattern_cases}
    with tempfile.TemporaryDirectory() as tmp:
        rq, out = os.path.join(tmp, "req.json"), os.path.join(tmp, "out.json")
        with open(rq, "w") as f:
            json.dump(req, f)
        p = subprocess.run([tool, rq, out], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if not chk.ok(p.returncode == 0, "eval_tool exits 0", p.stderr):
            return chk.finish()
        with open(out) as f:
            got = json.load(f)

    chk.section("metrics (%d cases)" % len(mcases))
    bad = []
    for (p, g, x, y), r in zip(mcases, got["metrics"]):
        ref = {"acc": acc(p, g), "f1": f1(p, g), "mcc": mcc(p, g), "pearson": pearson(x, y),
               "spearman": spearman(x, y)}
        for k, v in ref.items():
            c = r.get(k)
            if (v is None) != (c is None) or (v is not None and abs(v - c) > 1e-12):
                bad.append("%s: C %r, Python %r (pred %s gold %s x %s y %s)" % (k, c, v, p, g, x, y))
    chk.ok(not bad, "accuracy, F1, MCC, Pearson, Spearman == Python on %d cases (incl. ties, constant sides)"
           % len(mcases), "\n".join(bad[:10]))
    n_ties = sum(1 for _, _, x, _ in mcases if len(set(x)) < len(x))
    chk.ok(n_ties > 100, "the cases exercise ties (%d with tied x)" % n_ties)

    chk.section("extraction (%d strings x patterns)" % len(ext))
    bad = [(alts, s, c, findall0(alts, s)) for (alts, s), c in zip(ext, got["extract"]) if c != findall0(alts, s)]
    chk.ok(not bad, "extract == re.findall(pattern, s)[0] on %d cases" % len(ext),
           "\n".join("%r in %r: C %r, Python %r" % b for b in bad[:10]))
    hits = sum(1 for (alts, s) in ext if findall0(alts, s) is not None)
    chk.ok(0.2 * len(ext) < hits < 0.95 * len(ext), "both matches and misses occur (%d of %d match)" % (hits, len(ext)))

    chk.section("response split")
    bad = [(s, c, response(s)) for s, c in zip(resp_cases, got["response"]) if c != response(s)]
    chk.ok(not bad, "response == o.split('### Response:')[1].strip() on %d strings" % len(resp_cases),
           "\n".join("%r: C %r, Python %r" % b for b in bad[:10]))
    exp = [PATTERNS[0], PATTERNS[1], PATTERNS[2], PATTERNS[3], PATTERNS[4], PATTERNS[2], ["A", "B"]]
    chk.ok(got["pattern"] == exp, "task patterns: answerK tasks get answer1..answer5, others their choices",
           "%r" % got["pattern"])
    return chk.finish()


if __name__ == "__main__":
    sys.exit(main())
