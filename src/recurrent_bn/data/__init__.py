"""The paper's datasets (MNIST, Penn Treebank characters, text8), sklearn digits, and device-side batching.

Every loader reads real files under the data root (see ``resolve_data_root``) and raises a one-line
``DataNotFoundError`` / ``DataCorruptError`` saying what to do; nothing is ever synthesised in their place.
``make data`` fetches the files: see ``recurrent_bn.data.download.download``, which is deliberately not
re-exported here, because a function ``download`` in this namespace would hide the ``download`` submodule.
"""

from recurrent_bn.data.batches import (
    ClassBatches,
    TextBatches,
    class_eval_batches,
    text_eval_batches,
    text_streams,
)
from recurrent_bn.data.digits import load_digits
from recurrent_bn.data.download import DATASETS, verify_file
from recurrent_bn.data.mnist import load_mnist, pixel_order
from recurrent_bn.data.root import resolve_data_root
from recurrent_bn.data.text import load_ptb_chars, load_text8

__all__ = [
    "DATASETS",
    "ClassBatches",
    "TextBatches",
    "class_eval_batches",
    "load_digits",
    "load_mnist",
    "load_ptb_chars",
    "load_text8",
    "pixel_order",
    "resolve_data_root",
    "text_eval_batches",
    "text_streams",
    "verify_file",
]
