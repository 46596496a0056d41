"""The tanh question's ceiling: the best linear classifier of the MNIST pixels (the same split as the runs: first 50k
training images, last 10k for validation, the 10k test images), for the true permutation / scanline order (one
number: a linear classifier ignores the order) and for the authors' pMNIST draw (501 distinct pixels).

    python experiments/linear_ceiling.py          # writes results/analysis/linear_ceiling.json

Needs MNIST ($RBN_DATA_ROOT or ./data).
"""

import json
import time

from _launch import analysis_root

from recurrent_bn import data
from recurrent_bn.analysis import provenance
from recurrent_bn.linear_ceiling import linear_ceiling

if __name__ == "__main__":
    splits = data.load_mnist(data.resolve_data_root(None), num_valid=10_000)
    start = time.time()
    result = {"any_true_permutation": linear_ceiling(splits)}
    result["authors_order"] = linear_ceiling(splits, order=data.pixel_order("authors", 0))
    result["meta"] = provenance(seconds=round(time.time() - start, 1),
                                method="sklearn LogisticRegression (lbfgs, multinomial), C chosen on validation")
    path = analysis_root() / "linear_ceiling.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "meta"}, indent=2))
