"""Seeds of the `shard` fuzz target (fuzz_shard.c): valid zstd record shards and their malformations.

Imported by make_corpus.py (TARGETS["shard"]). Writes shards of docs/shards.md version 1 with an
encoder of its own, independent of datasets/shard.c: CRC-32C in Python, and zstd frames made of raw
and RLE blocks by hand (a zstd frame need not compress: the format allows stored blocks), so no zstd
module is needed and the bytes do not depend on the libzstd version. One seed holds a frame really
compressed by zstd (ZSTD_FRAME below, made once with the zstd CLI and kept as hex: its content is
checked by replay_shard, which must accept the file, i.e. the frame must decompress to exactly the
records Python wrote and checksummed).

Every malformed file breaks one thing and keeps every checksum right (unless the checksum is the
thing broken), so each reaches the check it is named after.
"""
import struct

import numpy as np

# ---- CRC-32C (Castagnoli, reflected 0x82F63B78) -----------------------------------------------------

_CRC_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


def crc32c(data):
    c = 0xFFFFFFFF
    for b in data:
        c = (c >> 8) ^ _CRC_TABLE[(c ^ b) & 0xFF]
    return c ^ 0xFFFFFFFF


assert crc32c(b"123456789") == 0xE3069283

# ---- zstd frames without compression ------------------------------------------------------------------

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def zstd_block(kind, size, last, payload):
    """3-byte block header (bit 0 last, bits 1-2 type: 0 raw, 1 RLE, 2 compressed, 3 reserved)."""
    return struct.pack("<I", (size << 3) | (kind << 1) | (1 if last else 0))[:3] + payload


def zstd_head(n, content_size=True, fcs=None):
    """Magic and frame header: single segment with the content size (fcs overrides the value), or,
    without content_size, a window descriptor and no content size."""
    if not content_size:
        return ZSTD_MAGIC + bytes([0x00, 0x50])  # FCS flag 0, not single segment; window 1 MiB
    v = n if fcs is None else fcs
    if n < 256:
        return ZSTD_MAGIC + bytes([0x20, v])
    if n < 65536 + 256:
        return ZSTD_MAGIC + bytes([0x60]) + struct.pack("<H", v - 256)
    return ZSTD_MAGIC + bytes([0xA0]) + struct.pack("<I", v)


def zstd_frame(data, rle_min=16, content_size=True, fcs=None, first_block_type=None, first_block_grow=0):
    """One zstd frame (content size recorded, no checksum) of raw blocks, with RLE blocks for runs
    of at least rle_min equal bytes. The last three arguments damage it: a wrong content size, the
    first block's type replaced, the first block's size grown past its bytes."""
    n = len(data)
    head = zstd_head(n, content_size, fcs)
    pieces, i, raw_from = [], 0, 0
    while i < n:
        j = i
        while j < n and data[j] == data[i] and j - i < 65536:
            j += 1
        if j - i >= rle_min:
            if raw_from < i:
                pieces.append((0, data[raw_from:i]))
            pieces.append((1, data[i:j]))
            raw_from = j
        i = j
    if raw_from < n or not pieces:
        pieces.append((0, data[raw_from:]))
    blocks = []
    for k, (kind, chunk) in enumerate(pieces):
        last = k == len(pieces) - 1
        size = len(chunk) + (first_block_grow if k == 0 else 0)
        btype = first_block_type if (k == 0 and first_block_type is not None) else kind
        blocks.append(zstd_block(btype, size, last, chunk if kind == 0 else chunk[:1]))
    return head + b"".join(blocks)


# ---- records and shards (docs/shards.md) --------------------------------------------------------------

PAD, PROMPT, RESPONSE, IMAGE = 0, 1, 2, 3


