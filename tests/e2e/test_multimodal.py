#!/usr/bin/python3
"""LLaVA-style training end to end on real images: Debian's Fashion-MNIST (skipped with 77
when /usr/share/datasets/fashion-mnist is absent) -> `convert --format fashion-mnist` (240 train / 40
test PNGs + LLaVA JSON) -> a sentencepiece tokenizer on the conversations -> `convert --format llava
--image-tokens 16` shards -> a tiny random CLIP tower (28 px, 7 px patches: 16 features) and LLaMA ->
stage 1 (projector alone) -> stage 2 (projector + TS-LoRA on every projection) -> `eval` -> `generate
--image`.

Accuracy above chance is not asked for at this size. Checked instead: the shards' image runs (16
TK_KIND_IMAGE positions per record, gold answers in the meta); what each stage trains and writes
(stage 1: projector tensors only; stage 2: LoRA on all 14 projections + a projector that moved);
the results JSON against its per-sample JSONL (n, metrics in [0,1] and equal to the samples' means,
em = normalised exact match, mc_correct = choice is gold, gold answers in the data's order); the
saved projector reloaded (re-written by Python) gives an identical eval and a bit-identical training
step, the stage-1 projector a different step; eval with the multiple-choice candidates one at a time
(--eval-batch 1) gives the batched eval's samples exactly; `generate --image` prints the answer eval generated for
the same image and question. The tower trains too: stage 2 with TS-LoRA on every tower projection
plus --tune-vision-tower writes the tower adapters under PEFT's LLaVA keys with their thresholds
(layer 1, past hidden state -2, untouched) and OUT/vision_tower, logs the tower modules' gates
(gates.jsonl with n_tower, `tspeft gates` in their own block); eval and generate use them alike;
info lists them and merge refuses them; a run with tower adapters and dropout resumes exactly; the
tower options' misuse (stage 1 tower adapters, tuning with checkpoints, --vision-tower-lr with a
frozen tower, cached features) gets one line. Bad input (one-line error naming the file, non-zero exit, no crash): a
text-only model on image shards, image runs of the wrong length (names the record), eval of a
.shard without --vision-tower, generate with a missing image.

    /usr/bin/python3 tests/e2e/test_multimodal.py --tspeft build/tspeft [--keep]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_util as U  # noqa: E402

import numpy as np  # noqa: E402

import fixtures as FX  # noqa: E402
import st  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import make_random_vit as MV  # noqa: E402

FMNIST = "/usr/share/datasets/fashion-mnist"
N_TRAIN, N_TEST, IMG_TOK = 240, 40, 16
HID, VOCAB, VH = 64, 400, 32
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
          "helpful, detailed, and polite answers to the user's questions.")
PROJ = ["model.mm_projector.0.weight", "model.mm_projector.0.bias", "model.mm_projector.2.weight",
        "model.mm_projector.2.bias"]
KIND_IMAGE = 3


def normalise(s):
    """vqa.h's answer normalisation: ASCII whitespace trimmed, lower case, one trailing '.' removed."""
    s = s.strip(" \t\n\r\f\v").lower()
    return s[:-1] if s.endswith(".") else s


def one_line_error(p, *needles):
    """Non-zero exit (not a signal), a single 'tspeft VERB: ...' error line holding every needle."""
    errs = [l for l in p.stderr.splitlines() if l.startswith("tspeft ") and ": " in l]
    last = errs[-1] if errs else ""
    return 0 < p.returncode < 128 and all(n in last for n in needles), last


