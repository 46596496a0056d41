"""Figure 8 (ours), the tanh question: can batch norm after W_x x and W_h h replace tanh and the bias in a plain RNN?

    python experiments/fig8_tanh_question.py [hydra overrides ...]        # pMNIST, CPU scale
    RBN_TASK=smnist python experiments/fig8_tanh_question.py

Sweeps rnn (tanh), bn_rnn (tanh(BN(W_h h + W_x x))), bn_linear_rnn (BN(W_x x) + BN(W_h h), no tanh, no bias) and
ln_rnn on $RBN_TASK (default pmnist) into <RBN_RUNS>/fig8_tanh_<task>. Their gradient flow at initialization is part
of experiments/fig1a_gradient_flow.py.
"""

import os

from _launch import finish, preset, sweep

TASK = os.environ.get("RBN_TASK", "pmnist")

if __name__ == "__main__":
    finish([sweep(f"fig8_tanh_{TASK}", [preset(TASK), "model=rnn,bn_rnn,bn_linear_rnn,ln_rnn"])])
