#!/usr/bin/python3
"""Position-embedding interpolation parity: vision/pos_interp.c and a tower run at another image size
against torch.

    /usr/bin/python3 tests/parity/test_pos_interp_parity.py --tspeft build/tspeft [--keep]

The C side is BUILD/tests/pos_interp_probe (tests/vision/pos_interp_probe.c), found beside tspeft.

map: for grids up, down, rectangular, 1 x 1 and unchanged, with CLIP's class row (prefix 1) and
  without (SigLIP), random x [n_old, C] and dy [n_new, C]: the probe's forward y = M x and backward
  dx = M^T dy against transformers' interpolate_pos_encoding written in plain torch (the class row
  split off, the grid reshaped to [1, C, h, w], F.interpolate(size=(h', w'), mode="bicubic",
  align_corners=False), back to rows) in float64, dx from autograd. Bound: max abs error <=
  1e-5 * max(1, max|ref|) per map, and 1e-5 absolute over all of them. The float32 run of the same
  torch code is reported beside it.
encode: tiny random CLIP and SigLIP towers (examples/make_random_vit.py) encoded by the probe at an
  image size other than their image_size (tk_vit_set_image_size), against the float64 reference
  tower of test_vision_parity.py given the interpolated position embeddings; bound 1e-4 as there.
Exit status 1 when anything fails.
"""
import argparse
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

import make_random_vit as MV  # noqa: E402
import st  # noqa: E402
from test_vision_parity import Checks, select_ref, vit_reference  # noqa: E402

torch.set_num_threads(2)
TOL_MAP = 1e-5
TOL_VIT = 1e-4


def interp_reference(pos, prefix, ho, wo, hn, wn):
    """transformers' interpolate_pos_encoding: pos [prefix + ho*wo, C] -> [prefix + hn*wn, C]."""
    C = pos.shape[1]
    cls, grid = pos[:prefix], pos[prefix:]
    g = grid.reshape(1, ho, wo, C).permute(0, 3, 1, 2)
    g = F.interpolate(g, size=(hn, wn), mode="bicubic", align_corners=False)
    g = g.permute(0, 2, 3, 1).reshape(hn * wn, C)
    return torch.cat([cls, g], dim=0)


def run(cmd):
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="2"))


MAPS = [  # (h_old, w_old, h_new, w_new, prefix, C)
    (4, 4, 6, 6, 1, 8), (6, 6, 4, 4, 0, 8), (3, 5, 7, 2, 1, 5), (1, 1, 3, 3, 0, 4), (5, 5, 5, 5, 1, 6),
    (24, 24, 32, 32, 1, 16), (16, 16, 27, 27, 0, 12), (24, 24, 16, 16, 1, 8),
]


def map_cases(probe, tmp, chk):
    rng = np.random.default_rng(3)
    worst = 0.0
    for ho, wo, hn, wn, pre, C in MAPS:
        what = "map %dx%d -> %dx%d prefix %d" % (ho, wo, hn, wn, pre)
        x = rng.standard_normal((pre + ho * wo, C)).astype(np.float32)
        dy = rng.standard_normal((pre + hn * wn, C)).astype(np.float32)
        inp, out = os.path.join(tmp, "map_in.safetensors"), os.path.join(tmp, "map_out.safetensors")
        st.save(inp, {"x": x, "dy": dy})
        p = run([probe, "map", "--grid", str(ho), str(wo), str(hn), str(wn), "--prefix", str(pre), "--input", inp,
                 "--out", out])
        if not chk.ok(p.returncode == 0, what + ": probe exits 0", p.stderr.strip()):
            continue
        got = st.load(out)
        xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        ref = interp_reference(xt, pre, ho, wo, hn, wn)
        (ref * torch.tensor(dy, dtype=torch.float64)).sum().backward()
        ref32 = interp_reference(torch.tensor(x), pre, ho, wo, hn, wn).numpy()
        e32 = float(np.max(np.abs(ref32 - ref.detach().numpy())))
        chk.close(got["y"], ref.detach().numpy(), TOL_MAP, what + " forward (torch float32 itself: %.1e)" % e32)
        chk.close(got["dx"], xt.grad.numpy(), TOL_MAP, what + " backward = autograd")
        worst = max(worst, float(np.max(np.abs(got["y"] - ref.detach().numpy()))),
                    float(np.max(np.abs(got["dx"] - xt.grad.numpy()))))
    # the comparison can fail: align_corners=True or bilinear give other values on an upscale
    g = torch.tensor(rng.standard_normal((1, 2, 4, 4)))
    a = F.interpolate(g, size=(6, 6), mode="bicubic", align_corners=False)
    b = F.interpolate(g, size=(6, 6), mode="bicubic", align_corners=True)
    c = F.interpolate(g, size=(6, 6), mode="bilinear", align_corners=False)
    chk.ok(float((a - b).abs().max()) > 100 * TOL_MAP and float((a - c).abs().max()) > 100 * TOL_MAP,
           "the reference tells bicubic/align_corners=False from align_corners=True and bilinear")
    chk.ok(worst <= TOL_MAP, "max abs error over every map, forward and backward: %.2e (<= %.0e absolute)" % (worst, TOL_MAP))


