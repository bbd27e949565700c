#!/usr/bin/python3
"""Tokenizer and prompt-template golden test (text/): runs tests/text/make_golden.py with the C
helper built beside the tspeft binary (BUILD/tests/text_golden).

    /usr/bin/python3 tests/e2e/test_tokenizer_golden.py --tspeft build/tspeft [--keep DIR]

Exit status 0 when every check passed, 1 otherwise.
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "text"))

import make_golden  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tspeft", required=True, help="the tspeft binary; text_golden is BUILD/tests/text_golden")
    ap.add_argument("--keep", help="train the tokenizers into this directory and keep it")
    args = ap.parse_args()
    helper = os.path.join(os.path.dirname(os.path.abspath(args.tspeft)), "tests", "text_golden")
    argv = ["--helper", helper] + (["--keep", args.keep] if args.keep else [])
    return make_golden.main(argv)


if __name__ == "__main__":
    sys.exit(main())
