"""Seeds of the converter fuzz targets: fmnist_images and fmnist_labels (fuzz_fmnist.h: Fashion-MNIST
idx files) and llava (fuzz_llava.c: LLaVA conversation JSON).

Imported by make_corpus.py. Gzip'd seeds use compression level 0 (stored deflate blocks) and mtime 0,
so their bytes do not depend on zlib's compressor.
"""
import gzip
import json
import struct

# ---- Fashion-MNIST idx (the fixed partner file holds 3 items: 4 x 4 images, labels 0, 9, 5) ----------

N, ROWS, COLS = 3, 4, 4


def idx(magic, dims, data):
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + data


def gz(b):
    return gzip.compress(b, compresslevel=0, mtime=0)


def images(n=N, rows=ROWS, cols=COLS, magic=0x803, count=None, data=None, extra=b""):
    px = bytes((i * 37) % 256 for i in range(n * rows * cols)) if data is None else data
    return idx(magic, [n if count is None else count, rows, cols], px + extra)


def labels(values=(0, 9, 5), magic=0x801, count=None, extra=b""):
    return idx(magic, [len(values) if count is None else count], bytes(values) + extra)


def corpus_fmnist_images(rng, bit_flips, cut):
    good = images()
    c = {
        "ok_raw.idx": good,
        "ok_gzip.idx.gz": gz(good),
        "ok_28x28.idx": images(rows=28, cols=28),
    }
    c.update(cut(good, [0, 3, 10, 16, 40, len(good) - 1], "idx"))
    c.update(bit_flips(gz(good), 3, rng, "idx.gz"))
    c.update({
        "magic_labels_0x801.idx": images(magic=0x801),
        "magic_int32_0xc03.idx": images(magic=0xC03),
        "magic_4_dims.idx": images(magic=0x804),
        "magic_text.idx": b"P5\n4 4\n255\n" + bytes(16),
        "count_0.idx": images(n=0),
        "count_4_vs_3_labels.idx": images(n=4),
        "count_2_vs_3_labels.idx": images(n=2),
        "count_2p32_minus_1.idx": images(count=0xFFFFFFFF),
        "rows_0.idx": images(rows=0, data=b""),
        "cols_4097.idx": images(rows=1, cols=4097),
        "rows_2p31.idx": images(rows=1 << 31, data=bytes(48)),
        "data_short.idx": images()[:-5],
        "data_extra_byte.idx": images(extra=b"\x00"),
        "gzip_truncated.idx.gz": gz(good)[:-12],
        "gzip_crc_wrong.idx.gz": gz(good)[:-8] + b"\x00\x00\x00\x00" + gz(good)[-4:],
        "gzip_length_wrong.idx.gz": gz(good)[:-4] + struct.pack("<I", len(good) + 1),
        # lenient today: zlib's gzread stops at the end of the gzip member and ignores what follows
        "any_gzip_then_garbage.idx.gz": gz(good) + b"garbage",
        "gzip_bad_deflate.idx.gz": gz(good)[:10] + b"\x07" + gz(good)[11:],
        "gzip_of_short_data.idx.gz": gz(good[:-5]),
    })
    return c


def corpus_fmnist_labels(rng, bit_flips, cut):
    good = labels()
    c = {
        "ok_raw.idx": good,
        "ok_gzip.idx.gz": gz(good),
    }
    c.update(cut(good, [0, 3, 8, 10], "idx"))
    c.update(bit_flips(gz(good), 2, rng, "idx.gz"))
    c.update({
        "magic_images_0x803.idx": labels(magic=0x803),
        "magic_int16_0xb01.idx": labels(magic=0xB01),
        "label_10.idx": labels((0, 10, 5)),
        "label_255.idx": labels((255, 9, 5)),
        "count_2.idx": labels((0, 9)),
        "count_4.idx": labels((0, 9, 5, 1)),
        "count_2p32_minus_1.idx": labels(count=0xFFFFFFFF),
        "count_0.idx": labels(()),
        "data_extra_byte.idx": labels(extra=b"\x01"),
        "gzip_truncated.idx.gz": gz(good)[:-6],
        "gzip_crc_wrong.idx.gz": gz(good)[:-8] + b"\xff\xff\xff\xff" + gz(good)[-4:],
    })
    return c


# ---- LLaVA conversation JSON (fixture: images/ok.png, broken.png, notes.txt, sub/) --------------------

def rec(conv, image="ok.png", rid="r0", **extra):
    r = {"id": rid}
    if image is not None:
        r["image"] = image
    r["conversations"] = conv
    r.update(extra)
    return r


def turns(*pairs):
    out = []
    for i, (h, g) in enumerate(pairs):
        out.append({"from": "human", "value": h})
        out.append({"from": "gpt", "value": g})
    return out


