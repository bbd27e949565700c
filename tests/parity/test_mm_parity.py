#!/usr/bin/python3
"""PyTorch parity of the spliced multimodal training step: a tiny random CLIP tower, an
mlp2x_gelu projector and a tiny LLaMA with a gated LoRA adapter. `tspeft train --vision-tower T
--projector P --adapter A --steps 1 --dump D` on a LLaVA-format shard (real PNGs through the converter)
against a plain-torch step: CLIP forward (test_vision_parity.vit_reference, hidden state -2, patch
tokens), the projector, the projections spliced over the image-token rows of the token embeddings,
the LLaMA with the gated adapter (reference.Reference), the shifted cross-entropy, autograd.
Compared: loss, logits, every adapter gradient, the projector's gradients, keep counts (exact) and
next tau; tolerance 1e-4 relative to each tensor's max magnitude. Stage 1 (projector only, no
adapter) too. A third case trains the tower as well: gated LoRA on tower projections (layer 0 runs;
layer 1's modules sit past the selected hidden state -2 and must get zero gradients) plus
--tune-vision-tower, against the reference tower with the same gated adapters under autograd: the
tower adapters' gradients, keep counts and next thresholds, and every tower tensor's gradient. The C side's CLIP preprocessing at the tower's own size is the identity resize, so the
reference pixels are (rgb/255 - mean)/std.

    /usr/bin/python3 tests/parity/test_mm_parity.py --tspeft build/tspeft
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "examples"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

import fixtures as FX  # noqa: E402
import make_random_vit as MV  # noqa: E402
import reference as R  # noqa: E402
import st  # noqa: E402
import test_vision_parity as VP  # noqa: E402

TOL = 1e-4
HID, VOCAB, VH = 32, 320, 16
MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])


class Splice:
    """Stands in for the embedding table: table[ids] gives the token rows with the image runs
    replaced by the projections (row b's k-th run <- its k-th image)."""

    def __init__(self, table, kinds, proj_rows):
        self.table, self.kinds, self.proj = table, kinds, proj_rows

    def __getitem__(self, idx):
        x = self.table[idx].clone()
        for b in range(x.shape[0]):
            pos = np.nonzero(self.kinds[b] == 3)[0]
            if len(pos):
                x[b, torch.from_numpy(pos)] = self.proj[b]
        return x


VPRE = "vision_tower.vision_model."          # the tower's target-module prefix (a LLaVA model)
KPRE = "base_model.model." + VPRE            # its PEFT keys
TOWER_TARGETS = ["self_attn.q_proj", "self_attn.v_proj", "mlp.fc1"]


def gated_lora(P, tw, scale, recs):
    """vit_reference's adapt hook: h = b + S m with m = scale B A x, r = ||m|| / ||b||, S = [r >= tau]
    (tau from tw; modules without tensors plain). Records r, S, m, h per module for the checks."""
    def adapt(name, x, b):
        key = KPRE + name
        if key + ".lora_A.weight" not in P:
            return b
        m = scale * ((x @ P[key + ".lora_A.weight"].t()) @ P[key + ".lora_B.weight"].t())
        with torch.no_grad():
            r = m.norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-6)
        tau = float(np.asarray(tw.get(key + ".ts_tau", [0.0]))[0])
        S = (r.float() >= np.float32(tau)).to(b.dtype)
        h = b + S.unsqueeze(-1) * m
        if h.requires_grad:
            h.retain_grad()
        recs[key] = {"r": r, "S": S, "m": m, "h": h}
        return h
    return adapt


def tower_r(vc, W, pix, tw, scale):
    """r_i of every tower module that runs, at tau 0 (to place the thresholds)."""
    P = {k: torch.tensor(np.asarray(v, np.float64)) for k, v in tw.items()}
    recs = {}
    VP.vit_reference(vc, W, torch.tensor(pix), adapt=gated_lora(P, {}, scale, recs))
    return {k: v["r"].numpy().reshape(-1) for k, v in recs.items()
            if int(k.split("encoder.layers.")[1].split(".")[0]) == 0}


