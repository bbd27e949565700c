"""Seeds of the `tokenizer` fuzz target (fuzz_tokenizer.c): sentencepiece models (tokenizer.model, a
serialized ModelProto) and their malformations.

Imported by make_corpus.py (TARGETS["tokenizer"]). The valid seeds are trained at generation time by
Debian's `spm_train` (package sentencepiece, in the Makefile's PACKAGES) on a few hundred generated
lines, one thread, fixed seed, in a temporary directory with relative paths (the model file records
its input and prefix): the bytes are reproducible (checked: two trainings give identical files), so
`make_corpus.py --check` can regenerate and compare them. Another sentencepiece version may train a
different model; the check then reports the tokenizer files as stale, and rerunning make_corpus.py
refreshes them.

The malformations are edits of the protobuf wire format by the small encoder/decoder below (no
protobuf module): fields removed, repeated, retyped, overlong varints, lengths past the end, and
content sentencepiece itself must judge (no unk piece, duplicate pieces, unknown model type, a broken
normalizer blob, failing self-test data, ...).
"""
import json
import os
import shutil
import struct
import subprocess
import tempfile

# ---- training ---------------------------------------------------------------------------------------

WORDS = ("the a of to in is was answer question correct option true false please choose which water "
         "light plant animal earth heat hello world user assistant cat dog mat sleeps runs quickly").split()
EXTRA = ["café naïve résumé", "日本語のテキスト 中文", "emoji 😀 🎉", "### Instruction:", "### Response:",
         "numbers 12345 3.14"]

# name -> spm_train options (identity normalization: no 200 KB NFKC table in the corpus)
MODELS = {
    "llama": dict(model_type="bpe", vocab_size=340, byte_fallback="true", split_digits="true",
                  allow_whitespace_only_pieces="true", remove_extra_whitespaces="false",
                  unk_id=0, bos_id=1, eos_id=2, pad_id=-1),
    "small": dict(model_type="bpe", vocab_size=70, unk_id=0, bos_id=1, eos_id=2, pad_id=-1),
    "unigram": dict(model_type="unigram", vocab_size=70, hard_vocab_limit="false", unk_id=0, bos_id=1, eos_id=2,
                    pad_id=3),
}