ENC = [  # make_random_vit arguments, the size to run at, selections
    dict(name="clip_32_to_48", mk=dict(kind="clip", hidden=32, layers=2, heads=4, inter=48, image=32, patch=8,
                                       dtype="F32", config="vision", prefix="vision_model."), S=48,
         sel=[(-1, "cls_patch", False), (-2, "patch", False)]),
    dict(name="siglip_32_to_24", mk=dict(kind="siglip", hidden=32, layers=2, heads=4, inter=48, image=32, patch=8,
                                         dtype="F32", config="vision", prefix="vision_model."), S=24,
         sel=[(-1, "patch", True), (-2, "patch", False)]),
]


def encode_cases(probe, tmp, chk):
    for case in ENC:
        d = os.path.join(tmp, case["name"])
        cfg, stored = MV.make(os.path.join(d, "model"), std=0.15, noisy=True, seed=7, **case["mk"])
        vc = cfg.get("vision_config", cfg)
        pfx = case["mk"]["prefix"]
        W = {k[len(pfx):]: torch.tensor(v, dtype=torch.float64) for k, v in stored.items() if k.startswith(pfx)}
        P, S0, S = vc["patch_size"], vc["image_size"], case["S"]
        pre = 1 if vc["model_type"] == "clip_vision_model" else 0
        W2 = dict(W)
        W2["embeddings.position_embedding.weight"] = interp_reference(
            W["embeddings.position_embedding.weight"], pre, S0 // P, S0 // P, S // P, S // P)
        pixels = np.random.default_rng(9).standard_normal((2, 3, S, S)).astype(np.float32)
        pix = os.path.join(d, "pixels.safetensors")
        st.save(pix, {"pixels": pixels})
        hs, post = vit_reference(vc, W2, torch.tensor(pixels, dtype=torch.float64))
        for i, (layer, feature, post_norm) in enumerate(case["sel"]):
            out = os.path.join(d, "out%d.safetensors" % i)
            cmd = [probe, "encode", "--model", os.path.join(d, "model"), "--image-size", str(S), "--input", pix,
                   "--out", out, "--layer", str(layer), "--feature", feature]
            p = run(cmd + (["--post-norm"] if post_norm else []))
            what = "%s layer %d %s" % (case["name"], layer, feature)
            if not chk.ok(p.returncode == 0, what + ": probe exits 0", p.stderr.strip()):
                continue
            chk.close(st.load(out)["features"], select_ref(vc, hs, post, layer, feature, post_norm).numpy(), TOL_VIT,
                      what + " at %d px (checkpoint %d px)" % (S, S0))
        # the interpolation matters: the tower with its 4 x 4 embeddings cropped/tiled would differ
        hs0, _ = vit_reference(vc, dict(W, **{"embeddings.position_embedding.weight":
                                              W2["embeddings.position_embedding.weight"] * 0}),
                               torch.tensor(pixels, dtype=torch.float64))
        diff = float((hs0[-1] - hs[-1]).abs().max())
        chk.ok(diff > 100 * TOL_VIT, "%s: the position embeddings change the output by %.3g" % (case["name"], diff))
        # a size that is no multiple of the patch is refused with one line
        p = run([probe, "encode", "--model", os.path.join(d, "model"), "--image-size", str(S + 1), "--input", pix,
                 "--out", os.path.join(d, "bad.safetensors")])
        chk.ok(p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and "multiple" in p.stderr,
               "%s: --image-size %d (no multiple of %d) refused, one line" % (case["name"], S + 1, P), p.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tspeft", required=True, help="the tspeft binary; the helper is BUILD/tests/pos_interp_probe")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    probe = os.path.join(os.path.dirname(os.path.abspath(a.tspeft)), "tests", "pos_interp_probe")
    if not os.access(probe, os.X_OK):
        print("test_pos_interp_parity: helper %s not found (build the pos_interp_probe target)" % probe)
        return 1
    chk = Checks()
    tmp = tempfile.mkdtemp(prefix="tspeft_pos_interp_")
    try:
        print("maps:")
        map_cases(probe, tmp, chk)
        print("towers at another image size:")
        encode_cases(probe, tmp, chk)
    finally:
        if a.keep or chk.failed:
            print("kept %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print("test_pos_interp_parity: %d checks, %d failed" % (chk.n, chk.failed))
    return 1 if chk.failed else 0


if __name__ == "__main__":
    sys.exit(main())
