"""Figure 1b: the expected derivative of tanh, E[tanh'(z)] for z ~ N(0, σ²), with its inter-quartile band.

    python experiments/fig1b_tanh_derivative.py

Writes <RBN_ANALYSIS>/fig1b_tanh_derivative.csv (σ from 0 to 2 in steps of 0.01) and its .json. Exact (quadrature and
half-normal quantiles), under a second; needs no data.
"""

from __future__ import annotations

import numpy as np
from _launch import analysis_root

from recurrent_bn import analysis
from recurrent_bn.provenance import provenance, write_analysis


def main() -> None:
    out = analysis_root() / "fig1b_tanh_derivative.csv"
    table = analysis.expected_tanh_derivative(np.round(np.arange(0, 2.0001, 0.01), 2))
    meta = provenance(method="Gauss-Hermite quadrature (200 nodes) for the mean; quantiles of tanh'(z) "
                             "from the half-normal quantiles of |z|, exact")
    write_analysis(table, out, meta)
    print(table[table["sigma"].isin([0.1, 0.5, 1.0])].to_string(index=False))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
