"""Image decoding and preprocessing (vision/image.c, vision/preprocess.c) against PIL and a numpy
transcription of Hugging Face's CLIPImageProcessor / SiglipImageProcessor and LLaVA's expand2square.

    /usr/bin/python3 tests/parity/test_vision_pil.py --tspeft build/tspeft [--keep DIR]

The C side is the helper BUILD/tests/vision_golden (tests/vision/vision_golden.c). Images come from
PIL, written by this test in every supported format (JPEG baseline/progressive/4:4:4/4:2:0/gray, PNG
RGB/L/RGBA/LA/P/1-bit, BMP RGB/L/P, GIF single and animated, PPM, PGM) at odd sizes, plus real
photographs of clothing from Debian's dataset-fashion-mnist (skipped, and said so, when absent).

Tolerances (docs/vision.md):
  decoded pixels, lossless formats      exact
  decoded pixels, JPEG                  stb_image's IDCT and chroma upsampling differ from libjpeg-
                                        turbo's: max |diff| <= JPEG_MAX levels except in the last row
                                        and column (odd sizes with subsampled chroma: the edge sample is
                                        upsampled differently, up to 64 levels seen), mean <= JPEG_MEAN
  resize / crop / pad (uint8)           exact (Pillow's fixed-point resampling reproduced)
  tensors (float32)                     max |diff| <= 1e-6 (the same float32 operations: 0 expected)
Exits 1 when any check fails, printing the largest differences.
"""
import argparse
import gzip
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np

try:
    from PIL import Image
except ImportError:  # python3-pil is in the Makefile's PACKAGES
    print("test_vision_pil: FAIL: python3-pil is not installed (run `make deps`)")
    sys.exit(1)

BICUBIC = getattr(Image, "Resampling", Image).BICUBIC
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FMNIST = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
JPEG_MAX = 4      # levels, all pixels but the last row and column
JPEG_MEAN = 1.0   # levels
TENSOR_TOL = 1e-6


class Checks:
    def __init__(self):
        self.failed = 0
        self.passed = 0

    def ok(self, cond, what, detail=""):
        print("  %-84s %s" % (what, "ok" if cond else "FAIL"))
        if cond:
            self.passed += 1
        else:
            self.failed += 1
            if detail:
                print("    " + str(detail).replace("\n", "\n    "))
        return cond


# ---- the reference (HF transformers' image_transforms / image processors, transcribed) ----

