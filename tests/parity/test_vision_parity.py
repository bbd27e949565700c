#!/usr/bin/python3
"""Vision parity: the C CLIP/SigLIP encoders and the LLaVA projector against plain-torch references.

    /usr/bin/python3 tests/parity/test_vision_parity.py --tspeft build/tspeft [--keep] [--case PREFIX]

The C side is the helper BUILD/tests/vision_probe (tests/vision/vision_probe.c), found beside the
tspeft binary. Tiny random HF-format towers are written with examples/make_random_vit.py (F32, BF16,
F16; every tensor-name prefix; standalone, CLIPConfig/SiglipConfig and llava-hf configs; sharded),
random pixels are run through `vision_probe encode`, and the selected hidden state is compared with
a float64 re-implementation of transformers' CLIPVisionTransformer / SiglipVisionTransformer written
here (F.conv2d patch embedding, per-head softmax attention, quick_gelu / gelu / gelu_pytorch_tanh).
The training forward and backward (`vision_probe grad`: pooled outputs with SigLIP's attention-pooling
head, selections) are compared with torch autograd: output, pixel gradient and the gradient of every
tower tensor. The projector (linear, mlp2x_gelu; original LLaVA and llava-hf names) is compared with torch autograd:
output, input gradient and every weight gradient. Malformed checkpoints must fail with one line
naming the file and the tensor or key.

Tolerances: encoder max abs error <= 1e-4 * max(1, max|ref|); tower gradients and projector max abs
error / max|ref| <= 1e-4 per tensor. Exit status 1 when anything fails, 2 on bad usage.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "examples"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import make_random_vit as MV  # noqa: E402
import st  # noqa: E402

torch.set_num_threads(2)
TOL_VIT = 1e-4
TOL_PROJ = 1e-4


# ---- references (float64, written from transformers' modeling_clip.py / modeling_siglip.py) -------

def act_fn(name, x):
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return F.gelu(x)
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return F.gelu(x, approximate="tanh")
    raise ValueError(name)


def vit_reference(vc, W, pixels, adapt=None):
    """vc: the vision config dict; W: unprefixed name -> float64 tensor; pixels [B,3,S,S].
    adapt(name, x, b) -> the projection's output before its bias, given b = x W0^T (a gated adapter's
    h = b + S m), for every projection ("encoder.layers.L.self_attn.q_proj", ...); None: plain.
    Returns (hidden_states list of [B,T,C], post_layernorm function)."""
    clip = vc["model_type"] == "clip_vision_model"
    C, H, P, eps = vc["hidden_size"], vc["num_attention_heads"], vc["patch_size"], vc["layer_norm_eps"]
    D = C // H
    B = pixels.shape[0]
    x = F.conv2d(pixels, W["embeddings.patch_embedding.weight"], W.get("embeddings.patch_embedding.bias"),
                 stride=P)
    x = x.flatten(2).transpose(1, 2)  # [B, N, C]
    if clip:
        x = torch.cat([W["embeddings.class_embedding"].expand(B, 1, C), x], dim=1)
    x = x + W["embeddings.position_embedding.weight"][None]
    if clip:
        x = F.layer_norm(x, (C,), W["pre_layrnorm.weight"], W["pre_layrnorm.bias"], eps)
    hs = [x]
    T = x.shape[1]
    for L in range(vc["num_hidden_layers"]):
        p = "encoder.layers.%d." % L

        def lin(h, name):
            if adapt is None:
                return F.linear(h, W[p + name + ".weight"], W[p + name + ".bias"])
            return adapt(p + name, h, F.linear(h, W[p + name + ".weight"])) + W[p + name + ".bias"]

        r = x
        h = F.layer_norm(x, (C,), W[p + "layer_norm1.weight"], W[p + "layer_norm1.bias"], eps)
        q = lin(h, "self_attn.q_proj") * D ** -0.5
        k = lin(h, "self_attn.k_proj")
        v = lin(h, "self_attn.v_proj")
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v  # no mask: bidirectional
        a = a.transpose(1, 2).reshape(B, T, C)
        x = r + lin(a, "self_attn.out_proj")
        r = x
        h = F.layer_norm(x, (C,), W[p + "layer_norm2.weight"], W[p + "layer_norm2.bias"], eps)
        h = lin(act_fn(vc["hidden_act"], lin(h, "mlp.fc1")), "mlp.fc2")
        x = r + h
        hs.append(x)

    def post(t):
        return F.layer_norm(t, (C,), W["post_layernorm.weight"], W["post_layernorm.bias"], eps)
    return hs, post


def pooled_ref(vc, W, hs, post):
    """pooler_output: CLIP post_layernorm(last)[:, 0]; SigLIP head(post_layernorm(last)) (transformers'
    SiglipMultiheadAttentionPoolingHead through nn.MultiheadAttention), or the mean over the patches
    of post_layernorm(last) without a head."""
    last = post(hs[-1])
    if vc["model_type"] == "clip_vision_model":
        return last[:, 0]
    if "head.probe" not in W:
        return last.mean(dim=1)
    C, H, eps = vc["hidden_size"], vc["num_attention_heads"], vc["layer_norm_eps"]
    B = last.shape[0]
    a, _ = F.multi_head_attention_forward(
        W["head.probe"].expand(B, 1, C).transpose(0, 1), last.transpose(0, 1), last.transpose(0, 1), C, H,
        W["head.attention.in_proj_weight"], W["head.attention.in_proj_bias"], None, None, False, 0.0,
        W["head.attention.out_proj.weight"], W["head.attention.out_proj.bias"], training=False,
        need_weights=False)
    a = a.transpose(0, 1)  # [B, 1, C]
    h = F.layer_norm(a, (C,), W["head.layernorm.weight"], W["head.layernorm.bias"], eps)
    h = F.linear(act_fn(vc["hidden_act"], F.linear(h, W["head.mlp.fc1.weight"], W["head.mlp.fc1.bias"])),
                 W["head.mlp.fc2.weight"], W["head.mlp.fc2.bias"])
    return (a + h)[:, 0]


def select_ref(vc, hs, post, layer, feature, post_norm):
    h = hs[layer]
    if post_norm:
        h = post(h)
    if feature == "patch" and vc["model_type"] == "clip_vision_model":
        h = h[:, 1:]
    return h


def projector_reference(kind, w, x, dy):
    """w: dict w1, b1 (, w2, b2) float64; returns y, dx, {key: grad}."""
    p = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in w.items()}
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    y = F.linear(xt, p["w1"], p["b1"])
    if kind == "mlp2x_gelu":
        y = F.linear(F.gelu(y), p["w2"], p["b2"])  # exact erf GELU (nn.GELU())
    (y * torch.tensor(dy, dtype=torch.float64)).sum().backward()
    return y.detach().numpy(), xt.grad.numpy(), {k: t.grad.numpy() for k, t in p.items()}


# ---- harness ---------------------------------------------------------------------------------------

class Checks:
    def __init__(self):
        self.failed = 0
        self.n = 0

    def ok(self, cond, what, detail=""):
        self.n += 1
        print("  %-4s %s%s" % ("ok" if cond else "FAIL", what, ("  -- " + detail) if (detail and not cond) else ""))
        if not cond:
            self.failed += 1
        return cond

    def close(self, got, ref, tol, what, scale="abs"):
        got = np.asarray(got, np.float64)
        ref = np.asarray(ref, np.float64)
        if got.shape != ref.shape:
            return self.ok(False, what, "shape %s, expected %s" % (got.shape, ref.shape))
        err = float(np.max(np.abs(got - ref))) if got.size else 0.0
        mref = float(np.max(np.abs(ref))) if ref.size else 0.0
        bound = tol * (max(1.0, mref) if scale == "abs" else max(mref, 1e-12))
        finite = bool(np.all(np.isfinite(got)))
        self.n += 1
        good = finite and err <= bound
        print("  %-4s %s: max abs err %.3e (max|ref| %.3g, bound %.1e)" % ("ok" if good else "FAIL", what, err, mref, bound))
        if not good:
            self.failed += 1
        return good


def run(cmd):
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="2"))


def probe_encode(probe, model, pixels_path, out, layer, feature, post=False, prefix=None, batch=None):
    cmd = [probe, "encode", "--model", model, "--input", pixels_path, "--out", out, "--layer", str(layer),
           "--feature", feature]
    if post:
        cmd.append("--post-norm")
    if prefix:
        cmd += ["--prefix", prefix]
    if batch:
        cmd += ["--batch", str(batch)]
    return run(cmd)


# Encoder cases: make_random_vit arguments, pixels batch, selections (layer, feature, post_norm, batch).
VIT_CASES = [
    dict(name="e1_clip_f32_vision", mk=dict(kind="clip", hidden=64, layers=3, heads=4, inter=96, image=32,
                                            patch=8, dtype="F32", config="vision", prefix="vision_model."),
         B=3, sel=[(-2, "patch", False, None), (-1, "cls_patch", False, None), (0, "cls_patch", False, None),
                   (-1, "patch", True, None), (2, "patch", False, 2), (-4, "patch", False, 1),
                   (3, "cls_patch", False, None)]),
    dict(name="e2_clip_bf16_llava_gelu", mk=dict(kind="clip", hidden=48, layers=2, heads=4, inter=80, image=28,
                                                 patch=7, dtype="BF16", config="llava", act="gelu",
                                                 prefix="vision_tower.vision_model.", extra=True),
         B=2, auto_prefix=True, sel=[(-2, "patch", False, None), (-1, "cls_patch", False, None)]),
    dict(name="e3_siglip_f32_full", mk=dict(kind="siglip", hidden=64, layers=3, heads=8, inter=112, image=32,
                                            patch=8, dtype="F32", config="full", prefix="vision_model.",
                                            extra=True),
         B=2, sel=[(-2, "patch", False, None), (-1, "patch", True, None), (-1, "cls_patch", False, None),
                   (1, "full", False, 1)]),
    dict(name="e4_siglip_bf16_sharded_prefix", mk=dict(kind="siglip", hidden=32, layers=2, heads=2, inter=64,
                                                       image=24, patch=6, dtype="BF16", config="vision",
                                                       prefix="model.vision_tower.vision_tower.vision_model."),
         B=2, shards=2, sel=[(-2, "patch", False, None), (-1, "default", True, None)]),
    dict(name="e5_clip_f16_hf452_prefix", mk=dict(kind="clip", hidden=32, layers=2, heads=4, inter=64, image=16,
                                                  patch=4, dtype="F16", config="llava",
                                                  prefix="model.vision_tower.vision_model."),
         B=1, auto_prefix=True, sel=[(-2, "patch", False, None)]),
]


def vit_case(case, probe, tmp, chk):
    d = os.path.join(tmp, case["name"])
    mk = dict(case["mk"])
    cfg, stored = MV.make(os.path.join(d, "model"), std=0.15, noisy=True, seed=zlib.crc32(case["name"].encode()) % 1000, **mk)
    model = os.path.join(d, "model")
    if case.get("shards"):  # re-save as shards + index
        os.remove(os.path.join(model, "model.safetensors"))
        names = sorted(stored)
        half = len(names) // 2
        st.save_sharded(model, {k: (mk["dtype"], v) for k, v in stored.items()}, [names[:half], names[half:]])
    vc = cfg.get("vision_config", cfg)
    prefix = mk["prefix"]
    W = {k[len(prefix):]: torch.tensor(v, dtype=torch.float64) for k, v in stored.items() if k.startswith(prefix)}
    rng = np.random.default_rng(5)
    S = vc["image_size"]
    pixels = rng.standard_normal((case["B"], 3, S, S)).astype(np.float32)
    pix_path = os.path.join(d, "pixels.safetensors")
    st.save(pix_path, {"pixels": pixels})
    hs, post = vit_reference(vc, W, torch.tensor(pixels, dtype=torch.float64))
    for i, (layer, feature, post_norm, batch) in enumerate(case["sel"]):
        out = os.path.join(d, "out%d.safetensors" % i)
        p = probe_encode(probe, model, pix_path, out, layer, feature, post_norm,
                         None if case.get("auto_prefix") else prefix, batch)
        what = "%s layer %d %s%s%s" % (case["name"], layer, feature, " post_norm" if post_norm else "",
                                       " batch %d" % batch if batch else "")
        if not chk.ok(p.returncode == 0, what + ": probe exits 0", p.stderr.strip()):
            continue
        got = st.load(out)["features"]
        feat = "patch" if feature in ("patch", "default") else "cls_patch"
        ref = select_ref(vc, hs, post, layer, feat, post_norm).numpy()
        chk.close(got, ref, TOL_VIT, what)
    # the comparison must be able to fail: the neighbouring layer differs by far more than the bound
    diff = float((hs[-1] - hs[-2]).abs().max())
    chk.ok(diff > 100 * TOL_VIT * max(1.0, float(hs[-2].abs().max())),
           "%s: hidden_states[-1] and [-2] differ by %.3g (the test can tell layers apart)" % (case["name"], diff))


# Gradient cases: the training forward and backward (vision_probe grad) against torch autograd in
# float64: out, d pixels and the gradient of every tensor of the tower, each to 1e-4 of its max |ref|
# (k_proj.bias, whose gradient is 0 up to rounding, to 1e-4 of its k_proj.weight gradient's max).
GRAD_CASES = [
    dict(name="g1_clip_pooled", mk=dict(kind="clip", hidden=32, layers=2, heads=4, inter=48, image=16, patch=4,
                                        dtype="F32", config="vision", prefix="vision_model."), B=2, sel="pooled"),
    dict(name="g2_clip_layer_patch", mk=dict(kind="clip", hidden=32, layers=3, heads=2, inter=40, image=12,
                                             patch=4, dtype="F32", config="llava",
                                             prefix="vision_tower.vision_model."),
         B=2, sel=(-2, "patch", False)),
    dict(name="g3_siglip_head_pooled", mk=dict(kind="siglip", hidden=32, layers=2, heads=4, inter=56, image=16,
                                               patch=4, dtype="F32", config="vision", prefix="vision_model.",
                                               extra=True), B=3, sel="pooled"),
    dict(name="g4_siglip_nohead_pooled", mk=dict(kind="siglip", hidden=24, layers=2, heads=3, inter=40, image=12,
                                                 patch=6, dtype="F32", config="vision", prefix="vision_model."),
         B=2, sel="pooled"),
    dict(name="g5_siglip_post_norm_gelu", mk=dict(kind="siglip", hidden=32, layers=2, heads=4, inter=48, image=16,
                                                  patch=8, dtype="F32", config="full", prefix="vision_model.",
                                                  act="gelu"), B=2, sel=(-1, "patch", True)),
]


def grad_case(case, probe, tmp, chk):
    d = os.path.join(tmp, case["name"])
    mk = dict(case["mk"])
    cfg, stored = MV.make(os.path.join(d, "model"), std=0.15, noisy=True,
                          seed=zlib.crc32(case["name"].encode()) % 1000, **mk)
    vc = cfg.get("vision_config", cfg)
    prefix = mk["prefix"]
    W = {k[len(prefix):]: torch.tensor(v, dtype=torch.float64, requires_grad=True)
         for k, v in stored.items() if k.startswith(prefix)}
    rng = np.random.default_rng(9)
    S = vc["image_size"]
    pixels = rng.standard_normal((case["B"], 3, S, S)).astype(np.float32)
    px = torch.tensor(pixels, dtype=torch.float64, requires_grad=True)
    hs, post = vit_reference(vc, W, px)
    if case["sel"] == "pooled":
        out = pooled_ref(vc, W, hs, post)[:, None]
        extra = ["--pooled"]
    else:
        layer, feature, post_norm = case["sel"]
        out = select_ref(vc, hs, post, layer, feature, post_norm)
        extra = ["--layer", str(layer), "--feature", feature] + (["--post-norm"] if post_norm else [])
    dout = rng.standard_normal(tuple(out.shape)).astype(np.float32)
    (out * torch.tensor(dout, dtype=torch.float64)).sum().backward()
    io_path = os.path.join(d, "io.safetensors")
    st.save(io_path, {"pixels": pixels, "dout": dout})
    res = os.path.join(d, "grad.safetensors")
    p = run([probe, "grad", "--model", os.path.join(d, "model"), "--input", io_path, "--out", res] + extra)
    if not chk.ok(p.returncode == 0, "%s: probe exits 0" % case["name"], p.stderr.strip()):
        return
    got = st.load(res)
    chk.close(got["out"], out.detach().numpy(), TOL_VIT, "%s: out" % case["name"], scale="rel")
    chk.close(got["dpixels"], px.grad.numpy(), TOL_VIT, "%s: d pixels" % case["name"], scale="rel")
    names = sorted(k for k in got if k.startswith("grad."))
    chk.ok(set(n[5:] for n in names) == set(W), "%s: a gradient for exactly the tower's %d tensors" %
           (case["name"], len(W)), "got %s" % names)
    worst, wname = 0.0, ""
    for n in names:
        ref = W[n[5:]].grad
        ref = np.zeros(tuple(W[n[5:]].shape)) if ref is None else ref.numpy()
        g = np.asarray(got[n], np.float64).reshape(ref.shape)
        scale = float(np.max(np.abs(ref)))
        if n.endswith("k_proj.bias"):  # exactly 0 (softmax ignores a shift shared by a row): relative to
            kw = W[n[5:-4] + "weight"].grad  # the same projection's weight gradient instead
            scale = float(kw.abs().max()) if kw is not None else 1.0
        err = float(np.max(np.abs(g - ref))) / max(scale, 1e-12)
        if not np.all(np.isfinite(g)):
            err = float("inf")
        if err > worst:
            worst, wname = err, n[5:]
        if err > TOL_VIT:
            chk.ok(False, "%s: grad %s" % (case["name"], n[5:]), "max abs err / max|ref| %.3e" % err)
    chk.ok(worst <= TOL_VIT, "%s: every parameter gradient within %.0e (worst %.3e, %s)" %
           (case["name"], TOL_VIT, worst, wname))


def self_checks(chk):
    """The reference against things it must reproduce, independent of the C code."""
    vc = MV.vision_config("clip", 16, 1, 2, 24, 8, 4)
    _, stored = MV.make(None, kind="clip", hidden=16, layers=1, heads=2, inter=24, image=8, patch=4,
                        std=0.3, noisy=True, write=False)
    W = {k[len("vision_model."):]: torch.tensor(v, dtype=torch.float64) for k, v in stored.items()}
    px = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    hs, _ = vit_reference(vc, W, px)
    # images are independent: one at a time == batched
    one = vit_reference(vc, W, px[1:])[0][-1]
    chk.ok(torch.allclose(one, hs[-1][1:], atol=1e-12), "reference: images are independent")
    # patch embedding by hand (im2col) == conv2d
    w = W["embeddings.patch_embedding.weight"]
    patch = px[0, :, 4:8, 0:4].reshape(-1)  # patch row 1, column 0 = index 2
    emb = w.reshape(16, -1) @ patch + W["embeddings.position_embedding.weight"][1 + 2]
    pre = F.layer_norm(torch.cat([(W["embeddings.class_embedding"] + W["embeddings.position_embedding.weight"][0])[None],
                                  emb[None]]), (16,), W["pre_layrnorm.weight"], W["pre_layrnorm.bias"], 1e-5)
    chk.ok(torch.allclose(pre[1], hs[0][0, 3], atol=1e-12) and torch.allclose(pre[0], hs[0][0, 0], atol=1e-12),
           "reference: conv patch embedding == hand im2col, class token first")
    # attention is bidirectional: the first token's output depends on the last patch
    px2 = px.clone()
    px2[:, :, 4:, 4:] += 1.0
    chk.ok(float((vit_reference(vc, W, px2)[0][-1][:, 0] - hs[-1][:, 0]).abs().max()) > 1e-3,
           "reference: attention sees later tokens (no causal mask)")
    # a wrong activation would be caught
    vc2 = dict(vc, hidden_act="gelu")
    diff = float((vit_reference(vc2, W, px)[0][-1] - hs[-1]).abs().max())
    chk.ok(diff > 10 * TOL_VIT, "reference: quick_gelu vs gelu differ by %.2g (> 10x tolerance)" % diff)


BAD_CASES = [
    # name, mutation, expected substrings of the single stderr line
    ("bad_shape", "shape", ["model.safetensors", "vision_model.encoder.layers.1.mlp.fc1.weight", "shape"]),
    ("missing_tensor", "missing", ["vision_model.encoder.layers.1.mlp.fc2.bias", "missing"]),
    ("clip_config_siglip_weights", "clip_cfg_siglip", ["vision_model.embeddings.class_embedding", "missing"]),
    ("siglip_config_clip_weights", "siglip_cfg_clip", ["class_embedding", "SigLIP"]),
    ("unknown_model_type", "model_type", ["config.json", "model_type", "vit_mae"]),
    ("original_llava_config", "llava_orig", ["config.json", "mm_vision_tower", "openai/clip-vit-large-patch14-336"]),
    ("bad_layer", "layer", ["layer 3 out of range"]),
    ("bad_pixels", "pixels", ["pixels.safetensors", "pixels must be"]),
    ("no_tower", "prefix", ["no vision tower found"]),
    ("bad_heads", "heads", ["config.json", "num_attention_heads"]),
]


def bad_case(name, mut, expect, probe, tmp, chk):
    d = os.path.join(tmp, name)
    model = os.path.join(d, "model")
    kind = "siglip" if mut == "clip_cfg_siglip" else "clip"
    cfg, stored = MV.make(model, kind=kind, hidden=16, layers=2, heads=2, inter=24, image=8, patch=4, seed=1)
    S = 8
    pixels = np.zeros((1, 3, S, S), np.float32)
    layer = -2
    if mut == "shape":
        stored["vision_model.encoder.layers.1.mlp.fc1.weight"] = stored["vision_model.encoder.layers.1.mlp.fc1.weight"].T.copy()
    elif mut == "missing":
        del stored["vision_model.encoder.layers.1.mlp.fc2.bias"]
    elif mut == "clip_cfg_siglip":
        cfg = dict(cfg, model_type="clip_vision_model", hidden_act="quick_gelu")
    elif mut == "siglip_cfg_clip":
        cfg = dict(cfg, model_type="siglip_vision_model")
    elif mut == "model_type":
        cfg = dict(cfg, model_type="vit_mae")
    elif mut == "llava_orig":
        cfg = {"model_type": "llava_llama", "mm_vision_tower": "openai/clip-vit-large-patch14-336",
               "mm_projector_type": "mlp2x_gelu", "hidden_size": 64}
    elif mut == "layer":
        layer = 3
    elif mut == "pixels":
        pixels = np.zeros((1, 3, S, S + 1), np.float32)
    elif mut == "prefix":
        stored = {"encoder." + k: v for k, v in stored.items()}
    elif mut == "heads":
        cfg = dict(cfg, num_attention_heads=3)
    MV.save_safetensors(os.path.join(model, "model.safetensors"), stored, "F32")
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump(cfg, f)
    pix_path = os.path.join(d, "pixels.safetensors")
    st.save(pix_path, {"pixels": pixels})
    p = probe_encode(probe, model, pix_path, os.path.join(d, "out.safetensors"), layer, "patch")
    line = p.stderr.strip()
    good = p.returncode == 1 and len(line.splitlines()) == 1 and all(s in line for s in expect)
    chk.ok(good, "%s: exit 1 with one line naming %s" % (name, ", ".join(expect)),
           "rc %d, stderr %r" % (p.returncode, line))
    if good:
        print("       (%s)" % line)


PROJ_CASES = [
    dict(name="p1_mlp2x_original_f32", kind="mlp2x_gelu", layout="original", dtype="F32", I=24, O=40, N=7),
    dict(name="p2_linear_original_bf16", kind="linear", layout="original", dtype="BF16", I=20, O=12, N=5),
    dict(name="p3_mlp2x_llava_hf_dir", kind="mlp2x_gelu", layout="hf", dtype="F32", I=16, O=24, N=6),
    dict(name="p4_mlp2x_hf452_bf16_dir", kind="mlp2x_gelu", layout="hf452", dtype="BF16", I=12, O=20, N=3),
]

NAMES = {
    ("original", "mlp2x_gelu"): ["model.mm_projector.0.weight", "model.mm_projector.0.bias",
                                 "model.mm_projector.2.weight", "model.mm_projector.2.bias"],
    ("original", "linear"): ["model.mm_projector.weight", "model.mm_projector.bias"],
    ("hf", "mlp2x_gelu"): ["multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_1.bias",
                           "multi_modal_projector.linear_2.weight", "multi_modal_projector.linear_2.bias"],
    ("hf452", "mlp2x_gelu"): ["model.multi_modal_projector.linear_1.weight",
                              "model.multi_modal_projector.linear_1.bias",
                              "model.multi_modal_projector.linear_2.weight",
                              "model.multi_modal_projector.linear_2.bias"],
}


def proj_case(case, probe, tmp, chk):
    d = os.path.join(tmp, case["name"])
    os.makedirs(d)
    rng = np.random.default_rng(11)
    I, O, N, kind = case["I"], case["O"], case["N"], case["kind"]
    w = {"w1": rng.standard_normal((O, I)) * 0.3, "b1": rng.standard_normal(O) * 0.3}
    if kind == "mlp2x_gelu":
        w["w2"] = rng.standard_normal((O, O)) * 0.3
        w["b2"] = rng.standard_normal(O) * 0.3
    w = {k: MV.to_stored(v.astype(np.float32), case["dtype"])[1] for k, v in w.items()}
    names = NAMES[(case["layout"], kind)]
    tensors = dict(zip(names, [w[k] for k in ("w1", "b1", "w2", "b2") if k in w]))
    if case["layout"] == "original":
        path = os.path.join(d, "mm_projector.safetensors")
    else:  # a llava-hf directory: the projector among other tensors
        path = os.path.join(d, "llava")
        os.makedirs(path)
        tensors["language_model.model.embed_tokens.weight"] = np.ones((4, O), np.float32)
        tensors["vision_tower.vision_model.post_layernorm.weight"] = np.ones(I, np.float32)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"model_type": "llava", "projector_hidden_act": "gelu"}, f)
    MV.save_safetensors(path if case["layout"] == "original" else os.path.join(path, "model.safetensors"),
                        tensors, case["dtype"])
    x = rng.standard_normal((N, I)).astype(np.float32)
    dy = rng.standard_normal((N, O)).astype(np.float32)
    io_path = os.path.join(d, "io.safetensors")
    st.save(io_path, {"x": x, "dy": dy})
    out = os.path.join(d, "out.safetensors")
    save = os.path.join(d, "saved", "mm_projector.safetensors")
    os.makedirs(os.path.dirname(save))
    p = run([probe, "project", "--proj", path, "--kind", kind, "--input", io_path, "--out", out, "--save", save])
    if not chk.ok(p.returncode == 0, "%s: probe exits 0" % case["name"], p.stderr.strip()):
        return
    got = st.load(out)
    y, dx, grads = projector_reference(kind, {k: v.astype(np.float64) for k, v in w.items()},
                                       x.astype(np.float64), dy.astype(np.float64))
    chk.close(got["y"], y, TOL_PROJ, "%s: y" % case["name"], scale="rel")
    chk.close(got["dx"], dx, TOL_PROJ, "%s: dx" % case["name"], scale="rel")
    saved_names = NAMES[("original", kind)]
    for key, nm in zip(("w1", "b1", "w2", "b2"), saved_names):
        if key in grads:
            chk.close(got["grad." + nm], grads[key], TOL_PROJ, "%s: d%s (%s)" % (case["name"], key, nm), scale="rel")
    saved = st.load(save)
    want = {nm: w[k] for k, nm in zip(("w1", "b1", "w2", "b2"), saved_names) if k in w}
    chk.ok(set(saved) == set(want) and all(np.array_equal(saved[k], want[k]) for k in want),
           "%s: saved mm_projector.safetensors has the original keys %s and the exact values" %
           (case["name"], ", ".join(sorted(want))), "got %s" % sorted(saved))


def proj_bad(probe, tmp, chk):
    d = os.path.join(tmp, "proj_bad")
    os.makedirs(d)
    path = os.path.join(d, "mm_projector.safetensors")
    MV.save_safetensors(path, {"model.mm_projector.0.weight": np.zeros((4, 3), np.float32),
                               "model.mm_projector.0.bias": np.zeros(4, np.float32),
                               "model.mm_projector.2.weight": np.zeros((4, 5), np.float32),
                               "model.mm_projector.2.bias": np.zeros(4, np.float32)}, "F32")
    io_path = os.path.join(d, "io.safetensors")
    st.save(io_path, {"x": np.zeros((2, 3), np.float32), "dy": np.zeros((2, 4), np.float32)})
    for kind, expect in (("linear", ["mm_projector.safetensors", "expected linear"]),
                         ("mlp2x_gelu", ["mm_projector.safetensors", "model.mm_projector.2.weight", "[4, 4]"])):
        p = run([probe, "project", "--proj", path, "--kind", kind, "--input", io_path, "--out",
                 os.path.join(d, "out.safetensors")])
        line = p.stderr.strip()
        chk.ok(p.returncode == 1 and all(s in line for s in expect),
               "projector %s on a bad file: exit 1 naming %s" % (kind, ", ".join(expect)), repr(line))
        print("       (%s)" % line)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tspeft", required=True, help="the tspeft binary; the helper is BUILD/tests/vision_probe")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--case", action="append", help="run only cases whose name starts with this")
    args = ap.parse_args()
    probe = os.path.join(os.path.dirname(os.path.abspath(args.tspeft)), "tests", "vision_probe")
    if not os.access(probe, os.X_OK):
        print("test_vision_parity: helper %s not found (build the vision_probe target)" % probe)
        return 1
    chk = Checks()
    tmp = tempfile.mkdtemp(prefix="tspeft_vision_parity_")

    def want(name):
        return not args.case or any(name.startswith(c) for c in args.case)
    try:
        if not args.case:
            print("self-checks of the reference:")
            self_checks(chk)
        for c in VIT_CASES:
            if want(c["name"]):
                print("%s:" % c["name"])
                vit_case(c, probe, tmp, chk)
        for c in GRAD_CASES:
            if want(c["name"]):
                print("%s:" % c["name"])
                grad_case(c, probe, tmp, chk)
        for name, mut, expect in BAD_CASES:
            if want(name):
                print("%s:" % name)
                bad_case(name, mut, expect, probe, tmp, chk)
        for c in PROJ_CASES:
            if want(c["name"]):
                print("%s:" % c["name"])
                proj_case(c, probe, tmp, chk)
        if want("proj_bad"):
            print("proj_bad:")
            proj_bad(probe, tmp, chk)
    finally:
        if args.keep or chk.failed:
            print("kept %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if chk.n == 0:
        print("test_vision_parity: no case matched")
        return 2
    print("test_vision_parity: %d checks, %d failed" % (chk.n, chk.failed))
    return 1 if chk.failed else 0


if __name__ == "__main__":
    sys.exit(main())
