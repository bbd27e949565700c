#!/usr/bin/python3
"""Text side of the demo (examples/demo.sh): instructions generated here, in LLaVA's conversation
schema without images, so text and visual instructions share one template and one converter.

    /usr/bin/python3 examples/demo_data.py OUT_DIR [--train 1500] [--test 200] [--seed 0]

Writes OUT_DIR/text_train.json, OUT_DIR/text_test.json (disjoint questions) and OUT_DIR/corpus.txt
(every sentence of the text and of the Fashion-MNIST conversations, for training the tokenizer).
Tasks (answers are single words, so multiple choice over the dataset's answers is meaningful):
  "Which is heavier, a <thing> or a <thing>?"   -> the heavier of two garments/objects by a fixed order
  "What do you wear on your <body part>?"       -> the garment class worn there
  "What is <a> plus <b>?" (a + b < 10)          -> the sum as a word
"""
import argparse
import json
import os
import random

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# lightest to heaviest
THINGS = ["sandal", "t-shirt", "shirt", "dress", "trouser", "pullover", "sneaker", "bag", "coat", "boot"]
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--train", type=int, default=1500)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rng = random.Random(a.seed)
    ex = examples()
    rng.shuffle(ex)
    n_test = min(a.test, len(ex) // 4)
    test, pool = ex[:n_test], ex[n_test:]
    train = [pool[rng.randrange(len(pool))] for _ in range(a.train)]  # repeats: small pool
    with open(os.path.join(a.out, "text_train.json"), "w") as f:
        json.dump([record(i, q, ans) for i, (q, ans) in enumerate(train)], f, indent=1)
    with open(os.path.join(a.out, "text_test.json"), "w") as f:
        json.dump([record(i, q, ans) for i, (q, ans) in enumerate(test)], f, indent=1)
    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")
    with open(os.path.join(a.out, "corpus.txt"), "w") as f:
        for q, ans in ex:
            f.write("%s USER: %s ASSISTANT: %s\n" % (system, q, ans))
        for c in CLASSES:
            for q in QUESTIONS:
                f.write("%s USER: %s ASSISTANT: %s\n" % (system, q, c))
    print("demo_data: %d train and %d test text instructions (%d distinct questions) in %s" %
          (len(train), len(test), len(ex), a.out))


if __name__ == "__main__":
    main()