def tower_checks(dump, Wt, Pt, recs, tw):
    """Errors of the tower's gradients and gate against the dump; keep-count mismatches; kept, seen."""
    errs, bad, kept_all, seen_all = {}, [], 0, 0
    for k, p in Pt.items():
        ref = p.grad.numpy() if p.grad is not None else np.zeros(tuple(p.shape))
        if k + ".grad" not in dump:
            bad.append("%s.grad missing" % k)
            continue
        got = dump[k + ".grad"]
        errs[k] = rel(ref, got) if np.max(np.abs(ref)) > 0 else float(np.max(np.abs(got)))
    for k, w in Wt.items():
        ref = w.grad.numpy() if w.grad is not None else np.zeros(tuple(w.shape))
        nm = VPRE + k + ".grad"
        if nm not in dump:
            bad.append("%s missing" % nm)
            continue
        got = np.asarray(dump[nm]).reshape(ref.shape)
        scale = float(np.max(np.abs(ref)))
        if k.endswith("k_proj.bias") and Wt[k[:-4] + "weight"].grad is not None:  # 0 in theory: relative to its weight's
            scale = float(np.max(np.abs(Wt[k[:-4] + "weight"].grad.numpy())))
        errs["tower " + k] = float(np.max(np.abs(got - ref))) / max(scale, 1e-12) if scale > 0 \
            else float(np.max(np.abs(got)))
    for key, rec in recs.items():
        layer = int(key.split("encoder.layers.")[1].split(".")[0])
        if layer != 0:
            continue
        keep, n = int(rec["S"].sum()), int(rec["S"].numel())
        kept_all += keep
        seen_all += n
        if key + ".keep" not in dump or int(dump[key + ".keep"][0]) != keep:
            bad.append("%s %s vs %d" % (key, dump.get(key + ".keep", ["missing"])[0], keep))
            continue
        c = (rec["h"].grad * rec["m"].detach()).sum(-1).numpy().reshape(-1)
        r = rec["r"].numpy().reshape(-1).astype(np.float32)
        tau = np.float32(np.asarray(tw[key + ".ts_tau"])[0])
        nxt = R.prox_step(r, c, 0.1, n, tau, 0.05)
        errs[key + ".ts_tau.next"] = abs(float(dump[key + ".ts_tau.next"][0]) - float(nxt))
    return errs, bad, kept_all, seen_all


def rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b))) / max(float(np.max(np.abs(a))), 1e-30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tspeft", required=True)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="tk_mm_parity_")
    T = lambda *p: os.path.join(tmp, *p)  # noqa: E731
    failures = []
    try:
        FX.make_model(T("model"), 5, hidden=HID, inter=64, layers=2, heads=4, kv_heads=2, vocab=VOCAB, max_pos=256)
        _, tower = MV.make(T("tower"), kind="clip", hidden=VH, layers=2, heads=2, inter=32, image=28, patch=7,
                           prefix="vision_model.", seed=1, noisy=True)
        vc = json.load(open(T("tower", "config.json")))
        rng = np.random.default_rng(2)
        proj = {"w1": rng.normal(0, 0.3, (HID, VH)), "b1": rng.normal(0, 0.1, HID),
                "w2": rng.normal(0, 0.3, (HID, HID)), "b2": rng.normal(0, 0.1, HID)}
        proj = {k: v.astype(np.float32) for k, v in proj.items()}
        st.save(T("mm_projector.safetensors"), {"model.mm_projector.0.weight": proj["w1"],
                                                "model.mm_projector.0.bias": proj["b1"],
                                                "model.mm_projector.2.weight": proj["w2"],
                                                "model.mm_projector.2.bias": proj["b2"]})
        # data: 4 images with one-word answers, through the converter
        os.makedirs(T("img"))
        recs, words = [], ["red", "green", "blue", "dark"]
        for i in range(4):
            px = (rng.random((28, 28, 3)) * 255).astype(np.uint8)
            Image.fromarray(px).save(T("img", "%d.png" % i))
            recs.append({"id": str(i), "image": "%d.png" % i, "conversations": [
                {"from": "human", "value": "<image>\nWhat colour?" + " tell me" * i},
                {"from": "gpt", "value": words[i]}]})
        json.dump(recs, open(T("data.json"), "w"))
        with open(T("corpus.txt"), "w") as f:
            for i in range(200):
                f.write("A chat between a curious user and an artificial intelligence assistant. The assistant "
                        "gives helpful, detailed, and polite answers to the user's questions. USER: What colour? "
                        "tell me ASSISTANT: %s\n" % words[i % 4])
        subprocess.run(["spm_train", "--input=" + T("corpus.txt"), "--model_prefix=" + T("tok"), "--vocab_size=300",
                        "--model_type=bpe", "--byte_fallback=true", "--num_threads=1"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run([a.tspeft, "convert", "--format", "llava", "--input", T("data.json"), "--image-folder", T("img"),
                        "--tokenizer", T("tok.model"), "--image-tokens", "16", "--out", T("data.shard"), "--quiet"],
                       check=True)
        dump_tool = os.path.join(os.path.dirname(os.path.abspath(a.tspeft)), "tests", "dump_shard")
        rows = [json.loads(l) for l in subprocess.run([dump_tool, T("data.shard")], check=True, stdout=subprocess.PIPE,
                                                       text=True).stdout.splitlines()]
        Tm = max(len(r["input_ids"]) for r in rows)
        ids = np.zeros((4, Tm), np.int64)
        lab = np.full((4, Tm), -100, np.int64)
        msk = np.zeros((4, Tm), np.int64)
        kinds = np.zeros((4, Tm), np.int64)
        for b, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[b, :n], lab[b, :n], msk[b, :n], kinds[b, :n] = r["input_ids"], r["labels"], 1, r["kinds"]
        # reference features: CLIP on (rgb/255 - mean)/std, hidden state -2, patch tokens
        pix = np.stack([((np.asarray(Image.open(T("img", "%d.png" % i)).convert("RGB"), np.float64) / 255.0 - MEAN) / STD)
                        .transpose(2, 0, 1) for i in range(4)])
        W = {k[len("vision_model."):]: torch.tensor(np.asarray(v, np.float64)) for k, v in tower.items()}
        hs, post = VP.vit_reference(vc, W, torch.tensor(pix))
        feats = VP.select_ref(vc, hs, post, -2, "patch", False).float()      # [4, 16, VH]

        for stage in (2, 1, "tower"):
            tower_case = stage == "tower"
            tag = "stage 2, tower adapters + --tune-vision-tower" if tower_case else "stage %d" % stage
            stage = 2 if tower_case else stage
            targets = ["q_proj", "v_proj", "down_proj"]
            acfg = FX.adapter_config("lora", targets, r=4, alpha=8,
                                     ts={"rule": "prox", "lambda": 0.1, "eta_tau": 0.05, "tau0": 0.0})
            tensors = FX.make_adapter_tensors(acfg, T("model"), 7)
            for name in [n for L in range(2) for n in R.linear_names(L) if R._targeted(n, acfg)]:
                tensors[R.PEFT_PREFIX + name + ".ts_tau"] = np.array([0.35], np.float32)
            tw = {}  # the tower adapters: PEFT key -> tensor
            if tower_case:
                acfg["target_modules"] = targets + [VPRE + "encoder.layers.%d.%s" % (L, m) for L in (0, 1)
                                                    for m in TOWER_TARGETS]
                trng = np.random.default_rng(11)
                for L in (0, 1):
                    for m in TOWER_TARGETS:
                        key = KPRE + "encoder.layers.%d.%s" % (L, m)
                        out = 32 if m == "mlp.fc1" else VH
                        tw[key + ".lora_A.weight"] = (trng.standard_normal((4, VH)) * 0.3).astype(np.float32)
                        tw[key + ".lora_B.weight"] = (trng.standard_normal((out, 4)) * 0.3).astype(np.float32)
                # each tower module's threshold at the median of its r_i: some patches gated off
                r0 = tower_r(vc, W, pix, tw, 2.0)
                for key, r in r0.items():
                    tw[key + ".ts_tau"] = np.array([np.median(r)], np.float32)
                tensors.update(tw)
            FX.write_adapter(T("adapter"), acfg, tensors)
            args = [a.tspeft, "train", "--model", T("model"), "--vision-tower", T("tower"), "--projector",
                    T("mm_projector.safetensors"), "--data", T("data.shard"), "--steps", "1", "--batch-size", "4",
                    "--max-seq-len", "256", "--lr", "0", "--threads", "1", "--stage", str(stage),
                    "--dump", T("dump%d" % stage)]
            if stage == 2:
                args += ["--adapter", T("adapter")]
            if tower_case:
                args += ["--tune-vision-tower"]
            p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
            if p.returncode:
                failures.append("%s: tspeft train failed: %s" % (tag, p.stderr.strip()[-400:]))
                continue
            dump = st.load(T("dump%d" % stage, "step1.safetensors"))
            # reference
            if stage == 2:
                ref = R.Reference(T("model"), T("adapter"))
            else:
                FX.write_adapter(T("noadapter"), FX.adapter_config("lora", [], r=4, alpha=8), {})
                ref = R.Reference(T("model"), T("noadapter"))
            pt = {k: torch.tensor(v, requires_grad=True) for k, v in proj.items()}
            f_in = feats
            if tower_case:  # the tower in the graph: its tensors and adapters get gradients
                Wt = {k: v.clone().requires_grad_(True) for k, v in W.items()}
                Pt = {k: torch.tensor(np.asarray(v, np.float64), requires_grad=True) for k, v in tw.items()
                      if not k.endswith(".ts_tau")}
                recs = {}
                hs_t, post_t = VP.vit_reference(vc, Wt, torch.tensor(pix), adapt=gated_lora(Pt, tw, 2.0, recs))
                f_in = VP.select_ref(vc, hs_t, post_t, -2, "patch", False).float()
            y = F.linear(F.gelu(F.linear(f_in, pt["w1"], pt["b1"])), pt["w2"], pt["b2"])   # [4,16,HID]
            ref.base["model.embed_tokens.weight"] = Splice(ref.base["model.embed_tokens.weight"], kinds, y)
            res = ref.step([(ids, lab, msk)])
            errs = {"loss": abs(res["loss"] - float(dump["loss"][0])) / abs(res["loss"]),
                    "logits": rel(res["logits"][0].numpy(), dump["logits.0"])}
            names = {"w1": "model.mm_projector.0.weight", "b1": "model.mm_projector.0.bias",
                     "w2": "model.mm_projector.2.weight", "b2": "model.mm_projector.2.bias"}
            for k, nm in names.items():
                if nm + ".grad" not in dump:
                    failures.append("%s: %s.grad missing from the dump" % (tag, nm))
                    continue
                errs[nm] = rel(pt[k].grad.numpy(), dump[nm + ".grad"])
            for k, g in res["grads"].items():
                errs[k] = rel(g.numpy(), dump[k])
            keep_bad = []
            for name, info in res["gate"].items():
                key = R.PEFT_PREFIX + name
                if int(dump[key + ".keep"][0]) != info["keep"]:
                    keep_bad.append("%s %d vs %d" % (name, int(dump[key + ".keep"][0]), info["keep"]))
                errs[key + ".ts_tau.next"] = abs(float(dump[key + ".ts_tau.next"][0]) - float(info["tau_next"]))
            if tower_case:
                t_errs, t_keep_bad, t_kept, t_seen = tower_checks(dump, Wt, Pt, recs, tw)
                errs.update(t_errs)
                keep_bad += t_keep_bad
            worst = max(errs, key=errs.get)
            kept = sum(info["keep"] for info in res["gate"].values())
            seen = sum(info["N"] for info in res["gate"].values())
            print("%s: loss %.6f, %d tensors compared, max error %.1e (%s); gates keep %d of %d tokens" %
                  (tag, res["loss"], len(errs), errs[worst], worst, kept, seen))
            if errs[worst] > TOL:
                failures.append("%s: %s error %.2e > %.0e" % (tag, worst, errs[worst], TOL))
            if keep_bad:
                failures.append("%s: keep counts differ: %s" % (tag, "; ".join(keep_bad[:4])))
            if stage == 2 and not (0 < kept < seen):
                failures.append("%s: the case should gate some tokens off and keep others (kept %d of %d)" %
                                (tag, kept, seen))
            if tower_case:
                print("%s: tower gates keep %d of %d patch-token updates" % (tag, t_kept, t_seen))
                if not (0 < t_kept < t_seen):
                    failures.append("%s: the tower's gates should keep some tokens and drop others (kept %d of %d)"
                                    % (tag, t_kept, t_seen))
    finally:
        if a.keep:
            print("kept", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    for f in failures:
        print("FAIL " + f)
    print("test_mm_parity: %s" % ("passed" if not failures else "%d failure(s)" % len(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
