#!/usr/bin/python3
"""Image classification on a vision tower: `tspeft train / eval --task image-classification`.

    /usr/bin/python3 tests/e2e/test_image_classification.py --tspeft build/tspeft [--keep]

Data: four Fashion-MNIST classes (T-shirt/top, Trouser, Sneaker, Ankle boot; Debian's
/usr/share/datasets/fashion-mnist, skipped with exit 77 without it), 60 training images per class
from the train split and 40 test images per class from the t10k split, written as PNG files and
packed into shards with the image-classification record contract (one image payload, meta label
and n_classes) by the make_shard test helper. Model: a random tiny CLIP tower (hidden 32, 2 layers,
28 px, patch 7) from examples/make_random_vit.py.

Checks: a TS-gated LoRA on every tower projection trains (loss falls) and the held-out top-1
accuracy is well above chance (> 0.5 for 4 classes; chance 0.25); the adapter is in PEFT's layout
(tower module keys under base_model.model.vision_model., the classifier as modules_to_save, ts_tau
per module, full tower names in target_modules, task_type null); `tspeft eval` writes its results
JSON and the per-image JSONL beside it (one line per image in data order, correct == (pred ==
label), their mean the top-1, per-image keep averaging to the results' keep); `tspeft gates` shows
the tower modules in their own block; the chance control (--gate random --keep 0.3 discards about
70% in training and evaluation) and --target-modules @FILE; a linear probe (--adapter-type none) and
--tune-vision-tower with LoRA (the tower written as OUT/vision_tower, its weights changed, usable as
--model) run; bad input is refused with one line and nothing written: the classifier's class count
against the data's n_classes, records disagreeing on n_classes, a LLaMA target name, --gate random
without a valid --keep, --keep without --gate random, a missing @FILE.
"""
import argparse
import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "examples"))
import e2e_util as U  # noqa: E402  (puts tests/parity on sys.path)

import numpy as np  # noqa: E402

import make_random_vit as MV  # noqa: E402
import st  # noqa: E402

FMNIST = "/usr/share/datasets/fashion-mnist"
CLASSES = [0, 1, 7, 9]  # T-shirt/top, Trouser, Sneaker, Ankle boot
NAMES = ["T-shirt/top", "Trouser", "Sneaker", "Ankle boot"]
LABELS = {}  # shard path -> its records' labels in record order (make_split)


