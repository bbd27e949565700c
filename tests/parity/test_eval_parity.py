#!/usr/bin/python3
"""Evaluation parity (src/eval): beam search and continuation log-likelihoods of the C code against the
plain-torch LLaMA of reference.py, on a tiny random model with a TS-gated LoRA adapter, through the C
helper built beside tspeft (BUILD/tests/eval_tool).

    /usr/bin/python3 tests/parity/test_eval_parity.py --tspeft build/tspeft [--keep]

* log-likelihood: candidates of different lengths scored as one right-padded batch through the
  training forward == the reference run on each sequence alone, to 1e-4 (relative, absolute floor
  1e-4), with per-token gates mixed (some tokens of gated modules kept, some dropped; thresholds in
  gaps of the r values, margin re-verified), and lm-eval's is_greedy flag;
* beam search, 4 beams == a plain-Python port of Hugging Face's beam search (BeamSearchScorer and
  BeamHypotheses of transformers 4.28, length_penalty 1, early_stopping False) over the reference's
  logits, tokens exactly and score to 1e-5, with and without an eos (eos chosen among tokens the
  model produces, so finished hypotheses occur, also at the first step);
* beams=1 == greedy (tk_llama_generate, the KV-cached decoder) == the reference's greedy decode;
* the gate applies at inference: half the modules have tau = 1000 (every token dropped) and the
  reference, which applies the gates, agrees; the adapter changes some greedy output.

Exit status 0 when every check passed, 1 otherwise.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "e2e"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import e2e_util as U  # noqa: E402
import fixtures as FX  # noqa: E402
import reference as R  # noqa: E402

torch.set_num_threads(2)
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 64
TS = {"rule": "prox", "lambda": 0.05, "eta_tau": 0.05, "tau0": 0.0, "target_keep": None,
      "eta_lambda": 0.05, "beta": 0.01, "warmup_steps": 0}


def run_tool(tool, req, tmp):
    rq, out = os.path.join(tmp, "req.json"), os.path.join(tmp, "out.json")
    with open(rq, "w") as f:
        json.dump(req, f)
    p = subprocess.run([tool, rq, out], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="2"), timeout=120)
    if p.returncode != 0:
        return None, p.stderr
    with open(out) as f:
        return json.load(f), ""


def ref_forward(ref, seqs, taus=None):
    """Logits [B, T, V] of equal-length sequences (no padding)."""
    ids = np.array(seqs, np.int64)
    res = ref.step([(ids, ids.copy(), np.ones_like(ids))], taus=taus, backward=False)
    return res


def ref_seq_logprob(ref, seq, begin):
    res = ref_forward(ref, [seq])
    lg = res["logits"][0][0].double()
    lp = torch.log_softmax(lg, -1)
    total, greedy, gap = 0.0, True, np.inf
    for t in range(begin, len(seq)):
        total += float(lp[t - 1, seq[t]])
        top2 = torch.topk(lg[t - 1], 2).values
        gap = min(gap, float(top2[0] - top2[1]))
        greedy &= int(torch.argmax(lg[t - 1])) == seq[t]
    return total, greedy, gap, res


# ---- Hugging Face beam search (transformers 4.28), ported over the reference's logits -------------

class BeamHypotheses:
    def __init__(self, num_beams, length_penalty):
        self.length_penalty = length_penalty
        self.num_beams = num_beams
        self.beams = []
        self.worst_score = 1e9

    def __len__(self):
        return len(self.beams)

    def add(self, hyp, sum_logprobs):
        score = sum_logprobs / (len(hyp) ** self.length_penalty)
        if len(self) < self.num_beams or score > self.worst_score:
            self.beams.append((score, hyp))
            if len(self) > self.num_beams:
                sorted_next_scores = sorted([(s, idx) for idx, (s, _) in enumerate(self.beams)])
                del self.beams[sorted_next_scores[0][1]]
                self.worst_score = sorted_next_scores[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs, cur_len):
        if len(self) < self.num_beams:
            return False
        return self.worst_score >= best_sum_logprobs / cur_len ** self.length_penalty


def hf_beam_search(ref, prompt, num_beams, max_new, eos, length_penalty=1.0):
    P = len(prompt)
    input_ids = [list(prompt) for _ in range(num_beams)]
    beam_scores = torch.zeros(num_beams, dtype=torch.float64)
    beam_scores[1:] = -1e9
    hyps = BeamHypotheses(num_beams, length_penalty)
    done = False
    while True:
        logits = ref_forward(ref, input_ids)["logits"][0][:, -1, :].double()
        scores = torch.log_softmax(logits, -1) + beam_scores[:, None]
        V = scores.shape[-1]
        next_scores, next_tokens = torch.topk(scores.view(-1), 2 * num_beams, largest=True, sorted=True)
        cur_len = len(input_ids[0])
        nb_scores, nb_tokens, nb_idx = [], [], []
        for rank, (s, flat) in enumerate(zip(next_scores.tolist(), next_tokens.tolist())):
            b, tok = divmod(flat, V)
            if eos is not None and tok == eos:
                if rank >= num_beams:
                    continue
                hyps.add(list(input_ids[b]), s)
            else:
                nb_scores.append(s)
                nb_tokens.append(tok)
                nb_idx.append(b)
            if len(nb_scores) == num_beams:
                break
        done = done or hyps.is_done(float(next_scores.max()), cur_len)
        input_ids = [input_ids[b] + [t] for b, t in zip(nb_idx, nb_tokens)]
        beam_scores = torch.tensor(nb_scores, dtype=torch.float64)
        if done or len(input_ids[0]) >= P + max_new:
            break
    if not done:
        for b in range(num_beams):
            hyps.add(list(input_ids[b]), float(beam_scores[b]))
    score, best = sorted(hyps.beams, key=lambda x: x[0]).pop()
    return best[P:], score, next_scores


def ref_greedy(ref, prompt, max_new, eos):
    seq, out = list(prompt), []
    for _ in range(max_new):
        lg = ref_forward(ref, [seq])["logits"][0][0, -1]
        t = int(torch.argmax(lg))
        out.append(t)
        seq.append(t)
        if t == eos:
            break
    return out


# ---- fixtures ----------------------------------------------------------------------------------------

def make_fixture(root, seed):
    mdir, adir = os.path.join(root, "model"), os.path.join(root, "adapter")
    FX.make_model(mdir, seed, vocab=VOCAB)
    cfg = FX.adapter_config("lora", ALL7, model_dir=mdir, ts=TS)
    tens = FX.make_adapter_tensors(cfg, mdir, seed)
    FX.write_adapter(adir, cfg, tens)
    return mdir, adir, cfg, tens


def loglik_groups(rng):
    groups = []
    for g in range(4):
        ctx = [1] + [int(x) for x in rng.integers(3, VOCAB, int(rng.integers(4, 9)))]
        cands = [ctx + [int(x) for x in rng.integers(3, VOCAB, int(rng.integers(1, 6)))]
                 for _ in range(int(rng.integers(2, 5)))]
        groups.append({"seqs": cands, "begins": [len(ctx)] * len(cands)})
    return groups


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tspeft", required=True, help="the tspeft binary; eval_tool is BUILD/tests/eval_tool")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    tool = os.path.join(os.path.dirname(os.path.abspath(args.tspeft)), "tests", "eval_tool")
    chk = U.Checks("test_eval_parity")
    if not chk.ok(os.path.isfile(tool), "eval_tool exists at %s" % tool):
        return chk.finish()
    tmp = tempfile.mkdtemp(prefix="tspeft-evalpar-")
    try:
        loglik_part(chk, tool, tmp)
        beam_part(chk, tool, tmp)
    finally:
        if args.keep:
            print("kept %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return chk.finish()


def loglik_part(chk, tool, tmp):
    chk.section("log-likelihood, mixed per-token gates")
    for attempt in range(4):
        seed = 31 + attempt
        root = os.path.join(tmp, "ll%d" % attempt)
        mdir, adir, cfg, tens = make_fixture(root, seed)
        rng = np.random.default_rng(seed)
        groups = loglik_groups(rng)
        rows = [{"input_ids": s, "labels": s, "attention_mask": [1] * len(s)} for g in groups for s in g["seqs"]]
        ref = R.Reference(mdir, adir)
        taus = {}
        mods = list(ref.ad.modules)
        pick = set(mods[::2])

        def picker(name, r, mask):
            if name not in pick:
                return None
            t = FX.pick_tau(r, mask)
            if t is not None:
                taus[name] = t
            return t

        batch = R.pad_rows(rows)
        ref.step([batch], picker=picker, backward=False)
        for name, t in taus.items():
            tens[R.PEFT_PREFIX + name + ".ts_tau"] = np.array([t], np.float32)
        FX.write_adapter(adir, cfg, tens)
        ref = R.Reference(mdir, adir)
        expect, margin_ok, dropped = [], True, 0
        for g in groups:
            e = []
            for s, b in zip(g["seqs"], g["begins"]):
                lp, greedy, gap, res = ref_seq_logprob(ref, s, b)
                e.append((lp, greedy, gap))
                margin_ok &= FX.min_margin(res, ref.ad.tau) >= FX.MARGIN
                dropped += sum(int((1 - rec["S"]).sum()) for recs in res["recs"].values() for rec in recs)
            expect.append(e)
        if margin_ok and len(taus) >= 3 and dropped > 0:
            break
    chk.ok(margin_ok and dropped > 0, "fixture: %d gated modules with per-token decisions (%d token updates "
           "dropped), every |r - tau| / tau >= %g" % (len(taus), dropped, FX.MARGIN))
    got, err = run_tool(tool, {"model": mdir, "adapter": adir, "loglik": groups}, tmp)
    if not chk.ok(got is not None, "eval_tool runs the log-likelihood requests", err):
        return
    worst, bad_greedy, n = 0.0, [], 0
    for g, e, r in zip(groups, expect, got["loglik"]):
        if "error" in r:
            chk.ok(False, "loglik request", r["error"])
            return
        for (lp, greedy, gap), c, cg in zip(e, r["lp"], r["greedy"]):
            worst = max(worst, abs(c - lp) / max(1.0, abs(lp)))
            n += 1
            if gap > 1e-4 and bool(cg) != greedy:
                bad_greedy.append((lp, greedy, cg))
    chk.ok(worst <= 1e-4, "%d continuation log-likelihoods (batched, right-padded) == reference per sequence: "
           "max rel err %.2e <= 1e-4" % (n, worst))
    chk.ok(not bad_greedy, "is_greedy flags == reference", bad_greedy)
    # a request the C code must refuse: empty continuation
    bad, _ = run_tool(tool, {"model": mdir, "adapter": adir,
                             "loglik": [{"seqs": [[1, 5, 6]], "begins": [3]}]}, tmp)
    chk.ok(bad is not None and "error" in bad["loglik"][0], "an empty continuation is refused with an error")


def beam_part(chk, tool, tmp):
    chk.section("beam search and greedy, half the modules gated off")
    root = os.path.join(tmp, "beam")
    mdir, adir, cfg, tens = make_fixture(root, 57)
    ref = R.Reference(mdir, adir)
    mods = list(ref.ad.modules)
    for i, name in enumerate(mods):
        tens[R.PEFT_PREFIX + name + ".ts_tau"] = np.array([1000.0 if i % 2 else 0.0], np.float32)
    FX.write_adapter(adir, cfg, tens)
    ref = R.Reference(mdir, adir)
    rng = np.random.default_rng(5)
    prompts = [[1] + [int(x) for x in rng.integers(3, VOCAB, int(rng.integers(3, 10)))] for _ in range(4)]
    max_new = 8
    cases = []
    for p in prompts:
        g = ref_greedy(ref, p, max_new, None)
        for eos in (None, g[0], g[2], g[5]):
            cases.append((p, eos))
    reqs = []
    for p, eos in cases:
        e = -1 if eos is None else eos
        reqs += [{"ids": p, "max_new": max_new, "eos": e, "beams": 4},
                 {"ids": p, "max_new": max_new, "eos": e, "beams": 1},
                 {"ids": p, "max_new": max_new, "eos": e, "beams": 0}]
    got, err = run_tool(tool, {"model": mdir, "adapter": adir, "generate": reqs}, tmp)
    if not chk.ok(got is not None, "eval_tool runs %d generation requests" % len(reqs), err):
        return
    errs = [r["error"] for r in got["generate"] if "error" in r]
    if not chk.ok(not errs, "no generation request failed", errs[:3]):
        return
    bad4, bad_score, bad1, badg, differs, short = [], [], [], [], 0, 0
    worst = 0.0
    for k, (p, eos) in enumerate(cases):
        b4, b1, gr = got["generate"][3 * k: 3 * k + 3]
        toks, score, _ = hf_beam_search(ref, p, 4, max_new, eos)
        if b4["ids"] != toks:
            bad4.append("prompt %s eos %s: C %s, reference %s" % (p, eos, b4["ids"], toks))
        else:
            rel = abs(b4["score"] - score) / max(1e-12, abs(score))
            worst = max(worst, rel)
        short += len(toks) < max_new
        rg = ref_greedy(ref, p, max_new, eos)
        if gr["ids"] != rg:
            badg.append("prompt %s eos %s: C %s, reference %s" % (p, eos, gr["ids"], rg))
        g_no_eos = gr["ids"][:-1] if eos is not None and gr["ids"] and gr["ids"][-1] == eos else gr["ids"]
        if b1["ids"] != g_no_eos:
            bad1.append("prompt %s eos %s: beams=1 %s, greedy %s" % (p, eos, b1["ids"], gr["ids"]))
        differs += b4["ids"] != g_no_eos
    chk.ok(not bad4, "4 beams == Hugging Face beam search on the reference (%d cases)" % len(cases), "\n".join(bad4))
    chk.ok(not bad4 and worst <= 1e-5, "4-beam scores == reference: max rel err %.2e <= 1e-5" % worst)
    chk.ok(short >= 3, "finished hypotheses occur: %d of %d best beams end before max_new" % (short, len(cases)))
    chk.ok(differs >= 1, "beam search is not greedy here: %d of %d cases differ from greedy" % (differs, len(cases)))
    chk.ok(not bad1, "beams=1 == greedy (minus a final eos) in all %d cases" % len(cases), "\n".join(bad1))
    chk.ok(not badg, "greedy (KV cache, gates applied) == reference greedy decode", "\n".join(badg))
    # the adapter (its open half) changes the output: the gate does not simply drop everything
    plain = os.path.join(root, "plain_adapter")
    cfg0 = dict(cfg)
    tens0 = {k: v for k, v in tens.items()}
    for name in mods:
        tens0[R.PEFT_PREFIX + name + ".ts_tau"] = np.array([1000.0], np.float32)
    FX.write_adapter(plain, cfg0, tens0)
    off, err = run_tool(tool, {"model": mdir, "adapter": plain,
                               "generate": [{"ids": p, "max_new": max_new, "eos": -1, "beams": 0} for p in prompts]}, tmp)
    if chk.ok(off is not None, "eval_tool with every module gated off", err):
        with_ad = [got["generate"][3 * 4 * i + 2]["ids"] for i in range(len(prompts))]
        n_diff = sum(a["ids"] != b for a, b in zip(off["generate"], with_ad))
        chk.ok(n_diff >= 1, "the open modules change the greedy output of %d of %d prompts" % (n_diff, len(prompts)))


if __name__ == "__main__":
    sys.exit(main())
