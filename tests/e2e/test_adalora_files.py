"""AdaLoRA adapter files (docs/adalora.md): a PEFT-layout AdaLoRA adapter, written here from torch
tensors as PEFT's save_pretrained writes one (keys base_model.model.<module>.lora_A / lora_B / lora_E,
no ".weight"; tensors resized by rank_pattern; the safetensors library's layout: metadata first,
tensors in name order), must work in every verb that takes --adapter:

  (a) info prints each module's final rank (of init_r) and the budget;
  (b) round trip: train --adapter AD --steps 1 --lr 0 --out RT writes the same adapter_model.safetensors,
      byte for byte, and the same rank_pattern;
  (c) generate --ids gives the tokens of a plain-torch greedy decode with PEFT's AdaLoRA update
      (x (A * E)^T B^T * lora_alpha / (init_r + 1e-5); tests/parity/test_adalora_parity.py's reference);
  (d) merge writes W0 + alpha / (init_r + 1e-5) * B (E * A) for every adapted weight, the rest unchanged;
  (e) eval --mode ll with the adapter equals eval of the merged model (no gate: merging is exact);
  (f) an AdaLoRA adapter trained by tspeft (ranks allocated by its schedule) has PEFT's key names and
      shapes, ranks summing to target_r times the module count, and round-trips byte for byte too;
  (g) a module whose triplets were all masked (empty tensors, as PEFT writes them) loads as a plain linear.

Exit 0 when every check passed, 1 otherwise.
"""
import argparse
import json
import os
import re
import shutil
import struct
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import e2e_util as U  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import reference as R  # noqa: E402
import st  # noqa: E402
import test_adalora_parity as AP  # noqa: E402
import test_eval_e2e as EV  # noqa: E402

P = R.PEFT_PREFIX
INIT_R = 4
ALPHA = 8.0
TARGETS = ["q_proj", "v_proj", "up_proj"]


def save_like_safetensors(path, tensors):
    """The safetensors library's layout: {"__metadata__": ..., tensors in name order}, header padded
    with spaces to a multiple of 8, data in the same order."""
    header = {"__metadata__": {"format": "pt"}}
    blobs, off = [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name], np.float32)
        b = a.tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb + b"".join(blobs))


