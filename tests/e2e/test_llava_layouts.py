#!/usr/bin/python3
"""LLaVA-1.5 checkpoints in both layouts: the same tiny weights stored as
  original   LlavaLlamaForCausalLM: LLaMA keys in config.json + mm_* keys; tensors model.*, lm_head,
             model.mm_projector.{0,2}.*; the vision tower a separate CLIP directory (mm_vision_tower)
  hf         llava-hf LlavaForConditionalGeneration before transformers 4.52: config text_config /
             vision_config; language_model.model.*, language_model.lm_head.weight,
             vision_tower.vision_model.*, multi_modal_projector.linear_{1,2}.*
  hf452      the same after 4.52: model.language_model.*, lm_head.weight, model.vision_tower.vision_model.*,
             model.multi_modal_projector.linear_{1,2}.*
must train identically: `tspeft train --model CKPT --vision-tower (CKPT or the tower dir) --projector CKPT
--stage 2 --steps 1 --dump` gives bit-identical dumps (loss, logits, every gradient including the
projector's, keep counts, next tau) for the three layouts, and a projector-only stage-1 step agrees too.
Images at another size than the tower's (--image-size with --interpolate-pos) generate and train one
step; without --interpolate-pos such a size is refused with one line.

    /usr/bin/python3 tests/e2e/test_llava_layouts.py --tspeft build/tspeft
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

from PIL import Image  # noqa: E402

HID, VOCAB, VH = 32, 320, 16


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tspeft", required=True)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    chk = U.Checks("test_llava_layouts")
    tmp = tempfile.mkdtemp(prefix="tk_llava_")
    T = lambda *p: os.path.join(tmp, *p)  # noqa: E731
    try:
        # weights: a tiny LLaMA, a CLIP tower (28 px, 7 px patches: 16 tokens), an mlp2x_gelu projector
        cfg = FX.make_model(T("plain"), 5, hidden=HID, inter=64, layers=2, heads=4, kv_heads=2, vocab=VOCAB, max_pos=256)
        llama = st.load(os.path.join(T("plain"), "model.safetensors"))
        vcfg, tower = MV.make(T("tower"), kind="clip", hidden=VH, layers=2, heads=2, inter=32, image=28, patch=7,
                              prefix="vision_model.", seed=1)
        vc = json.load(open(T("tower", "config.json")))
        rng = np.random.default_rng(2)
        proj = {"w1": rng.normal(0, 0.2, (HID, VH)).astype(np.float32), "b1": rng.normal(0, 0.1, HID).astype(np.float32),
                "w2": rng.normal(0, 0.2, (HID, HID)).astype(np.float32), "b2": rng.normal(0, 0.1, HID).astype(np.float32)}
        tower_t = {k[len("vision_model."):]: v for k, v in tower.items()}

        def write(d, config, tensors):
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(config, f)
            st.save(os.path.join(d, "model.safetensors"), tensors)

        orig_cfg = dict(cfg, architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama",
                        mm_vision_tower="openai/clip-vit-large-patch14-336", mm_projector_type="mlp2x_gelu",
                        mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_hidden_size=VH)
        t = dict(llama)
        t.update({"model.mm_projector.0.weight": proj["w1"], "model.mm_projector.0.bias": proj["b1"],
                  "model.mm_projector.2.weight": proj["w2"], "model.mm_projector.2.bias": proj["b2"]})
        write(T("original"), orig_cfg, t)
        hf_cfg = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "text_config": cfg,
                  "vision_config": vc, "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
                  "projector_hidden_act": "gelu", "image_token_index": 32000}
        t = {"language_model." + k: v for k, v in llama.items()}
        t.update({"vision_tower.vision_model." + k: v for k, v in tower_t.items()})
        t.update({"multi_modal_projector.linear_1.weight": proj["w1"], "multi_modal_projector.linear_1.bias": proj["b1"],
                  "multi_modal_projector.linear_2.weight": proj["w2"], "multi_modal_projector.linear_2.bias": proj["b2"]})
        write(T("hf"), hf_cfg, t)
        t = {("model.language_model." + k[6:] if k.startswith("model.") else k): v for k, v in llama.items()}
        t.update({"model.vision_tower.vision_model." + k: v for k, v in tower_t.items()})
        t.update({"model.multi_modal_projector.linear_1.weight": proj["w1"],
                  "model.multi_modal_projector.linear_1.bias": proj["b1"],
                  "model.multi_modal_projector.linear_2.weight": proj["w2"],
                  "model.multi_modal_projector.linear_2.bias": proj["b2"]})
        write(T("hf452"), hf_cfg, t)

        # data: 12 small images with one-word answers, through the real converter
        os.makedirs(T("img"))
        recs, words = [], ["red", "green", "blue", "dark"]
        for i in range(12):
            px = (rng.random((28, 28, 3)) * 255).astype(np.uint8)
            px[:, :, i % 3] = 200
            Image.fromarray(px).save(T("img", "%d.png" % i))
            recs.append({"id": str(i), "image": "%d.png" % i, "conversations": [
                {"from": "human", "value": "<image>\nWhat colour dominates?"},
                {"from": "gpt", "value": words[i % 4]}]})
        with open(T("data.json"), "w") as f:
            json.dump(recs, f)
        with open(T("corpus.txt"), "w") as f:
            for i in range(200):
                f.write("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                        "helpful, detailed, and polite answers to the user's questions. USER: What colour dominates? "
                        "ASSISTANT: %s %s\n" % (words[i % 4], words[(i * 7) % 4]))
        p = subprocess.run(["spm_train", "--input=" + T("corpus.txt"), "--model_prefix=" + T("tok"), "--vocab_size=300",
                            "--model_type=bpe", "--byte_fallback=true", "--num_threads=1"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        chk.ok(p.returncode == 0, "spm_train", p.stderr[-400:])
        p = U.run(a.tspeft, ["convert", "--format", "llava", "--input", T("data.json"), "--image-folder", T("img"),
                             "--tokenizer", T("tok.model"), "--image-tokens", 16, "--out", T("data.shard"), "--quiet"])
        chk.ok(p.returncode == 0, "convert --format llava", p.stderr)

        common = ["train", "--data", T("data.shard"), "--steps", 1, "--batch-size", 4, "--max-seq-len", 256,
                  "--threads", 1, "--lr", "1e-2", "--seed", 3]
        layouts = {"original": (T("original"), T("tower")), "hf": (T("hf"), T("hf")), "hf452": (T("hf452"), T("hf452"))}
        for stage, extra in (("2", ["--target-modules", "all", "--ts-tau0", "0.2"]), ("1", [])):
            dumps = {}
            for name, (ckpt, tw) in layouts.items():
                d = T("dump-%s-%s" % (stage, name))
                p = U.run(a.tspeft, common + ["--model", ckpt, "--vision-tower", tw, "--projector", ckpt, "--stage", stage,
                                              "--dump", d] + extra, env={"OMP_NUM_THREADS": "1"})
                ok = chk.ok(p.returncode == 0, "stage %s, %s layout: one step with --dump" % (stage, name), p.stderr)
                if ok:
                    dumps[name] = st.load(os.path.join(d, "step1.safetensors"))
            if len(dumps) != 3:
                continue
            ref = dumps["original"]
            names = sorted(ref)
            has_proj = any(k.startswith("model.mm_projector") and k.endswith(".grad") for k in names)
            chk.ok(has_proj, "stage %s: the dump holds projector gradients (%d tensors)" % (stage, len(names)),
                   names[:8])
            for name in ("hf", "hf452"):
                same = sorted(dumps[name]) == names and all(np.array_equal(ref[k], dumps[name][k]) for k in names)
                bad = [k for k in names if k in dumps[name] and not np.array_equal(ref[k], dumps[name][k])][:4]
                chk.ok(same, "stage %s: %s layout's dump is bit-identical to the original layout's" % (stage, name), bad)
        # the feature cache: the tower's F16 features stored at convert time train like the images
        p = U.run(a.tspeft, ["convert", "--format", "llava", "--input", T("data.json"), "--image-folder", T("img"),
                             "--tokenizer", T("tok.model"), "--image-tokens", 16, "--encoder", T("tower"),
                             "--out", T("feat.shard"), "--quiet"])
        chk.ok(p.returncode == 0, "convert --encoder (F16 feature cache)", p.stderr)
        dd = {}
        for name, data in (("images", T("data.shard")), ("features", T("feat.shard"))):
            d = T("dump-cache-" + name)
            p = U.run(a.tspeft, ["train", "--data", data, "--steps", 1, "--batch-size", 4, "--max-seq-len", 256,
                                 "--threads", 1, "--seed", 3, "--model", T("plain"), "--vision-tower", T("tower"),
                                 "--projector", T("original"), "--target-modules", "all", "--dump", d],
                      env={"OMP_NUM_THREADS": "1"})
            if chk.ok(p.returncode == 0, "one step on %s" % name, p.stderr):
                dd[name] = st.load(os.path.join(d, "step1.safetensors"))
        if len(dd) == 2:
            l1, l2 = float(dd["images"]["loss"][0]), float(dd["features"]["loss"][0])
            g = [k for k in dd["images"] if k.startswith("model.mm_projector") and k.endswith(".grad")]
            gerr = max(float(np.max(np.abs(dd["images"][k] - dd["features"][k]))) / max(float(np.max(np.abs(dd["images"][k]))), 1e-30)
                       for k in g)
            chk.ok(abs(l1 - l2) <= 1e-3 * abs(l1) and gerr <= 1e-2,
                   "cached F16 features: loss %.6f vs %.6f, projector gradients within %.1e (F16 rounding)" % (l1, l2, gerr))
        # generate --image: the llava-hf directory as model, tower and projector
        p = U.run(a.tspeft, ["generate", "--model", T("hf"), "--vision-tower", T("hf"), "--projector", T("hf"),
                             "--tokenizer", T("tok.model"), "--image", T("img", "0.png"), "--prompt",
                             "What colour dominates?", "--max-new-tokens", 4])
        chk.ok(p.returncode == 0 and len(p.stdout.splitlines()) == 1, "generate --image prints one line of text: %r"
               % p.stdout.strip()[:40], p.stderr)
        p2 = U.run(a.tspeft, ["generate", "--model", T("original"), "--vision-tower", T("tower"), "--projector",
                              T("original"), "--tokenizer", T("tok.model"), "--image", T("img", "0.png"), "--prompt",
                              "What colour dominates?", "--max-new-tokens", 4])
        chk.ok(p2.returncode == 0 and p2.stdout == p.stdout, "the original layout generates the same text", p2.stderr)
        # another image size: 28 px -> 42 px (6 x 6 patches instead of 4 x 4) with --interpolate-pos
        gen = ["generate", "--model", T("original"), "--vision-tower", T("tower"), "--projector", T("original"),
               "--tokenizer", T("tok.model"), "--image", T("img", "0.png"), "--prompt", "What colour dominates?",
               "--max-new-tokens", 4, "--image-size", 42]
        p3 = U.run(a.tspeft, gen + ["--interpolate-pos"])
        chk.ok(p3.returncode == 0 and len(p3.stdout.splitlines()) == 1,
               "generate --image-size 42 --interpolate-pos prints one line: %r" % p3.stdout.strip()[:40], p3.stderr)
        p3 = U.run(a.tspeft, gen)
        chk.ok(p3.returncode == 1 and len(p3.stderr.strip().splitlines()) == 1 and "--interpolate-pos" in p3.stderr,
               "generate --image-size 42 without --interpolate-pos: one line naming it, exit 1", p3.stderr)
        p3 = U.run(a.tspeft, ["convert", "--format", "llava", "--input", T("data.json"), "--image-folder", T("img"),
                              "--tokenizer", T("tok.model"), "--image-tokens", 36, "--out", T("data36.shard"), "--quiet"])
        chk.ok(p3.returncode == 0, "convert --image-tokens 36", p3.stderr)
        p3 = U.run(a.tspeft, common[:1] + ["--data", T("data36.shard")] + common[3:] +
                   ["--model", T("original"), "--vision-tower", T("tower"), "--projector", T("original"), "--stage", "1",
                    "--image-size", 42, "--interpolate-pos", "--dump", T("dump-42")], env={"OMP_NUM_THREADS": "1"})
        ok = chk.ok(p3.returncode == 0, "one stage-1 step at 42 px (36 image tokens) with --interpolate-pos", p3.stderr)
        if ok:
            d42 = st.load(os.path.join(T("dump-42"), "step1.safetensors"))
            chk.ok(np.isfinite(float(d42["loss"][0])), "its loss is finite: %.4f" % float(d42["loss"][0]))
        p = U.run(a.tspeft, ["generate", "--model", T("hf"), "--tokenizer", T("tok.model"), "--image", T("img", "0.png"),
                             "--prompt", "x"])
        chk.ok(p.returncode == 2 and "--vision-tower" in p.stderr, "--image without --vision-tower: usage error", p.stderr)
    finally:
        if a.keep:
            print("kept", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return chk.finish()


if __name__ == "__main__":
    sys.exit(main())