def js(obj):
    return (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode()


def corpus_llava(rng, bit_flips, text_truncations):
    img = rec(turns(("<image>\nWhat is in the picture?", "A cat on a mat."), ("Which colour?", "Grey.")))
    text = rec(turns(("Hello there", "Hi! How can I help?")), image=None, rid=7)
    good = js([img, text])

    def one(r):
        return js([img, r])

    c = {
        "ok_image_and_text.json": good,
        "ok_image_tag_at_end.json": js([rec(turns(("Describe it. <image>", "A cat.")))]),
        "ok_user_assistant_names.json": js([rec([{"from": "user", "value": "<image> what?"},
                                                 {"from": "assistant", "value": "a cat"}])]),
        "ok_leading_gpt_turn_dropped.json": js([rec([{"from": "gpt", "value": "ignored"}] + turns(("<image>\nq", "a")))]),
        "ok_image_null.json": js([rec(turns(("q", "a")), image=None), dict(rec(turns(("q2", "a2")), image=None), image=None)]),
        "ok_unicode_text.json": js([rec(turns(("<image>\ncaf\u00e9 \u65e5\u672c \U0001f600 ?", "\u00e9t\u00e9")))]),
        "ok_no_id.json": js([{"image": "ok.png", "conversations": turns(("<image>", "x"))}]),
    }
    c.update(text_truncations(good, 5, rng, "json"))
    c.update({
        "empty_file.json": b"",
        "not_json.json": b"id: 1\n",
        "top_level_object.json": js(img),
        "empty_array.json": b"[]",
        "deep_nesting_3000.json": b"[" * 3000 + b"]" * 3000,
        "record_not_object.json": one([1, 2]),
        "id_is_object.json": one(rec(turns(("<image>", "a")), rid={"a": 1})),
        "image_is_number.json": one(rec(turns(("<image>", "a")), image=3)),
        "image_is_list.json": one(rec(turns(("<image>", "a")), image=["ok.png", "ok.png"])),
        "conversations_missing.json": one({"id": "x", "image": "ok.png"}),
        "conversations_string.json": one(rec("human: hi")),
        "conversations_empty.json": one(rec([], image=None)),
        "turn_not_object.json": one(rec(["<image> hi", "a"])),
        "turn_value_number.json": one(rec([{"from": "human", "value": 5}, {"from": "gpt", "value": "a"}], image=None)),
        "turn_from_missing.json": one(rec([{"value": "<image>"}, {"from": "gpt", "value": "a"}])),
        "turn_from_system.json": one(rec([{"from": "system", "value": "be nice"}] + turns(("<image>", "a")))),
        "turns_two_human.json": one(rec([{"from": "human", "value": "<image>"}, {"from": "human", "value": "x"},
                                         {"from": "gpt", "value": "a"}])),
        "turns_two_gpt.json": one(rec(turns(("<image>", "a")) + [{"from": "gpt", "value": "b"}])),
        "turns_end_with_human.json": one(rec(turns(("<image>", "a")) + [{"from": "human", "value": "more?"}])),
        "only_gpt_turns.json": one(rec([{"from": "gpt", "value": "a"}], image=None)),
        "image_two_tags.json": one(rec(turns(("<image> and <image>", "a")))),
        "image_tag_in_gpt_turn.json": one(rec(turns(("look", "<image> here")))),
        "image_without_tag.json": one(rec(turns(("no tag", "a")))),
        "tag_without_image.json": one(rec(turns(("<image>", "a")), image=None)),
        "image_missing_file.json": one(rec(turns(("<image>", "a")), image="missing.png")),
        "image_broken_png.json": one(rec(turns(("<image>", "a")), image="broken.png")),
        "image_is_text_file.json": one(rec(turns(("<image>", "a")), image="notes.txt")),
        "image_is_directory.json": one(rec(turns(("<image>", "a")), image="sub")),
        "image_empty_path.json": one(rec(turns(("<image>", "a")), image="")),
        "image_dev_zero.json": one(rec(turns(("<image>", "a")), image="/dev/zero")),
        "image_path_newline.json": one(rec(turns(("<image>", "a")), image="ok\n.png")),
        "invalid_utf8_in_text.json": js([img])[:-3] + b', "x": "\xff\xfe"}]\n',
    })
    # lenient today: unknown keys are ignored; cJSON ends a string at an escaped NUL (\u0000), so
    # the rest of that turn's text is silently dropped
    c["any_unknown_keys.json"] = one(rec(turns(("<image>", "a")), model="x", extra={"a": [1]}))
    c["any_value_nul_escape.json"] = one(rec(turns(("<image> first\u0000dropped", "a"))))
    return c
