#!/usr/bin/python3
"""Text side of the demo (examples/demo.sh): instructions generated here, in LLaVA's conversation
schema without images, so text and visual instructions share one template and one converter.

    /usr/bin/python3 examples/demo_data.py OUT_DIR [--train 3000] [--val 300] [--test 300] [--seed 0]

Writes OUT_DIR/text_train.json, OUT_DIR/text_val.json, OUT_DIR/text_test.json and OUT_DIR/corpus.txt
(every sentence of the text and of the Fashion-MNIST conversations, for training the tokenizer).
The distinct questions are shuffled once (--seed) and split into a held-out test set (--test), a
validation set (--val) and a training pool (the rest): the three share no question. The training
file draws --train records from the pool with repeats.
Tasks (answers are single words, so multiple choice over the dataset's answers is meaningful):
  "Which is heavier, a <thing> or a <thing>?"   -> the heavier of two things by a fixed order of 40
                                                   (1560 ordered pairs: a held-out pair is answered
                                                   only by learning the order, i.e. transitivity)
  "What do you wear on your <body part>?"       -> the garment class worn there
  "What is <a> plus <b>?" (a + b < 10)          -> the sum as a word
"""
import argparse
import json
import os
import random
import sys

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# lightest to heaviest: the ten Fashion-MNIST garment words in their old order (sandal ... boot)
# among household objects; the questions use "a", so no name starts with a vowel sound
THINGS = ["feather", "stamp", "paperclip", "coin", "pencil", "key", "spoon", "toothbrush", "lightbulb",
          "sandal", "candle", "t-shirt", "shirt", "mug", "dress", "plate", "trouser", "book", "pullover",
          "sneaker", "teapot", "bag", "saucepan", "kettle", "coat", "lamp", "boot", "toaster", "chair",
          "suitcase", "microwave", "television", "bicycle", "desk", "bookcase", "sofa", "fridge",
          "washing-machine", "wardrobe", "piano"]
WEAR = {"feet": "Sneaker", "legs": "Trouser", "upper body": "Shirt", "shoulder": "Bag", "toes": "Sandal",
        "ankles": "Ankle boot", "whole body": "Dress", "chest": "Pullover", "back": "Coat", "torso": "T-shirt/top"}
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
QUESTIONS = ["What item of clothing is this?", "What is shown in this image?", "Which Fashion-MNIST class is this?",
             "Name the garment in the picture.", "What kind of fashion item is pictured?"]


def examples():
    out = []
    for i, a in enumerate(THINGS):
        for j, b in enumerate(THINGS):
            if i != j:
                out.append(("Which is heavier, a %s or a %s?" % (a, b), THINGS[max(i, j)]))
    for part, garment in WEAR.items():
        for form in ("What do you wear on your %s?", "Name something worn on the %s.", "What covers your %s?"):
            out.append((form % part, garment))
    for a in range(10):
        for b in range(10 - a):
            out.append(("What is %s plus %s?" % (WORDS[a], WORDS[b]), WORDS[a + b]))
            out.append(("What is %d plus %d?" % (a, b), WORDS[a + b]))
    return out


def record(i, q, a):
    return {"id": "text-%05d" % i, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}


def write(path, pairs):
    with open(path, "w") as f:
        json.dump([record(i, q, ans) for i, (q, ans) in enumerate(pairs)], f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--train", type=int, default=3000, help="training records, drawn with repeats from the pool")
    ap.add_argument("--val", type=int, default=300, help="validation questions")
    ap.add_argument("--test", type=int, default=300, help="held-out test questions")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    ex = examples()
    assert len(set(THINGS)) == 40 and len(set(q for q, _ in ex)) == len(ex)  # distinct things, questions
    if a.test < 1 or a.val < 1 or a.train < 1 or a.test + a.val > len(ex) - 100:
        sys.exit("demo_data: --test %d + --val %d must leave at least 100 of the %d distinct questions for "
                 "training (and each of --train, --val, --test must be >= 1)" % (a.test, a.val, len(ex)))
    os.makedirs(a.out, exist_ok=True)
    rng = random.Random(a.seed)
    rng.shuffle(ex)
    test, val, pool = ex[:a.test], ex[a.test:a.test + a.val], ex[a.test + a.val:]
    train = [pool[rng.randrange(len(pool))] for _ in range(a.train)]  # repeats: the pool is small
    write(os.path.join(a.out, "text_train.json"), train)
    write(os.path.join(a.out, "text_val.json"), val)
    write(os.path.join(a.out, "text_test.json"), test)
    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")
    with open(os.path.join(a.out, "corpus.txt"), "w") as f:
        for q, ans in ex:
            f.write("%s USER: %s ASSISTANT: %s\n" % (system, q, ans))
        for c in CLASSES:
            for q in QUESTIONS:
                f.write("%s USER: %s ASSISTANT: %s\n" % (system, q, c))
    print("demo_data: %d train (from a pool of %d), %d validation and %d test text instructions "
          "(%d distinct questions) in %s" % (len(train), len(pool), len(val), len(test), len(ex), a.out))


if __name__ == "__main__":
    main()