def corpus_lines():
    s, lines = 12345, []
    for _ in range(400):
        s = (s * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        n = 2 + (s >> 33) % 8
        words = []
        for _ in range(n):
            s = (s * 6364136223846793005 + 1442695040888963407) % (1 << 64)
            words.append(WORDS[(s >> 33) % len(WORDS)])
        lines.append(" ".join(words))
    return lines + EXTRA * 5


def train():
    """name -> model bytes, trained by spm_train (one thread, fixed seed, relative paths)."""
    spm = shutil.which("spm_train")
    if not spm:
        raise SystemExit("make_corpus: spm_train not found: install the Debian package sentencepiece (make deps)")
    out = {}
    with tempfile.TemporaryDirectory(prefix="tkspm.") as tmp:
        with open(os.path.join(tmp, "corpus.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(corpus_lines()) + "\n")
        for name, opts in MODELS.items():
            args = dict(opts, input="corpus.txt", model_prefix=name, normalization_rule_name="identity",
                        character_coverage=1.0, num_threads=1, random_seed=7, minloglevel=2)
            p = subprocess.run([spm] + ["--%s=%s" % kv for kv in args.items()], cwd=tmp,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if p.returncode != 0:
                raise SystemExit("make_corpus: spm_train failed for %s:\n%s" % (name, p.stderr[-2000:]))
            with open(os.path.join(tmp, name + ".model"), "rb") as f:
                out[name] = f.read()
    return out


# ---- protobuf wire format ---------------------------------------------------------------------------

def varint(v):
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def parse(buf):
    """[(field, wire, value)]: value an int (varint), bytes (length-delimited) or raw bytes (fixed)."""
    i, out = 0, []

    def rv():
        nonlocal i
        v, shift = 0, 0
        while True:
            b = buf[i]
            i += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return v

    while i < len(buf):
        key = rv()
        field, wire = key >> 3, key & 7
        if wire == 0:
            out.append((field, 0, rv()))
        elif wire == 2:
            n = rv()
            out.append((field, 2, bytes(buf[i:i + n])))
            i += n
        elif wire in (1, 5):
            w = 8 if wire == 1 else 4
            out.append((field, wire, bytes(buf[i:i + w])))
            i += w
        else:
            raise ValueError("wire type %d" % wire)
    return out


def ser(fields):
    out = []
    for field, wire, v in fields:
        out.append(varint(field << 3 | wire))
        if wire == 0:
            out.append(varint(v))
        elif wire == 2:
            out.append(varint(len(v)) + v)
        else:
            out.append(v)
    return b"".join(out)


def edit(fields, field, fn):
    """Applies fn to the value of every top-level `field`; fn returns a new value or None (drop)."""
    out = []
    for f, w, v in fields:
        if f == field:
            v = fn(v)
            if v is None:
                continue
        out.append((f, w, v))
    return out


def set_field(msg, field, wire, value):
    """msg bytes with every `field` replaced by one (field, wire, value) at the end (None: removed)."""
    fs = [x for x in parse(msg) if x[0] != field]
    if value is not None:
        fs.append((field, wire, value))
    return ser(fs)


def pieces(model):
    return [v for f, w, v in parse(model) if f == 1]


def piece_fields(p):
    d = {f: v for f, w, v in parse(p)}
    return d.get(1, b""), d.get(2), d.get(3, 1)  # piece, score (4 raw bytes), type (NORMAL = 1)


def make_piece(piece, score=b"\x00\x00\x00\x00", ptype=None):
    fs = [(1, 2, piece), (2, 5, score)]
    if ptype is not None:
        fs.append((3, 0, ptype))
    return ser(fs)


def map_pieces(model, fn):
    """fn(index, piece message bytes) -> new bytes, or None to drop the piece."""
    k = [0]

    def f(v):
        r = fn(k[0], v)
        k[0] += 1
        return r

    return ser(edit(parse(model), 1, f))


def trainer(model, field, wire, value):
    return ser(edit(parse(model), 2, lambda t: set_field(t, field, wire, value)))


def normalizer(model, field, wire, value):
    return ser(edit(parse(model), 3, lambda t: set_field(t, field, wire, value)))


NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def corpus_tokenizer(rng, bit_flips, text_truncations):
    m = train()
    small, llama = m["small"], m["llama"]
    ps = pieces(small)
    first_normal = next(i for i, p in enumerate(ps) if piece_fields(p)[2] == NORMAL)
    normal_piece = piece_fields(ps[first_normal])[0]
    llama_ps = pieces(llama)
    byte_41 = next(i for i, p in enumerate(llama_ps) if piece_fields(p)[0] == b"<0x41>")

    def retype(i, t):
        return map_pieces(small, lambda k, p: make_piece(piece_fields(p)[0], piece_fields(p)[1] or b"\0" * 4, t)
                          if k == i else p)

    def rescore(i, score):
        return map_pieces(small, lambda k, p: make_piece(piece_fields(p)[0], struct.pack("<f", score),
                                                         piece_fields(p)[2]) if k == i else p)

    def rename(model, i, name):
        return map_pieces(model, lambda k, p: make_piece(name, piece_fields(p)[1] or b"\0" * 4, piece_fields(p)[2])
                          if k == i else p)

    fields = parse(small)
    only = lambda keep: ser([x for x in fields if x[0] in keep])  # noqa: E731
    self_test = ser([(1, 2, ser([(1, 2, b"hello world"), (2, 2, b"\xe2\x96\x81not \xe2\x96\x81it")]))])
    # the pieces of "hello world", space-separated, as the model really encodes them (sentencepiece's
    # self-test format), from Debian's python3-sentencepiece
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_proto=small)
    expected = " ".join(sp.encode("hello world", out_type=str)).encode()
    self_test_ok = ser([(1, 2, ser([(1, 2, b"hello world"), (2, 2, expected)]))])
    c = {
        "ok_llama_bpe_byte_fallback.model": llama,
        "ok_small_bpe.model": small,
        "ok_unigram_pad_id.model": m["unigram"],
        "ok_self_test_passes.model": small + ser([(4, 2, self_test_ok)]),
    }
    # a cut is malformed unless it ends exactly after the last field
    c.update(text_truncations(small, 6, rng, "model"))
    c.update(bit_flips(small, 6, rng, "model"))
    c.update({
        # framing (the shim, before sentencepiece sees the bytes)
        "empty_file.model": b"",
        "text_not_protobuf.model": b"this is not a sentencepiece model\n",
        "hf_tokenizer_json.model": (json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}})
                                    + "\n").encode(),
        "key_varint_11_bytes.model": b"\xff" * 10 + b"\x01" + small,
        "field_number_zero.model": b"\x02\x00" + small,
        "wire_type_3.model": small + b"\x0b",
        "pieces_as_varint.model": b"\x08\x01" + small,
        "length_2p62_past_end.model": b"\x0a" + varint(1 << 62) + small,
        "no_pieces.model": only({2, 3}),
        "no_trainer_spec.model": only({1, 3}),
        "no_normalizer_spec.model": only({1, 2}),
        # content (sentencepiece's checks)
        "piece_not_a_message.model": ser([(1, 2, b"\xff\xff\xff")] + fields),
        "piece_empty_string.model": rename(small, first_normal, b""),
        "piece_duplicate.model": ser(fields + [(1, 2, make_piece(normal_piece))]),
        "unk_piece_missing.model": retype(0, NORMAL),
        "unk_piece_twice.model": retype(first_normal, UNKNOWN),
        "byte_fallback_without_byte_pieces.model": trainer(small, 35, 0, 1),
        "byte_piece_malformed.model": rename(llama, byte_41, b"<0xZZ>"),
        "normalizer_charsmap_size_huge.model": normalizer(small, 2, 2, b"\xff\xff\xff\x7f" + bytes(8)),
        # rejected, but sentencepiece also prints two LOG(INFO) lines about the failed sample to stderr
        "self_test_fails.model": small + ser([(4, 2, self_test)]),
        # lenient today: sentencepiece loads these, and the target then encodes and decodes with them
        "any_score_nan.model": rescore(first_normal, float("nan")),
        "any_score_inf.model": rescore(first_normal, float("inf")),
        "any_model_type_char.model": trainer(small, 3, 0, 4),
        "any_model_type_word.model": trainer(small, 3, 0, 3),
        "any_trainer_vocab_size_wrong.model": trainer(small, 4, 0, 5),
        "any_denormalizer_garbage.model": small + ser([(5, 2, b"\x12\x04\x01\x02\x03\x04")]),
        # ... and these, which a stricter loader might refuse: the trainer_spec's special ids are not
        # what sentencepiece uses (it takes the UNKNOWN piece and the bos/eos pieces), an unknown
        # enum value reads as the default (model type unigram, piece type normal), pieces are not
        # checked for UTF-8, a normalizer name without its table is ignored
        "any_unk_id_1000.model": trainer(small, 40, 0, 1000),
        "any_bos_id_equals_eos_id.model": trainer(small, 41, 0, 2),
        "any_model_type_9.model": trainer(small, 3, 0, 9),
        "any_piece_type_99.model": retype(first_normal, 99),
        "any_piece_invalid_utf8.model": rename(small, first_normal, b"\xff\xfe"),
        "any_normalizer_rule_unknown.model": normalizer(small, 1, 2, b"no_such_rule"),
    })
    return c


def pending_crashes():
    """Inputs that crash today, kept out of the corpus until the code is fixed (docs/bad-input.md,
    "Open defects"): name -> bytes; `make_corpus.py --pending DIR` writes them."""
    # none today: the last one (crash_normalizer_charsmap_garbage.model) is fixed and lives in the corpus as a crash_* file
    return {}

