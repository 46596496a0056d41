"""recurrent-bn: Recurrent Batch Normalization (Cooijmans et al. 2016) as drop-in PyTorch layers.

    import recurrent_bn
    lstm = recurrent_bn.LSTM(input_size, hidden_size, norm="bn", max_length=100)
    output, (h_n, c_n) = lstm(x)                         # x: (T, B, input_size)
    recurrent_bn.estimate_population_statistics(model, batches)  # before testing, as the paper does
    cell = recurrent_bn.LSTMCell(input_size, hidden_size, norm="bn", max_length=100)
    h, c = cell(x[t], (h, c), step=t)                    # one step of the layer, for loops of your own
"""

import torch

from recurrent_bn.cells import LSTMCell, RNNCell
from recurrent_bn.layers import LSTM, RNN, estimate_population_statistics
from recurrent_bn.norm import CellShift, RecurrentBatchNorm, RecurrentLayerNorm

# A whole model saved with torch.save(model) loads under torch.load's default weights_only=True, as a model of
# torch.nn's own layers does: the package's modules hold only tensors, numbers and strings.
torch.serialization.add_safe_globals([LSTM, RNN, LSTMCell, RNNCell, RecurrentBatchNorm, RecurrentLayerNorm, CellShift])

__all__ = [
    "LSTM", "LSTMCell", "RNN", "RNNCell", "RecurrentBatchNorm", "RecurrentLayerNorm", "estimate_population_statistics",
]
__version__ = "0.1.0"
