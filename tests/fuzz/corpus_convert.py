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


# ---- LLM-Adapters / Alpaca instruction data (fuzz_instruct.c) -----------------------------------------

INSTR = [{"instruction": "Please answer the following question with true or false.\n\nQuestion: is water wet?",
          "input": "", "output": "the correct answer is true", "answer": "true"},
         {"instruction": "Solve: 2 + 3 = ?", "input": "", "output": "5", "answer": 5},
         {"instruction": "Translate", "input": "caf\u00e9", "output": "coffee shop"}]


def jsonl(rows):
    return b"".join((json.dumps(r, ensure_ascii=False) + "\n").encode() for r in rows)


def corpus_instruct(rng, bit_flips, text_truncations):
    good = js(INSTR)
    lines = jsonl(INSTR)

    def one(r):
        return js(INSTR + [r])

    c = {
        "ok_array.json": good,
        "ok_jsonl.json": lines,
        "ok_jsonl_blank_lines_crlf.json": b"\r\n" + lines.replace(b"\n", b"\r\n") + b"\r\n\r\n",
        "ok_eval_set_no_output.json": js([{"instruction": "q?", "answer": "A"}]),
        "ok_extra_fields.json": one({"instruction": "x", "output": "y", "meta": {"a": [1]}}),
        "ok_leading_spaces.json": b"  \n\t" + good,
        "ok_answer_float.json": one({"instruction": "x", "output": "y", "answer": 2.5}),
    }
    c.update(text_truncations(good, 4, rng, "json"))
    c.update({
        "empty_file.json": b"",
        "only_spaces.json": b" \n\t \n",
        "empty_array.json": b"[]",
        "not_json.json": b"instruction: hi\n",
        "top_level_object.json": js(INSTR[0]),
        "array_then_garbage.json": good + b"x",
        "two_arrays.json": good + good,
        "deep_nesting_3000.json": b"[" * 3000 + b"]" * 3000,
        "record_not_object.json": one(["instruction", "x"]),
        "instruction_missing.json": one({"input": "", "output": "y"}),
        "instruction_number.json": one({"instruction": 3, "output": "y"}),
        "instruction_null.json": one({"instruction": None, "output": "y"}),
        "output_missing_no_answer.json": one({"instruction": "x"}),
        "output_list.json": one({"instruction": "x", "output": ["y"]}),
        "input_object.json": one({"instruction": "x", "input": {}, "output": "y"}),
        "answer_bool.json": one({"instruction": "x", "output": "y", "answer": True}),
        # lenient today: cJSON does not validate UTF-8 inside strings
        "any_invalid_utf8.json": good[:-3] + b', {"instruction": "\xff\xfe", "output": "y"}]\n',
        "jsonl_bad_line_3.json": lines + b'{"instruction": "x", "output": }\n',
        "jsonl_line_is_array.json": lines + b"[1, 2]\n",
        "jsonl_two_objects_one_line.json": lines + b'{"instruction": "a", "output": "b"} {"instruction": "c", "output": "d"}\n',
    })
    return c


# ---- GLUE TSV (fuzz_glue.c: returned status is RTE's; every other task is tried too) ----------------

def tsv(rows):
    return b"".join(("\t".join(r) + "\n").encode() for r in rows)


RTE = [["index", "sentence1", "sentence2", "label"],
       ["0", "A cat sleeps on the mat.", "An animal is sleeping.", "entailment"],
       ["1", "It rains.", "The sun is out.", "not_entailment"],
       ["2", "Caf\u00e9s open early.", "Some caf\u00e9s open.", "entailment"]]


def corpus_glue(rng, bit_flips, text_truncations):
    good = tsv(RTE)

    def row(*r):
        return tsv(RTE + [list(r)])

    c = {
        "ok_rte_dev.tsv": good,
        "ok_rte_test_unlabeled.tsv": tsv([r[:3] for r in RTE]),
        "ok_rte_crlf_bom.tsv": b"\xef\xbb\xbf" + good.replace(b"\n", b"\r\n"),
        "ok_rte_no_final_newline.tsv": good.rstrip(b"\n"),
        "ok_rte_blank_lines.tsv": good.replace(b"\n", b"\n\n"),
        "ok_rte_columns_reordered.tsv": tsv([[r[3], r[0], r[2], r[1]] for r in RTE]),
        # other tasks' formats: RTE refuses them (no sentence1/label header) while the target's second
        # pass loads them as cola, sst2, stsb and mnli
        "any_cola_no_header.tsv": tsv([["gj04", "1", "", "The cat sleeps."], ["gj04", "0", "*", "Cat the sleeps."]]),
        "any_sst2.tsv": tsv([["sentence", "label"], ["a fine film", "1"], ["dull", "0"]]),
        "any_stsb.tsv": tsv([["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
                              "sentence2", "score"], ["0", "main", "x", "2012", "1", "n", "n", "A man.", "A person.", "3.8"]]),
        "any_stsb_score_out_of_range.tsv": tsv([["sentence1", "sentence2", "score"], ["a", "b", "7.5"], ["a", "b", "nan"]]),
        "any_mnli.tsv": tsv([["index", "sentence1", "sentence2", "gold_label"], ["0", "a", "b", "neutral"]]),
    }
    c.update(text_truncations(good, 3, rng, "tsv",
                              ok_cut=lambda k: good[k - 1:k] != b"\n" and good[k:k + 1] != b"\n"))
    c.update({
        "empty_file.tsv": b"",
        "header_only.tsv": tsv(RTE[:1]),
        "blank_lines_only.tsv": b"\n\r\n\n",
        # lenient today: a file without the label column is a test split (label -1), so a misnamed
        # label column ("gold") silently makes a labelled file unlabelled; text is not checked for UTF-8
        "any_label_column_misnamed.tsv": tsv([["index", "sentence1", "sentence2", "gold"]] + RTE[1:]),
        "missing_sentence2_column.tsv": tsv([["index", "sentence1", "label"], ["0", "a", "entailment"]]),
        "label_unknown.tsv": row("3", "a", "b", "neutral"),
        "label_case.tsv": row("3", "a", "b", "Entailment"),
        "label_empty.tsv": row("3", "a", "b", ""),
        "too_few_fields.tsv": row("3", "a", "b"),
        "too_many_fields.tsv": row("3", "a", "b", "entailment", "extra"),
        "seventy_columns.tsv": tsv([["c%d" % i for i in range(70)]]),
        "nul_byte.tsv": good + b"4\ta\x00b\tc\tentailment\n",
        "binary_garbage.tsv": bytes(range(1, 256)) * 4,
        "any_invalid_utf8.tsv": row("3", "a\xff", "b", "entailment").replace("a\xff".encode(), b"a\xff\xfe"),
    })
    return c
