"""Minimal safetensors reader/writer (numpy + json + struct), independent of the C implementation.

File layout: u64 little-endian header length N, N bytes of UTF-8 JSON
{name: {"dtype", "shape", "data_offsets": [begin, end)}, "__metadata__": {str: str}}, then the data
section (offsets are relative to its start). The writer pads the header with spaces to a multiple of
8 bytes and stores tensors contiguously in the given order.

    st.save(path, {"w": np.zeros((2, 3), np.float32), "b": ("BF16", arr)})
    tensors = st.load(path)             # name -> numpy array (BF16/F16 widened to float32 unless raw)
    st.save_sharded(dirpath, tensors, [names_of_shard1, names_of_shard2])

Supported dtypes: F32, F16, BF16, I64 (plus I32, U8, F64, BOOL on read).
"""
import json
import os
import struct

import numpy as np

# dtype name -> (numpy dtype used for the raw bytes, element size)
_RAW = {
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),
    "I64": (np.dtype("<i8"), 8),
    "I32": (np.dtype("<i4"), 4),
    "U8": (np.dtype("u1"), 1),
    "F64": (np.dtype("<f8"), 8),
    "BOOL": (np.dtype("u1"), 1),
}


class FormatError(ValueError):
    pass


def f32_to_bf16_bits(a):
    """Round float32 values to bfloat16 (round to nearest, ties to even) and return the uint16 bits.
    NaN stays a (quiet) NaN."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    bits = a.view(np.uint32).astype(np.uint64)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    out = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        out[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return out


def bf16_bits_to_f32(u):
    """Exact widening of bfloat16 bits (uint16) to float32."""
    u = np.ascontiguousarray(u, dtype=np.uint16)
    return (u.astype(np.uint32) << 16).view(np.float32)


def _dtype_of(arr):
    if arr.dtype == np.float32:
        return "F32"
    if arr.dtype == np.float16:
        return "F16"
    if arr.dtype == np.int64:
        return "I64"
    if arr.dtype == np.int32:
        return "I32"
    if arr.dtype == np.float64:
        return "F64"
    if arr.dtype == np.uint8:
        return "U8"
    if arr.dtype == np.bool_:
        return "BOOL"
    raise TypeError("unsupported numpy dtype %s" % arr.dtype)


def _encode(value):
    """value: numpy array, or (dtype_name, array) to force a stored dtype. Returns (dtype, shape, bytes)."""
    if isinstance(value, tuple):
        dt, arr = value
        arr = np.asarray(arr)
    else:
        arr = np.asarray(value)
        dt = _dtype_of(arr)
    shape = list(arr.shape)
    if dt == "BF16":
        raw = f32_to_bf16_bits(arr.astype(np.float32))
    elif dt == "BOOL":
        raw = arr.astype(np.uint8)
    else:
        raw = arr.astype(_RAW[dt][0])
    return dt, shape, np.ascontiguousarray(raw).tobytes()


def save(path, tensors, metadata=None):
    """Writes tensors (dict name -> array or (dtype, array)), in the dict's order."""
    header = {}
    blobs = []
    off = 0
    for name, value in tensors.items():
        dt, shape, data = _encode(value)
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * ((8 - len(hb) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)
    return off


def read(path, raw=False):
    """Returns (tensors, metadata): tensors is name -> (dtype_name, numpy array). F16/BF16 are widened
    to float32 unless raw=True (then BF16 comes back as its uint16 bits)."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise FormatError("%s: shorter than the 8-byte header length" % path)
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        raise FormatError("%s: header length %d exceeds file size %d" % (path, n, len(blob)))
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    if not isinstance(header, dict):
        raise FormatError("%s: header is not a JSON object" % path)
    data = blob[8 + n:]
    meta = header.pop("__metadata__", None) or {}
    out = {}
    spans = []
    for name, ent in header.items():
        dt = ent["dtype"]
        if dt not in _RAW:
            raise FormatError("%s: tensor %s has unknown dtype %s" % (path, name, dt))
        shape = [int(s) for s in ent["shape"]]
        if any(s < 0 for s in shape):
            raise FormatError("%s: tensor %s has a negative dimension" % (path, name))
        b, e = (int(x) for x in ent["data_offsets"])
        npdt, size = _RAW[dt]
        numel = int(np.prod(shape)) if shape else 1
        if not (0 <= b <= e <= len(data)) or e - b != numel * size:
            raise FormatError("%s: tensor %s has bad data_offsets [%d, %d) for %s %s"
                              % (path, name, b, e, dt, shape))
        spans.append((b, e, name))
        arr = np.frombuffer(data[b:e], dtype=npdt).reshape(shape).copy()
        if not raw:
            if dt == "BF16":
                arr = bf16_bits_to_f32(arr).reshape(shape)
            elif dt == "F16":
                arr = arr.astype(np.float32)
            elif dt == "BOOL":
                arr = arr.astype(np.bool_)
        out[name] = (dt, arr)
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise FormatError("%s: tensors %s and %s overlap" % (path, n0, n1))
    return out, meta


def load(path):
    """name -> numpy array (F16/BF16 widened to float32)."""
    tensors, _ = read(path)
    return {k: v[1] for k, v in tensors.items()}


def load_dtypes(path):
    """name -> stored dtype name."""
    tensors, _ = read(path, raw=True)
    return {k: v[0] for k, v in tensors.items()}


def save_sharded(dirpath, tensors, groups, prefix="model"):
    """Writes len(groups) shards <prefix>-0000i-of-0000n.safetensors holding the named tensors of each
    group, and <prefix>.safetensors.index.json with metadata.total_size and weight_map."""
    n = len(groups)
    weight_map = {}
    total = 0
    seen = set()
    for i, names in enumerate(groups):
        fname = "%s-%05d-of-%05d.safetensors" % (prefix, i + 1, n)
        part = {k: tensors[k] for k in names}
        total += save(os.path.join(dirpath, fname), part, metadata={"format": "pt"})
        for k in names:
            weight_map[k] = fname
            seen.add(k)
    missing = set(tensors) - seen
    if missing:
        raise ValueError("tensors in no shard: %s" % sorted(missing))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(dirpath, prefix + ".safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)


def load_checkpoint(dirpath, prefix="model"):
    """Loads DIR/<prefix>.safetensors or, when absent, the shards named by the index's weight_map
    (every mapped name must be present in its shard). Returns name -> numpy array."""
    single = os.path.join(dirpath, prefix + ".safetensors")
    index = os.path.join(dirpath, prefix + ".safetensors.index.json")
    if os.path.exists(single):
        return load(single)
    with open(index) as f:
        wm = json.load(f)["weight_map"]
    out = {}
    for fname in sorted(set(wm.values())):
        part = load(os.path.join(dirpath, fname))
        for name, file_of in wm.items():
            if file_of == fname:
                if name not in part:
                    raise FormatError("%s: index maps %s to it but it is absent" % (fname, name))
                out[name] = part[name]
    return out
