"""recurrent-bn: Recurrent Batch Normalization (Cooijmans et al. 2016) as drop-in PyTorch layers.

    import recurrent_bn
    lstm = recurrent_bn.LSTM(input_size, hidden_size, norm="bn", max_length=100)
    output, (h_n, c_n) = lstm(x)                         # x: (T, B, input_size)
    recurrent_bn.estimate_population_statistics(model, batches)  # before testing, as the paper does
"""

from recurrent_bn.layers import LSTM, RNN, estimate_population_statistics
from recurrent_bn.norm import RecurrentBatchNorm, RecurrentLayerNorm

__all__ = ["LSTM", "RNN", "RecurrentBatchNorm", "RecurrentLayerNorm", "estimate_population_statistics"]
__version__ = "0.1.0"