def peft_adapter(d, model_dir, seed):
    """Returns (config, tensors, ranks by module)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        mcfg = R.ModelConfig(json.load(f))
    rng = np.random.default_rng(seed)
    cfg = {"peft_type": "ADALORA", "task_type": "CAUSAL_LM", "init_r": INIT_R, "target_r": 2, "tinit": 0,
           "tfinal": 0, "deltaT": 1, "beta1": 0.85, "beta2": 0.85, "orth_reg_weight": 0.5, "total_step": 100,
           "lora_alpha": ALPHA, "lora_dropout": 0.0, "target_modules": TARGETS, "bias": "none",
           "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": model_dir,
           "rank_pattern": {}}
    tens, ranks = {}, {}
    k = 0
    for L in range(mcfg.L):
        for name in R.linear_names(L):
            if not R._targeted(name, cfg):
                continue
            k += 1
            keep = [bool(x) for x in rng.random(INIT_R) < 0.6]
            if not any(keep):
                keep[0] = True
            if k == 2:  # one module left out of rank_pattern: it keeps all init_r triplets
                keep = [True] * INIT_R
            else:
                cfg["rank_pattern"][name + ".lora_E"] = keep
            r = sum(keep)
            ranks[name] = r
            out, inp = AP.FX._shapes(mcfg, name)
            tens[P + name + ".lora_A"] = (rng.standard_normal((r, inp)) * 0.3).astype(np.float32)
            tens[P + name + ".lora_B"] = (rng.standard_normal((out, r)) * 0.3).astype(np.float32)
            tens[P + name + ".lora_E"] = (rng.standard_normal((r, 1)) * 0.8).astype(np.float32)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    save_like_safetensors(os.path.join(d, "adapter_model.safetensors"), tens)
    return cfg, tens, ranks


def ref_greedy(ref, prompt, n_new):
    ids = list(prompt)
    for _ in range(n_new):
        a = np.array([ids], np.int64)
        res = ref.step([(a, a.copy(), np.ones_like(a))], backward=False)
        ids.append(int(torch.argmax(res["logits"][0][0, -1]).item()))
    return ids[len(prompt):]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tspeft", required=True)
    a = ap.parse_args()
    T = a.tspeft
    chk = U.Checks("test_adalora_files")
    tmp = tempfile.mkdtemp(prefix="tspeft_adalora_files_")
    try:
        model = os.path.join(tmp, "model")
        U.tiny_model(model, seed=7, vocab=320, max_pos=512)
        ad = os.path.join(tmp, "peft_adalora")
        cfg, tens, ranks = peft_adapter(ad, model, 5)

        # (a) info
        p = U.run(T, ["info", "--model", model, "--adapter", ad])
        got = {}
        for line in p.stdout.splitlines():
            mm = re.match(r"\s+layers\.(\d+)\.(\w+)\.(\w+)\s+\S+\s+rank (\d+)/(\d+)", line)
            if mm:
                got["model.layers.%s.%s.%s" % mm.group(1, 2, 3)] = int(mm.group(4))
        chk.ok(p.returncode == 0 and got == ranks, "(a) info: every module's rank of init_r %d (%s)" %
               (INIT_R, ", ".join(str(ranks[k]) for k in sorted(ranks))), p.stdout + p.stderr)
        chk.ok("%d ranks over %d modules (budget %d)" % (sum(ranks.values()), len(ranks), 2 * len(ranks)) in p.stdout,
               "(a) info: the rank total and the budget", p.stdout)

        # (b) round trip through train (--lr 0: the tensors do not move; the ranks stay as allocated)
        data = os.path.join(tmp, "data.jsonl")
        U.pattern_data(data, n_rows=8, seed=3)
        rt = os.path.join(tmp, "rt")
        p = U.run(T, ["train", "--model", model, "--adapter", ad, "--data", data, "--steps", "1", "--lr", "0",
                      "--batch-size", "2", "--gate", "off", "--out", rt, "--threads", "1", "--gate-log", "off"])
        chk.ok(p.returncode == 0, "(b) train --adapter PEFT-AdaLoRA --lr 0 exits 0", p.stderr)
        same = p.returncode == 0 and U.read_bytes(os.path.join(rt, "adapter_model.safetensors")) == \
            U.read_bytes(os.path.join(ad, "adapter_model.safetensors"))
        chk.ok(same, "(b) round trip: adapter_model.safetensors byte for byte the same")
        if p.returncode == 0:
            with open(os.path.join(rt, "adapter_config.json")) as f:
                rc = json.load(f)
            chk.ok(rc.get("rank_pattern") == cfg["rank_pattern"] and rc.get("peft_type") == "ADALORA" and
                   all(rc.get(k) == cfg[k] for k in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1",
                                                    "beta2", "orth_reg_weight", "total_step", "lora_alpha")),
                   "(b) round trip: adapter_config.json keeps PEFT's fields and the rank_pattern", json.dumps(rc))

        # (c) generate against the torch reference
        ref = AP.make_reference(model, cfg, tens)
        prompt = [5, 17, 33, 8, 90, 41]
        want = ref_greedy(ref, prompt, 8)
        p = U.run(T, ["generate", "--model", model, "--adapter", ad, "--ids", ",".join(map(str, prompt)),
                      "--max-new-tokens", "8", "--eos", "-1", "--threads", "1"])
        got_ids = [int(x) for x in re.findall(r"-?\d+", p.stdout.strip().splitlines()[-1])] if p.stdout.strip() else []
        chk.ok(p.returncode == 0 and got_ids[-8:] == want, "(c) generate --ids: the reference's greedy tokens %s" % want,
               p.stdout + p.stderr)

        # (d) merge
        mg = os.path.join(tmp, "merged")
        p = U.run(T, ["merge", "--model", model, "--adapter", ad, "--out", mg])
        chk.ok(p.returncode == 0, "(d) merge exits 0", p.stderr)
        if p.returncode == 0:
            base, merged = st.load_checkpoint(model), st.load(os.path.join(mg, "model.safetensors"))
            worst, rest_same = 0.0, True
            for k, W0 in base.items():
                name = k[:-len(".weight")]
                if name in ranks:
                    A, B, E = (tens[P + name + "." + t].astype(np.float64) for t in ("lora_A", "lora_B", "lora_E"))
                    Wm = W0.astype(np.float64) + ALPHA / float(np.float32(INIT_R) + np.float32(1e-5)) * (B @ (A * E))
                    worst = max(worst, AP.rel(merged[k], Wm))
                elif k in merged and not np.array_equal(merged[k], W0):
                    rest_same = False
            chk.ok(worst <= 1e-5, "(d) merge: W0 + alpha/(init_r + 1e-5) B (E * A) (max rel err %.2e)" % worst)
            chk.ok(rest_same, "(d) merge: the other tensors unchanged")

            # (e) eval with the adapter equals eval of the merged model
            tok = EV.train_tokenizer(tmp, EV.boolq_rows(30, 9))
            bq = os.path.join(tmp, "boolq", "test.json")
            os.makedirs(os.path.dirname(bq))
            with open(bq, "w") as f:
                json.dump(EV.boolq_rows(6, 4), f)
            shutil.copy(os.path.join(model, "config.json"), mg)
            outs = []
            for args in (["--model", model, "--adapter", ad], ["--model", mg]):
                o = os.path.join(tmp, "eval%d.json" % len(outs))
                p = U.run(T, ["eval"] + args + ["--tokenizer", tok, "--data", bq, "--mode", "ll", "--out", o,
                                                "--threads", "1"], timeout=120)
                chk.ok(p.returncode == 0, "(e) eval --mode ll %s exits 0" % ("--adapter" if len(outs) == 0 else "merged"),
                       p.stderr)
                outs.append(o)
            if all(os.path.exists(o) for o in outs):
                s0 = [json.loads(l) for l in open(outs[0].replace(".json", ".samples.jsonl"))]
                s1 = [json.loads(l) for l in open(outs[1].replace(".json", ".samples.jsonl"))]

                def nums(s):
                    return [v for r in s for v in (r.get("loglik") or r.get("scores") or r.get("ll") or [])]
                n0, n1 = nums(s0), nums(s1)
                close = len(s0) == len(s1) == 6 and len(n0) == len(n1) and \
                    all(abs(x - y) <= 1e-3 * max(1.0, abs(y)) for x, y in zip(n0, n1))
                chk.ok(close and [r.get("extracted") for r in s0] == [r.get("extracted") for r in s1],
                       "(e) eval: the adapter's per-sample predictions and scores equal the merged model's (%d values)"
                       % len(n0), json.dumps(s0[:2]) + "\n" + json.dumps(s1[:2]))

        # (f) an adapter trained by tspeft
        tr = os.path.join(tmp, "trained")
        p = U.run(T, ["train", "--model", model, "--data", data, "--steps", "8", "--lr", "0.01", "--batch-size", "2",
                      "--adapter-type", "adalora", "--init-r", "4", "--target-r", "2", "--tinit", "1", "--tfinal", "2",
                      "--delta-t", "2", "--target-modules", ",".join(TARGETS), "--out", tr, "--threads", "1",
                      "--gate", "off", "--gate-log", "off"])
        chk.ok(p.returncode == 0, "(f) train --adapter-type adalora exits 0", p.stderr)
        if p.returncode == 0:
            with open(os.path.join(tr, "adapter_config.json")) as f:
                tc = json.load(f)
            t = st.load(os.path.join(tr, "adapter_model.safetensors"))
            rp = tc.get("rank_pattern") or {}
            okk = tc["peft_type"] == "ADALORA" and len(rp) == len(ranks)
            total = 0
            for name in ranks:
                keep = rp.get(name + ".lora_E", [])
                r = sum(keep)
                total += r
                okk = okk and len(keep) == 4 and t[P + name + ".lora_A"].shape[0] == r and \
                    t[P + name + ".lora_B"].shape[1] == r and t[P + name + ".lora_E"].shape == (r, 1)
            okk = okk and all(k.endswith((".lora_A", ".lora_B", ".lora_E", ".ts_tau")) for k in t)
            chk.ok(okk and total == 2 * len(ranks), "(f) trained: PEFT keys and shapes, ranks sum to target_r x %d = %d"
                   % (len(ranks), total), json.dumps(rp))
            rt2 = os.path.join(tmp, "rt2")
            p = U.run(T, ["train", "--model", model, "--adapter", tr, "--data", data, "--steps", "1", "--lr", "0",
                          "--batch-size", "2", "--gate", "off", "--out", rt2, "--threads", "1", "--gate-log", "off"])
            same = p.returncode == 0 and U.read_bytes(os.path.join(rt2, "adapter_model.safetensors")) == \
                U.read_bytes(os.path.join(tr, "adapter_model.safetensors"))
            chk.ok(same, "(f) trained adapter round-trips byte for byte", p.stderr)

        # (g) a module with no triplet kept (PEFT writes [0, in], [out, 0], [0, 1]) loads as a plain linear
        z = os.path.join(tmp, "zero_rank")
        zc = dict(cfg, rank_pattern=dict(cfg["rank_pattern"]))
        zname = "model.layers.1.self_attn.q_proj"
        zc["rank_pattern"][zname + ".lora_E"] = [False] * INIT_R
        zt = dict(tens)
        zt[P + zname + ".lora_A"] = np.zeros((0, tens[P + zname + ".lora_A"].shape[1]), np.float32)
        zt[P + zname + ".lora_B"] = np.zeros((tens[P + zname + ".lora_B"].shape[0], 0), np.float32)
        zt[P + zname + ".lora_E"] = np.zeros((0, 1), np.float32)
        os.makedirs(z)
        with open(os.path.join(z, "adapter_config.json"), "w") as f:
            json.dump(zc, f)
        save_like_safetensors(os.path.join(z, "adapter_model.safetensors"), zt)
        p = U.run(T, ["info", "--model", model, "--adapter", z])
        chk.ok(p.returncode == 0 and "layers.1.self_attn.q_proj" not in p.stdout and
               "layers.1.self_attn.v_proj" in p.stdout, "(g) a module with rank 0 loads and is not adapted",
               p.stdout + p.stderr)
    finally:
        if not chk.failed:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print("files kept in %s" % tmp)
    return chk.finish()


if __name__ == "__main__":
    sys.exit(main())
