#!/usr/bin/python3
"""Can a threshold on r choose the tokens that matter? Per module, how the gate's r_i (relative update
size) relates to c_i = <dLoss/dh_i, m_i> (the token's first-order effect on the loss), from one
step's dump of a trained adapter:

    tspeft train --model M --adapter RUN --data D ... --steps 1 --lr 0 --gate on --dump DUMP
    /usr/bin/python3 examples/gate_rc.py DUMP/step1.safetensors

Columns per module: tokens; Spearman rank correlation of r and |c| (a threshold on r can only pick
high-|c| tokens when it is high); the share of sum |c| carried by the 10% of tokens with the largest
|c| (how concentrated the first-order importance is); the share of sum |c| on the half of the tokens
with the smallest r (what dropping them costs in importance); and the signed sum of c on that half
over sum |c| (its first-order loss change: near 0 means dropping them is first-order free).
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "parity"))
import numpy as np  # noqa: E402

import st  # noqa: E402


def ranks(x):
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__.split("\n\n")[1])
    t = st.load(sys.argv[1])
    mods = sorted(k[:-len(".ts_r")] for k in t if k.endswith(".ts_r"))
    if not mods:
        sys.exit("gate_rc: %s holds no ts_r / ts_c (was the dump made with --gate on?)" % sys.argv[1])
    print("%-40s %6s %9s %9s %12s %12s" % ("module", "tokens", "rho(r,|c|)", "top10% |c|", "low-r half |c|",
                                          "low-r half c"))
    rhos = []
    for m in mods:
        r, c = np.asarray(t[m + ".ts_r"], np.float64), np.asarray(t[m + ".ts_c"], np.float64)
        a = np.abs(c)
        if len(r) < 2 or a.sum() == 0:
            continue
        rho = float(np.corrcoef(ranks(r), ranks(a))[0, 1])
        rhos.append(rho)
        low = np.argsort(r, kind="stable")[:len(r) // 2]
        top = np.sort(a)[::-1][:max(1, len(a) // 10)].sum() / a.sum()
        print("%-40s %6d %9.2f %9.2f %12.2f %+12.3f" % (m.replace("base_model.model.", ""), len(r), rho, top,
                                                       a[low].sum() / a.sum(), c[low].sum() / a.sum()))
    print("median rho(r, |c|) over %d modules: %.2f" % (len(rhos), float(np.median(rhos))))


if __name__ == "__main__":
    main()