def tiny_png():
    """A 2x1 grey PNG with a stored (uncompressed) deflate block: fixed bytes, no zlib involved."""
    import binascii

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", binascii.crc32(tag + body))

    raw = b"\x00\x40\xc0"  # filter 0, two grey pixels
    a, b = 1, 0
    for ch in raw:
        a = (a + ch) % 65521
        b = (b + a) % 65521
    deflate = b"\x78\x01" + b"\x01" + struct.pack("<HH", len(raw), len(raw) ^ 0xFFFF) + raw + struct.pack(">I", (b << 16) | a)
    ihdr = struct.pack(">IIBBBBB", 2, 1, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", deflate) + chunk(b"IEND", b"")


def image_bytes(kind, shape=(), data=b"", nbytes=None):
    b = struct.pack("<II", kind, len(shape)) + b"".join(struct.pack("<Q", s) for s in shape)
    return b + struct.pack("<Q", len(data) if nbytes is None else nbytes) + data


def features(shape, start=0.0):
    n = int(np.prod(shape))
    return image_bytes(2, shape, (start + 0.25 * np.arange(n)).astype("<f2").tobytes())


class Rec:
    """A record's bytes and what the index and header count of it."""

    def __init__(self, ids, labels=None, kinds=None, meta=b"", images=(), flags=0, record_bytes=None,
                 n_tokens=None, meta_len=None, n_images=None, extra=b""):
        T = len(ids)
        labels = list(ids) if labels is None else labels
        kinds = [PROMPT] * T if kinds is None else kinds
        body = (struct.pack("<%di" % T, *ids) + struct.pack("<%di" % len(labels), *labels) + bytes(kinds)
                + meta + b"".join(images) + extra)
        fixed = struct.pack("<III", T if n_tokens is None else n_tokens, len(meta) if meta_len is None else meta_len,
                            len(images) if n_images is None else n_images)
        size = len(fixed) + len(body) if record_bytes is None else record_bytes
        self.bytes = struct.pack("<I", size) + fixed + body
        self.tokens, self.images, self.flags = T, len(images), flags


def text_rec(i, T=5):
    ids = [(7 * i + 3 * t) % 32 for t in range(T)]
    split = T // 2
    labels = [-100] * split + ids[split:]
    kinds = [PROMPT] * split + [RESPONSE] * (T - split)
    meta = ('{"task":"boolq","id":"q%d","answer":"true"}' % i).encode()
    return Rec(ids, labels, kinds, meta)


def image_rec(i):
    """Prompt, two image-token runs (an encoded PNG, then cached F16 features [2, 3]), response."""
    ids = [1, 5, 0, 0, 6, 0, 0, 0, 7, 9, 10]
    kinds = [PROMPT, PROMPT, IMAGE, IMAGE, PROMPT, IMAGE, IMAGE, IMAGE, PROMPT, RESPONSE, RESPONSE]
    labels = [-100] * 9 + [9, 10]
    meta = ('{"task":"llava","id":"img%d","choices":["a","b"],"caption":"caf\\u00e9"}' % i).encode()
    return Rec(ids, labels, kinds, meta, [image_bytes(1, (), tiny_png()), features((2, 3), 0.5 * i)], flags=3)


def shard(frames, vocab=32, hdr=None, entries=None, zbytes=None, tail=b""):
    """frames: list of lists of Rec (or bytes: frame contents that are no record). hdr: header field overrides; entries: {frame: {field: value}};
    zbytes: {frame: the frame's compressed bytes} (default: zstd_frame of its records). Every
    checksum is computed over the final bytes unless overridden (hdr index_crc / header_crc, entry
    ccrc / ucrc). tail: bytes appended after the index (file_size still counts them)."""
    zbytes = zbytes or {}
    body, index, off, first = [], [], 96, 0
    totals = dict(records=0, tokens=0, images=0, flags=0)
    for f, items in enumerate(frames):
        recs = [r for r in items if isinstance(r, Rec)]  # bytes items: frame bytes that are no record
        u = b"".join(r.bytes if isinstance(r, Rec) else r for r in items)
        z = zbytes[f] if f in zbytes else zstd_frame(u)
        e = dict(offset=off, csize=len(z), usize=len(u), first=first, records=len(recs),
                 tokens=sum(r.tokens for r in recs), ccrc=crc32c(z), ucrc=crc32c(u))
        e.update((entries or {}).get(f, {}))
        index.append(struct.pack("<QQQQIIII", e["offset"], e["csize"], e["usize"], e["first"], e["records"],
                                 e["tokens"], e["ccrc"], e["ucrc"]))
        body.append(z)
        off += len(z)
        first += len(recs)
        totals["records"] += len(recs)
        totals["tokens"] += sum(r.tokens for r in recs)
        totals["images"] += sum(r.images for r in recs)
        for r in recs:
            totals["flags"] |= r.flags
    index = b"".join(index)
    size = 96 + sum(len(z) for z in body) + len(index) + len(tail)
    h = dict(magic=b"TKSHARD\x00", version=1, header_size=96, file_size=size, records=totals["records"],
             frames=len(frames), tokens=totals["tokens"], images=totals["images"], index_offset=size - len(index) - len(tail),
             flags=totals["flags"], vocab=vocab, frame_target=1 << 20, level=3, index_crc=crc32c(index), reserved=0)
    h.update(hdr or {})
    head = (h["magic"] + struct.pack("<IIQQQQQQIIIiIQ", h["version"], h["header_size"], h["file_size"], h["records"],
                                     h["frames"], h["tokens"], h["images"], h["index_offset"], h["flags"], h["vocab"],
                                     h["frame_target"], h["level"], h["index_crc"], h["reserved"]))
    assert len(head) == 92
    head += struct.pack("<I", h.get("header_crc", crc32c(head)))
    return head + b"".join(body) + index + tail


# A frame compressed by the zstd CLI (zstd 1.5.4, `zstd -19 --no-check`) holding the records
# [text_rec(i, 40) for i in range(4)]: made once, kept here; replay_shard checks it decompresses to
# exactly those records (the Python-computed uncompressed checksum must match).
ZSTD_FRAME = bytes.fromhex(
    "28b52ffd608805fd0500d28a1c23705973fcffffffffff5dffdff1cba0434ba9aac62d9c0bfca1240fbb3cecf2b0fd9d"
    "02a491c8f65233980c96a2c55aa6d00ba57aa0f762b95ca7577aab9849f66a802e97cbdd36c7bc72c91f673c71c30707"
    "bc73cd2fa73c72c71747bc70c1bb739eb9e59343deb8e287131ef8b9e70e171ca8504d4161696bcfa04c64a27b40c28a"
    "48c4c8c4df84124b1fe64847ecf9f1c47125a2a38ed8d3c793e3ca46471db1a78f27c795ab34b9e38034fd0327a5c01e"
    "25ce579b1b6852993b")


def records_of(recs):
    return b"".join(r.bytes for r in recs)


def corpus_shard(rng, bit_flips):
    texts = [text_rec(i) for i in range(5)]
    good = shard([texts[:3], texts[3:]])  # two frames: 3 + 2 records
    imgs = [image_rec(0), text_rec(7), image_rec(1)]
    with_images = shard([imgs[:2], imgs[2:]])
    zero_run = Rec([0] * 40, [-100] * 40, [PAD] * 38 + [RESPONSE] * 2, b'{"padded": true}')
    big = [text_rec(i, 40) for i in range(4)]
    c = {
        "ok_two_frames.shard": good,
        "ok_images_and_meta.shard": with_images,
        "ok_empty_shard.shard": shard([]),
        "ok_vocab_not_recorded.shard": shard([[Rec([70000, 5], [70000, -100])]], vocab=0),
        "ok_rle_blocks.shard": shard([[zero_run, texts[0]], [zero_run]]),
        "ok_one_record_per_frame.shard": shard([[t] for t in texts]),
        "ok_no_meta_one_token.shard": shard([[Rec([3])]]),
        "ok_zstd_compressed_frame.shard": shard([big], zbytes={0: ZSTD_FRAME}),
    }
    # cuts: inside the magic, inside the header, the header alone, inside the first frame, inside the index
    c.update(cut(good, [5, 60, 96, 120, len(good) - 1], "shard"))
    c.update(bit_flips(good, 3, rng, "shard"))

    def hdr(**kw):
        return shard([texts[:3], texts[3:]], hdr=kw)

    def entry(f, hdr=None, **kw):
        return shard([texts[:3], texts[3:]], entries={f: kw}, hdr=hdr)

    def frame(recs, **kw):
        return shard([recs], **kw)

    u0 = records_of(texts[:3])
    z0 = zstd_frame(u0)
    c.update({
        # header
        "empty_file.shard": b"",
        "bad_magic_safetensors.shard": b"\x10\x00\x00\x00\x00\x00\x00\x00" + good[8:],
        "magic_only.shard": good[:8],
        "version_2.shard": hdr(version=2),
        "header_size_128.shard": hdr(header_size=128),
        "header_crc_mismatch.shard": hdr(header_crc=0x12345678),
        "reserved_nonzero.shard": hdr(reserved=1 << 40),
        "flags_unknown_bit.shard": hdr(flags=4),
        "trailing_bytes.shard": good + b"\x00" * 7,
        "file_size_huge_2p63.shard": hdr(file_size=1 << 63),
        "vocab_size_above_int32.shard": hdr(vocab=0x80000000),
        "frame_target_zero.shard": hdr(frame_target=0),
        "zstd_level_999.shard": hdr(level=999),
        "frame_count_2p60.shard": hdr(frames=1 << 60),
        "frame_count_max_u64.shard": hdr(frames=(1 << 64) - 1),
        "frame_count_3_for_2.shard": hdr(frames=3),
        "index_offset_off_by_one.shard": hdr(index_offset=len(good) - 96 + 1),
        "records_zero_frames_two.shard": hdr(records=0),
        "records_count_6_for_5.shard": hdr(records=6),
        "tokens_count_off_by_one.shard": hdr(tokens=26),
        "images_without_flags.shard": hdr(images=2),
        "flags_without_images.shard": hdr(flags=1),
        "index_crc_mismatch.shard": hdr(index_crc=0),
        "empty_shard_with_tokens.shard": shard([], hdr=dict(tokens=3)),
        # frame index
        "frame_offset_2p63.shard": entry(1, offset=1 << 63),
        "frame_offset_gap.shard": entry(1, offset=96 + len(z0) + 1),
        "frame_offset_inside_header.shard": entry(0, offset=0),
        "frame_first_record_wrong.shard": entry(1, first=2),
        "frame_zero_records.shard": entry(1, records=0),
        "frame_records_huge_2p32.shard": entry(0, records=0xFFFFFFFF),
        "frame_usize_huge_2p40.shard": entry(0, usize=1 << 40),
        "frame_usize_below_minimum.shard": entry(0, usize=40),
        "frame_csize_zero.shard": entry(0, csize=0),
        "frame_csize_past_index.shard": entry(1, csize=10 ** 6),
        "frame_tokens_below_records.shard": shard([[Rec([1]), Rec([2])]], entries={0: dict(tokens=1)},
                                                  hdr=dict(tokens=1)),
        # frame contents (checksums right unless named)
        "compressed_crc_mismatch.shard": entry(0, ccrc=0xDEADBEEF),
        "uncompressed_crc_mismatch.shard": entry(0, ucrc=0xDEADBEEF),
        "zstd_frame_truncated.shard": frame(texts[:3], zbytes={0: z0[:-20]}),
        "zstd_bad_magic.shard": frame(texts[:3], zbytes={0: b"\x28\xb5\x2f\xfe" + z0[4:]}),
        "zstd_content_size_wrong.shard": frame(texts[:3], zbytes={0: zstd_frame(u0, fcs=len(u0) - 1)}),
        "zstd_no_content_size.shard": frame(texts[:3], zbytes={0: zstd_frame(u0, content_size=False)}),
        "zstd_two_frames.shard": frame(texts[:3], zbytes={0: z0 + zstd_frame(b"")}),
        "zstd_reserved_block_type.shard": frame(texts[:3], zbytes={0: zstd_frame(u0, first_block_type=3)}),
        "zstd_block_past_frame.shard": frame(texts[:3], zbytes={0: zstd_frame(u0, first_block_grow=100)}),
        # records
        "record_length_past_frame.shard": frame([text_rec(0, 3), Rec([1, 2], record_bytes=4000)]),
        "record_length_below_minimum.shard": frame([Rec([1, 2], record_bytes=4)]),
        "record_tokens_zero.shard": frame([Rec([1, 2], n_tokens=0)]),
        "record_tokens_max_u32.shard": frame([Rec([1, 2], n_tokens=0xFFFFFFFF)]),
        "record_meta_len_max_u32.shard": frame([Rec([1, 2], meta=b"{}", meta_len=0xFFFFFFFF)]),
        "record_images_257.shard": frame([Rec([1, 2], images=[image_bytes(1, (), b"x")] * 257, flags=1)]),
        "record_fields_short_of_length.shard": frame([Rec([1, 2], extra=b"\x00\x00\x00")]),
        "record_bytes_after_last.shard": frame([texts[0], b"\x00" * 16]),
        "frame_tokens_mismatch.shard": entry(0, tokens=16, hdr=dict(tokens=26)),
        "image_kind_0.shard": frame([Rec([1, 2], images=[image_bytes(0, (), b"x")], flags=1)]),
        "image_encoded_with_dims.shard": frame([Rec([1, 2], images=[image_bytes(1, (1,), b"x")], flags=1)]),
        "image_encoded_empty.shard": frame([Rec([1, 2], images=[image_bytes(1, (), b"")], flags=1)]),
        "image_features_zero_dims.shard": frame([Rec([1, 2], images=[image_bytes(2, (), b"\x00\x3c")], flags=2)]),
        "image_features_5_dims.shard": frame([Rec([1, 2], images=[image_bytes(2, (1,) * 5, b"\x00\x3c")], flags=2)]),
        "image_features_dims_max_u32.shard": frame([Rec([1, 2], images=[struct.pack("<II", 2, 0xFFFFFFFF)], flags=2)]),
        "image_features_shape_zero.shard": frame([Rec([1, 2], images=[image_bytes(2, (0, 3), b"")], flags=2)]),
        "image_features_shape_overflow.shard": frame([Rec([1, 2], images=[image_bytes(2, (1 << 32, 1 << 32), b"\x00\x3c", nbytes=2)], flags=2)]),
        "image_features_nbytes_mismatch.shard": frame([Rec([1, 2], images=[image_bytes(2, (2, 3), b"\x00" * 10)], flags=2)]),
        "image_nbytes_2p63.shard": frame([Rec([1, 2], images=[image_bytes(1, (), b"x", nbytes=1 << 63)], flags=1)]),
        "image_kind_not_in_flags.shard": frame([Rec([1, 2], images=[features((1, 2))], flags=1)]),
        "token_id_negative.shard": frame([Rec([1, -5])]),
        "token_id_equals_vocab.shard": frame([Rec([1, 32])]),
        "token_label_minus_one.shard": frame([Rec([1, 2], [-1, 2])]),
        "token_label_above_vocab.shard": frame([Rec([1, 2], [1, 99])]),
        "token_kind_4.shard": frame([Rec([1, 2], kinds=[1, 4])]),
        "meta_nul_byte.shard": frame([Rec([1, 2], meta=b'{"a":"\x00"}')]),
        "meta_not_object.shard": frame([Rec([1, 2], meta=b'["a"]')]),
        # lenient today: the reader checks metadata lightly (no NUL, {...}); the writer parsed it
        # fully, and header image counts are not compared with the records'
        "any_meta_invalid_utf8.shard": frame([Rec([1, 2], meta=b'{"a":"\xff\xfe"}')]),
        "any_meta_braces_not_json.shard": frame([Rec([1, 2], meta=b"{not json}")]),
        "any_header_image_count_wrong.shard": shard([imgs[:2], imgs[2:]], hdr=dict(images=9)),
    })
    return c


def cut(blob, cuts, ext):
    return {"trunc_%05d.%s" % (k, ext): blob[:k] for k in cuts}