def resumed_same(B, base, ra, rb, files):
    """base (a 6-step train command) run whole into ra, and into rb with checkpoints every 3 steps whose
    run is then resumed from checkpoint-3: (whether rb's files equal ra's byte for byte, the logs)."""
    p1 = U.run(B, base + ["--out", ra])
    p2 = U.run(B, base + ["--save-every", "3", "--out", rb])
    shutil.rmtree(os.path.join(rb, "checkpoint-6"), ignore_errors=True)
    for f in ("mm_projector.safetensors", "adapter_model.safetensors"):
        if os.path.exists(os.path.join(rb, f)):
            os.remove(os.path.join(rb, f))
    p3 = U.run(B, base + ["--save-every", "3", "--out", rb, "--resume", os.path.join(rb, "checkpoint-3")])
    same = all(p.returncode == 0 for p in (p1, p2, p3)) and all(
        os.path.exists(os.path.join(rb, f)) and U.read_bytes(os.path.join(ra, f)) == U.read_bytes(os.path.join(rb, f))
        for f in files)
    return same, p1.stderr + p2.stderr + p3.stderr


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tspeft", required=True)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    if not os.path.isfile(os.path.join(FMNIST, "t10k-images-idx3-ubyte.gz")):
        print("test_multimodal: skipped (%s absent)" % FMNIST)
        return 77
    if not shutil.which("spm_train"):
        print("test_multimodal: skipped (spm_train absent)")
        return 77
    B = a.tspeft
    chk = U.Checks("test_multimodal")
    tmp = tempfile.mkdtemp(prefix="tk_mm_e2e_")
    T = lambda *p: os.path.join(tmp, *p)  # noqa: E731
    dump_tool = os.path.join(os.path.dirname(os.path.abspath(B)), "tests", "dump_shard")
    TH = ["--threads", "2"]
    try:
        chk.section("data: Fashion-MNIST -> PNG + LLaVA JSON -> tokenizer -> shards")
        for split, n in (("train", N_TRAIN), ("test", N_TEST)):
            p = U.run(B, ["convert", "--format", "fashion-mnist", "--input", FMNIST, "--out", T("fm"), "--split", split,
                          "--limit", n, "--quiet"])
            if not chk.ok(p.returncode == 0, "convert --format fashion-mnist --split %s" % split, p.stderr):
                return chk.finish()
        recs = {s: json.load(open(T("fm", "%s.json" % s))) for s in ("train", "test")}
        chk.ok(len(recs["train"]) == N_TRAIN and len(recs["test"]) == N_TEST and
               all(os.path.isfile(T("fm", r["image"])) for s in recs for r in recs[s]),
               "%d + %d records, every image file present" % (N_TRAIN, N_TEST))
        with open(T("corpus.txt"), "w") as f:
            for s in recs:
                for r in recs[s]:
                    q = r["conversations"][0]["value"].replace("<image>\n", "")
                    f.write("%s USER: %s ASSISTANT: %s\n" % (SYSTEM, q, r["conversations"][1]["value"]))
        subprocess.run(["spm_train", "--input=" + T("corpus.txt"), "--model_prefix=" + T("tok"), "--vocab_size=%d" % VOCAB,
                        "--model_type=bpe", "--byte_fallback=true", "--num_threads=1", "--minloglevel=2"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tok = T("tok.model")
        for split in ("train", "test"):
            p = U.run(B, ["convert", "--format", "llava", "--input", T("fm", "%s.json" % split), "--image-folder", T("fm"),
                          "--tokenizer", tok, "--image-tokens", IMG_TOK, "--out", T("sh", "%s.shard" % split), "--quiet"])
            if not chk.ok(p.returncode == 0, "convert --format llava %s.shard" % split, p.stderr):
                return chk.finish()
        rows = [json.loads(l) for l in subprocess.run([dump_tool, T("sh", "test.shard")], check=True,
                                                       stdout=subprocess.PIPE, text=True).stdout.splitlines()]
        runs_ok = True
        for r in rows:
            pos = [i for i, k in enumerate(r["kinds"]) if k == KIND_IMAGE]
            runs_ok &= len(pos) == IMG_TOK and pos == list(range(pos[0], pos[0] + IMG_TOK)) and len(r["images"]) == 1
        chk.ok(len(rows) == N_TEST and runs_ok, "test shard: %d records, each one image run of %d IMAGE positions" %
               (N_TEST, IMG_TOK))
        golds = [r["conversations"][1]["value"] for r in recs["test"]]
        chk.ok([r["meta"].get("answer") for r in rows] == golds, "test shard meta answers are the JSON's answers, in order")

        MV.make(T("tower"), kind="clip", hidden=VH, layers=2, heads=2, inter=64, image=28, patch=7, seed=1)
        FX.make_model(T("model"), 5, hidden=HID, inter=128, layers=2, heads=4, kv_heads=2, vocab=VOCAB, max_pos=128)
        common = ["--model", T("model"), "--vision-tower", T("tower"), "--data", T("sh", "train.shard"),
                  "--batch-size", "8", "--max-seq-len", "128", "--lr", "3e-3", "--shuffle"] + TH

        chk.section("stage 1: the projector alone")
        p = U.run(B, ["train"] + common + ["--stage", "1", "--steps", "20", "--out", T("s1")])
        prog = U.progress(p.stderr)
        if not chk.ok(p.returncode == 0 and len(prog) > 0 and all(np.isfinite(x["loss"]) for x in prog),
                      "stage 1 trains (20 steps, finite losses)", p.stderr):
            return chk.finish()
        s1p = st.load(T("s1", "mm_projector.safetensors"))
        chk.ok(sorted(s1p) == sorted(PROJ) and s1p[PROJ[0]].shape == (HID, VH) and s1p[PROJ[2]].shape == (HID, HID),
               "stage 1 wrote mm_projector.safetensors (mlp2x_gelu, [%d,%d] and [%d,%d])" % (HID, VH, HID, HID))
        s1a = st.load(T("s1", "adapter_model.safetensors"))
        chk.ok(not any("lora_" in k for k in s1a), "stage 1 trained no adapter tensors", sorted(s1a))

        chk.section("stage 2: projector + TS-LoRA on every projection")
        p = U.run(B, ["train"] + common + ["--stage", "2", "--projector", T("s1", "mm_projector.safetensors"),
                                           "--target-modules", "all", "--steps", "20", "--out", T("s2")])
        prog = U.progress(p.stderr)
        if not chk.ok(p.returncode == 0 and len(prog) > 0 and all(np.isfinite(x["loss"]) for x in prog),
                      "stage 2 trains (20 steps, finite losses)", p.stderr):
            return chk.finish()
        s2a = st.load(T("s2", "adapter_model.safetensors"))
        mods = {k.split(".lora_")[0] for k in s2a if ".lora_A." in k}
        chk.ok(len(mods) == 14, "stage 2 adapter: LoRA on all 7 projections of both layers (%d)" % len(mods), sorted(s2a))
        s2p = st.load(T("s2", "mm_projector.safetensors"))
        chk.ok(sorted(s2p) == sorted(PROJ) and any(not np.array_equal(s1p[k], s2p[k]) for k in PROJ),
               "stage 2 wrote its projector, trained further from stage 1's")

        chk.section("--mm-projector-lr: the projector's own learning rate")
        # one AdamW step from zero moments moves each tensor by lr * g / (|g| + eps): max |change| = its lr
        p = U.run(B, ["train"] + common + ["--stage", "2", "--projector", T("s1", "mm_projector.safetensors"),
                                           "--target-modules", "all", "--gate", "off", "--steps", "1", "--lr", "1e-3",
                                           "--mm-projector-lr", "1e-2", "--max-grad-norm", "0", "--out", T("plr")])
        if chk.ok(p.returncode == 0, "stage 2 with --lr 1e-3 --mm-projector-lr 1e-2 runs", p.stderr):
            pp = st.load(T("plr", "mm_projector.safetensors"))
            pa = st.load(T("plr", "adapter_model.safetensors"))
            dp = max(float(np.abs(pp[k] - s1p[k]).max()) for k in PROJ)
            db = max(float(np.abs(v).max()) for k, v in pa.items() if ".lora_B." in k)  # lora_B starts at 0
            chk.ok(0.99e-2 <= dp <= 1.0001e-2 and 0.99e-3 <= db <= 1.0001e-3,
                   "one step: the projector moved by %.4g (its lr 1e-2), lora_B by %.4g (--lr 1e-3)" % (dp, db))
        p = U.run(B, ["train", "--model", T("model"), "--data", T("sh", "train.shard"), "--steps", "1",
                      "--mm-projector-lr", "1e-2"] + TH)
        ok, line = one_line_error(p, "--mm-projector-lr", "--vision-tower")
        chk.ok(ok, "--mm-projector-lr without --vision-tower: one line", p.stderr)

        chk.section("exact --resume with a projector (stage 1 and stage 2)")
        for stage, extra in (("1", []), ("2", ["--projector", T("s1", "mm_projector.safetensors"), "--target-modules",
                                                "all"])):
            files = ["mm_projector.safetensors"] + (["adapter_model.safetensors"] if stage == "2" else [])
            same, logs = resumed_same(B, ["train"] + common + ["--stage", stage, "--steps", "6"] + extra,
                                      T("ra%s" % stage), T("rb%s" % stage), files)
            chk.ok(same, "stage %s resumed from checkpoint-3 writes the uninterrupted run's %s bytes" %
                   (stage, " and ".join(files)), logs)

        chk.section("eval: results JSON against the per-sample JSONL")
        ev = ["eval", "--model", T("model"), "--adapter", T("s2"), "--tokenizer", tok, "--vision-tower", T("tower"),
              "--data", T("sh", "test.shard"), "--max-new-tokens", "8"] + TH
        p = U.run(B, ev + ["--out", T("ev1.json")])
        if not chk.ok(p.returncode == 0, "eval exits 0", p.stderr):
            return chk.finish()
        res = json.load(open(T("ev1.json")))
        samples = [json.loads(l) for l in open(T("ev1.samples.jsonl"))]
        task = res["tasks"][0]
        m = task["metrics"]
        chk.ok(len(res["tasks"]) == 1 and task["n"] == N_TEST == len(samples) and
               [s["record"] for s in samples] == list(range(N_TEST)), "n = %d = samples, records 0..%d in order" %
               (N_TEST, N_TEST - 1), task)
        chk.ok(set(m) >= {"vqa_em", "vqa_mc_acc"} and all(0.0 <= m[k] <= 1.0 for k in ("vqa_em", "vqa_mc_acc")),
               "vqa_em %.3f and vqa_mc_acc %.3f in [0,1]" % (m.get("vqa_em", -1), m.get("vqa_mc_acc", -1)), m)
        chk.ok("conversation template" in res["protocol"].get("vqa_prompt", ""),
               "the results' protocol says how visual questions were prompted", res["protocol"])
        chk.ok([s["gold"] for s in samples] == golds, "samples' gold answers are the test JSON's")
        chk.ok(abs(np.mean([s["em"] for s in samples]) - m["vqa_em"]) < 1e-9 and
               abs(np.mean([s["mc_correct"] for s in samples]) - m["vqa_mc_acc"]) < 1e-9,
               "metrics are the samples' means")
        chk.ok(all(s["em"] == (normalise(s["generation"]) == normalise(s["gold"])) for s in samples),
               "em = normalised exact match of generation and gold")
        answers = set(golds)
        chk.ok(all(s["choice"] in answers and s["mc_correct"] == (s["choice"] == s["gold"]) for s in samples),
               "every choice is one of the dataset's answers; mc_correct = (choice == gold)")

        chk.section("the saved projector, reloaded")
        os.makedirs(T("reload"))
        st.save(T("reload", "proj.safetensors"), {k: np.ascontiguousarray(v) for k, v in s2p.items()})
        p = U.run(B, ev + ["--projector", T("reload", "proj.safetensors"), "--out", T("ev2.json")])
        same = p.returncode == 0 and open(T("ev2.samples.jsonl")).read() == open(T("ev1.samples.jsonl")).read() \
            and json.load(open(T("ev2.json")))["tasks"][0]["metrics"] == m
        chk.ok(same, "eval with the projector re-written by Python: identical samples and metrics", p.stderr)
        # the candidates scored as batches of rows (the default) against one candidate at a time
        p = U.run(B, ev + ["--eval-batch", "1", "--out", T("ev3.json")])
        same = p.returncode == 0 and open(T("ev3.samples.jsonl")).read() == open(T("ev1.samples.jsonl")).read() \
            and json.load(open(T("ev3.json")))["tasks"][0]["metrics"] == m
        chk.ok(same, "eval --eval-batch 1 (one candidate at a time): identical samples and metrics", p.stderr)
        losses = {}
        for tag, proj in (("saved", T("s2", "mm_projector.safetensors")), ("reloaded", T("reload", "proj.safetensors")),
                          ("stage1", T("s1", "mm_projector.safetensors"))):
            p = U.run(B, ["train", "--model", T("model"), "--vision-tower", T("tower"), "--data", T("sh", "test.shard"),
                          "--stage", "2", "--adapter", T("s2"), "--projector", proj, "--steps", "1", "--batch-size", "8",
                          "--max-seq-len", "128", "--lr", "0", "--dump", T("dump_" + tag), "--out", T("o_" + tag)] + TH)
            if chk.ok(p.returncode == 0, "one dumped step with the %s projector" % tag, p.stderr):
                losses[tag] = float(st.load(T("dump_" + tag, "step1.safetensors"))["loss"][0])
        if len(losses) == 3:
            chk.ok(losses["saved"] == losses["reloaded"] and losses["stage1"] != losses["saved"],
                   "step loss: saved %.7f == reloaded %.7f != stage-1 projector %.7f" %
                   (losses["saved"], losses["reloaded"], losses["stage1"]))

        chk.section("generate --image")
        q0 = recs["test"][0]["conversations"][0]["value"].replace("<image>\n", "")
        gen = ["generate", "--model", T("model"), "--adapter", T("s2"), "--tokenizer", tok, "--vision-tower", T("tower"),
               "--prompt", q0, "--max-new-tokens", "8"] + TH
        p = U.run(B, gen + ["--image", T("fm", recs["test"][0]["image"])])
        chk.ok(p.returncode == 0 and p.stdout.strip() != "", "generate --image prints an answer: %r" % p.stdout.strip(),
               p.stderr)
        chk.ok(p.stdout.strip() == samples[0]["generation"].strip(),
               "it is eval's generation for the same image and question (%r)" % samples[0]["generation"], p.stdout)
        p1 = U.run(B, ["generate", "--model", T("model"), "--projector", T("s1", "mm_projector.safetensors"),
                       "--tokenizer", tok, "--vision-tower", T("tower"), "--prompt", q0, "--max-new-tokens", "4",
                       "--image", T("fm", recs["test"][1]["image"])] + TH)
        chk.ok(p1.returncode == 0, "generate with the stage-1 projector and no adapter", p1.stderr)

        chk.section("the tower trains too: TS-LoRA on its projections and --tune-vision-tower")
        tw_args = ["--stage", "2", "--projector", T("s1", "mm_projector.safetensors"), "--target-modules",
                   "all,vision_tower.vision_model.all", "--steps", "10"]
        p = U.run(B, ["train"] + common + tw_args + ["--tune-vision-tower", "--vision-tower-lr", "1e-3", "--out", T("tw")])
        prog = U.progress(p.stderr)
        if chk.ok(p.returncode == 0 and len(prog) > 0 and all(np.isfinite(x["loss"]) for x in prog),
                  "stage 2 with tower adapters and the whole tower trains (10 steps, finite losses)", p.stderr):
            twa = st.load(T("tw", "adapter_model.safetensors"))
            tmods = {k.split(".lora_")[0] for k in twa if ".lora_A." in k and "vision_tower" in k}
            want = {"base_model.model.vision_tower.vision_model.encoder.layers.%d.%s" % (L, m) for L in (0, 1)
                    for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                              "mlp.fc1", "mlp.fc2")}
            chk.ok(tmods == want, "the adapter holds LoRA on the tower's 12 projections under PEFT's LLaVA keys",
                   sorted(tmods))
            moved0 = all(np.abs(twa[k + ".lora_B.weight"]).max() > 0 for k in want if ".layers.0." in k)
            still1 = all(np.abs(twa[k + ".lora_B.weight"]).max() == 0 for k in want if ".layers.1." in k)
            chk.ok(moved0 and still1, "layer 0's tower adapters trained; layer 1's (past hidden state -2) kept lora_B = 0")
            chk.ok(all(k + ".ts_tau" in twa for k in want), "every tower module's threshold is saved (ts_tau)")
            cfg = json.load(open(T("tw", "adapter_config.json")))
            chk.ok(sum(t.startswith("vision_tower.vision_model.encoder.layers.") for t in cfg["target_modules"]) == 12,
                   "adapter_config.json names the 12 tower modules in target_modules", cfg["target_modules"])
            chk.ok(any("tower keep" in l for l in p.stderr.splitlines()), "progress lines report the tower's keep")
            lines = [json.loads(l) for l in open(T("tw", "gates.jsonl"))]
            tmod = [x for x in lines[0]["modules"] if x.startswith("vision_tower.")]
            chk.ok(lines[0].get("tower_layers") == 2 and len(tmod) == 6 and
                   all(".layers.0." in x for x in tmod) and len(lines) == 11 and
                   all(l["n_tower"] == [0, 0, 8 * 17, 0] for l in lines[1:]),
                   "gates.jsonl: the 6 tower modules that run (layer 0) after the LLaMA's, n_tower = 8 images x 17 "
                   "tokens per step", lines[0].get("modules"))
            pg = U.run(B, ["gates", T("tw")])
            chk.ok(pg.returncode == 0 and "vision tower, layer x module" in pg.stdout and "tower tokens" in pg.stdout,
                   "tspeft gates shows the tower's gates in their own block", pg.stdout + pg.stderr)
            t0 = st.load(T("tower", "model.safetensors"))
            t1 = st.load(T("tw", "vision_tower", "model.safetensors")) if os.path.exists(
                T("tw", "vision_tower", "model.safetensors")) else {}
            chk.ok(len(t1) == len(t0) and any(not np.array_equal(np.asarray(t0[k]), np.asarray(t1[k])) for k in t0)
                   and os.path.exists(T("tw", "vision_tower", "config.json")),
                   "the tuned tower is written as OUT/vision_tower (config.json, model.safetensors; %d tensors, moved)"
                   % len(t1))
            evt = ["eval", "--model", T("model"), "--adapter", T("tw"), "--tokenizer", tok, "--vision-tower",
                   T("tw", "vision_tower"), "--data", T("sh", "test.shard"), "--max-new-tokens", "8"] + TH
            p = U.run(B, evt + ["--out", T("evt.json")])
            if chk.ok(p.returncode == 0, "eval with the tower adapters and the tuned tower", p.stderr):
                st_t = [json.loads(l) for l in open(T("evt.samples.jsonl"))]
                gt = ["generate", "--model", T("model"), "--adapter", T("tw"), "--tokenizer", tok, "--vision-tower",
                      T("tw", "vision_tower"), "--prompt", q0, "--max-new-tokens", "8",
                      "--image", T("fm", recs["test"][0]["image"])] + TH
                p = U.run(B, gt)
                chk.ok(p.returncode == 0 and p.stdout.strip() == st_t[0]["generation"].strip(),
                       "generate --image with them prints eval's generation (%r)" % st_t[0]["generation"],
                       p.stdout + p.stderr)
            p = U.run(B, ["info", "--model", T("model"), "--adapter", T("tw")])
            chk.ok(p.returncode == 0 and "vision tower" in p.stdout, "info shows the adapter's tower modules",
                   p.stdout + p.stderr)
            p = U.run(B, ["merge", "--model", T("model"), "--adapter", T("tw"), "--out", T("merged")])
            ok, line = one_line_error(p, "vision tower")
            chk.ok(ok and not os.path.exists(T("merged", "model.safetensors")),
                   "merge refuses an adapter with tower modules in one line", p.stderr)
        # resumed runs with tower adapters: the thresholds and the dropout stream continue exactly
        same, logs = resumed_same(B, ["train"] + common + tw_args[:-1] + ["6", "--dropout", "0.1"], T("twa"), T("twb"),
                                  ["mm_projector.safetensors", "adapter_model.safetensors"])
        chk.ok(same, "tower adapters with dropout, resumed from checkpoint-3: the uninterrupted run's bytes", logs)
        for args, needles, what in (
                (["--stage", "1", "--target-modules", "vision_tower.vision_model.q_proj"], ["stage 1", "stage 2"],
                 "stage 1 with tower adapters"),
                (["--tune-vision-tower", "--save-every", "2"], ["--tune-vision-tower", "checkpoints"],
                 "--tune-vision-tower with checkpoints"),
                (["--vision-tower-lr", "1e-3"], ["--vision-tower-lr", "nothing of the tower trains"],
                 "--vision-tower-lr with a frozen tower")):
            ok, line = one_line_error(U.run(B, ["train"] + common + args + ["--steps", "1", "--out", T("badt")]),
                                      *needles)
            chk.ok(ok and not os.path.exists(T("badt", "adapter_model.safetensors")), what + ": one line", line)
        ok, line = one_line_error(U.run(B, ["train", "--model", T("model"), "--data", T("sh", "train.shard"),
                                            "--tune-vision-tower", "--steps", "1"] + TH), "--vision-tower")
        chk.ok(ok, "--tune-vision-tower without --vision-tower: one line", line)
        p = U.run(B, ["convert", "--format", "llava", "--input", T("fm", "test.json"), "--image-folder", T("fm"),
                      "--tokenizer", tok, "--image-tokens", "16", "--encoder", T("tower"), "--out", T("sh", "feat.shard"),
                      "--quiet"])
        if chk.ok(p.returncode == 0, "convert with --encoder (cached tower features)", p.stderr):
            ok, line = one_line_error(U.run(B, ["train", "--model", T("model"), "--vision-tower", T("tower"), "--data",
                                                T("sh", "feat.shard"), "--tune-vision-tower", "--steps", "1", "--out",
                                                T("badf")] + TH), T("sh", "feat.shard"), "--encoder")
            chk.ok(ok and not os.path.exists(T("badf", "adapter_model.safetensors")),
                   "cached features cannot train the tower: one line naming the shard", line)

        chk.section("bad input")
        ok, line = one_line_error(U.run(B, ["train", "--model", T("model"), "--data", T("sh", "train.shard"),
                                            "--steps", "1", "--out", T("bad1")] + TH), T("sh", "train.shard"), "text-only")
        chk.ok(ok, "text-only model on an image shard: error names the shard", line)
        p = U.run(B, ["convert", "--format", "llava", "--input", T("fm", "test.json"), "--image-folder", T("fm"),
                      "--tokenizer", tok, "--image-tokens", "9", "--out", T("sh", "bad9.shard"), "--quiet"])
        chk.ok(p.returncode == 0, "convert with --image-tokens 9", p.stderr)
        ok, line = one_line_error(U.run(B, ["train", "--model", T("model"), "--vision-tower", T("tower"), "--data",
                                            T("sh", "bad9.shard"), "--stage", "1", "--steps", "1", "--out", T("bad2")] + TH),
                                  T("sh", "bad9.shard"), "record 0", "9", "16")
        chk.ok(ok, "train: image runs of 9 tokens for a 16-feature tower: error names shard and record", line)
        ok, line = one_line_error(U.run(B, ev[:ev.index("--data")] + ["--data", T("sh", "bad9.shard"), "--out",
                                                                      T("bad9.json")]), T("sh", "bad9.shard"), "record 0")
        chk.ok(ok and not os.path.exists(T("bad9.json")), "eval: the same shard: error names shard and record", line)
        noto = [x for i, x in enumerate(ev) if x != "--vision-tower" and (i == 0 or ev[i - 1] != "--vision-tower")]
        ok, line = one_line_error(U.run(B, noto + ["--out", T("bad3.json")]), T("sh", "test.shard"), "--vision-tower")
        chk.ok(ok and not os.path.exists(T("bad3.json")), "eval of a .shard without --vision-tower: error names it", line)
        ok, line = one_line_error(U.run(B, gen + ["--image", T("fm", "no_such.png")]), T("fm", "no_such.png"))
        chk.ok(ok, "generate with a missing image: error names the file", line)
        ok, line = one_line_error(U.run(B, ["train"] + common + ["--stage", "1", "--adapter", T("s2"), "--steps", "1",
                                                                 "--out", T("bad4")]), T("s2"), "stage 1")
        chk.ok(ok and not os.path.exists(T("bad4")), "stage 1 with --adapter: refused, names the adapter", line)
        s1proj = T("s1", "mm_projector.safetensors")
        ok, line = one_line_error(U.run(B, ["train"] + common + ["--projector", s1proj, "--projector-type", "linear",
                                                                 "--steps", "1", "--out", T("bad5")]),
                                  s1proj, "mlp2x_gelu", "linear")
        chk.ok(ok and not os.path.exists(T("bad5")), "--projector-type contradicting the file: error names both", line)

        chk.section("train takes the projector's type from its file")
        p = U.run(B, ["train"] + common + ["--stage", "1", "--projector-type", "linear", "--steps", "2", "--out",
                                           T("lin1")])
        chk.ok(p.returncode == 0, "stage 1 with a linear projector", p.stderr)
        p = U.run(B, ["train"] + common + ["--stage", "2", "--projector", T("lin1", "mm_projector.safetensors"),
                                           "--steps", "2", "--out", T("lin2")])
        lin = st.load(T("lin2", "mm_projector.safetensors")) if p.returncode == 0 else {}
        chk.ok(p.returncode == 0 and sorted(lin) == ["model.mm_projector.bias", "model.mm_projector.weight"],
               "stage 2 from a linear projector without --projector-type trains a linear projector (%s)" % sorted(lin),
               p.stderr)
    finally:
        if a.keep:
            print("kept", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return chk.finish()


if __name__ == "__main__":
    sys.exit(main())
