#!/usr/bin/python3
"""Stand-in for the tspeft binary, for testing the parity harness itself (not a test of tspeft).

Accepts the `tspeft train ... --dump OUT` command line of test_parity.py and writes
OUT/step1.safetensors computed by reference.py in float64 (so its rounding differs from the fp32
reference the way an independent implementation's would).

    /usr/bin/python3 tests/parity/test_parity.py --tspeft tests/parity/fake_tspeft.py --no-self-checks

FAKE_TSPEFT_MUTATE=grad|drop|extra|keep|tau|exit injects one defect the harness must report.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import reference as R  # noqa: E402
import st  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["train"])
    for opt in ("--model", "--adapter", "--data", "--dump"):
        ap.add_argument(opt, required=True)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr")
    ap.add_argument("--threads")
    ap.add_argument("--seed")
    a = ap.parse_args()
    torch.set_num_threads(1)
    _, _, d = R.run_files(a.model, a.adapter, a.data, a.batch_size, a.grad_accum, torch.float64)
    mut = os.environ.get("FAKE_TSPEFT_MUTATE", "")
    first = lambda suffix: sorted(k for k in d if k.endswith(suffix))[0]  # noqa: E731
    if mut == "grad":
        k = first(".grad")
        d[k] = d[k] * 1.001
    elif mut == "drop":
        del d[first(".grad")]
    elif mut == "extra":
        d["base_model.model.model.norm.weight.grad"] = np.zeros(4, np.float32)
    elif mut == "keep":
        k = first(".keep")
        d[k] = d[k] + 1
    elif mut == "tau":
        k = first(".ts_tau.next")
        d[k] = d[k] * 1.01 + 1e-3
    elif mut == "exit":
        print("fake_tspeft: failing on purpose", file=sys.stderr)
        return 3
    os.makedirs(a.dump, exist_ok=True)
    st.save(os.path.join(a.dump, "step1.safetensors"),
            {k: v if v.dtype == np.int64 else v.astype(np.float32) for k, v in d.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