def hf_resize_shortest(img, size):
    """get_resize_output_image_size(default_to_square=False) + PIL resize (reducing_gap=None)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize((nw, nh), resample=BICUBIC, reducing_gap=None)


def hf_center_crop(a, ch, cw):
    """transformers.image_transforms.center_crop on an HWC array."""
    oh, ow = a.shape[:2]
    top = (oh - ch) // 2
    left = (ow - cw) // 2
    if top >= 0 and top + ch <= oh and left >= 0 and left + cw <= ow:
        return a[top:top + ch, left:left + cw]
    nh, nw = max(ch, oh), max(cw, ow)
    new = np.zeros((nh, nw) + a.shape[2:], dtype=a.dtype)
    tp = -(-(nh - oh) // 2)
    lp = -(-(nw - ow) // 2)
    new[tp:tp + oh, lp:lp + ow] = a
    top += tp
    left += lp
    return new[max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]


def hf_rescale_normalize(a, mean, std):
    x = (a.astype(np.float64) * (1 / 255)).astype(np.float32)       # rescale
    m = np.array(mean, dtype=np.float32)
    s = np.array(std, dtype=np.float32)
    x = (x - m) / s                                                   # normalize
    return np.ascontiguousarray(x.transpose(2, 0, 1))                 # channels first


def expand2square(img, bg):
    """LLaVA's llava/mm_utils.py expand2square."""
    w, h = img.size
    if w == h:
        return img
    s = max(w, h)
    out = Image.new(img.mode, (s, s), bg)
    out.paste(img, ((s - w) // 2, 0) if h > w else (0, (s - h) // 2))
    return out


def reference(img, mode, size):
    """(uint8 HWC before rescaling, float32 CHW tensor)."""
    img = img.convert("RGB")
    if mode == "siglip":
        px = np.array(img.resize((size, size), resample=BICUBIC, reducing_gap=None))
        return px, hf_rescale_normalize(px, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    if mode == "llava-pad":
        img = expand2square(img, tuple(int(x * 255) for x in CLIP_MEAN))
    px = hf_center_crop(np.array(hf_resize_shortest(img, size)), size, size)
    return px, hf_rescale_normalize(px, CLIP_MEAN, CLIP_STD)


# ---- the C side ----

class Golden:
    def __init__(self, helper, tmp):
        self.helper = helper
        self.tmp = tmp

    def run(self, args):
        out = os.path.join(self.tmp, "golden.out")
        if os.path.exists(out):
            os.remove(out)
        p = subprocess.run([self.helper] + [str(a) for a in args] + [out], capture_output=True, text=True)
        if p.returncode != 0:
            return None, p.stderr.strip()
        with open(out, "rb") as f:
            return f.read(), ""

    def image(self, args):
        data, msg = self.run(args)
        if data is None:
            return None, msg
        w, h = struct.unpack("<II", data[:8])
        return np.frombuffer(data[8:], dtype=np.uint8).reshape(h, w, 3), ""

    def tensor(self, mode, size, path):
        data, msg = self.run(["tensor", mode, size, path])
        if data is None:
            return None, msg
        return np.frombuffer(data, dtype="<f4").reshape(3, size, size), ""


def diff(a, b):
    if a is None or b is None or a.shape != b.shape:
        return None
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(d.max()), float(d.mean())


# ---- test images ----

def content(w, h, seed):
    """Smooth gradients, stripes, hard edges and noise: every resampling path sees detail."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 128 + 100 * np.sin(x / max(w, 1) * 7.0 + seed)
    g = 255.0 * y / max(h - 1, 1)
    b = np.where((x.astype(int) // 5 + y.astype(int) // 3) % 2 == 0, 230.0, 20.0)
    a = np.stack([r, g, b], axis=-1) + rng.normal(0, 18, size=(h, w, 3))
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def fmnist_images(n):
    if not os.path.exists(FMNIST):
        return None
    with gzip.open(FMNIST, "rb") as f:
        head = f.read(16)
        magic, count, rows, cols = struct.unpack(">IIII", head)
        assert magic == 0x803 and rows == 28 and cols == 28, "unexpected idx header in " + FMNIST
        raw = f.read(n * rows * cols)
    return np.frombuffer(raw, dtype=np.uint8).reshape(n, rows, cols)


def photo(items, w, h, seed):
    """A colour 'photograph' from Fashion-MNIST items: tinted, scaled with LANCZOS, on a gradient."""
    rng = np.random.default_rng(seed)
    base = content(w, h, seed).astype(np.float64) * 0.5
    img = Image.fromarray(base.astype(np.uint8))
    for k, it in enumerate(items):
        side = int(min(w, h) * 0.6)
        tile = Image.fromarray(it).resize((side, side), Image.LANCZOS)
        tint = rng.uniform(0.3, 1.0, size=3)
        rgb = (np.array(tile)[..., None] * tint).astype(np.uint8)
        img.paste(Image.fromarray(rgb), (int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))))
    return img


def write_cases(tmp, items):
    """[(name, path, lossless)] in every format the decoder supports."""
    cases = []

    def save(name, img, fmt, lossless=True, **kw):
        path = os.path.join(tmp, name)
        img.save(path, fmt, **kw)
        cases.append((name, path, lossless))

    rgb = Image.fromarray(content(37, 23, 1))
    tall = Image.fromarray(content(23, 41, 2))
    save("rgb_37x23.png", rgb, "PNG")
    save("gray_23x41.png", tall.convert("L"), "PNG")
    rgba = Image.fromarray(np.concatenate([content(50, 31, 3), content(50, 31, 4)[..., :1]], axis=-1), "RGBA")
    save("rgba_50x31.png", rgba, "PNG")
    save("la_17x29.png", Image.fromarray(content(17, 29, 5)).convert("LA"), "PNG")
    save("palette_33x33.png", Image.fromarray(content(33, 33, 6)).quantize(colors=37), "PNG")
    save("bilevel_19x13.png", Image.fromarray(content(19, 13, 7)).convert("1"), "PNG")
    save("rgb_1x1.png", Image.fromarray(content(1, 1, 8)), "PNG")
    save("rgb_37x23.bmp", rgb, "BMP")
    save("gray_31x17.bmp", Image.fromarray(content(31, 17, 9)).convert("L"), "BMP")
    save("palette_29x18.bmp", Image.fromarray(content(29, 18, 10)).quantize(colors=16), "BMP")
    save("palette_41x27.gif", Image.fromarray(content(41, 27, 11)).quantize(colors=64), "GIF")
    f1 = Image.fromarray(content(30, 20, 12)).quantize(colors=32)
    f2 = Image.fromarray(content(30, 20, 13)).quantize(colors=32)
    save("animated_30x20.gif", f1, "GIF", save_all=True, append_images=[f2], duration=100, loop=0)
    save("rgb_29x31.ppm", Image.fromarray(content(29, 31, 14)), "PPM")
    save("gray_31x29.pgm", Image.fromarray(content(31, 29, 15)).convert("L"), "PPM")
    # PNM with maxval != 255 (PIL scales round(v / maxval * 255)): 16-bit big-endian PPM, PGM maxval 100
    a16 = content(21, 11, 18).astype(np.uint16) * 257 + np.arange(21, dtype=np.uint16)[None, :, None]
    raw = {"rgb16_21x11.ppm": b"P6\n21 11\n65535\n" + a16.astype(">u2").tobytes(),
           "gray100_11x21.pgm": b"P5 11 21 100 " + (content(11, 21, 19)[..., 0] % 101).astype(np.uint8).tobytes()}
    for name, data in raw.items():
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            f.write(data)
        cases.append((name, path, True))
    jp = photo(items, 157, 103, 16) if items is not None else Image.fromarray(content(157, 103, 16))
    save("photo_157x103_444.jpg", jp, "JPEG", lossless=False, quality=95, subsampling=0)
    save("photo_157x103_420.jpg", jp, "JPEG", lossless=False, quality=85, subsampling=2)
    save("photo_157x103_prog.jpg", jp, "JPEG", lossless=False, quality=90, progressive=True)
    save("gray_37x23.jpg", rgb.convert("L"), "JPEG", lossless=False, quality=90)
    save("rgb_37x23_422.jpg", rgb, "JPEG", lossless=False, quality=90, subsampling=1)
    if items is not None:
        save("photo_301x203.png", photo(items, 301, 203, 17), "PNG")
        for i in range(3):
            save("fmnist_%d.png" % i, Image.fromarray(items[i]), "PNG")
    return cases


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tspeft", required=True, help="the tspeft binary; vision_golden is BUILD/tests/vision_golden")
    ap.add_argument("--keep", help="write the images here and keep them")
    args = ap.parse_args(argv)
    helper = os.path.join(os.path.dirname(os.path.abspath(args.tspeft)), "tests", "vision_golden")
    chk = Checks()
    if not os.path.exists(helper):
        chk.ok(False, "helper %s exists" % helper)
        return 1
    with tempfile.TemporaryDirectory(prefix="tk_vision_") as tmpd:
        tmp = args.keep or tmpd
        os.makedirs(tmp, exist_ok=True)
        g = Golden(helper, tmp)
        items = fmnist_images(8)
        if items is None:
            print("  skip  Fashion-MNIST photographs: %s absent (apt-get install dataset-fashion-mnist)" % FMNIST)
        cases = write_cases(tmp, items)

        print("== decoding (PIL Image.open(f).convert('RGB') vs stb_image)")
        jpeg_worst = (0.0, 0.0)
        for name, path, lossless in cases:
            want = np.array(Image.open(path).convert("RGB"))
            got, msg = g.image(["decode", path])
            d = diff(got, want)
            if d is None:
                chk.ok(False, "decode %s" % name, msg or "shape %s vs %s" % (None if got is None else got.shape,
                                                                           want.shape))
                continue
            if lossless:
                chk.ok(d[0] == 0, "decode %-26s exact (max diff %g)" % (name, d[0]))
            else:
                # The last column/row of an odd-sized image with subsampled chroma is upsampled
                # differently at the edge (libjpeg-turbo vs stb): bounded by the mean only.
                inner = diff(got[:-1, :-1], want[:-1, :-1]) if min(got.shape[:2]) > 1 else d
                jpeg_worst = (max(jpeg_worst[0], inner[0]), max(jpeg_worst[1], d[1]))
                chk.ok(inner[0] <= JPEG_MAX and d[1] <= JPEG_MEAN,
                       "decode %-26s inner max %g <= %d, edge max %g, mean %.3f <= %.1f"
                       % (name, inner[0], JPEG_MAX, d[0], d[1], JPEG_MEAN))
        print("  JPEG worst: inner max %g levels, mean %.3f" % jpeg_worst)

        print("== resize (PIL Image.resize(BICUBIC) vs C)")
        lossless = [(n, p) for n, p, ll in cases if ll]
        srcs = [c for c in lossless if c[0] in ("rgb_37x23.png", "gray_23x41.png", "photo_301x203.png", "rgb_1x1.png")]
        sizes = [(24, 24), (336, 336), (10, 7), (37, 12), (5, 23), (1, 1), (73, 46), (200, 3), (301, 150), (13, 211)]
        for name, path in srcs:
            img = Image.open(path).convert("RGB")
            for (w, h) in sizes:
                want = np.array(img.resize((w, h), resample=BICUBIC, reducing_gap=None))
                got, msg = g.image(["resize", path, w, h])
                d = diff(got, want)
                chk.ok(d is not None and d[0] == 0, "resize %-20s %4dx%-4d -> %4dx%-4d exact (max diff %s)" % (
                    name, img.size[0], img.size[1], w, h, None if d is None else d[0]), msg)

        print("== preprocessing (HF CLIP / LLaVA pad / SigLIP reference vs C)")
        pre = [(n, p, m, s) for n, p in lossless for m, s in (("clip", 24), ("llava-pad", 24), ("siglip", 16))]
        pre += [(n, p, m, s) for n, p in lossless if n.startswith("photo") or n.startswith("fmnist")
                for m, s in (("clip", 336), ("llava-pad", 336), ("siglip", 224))]
        pre += [(n, p, "clip", 40) for n, p in lossless if n in ("rgb_37x23.png", "rgb_1x1.png")]  # upscale
        worst = 0.0
        for name, path, mode, size in pre:
            want_px, want_t = reference(Image.open(path), mode, size)
            got_px, msg = g.image(["pixels", mode, size, path])
            d = diff(got_px, want_px)
            chk.ok(d is not None and d[0] == 0, "%-9s %3d %-24s uint8 exact (max diff %s)" % (
                mode, size, name, None if d is None else d[0]), msg)
            got_t, msg = g.tensor(mode, size, path)
            d = diff(got_t, want_t)
            if d is not None:
                worst = max(worst, d[0])
            chk.ok(d is not None and d[0] <= TENSOR_TOL, "%-9s %3d %-24s float32 max |diff| %s <= %g" % (
                mode, size, name, None if d is None else "%.3g" % d[0], TENSOR_TOL), msg)
        print("  tensors: largest |diff| %.3g" % worst)

        print("== errors")
        bad = os.path.join(tmp, "cut.png")
        with open(cases[0][1], "rb") as f:
            data = f.read()
        with open(bad, "wb") as f:
            f.write(data[:len(data) // 2])
        got, msg = g.image(["decode", bad])
        chk.ok(got is None and bad in msg and "\n" not in msg, "a truncated PNG: one line naming the file", msg)

    print("test_vision_pil: %d passed, %d failed" % (chk.passed, chk.failed))
    return 1 if chk.failed else 0


if __name__ == "__main__":
    sys.exit(main())
