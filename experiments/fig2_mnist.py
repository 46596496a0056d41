"""Figure 2 and Table 1: LSTM, BN-LSTM (and our extras VBN-LSTM, LN-LSTM) on sequential and permuted MNIST.

    python experiments/fig2_mnist.py [hydra overrides ...]           # CPU scale (conf/experiment/cpu_*)
    RBN_SCALE=paper python experiments/fig2_mnist.py                  # the paper's 100k iterations

Sweeps into <RBN_RUNS>/fig2_smnist and <RBN_RUNS>/fig2_pmnist (4 runs each). Needs MNIST.
"""

from _launch import finish, preset, sweep

MODELS = "lstm,bn_lstm,vbn_lstm,ln_lstm"

if __name__ == "__main__":
    finish([sweep(f"fig2_{task}", [preset(task), f"model={MODELS}"]) for task in ("smnist", "pmnist")])