def read_idx(split):
    pre = "train" if split == "train" else "t10k"
    with gzip.open(os.path.join(FMNIST, pre + "-images-idx3-ubyte.gz")) as f:
        data = f.read()
    n, rows, cols = struct.unpack(">III", data[4:16])
    images = np.frombuffer(data, np.uint8, offset=16).reshape(n, rows, cols)
    with gzip.open(os.path.join(FMNIST, pre + "-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images, labels


def png_gray(img):
    """An 8-bit grayscale PNG (filter 0 per row)."""
    h, w = img.shape
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def make_split(tspeft, d, split, per_class, n_classes=4, bad_record=False):
    images, labels = read_idx(split)
    os.makedirs(os.path.join(d, split), exist_ok=True)
    rows, count = [], {c: 0 for c in CLASSES}
    for i in range(len(labels)):
        c = int(labels[i])
        if c not in count or count[c] >= per_class:
            continue
        count[c] += 1
        path = os.path.join(d, split, "%05d.png" % i)
        with open(path, "wb") as f:
            f.write(png_gray(images[i]))
        lab = CLASSES.index(c)
        nc = n_classes + 1 if bad_record and len(rows) == 5 else n_classes
        rows.append({"input_ids": [0], "labels": [-100], "kinds": [3], "image_files": [path],
                     "meta": {"task": "image-classification", "id": "%s/%05d.png" % (NAMES[lab], i),
                              "label": lab, "answer": NAMES[lab], "n_classes": nc}})
        if all(v >= per_class for v in count.values()):
            break
    path = U.make_shard(tspeft, os.path.join(d, "%s%s%s.shard" % (split, "_nc%d" % n_classes if n_classes != 4 else "",
                                                                   "_bad" if bad_record else "")), rows, 1 << 16)
    LABELS[path] = [r["meta"]["label"] for r in rows]
    return path


def one_line_error(p, words):
    lines = p.stderr.strip().splitlines()
    return (p.returncode in (1, 2) and len(lines) == 1 and all(w in lines[0] for w in words)
            and "Traceback" not in p.stderr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tspeft", required=True)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if not os.path.exists(os.path.join(FMNIST, "train-images-idx3-ubyte.gz")):
        print("test_image_classification: %s not found (Debian's dataset-fashion-mnist): skipped" % FMNIST)
        return 77
    tsp = os.path.abspath(args.tspeft)
    chk = U.Checks("test_image_classification")
    tmp = tempfile.mkdtemp(prefix="tspeft_imgcls_")
    try:
        chk.section("data and tower")
        train = make_split(tsp, tmp, "train", 60)
        test = make_split(tsp, tmp, "test", 40)
        tower = os.path.join(tmp, "tower")
        MV.make(tower, kind="clip", hidden=32, layers=2, heads=4, inter=64, image=28, patch=7, seed=3)

        chk.section("TS-LoRA on every tower projection")
        out = os.path.join(tmp, "ts")
        p = U.run(tsp, ["train", "--task", "image-classification", "--model", tower, "--data", train, "--steps", 60,
                        "--batch-size", 24, "--lr", 3e-3, "--target-modules", "all", "--out", out, "--threads", 2,
                        "--log-every", 10], timeout=300)
        chk.ok(p.returncode == 0, "train exits 0", p.stderr + p.stdout)
        logs = [json.loads(x) for x in open(os.path.join(out, "train_log.jsonl"))] if p.returncode == 0 else []
        first = np.mean([x["loss"] for x in logs[:10]]) if logs else 0
        last = np.mean([x["loss"] for x in logs[-10:]]) if logs else 0
        chk.ok(len(logs) == 60 and last < first - 0.2, "the loss falls (first 10 steps %.3f, last 10 %.3f)" % (first, last))
        cfg = json.load(open(os.path.join(out, "adapter_config.json")))
        want_t = ["vision_model.encoder.layers.%d.%s" % (l, m) for l in range(2) for m in
                  ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")]
        chk.ok(cfg["target_modules"] == want_t and cfg["modules_to_save"] == ["classifier"] and
               cfg["task_type"] is None and cfg["peft_type"] == "LORA" and "ts_peft" in cfg,
               "adapter_config.json: tower modules by full name, modules_to_save [classifier], task_type null",
               json.dumps(cfg)[:600])
        t = st.load(os.path.join(out, "adapter_model.safetensors"))
        keys = set(t)
        want = {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
        for n in want_t:
            want |= {"base_model.model.%s.lora_A.weight" % n, "base_model.model.%s.lora_B.weight" % n,
                     "base_model.model.%s.ts_tau" % n}
        chk.ok(keys == want, "adapter_model.safetensors: PEFT keys of the tower modules, the classifier and ts_tau",
               sorted(keys ^ want))
        chk.ok(t["base_model.model.classifier.weight"].shape == (4, 32) and
               t["base_model.model.vision_model.encoder.layers.1.mlp.fc1.lora_A.weight"].shape == (8, 32) and
               float(np.abs(t["base_model.model.vision_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"]).max()) > 0,
               "shapes: classifier [4, 32], fc1 lora_A [8, 32]; lora_B trained away from 0")

        chk.section("eval")
        res = os.path.join(tmp, "ts_results.json")
        p = U.run(tsp, ["eval", "--task", "image-classification", "--model", tower, "--adapter", out, "--data", test,
                        "--out", res, "--threads", 2], timeout=120)
        chk.ok(p.returncode == 0 and "image-classification" in p.stdout, "eval exits 0 and prints the table",
               p.stderr + p.stdout)
        r = json.load(open(res)) if os.path.exists(res) else {"tasks": [{"n": 0, "metrics": {"top1_acc": 0}}]}
        acc = r["tasks"][0]["metrics"]["top1_acc"]
        print("       held-out top-1 %.3f on %d images, keep %.3f" % (acc, r["tasks"][0]["n"],
                                                                      r["tasks"][0]["metrics"].get("keep", 0)))
        chk.ok(r["tasks"][0]["n"] == 160 and acc > 0.5, "held-out top-1 %.3f > 0.5 (4 classes, chance 0.25)" % acc)
        sp = os.path.join(tmp, "ts_results.samples.jsonl")
        rows = [json.loads(x) for x in open(sp)] if os.path.exists(sp) else []
        labels = LABELS[test]
        chk.ok(len(rows) == 160 and [x["index"] for x in rows] == list(range(160)) and
               [x["label"] for x in rows] == labels and
               all(x["correct"] == int(x["pred"] == x["label"]) and 0 <= x["pred"] < 4 for x in rows) and
               abs(np.mean([x["correct"] for x in rows]) - acc) < 1e-12,
               "ts_results.samples.jsonl: one line per image in data order (labels as the shard's), correct == "
               "(pred == label), mean correct == top1_acc", (len(rows), rows[:2]))
        kp = [x.get("keep", -1) for x in rows]
        chk.ok(rows and all(0 <= k <= 1 for k in kp) and
               abs(np.mean(kp) - r["tasks"][0]["metrics"]["keep"]) < 1e-5 and min(kp) < max(kp),
               "per-image keep in [0, 1], its mean the results' keep %.4f, varying between images (%.3f .. %.3f)" %
               (r["tasks"][0]["metrics"].get("keep", -1), min(kp or [0]), max(kp or [0])))

        chk.section("gates")
        p = U.run(tsp, ["gates", out], timeout=60)
        chk.ok(p.returncode == 0 and "vision tower, layer x module" in p.stdout and "v.fc1" in p.stdout and
               "vision_model.encoder.layers.1.mlp.fc1" in p.stdout, "tspeft gates shows the tower modules in their own block",
               p.stderr + p.stdout)

        chk.section("linear probe and the whole tower")
        probe = os.path.join(tmp, "probe")
        p = U.run(tsp, ["train", "--task", "image-classification", "--model", tower, "--data", train, "--steps", 10,
                        "--batch-size", 16, "--lr", 3e-3, "--adapter-type", "none", "--out", probe, "--threads", 2,
                        "--quiet"], timeout=120)
        tp = st.load(os.path.join(probe, "adapter_model.safetensors")) if p.returncode == 0 else {}
        chk.ok(p.returncode == 0 and set(tp) == {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
               and not os.path.exists(os.path.join(probe, "gates.jsonl")),
               "--adapter-type none trains the classifier alone (no gates.jsonl)", p.stderr)
        full = os.path.join(tmp, "full")
        p = U.run(tsp, ["train", "--task", "image-classification", "--model", tower, "--data", train, "--steps", 10,
                        "--batch-size", 16, "--lr", 3e-3, "--target-modules", "q_proj,fc2", "--tune-vision-tower",
                        "--vision-tower-lr", 1e-3, "--out", full, "--threads", 2, "--quiet"], timeout=120)
        ok = p.returncode == 0 and os.path.exists(os.path.join(full, "vision_tower", "model.safetensors"))
        if ok:
            a = st.load(os.path.join(tower, "model.safetensors"))
            b = st.load(os.path.join(full, "vision_tower", "model.safetensors"))
            moved = [k for k in a if not np.array_equal(a[k], b[k])]
            fixed = [k for k in a if k not in moved and not k.endswith("k_proj.bias")]
            ok = set(a) == set(b) and not fixed  # k_proj.bias: a zero gradient (softmax shift)
        chk.ok(ok, "--tune-vision-tower (with LoRA on q_proj, fc2) writes OUT/vision_tower with every tensor trained",
               p.stderr)
        p = U.run(tsp, ["eval", "--task", "image-classification", "--model", os.path.join(full, "vision_tower"),
                        "--adapter", full, "--data", test, "--threads", 2], timeout=120)
        chk.ok(p.returncode == 0, "the trained tower evaluates as --model with its adapter", p.stderr)

        chk.section("the chance control and a module list from a file")
        rnd = os.path.join(tmp, "random")
        p = U.run(tsp, ["train", "--task", "image-classification", "--model", tower, "--data", train, "--steps", 10,
                        "--batch-size", 16, "--lr", 3e-3, "--target-modules", "all", "--gate", "random", "--keep", 0.3,
                        "--out", rnd, "--threads", 2, "--quiet"], timeout=120)
        g = U.run(tsp, ["gates", rnd, "--format", "json", "--plots", "off"], timeout=60) if p.returncode == 0 else p
        dis = json.loads(g.stdout)["discarded_fraction_run"] if g.returncode == 0 else -1
        cfg = json.load(open(os.path.join(rnd, "adapter_config.json"))) if p.returncode == 0 else {}
        chk.ok(p.returncode == 0 and abs(dis - 0.7) < 0.02 and
               abs(cfg.get("ts_peft", {}).get("keep", 0) - 0.3) < 1e-6,
               "--gate random --keep 0.3 trains; tspeft gates: discarded %.3f (about 0.7); ts_peft keep 0.3" % dis,
               p.stderr + g.stderr)
        rres = os.path.join(tmp, "random.json")
        p = U.run(tsp, ["eval", "--task", "image-classification", "--model", tower, "--adapter", rnd, "--data", test,
                        "--out", rres, "--threads", 2], timeout=120)
        k = json.load(open(rres))["tasks"][0]["metrics"]["keep"] if p.returncode == 0 else -1
        chk.ok(p.returncode == 0 and abs(k - 0.3) < 0.02, "its evaluation draws the gate at keep 0.3 too (%.3f)" % k,
               p.stderr)
        mfile = os.path.join(tmp, "modules.txt")
        with open(mfile, "w") as f:
            f.write("# kept modules\nvision_model.encoder.layers.0.self_attn.q_proj\n"
                    "vision_model.encoder.layers.1.mlp.fc2  # a comment\n")
        mo = os.path.join(tmp, "modfile")
        p = U.run(tsp, ["train", "--task", "image-classification", "--model", tower, "--data", train, "--steps", 3,
                        "--batch-size", 8, "--target-modules", "@" + mfile, "--gate", "off", "--out", mo, "--threads", 2,
                        "--quiet"], timeout=120)
        cfg = json.load(open(os.path.join(mo, "adapter_config.json"))) if p.returncode == 0 else {}
        chk.ok(cfg.get("target_modules") == ["vision_model.encoder.layers.0.self_attn.q_proj",
                                             "vision_model.encoder.layers.1.mlp.fc2"],
               "--target-modules @FILE: the file's names (comments dropped) are the targets", p.stderr)

        chk.section("bad input")
        test5 = make_split(tsp, tmp, "test", 5, n_classes=5)
        res5 = os.path.join(tmp, "bad_results.json")
        p = U.run(tsp, ["eval", "--task", "image-classification", "--model", tower, "--adapter", out, "--data", test5,
                        "--out", res5], timeout=60)
        chk.ok(one_line_error(p, ["adapter_model.safetensors", "4 classes", "5"]) and not os.path.exists(res5) and
               not os.path.exists(os.path.join(tmp, "bad_results.samples.jsonl")),
               "eval: the classifier's 4 classes against data with n_classes 5: one line, nothing written "
               "(neither the results nor the samples)", p.stderr)
        for argv, words, what in (
                (["--gate", "random"], ["--gate random", "--keep"], "--gate random without --keep"),
                (["--gate", "random", "--keep", "0"], ["--keep", "(0, 1]"], "--keep 0"),
                (["--keep", "0.5"], ["--keep", "--gate random"], "--keep without --gate random"),
                (["--target-modules", "@" + os.path.join(tmp, "no_such.txt")], ["no_such.txt"],
                 "--target-modules @FILE of a missing file")):
            p = U.run(tsp, ["train", "--task", "image-classification", "--model", tower, "--data", train, "--steps", 2,
                            "--out", os.path.join(tmp, "bad_out")] + argv, timeout=60)
            chk.ok(one_line_error(p, words) and not os.path.exists(os.path.join(tmp, "bad_out")),
                   "train: %s: one line, nothing written" % what, p.stderr)
        bad = make_split(tsp, tmp, "train", 3, bad_record=True)
        bout = os.path.join(tmp, "bad_out")
        p = U.run(tsp, ["train", "--task", "image-classification", "--model", tower, "--data", bad, "--steps", 2,
                        "--out", bout], timeout=60)
        chk.ok(one_line_error(p, [os.path.basename(bad), "record 5", "n_classes 5"]) and not os.path.exists(bout),
               "train: records disagreeing on n_classes: one line naming the shard and record, nothing written",
               p.stderr)
        p = U.run(tsp, ["train", "--task", "image-classification", "--model", tower, "--data", train, "--steps", 2,
                        "--target-modules", "model.layers.0.self_attn.o_proj", "--out", bout], timeout=60)
        chk.ok(one_line_error(p, ["--target-modules", "LLaMA"]) and not os.path.exists(bout),
               "train: a LLaMA module name as a tower target: one line", p.stderr)
    finally:
        if args.keep or chk.failed:
            print("kept %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return chk.finish()


if __name__ == "__main__":
    sys.exit(main())
