"""Figure 6: sensitivity of the BN-LSTM to the initial γ, γ_init ∈ {0.1, 0.3, 0.5, 0.7, 1.0}, on pMNIST and PTB.

    python experiments/fig6_gamma.py [hydra overrides ...]            # CPU scale
    RBN_SCALE=paper python experiments/fig6_gamma.py
    RBN_TASK=pmnist python experiments/fig6_gamma.py                 # one of the two tasks

Sweeps into <RBN_RUNS>/fig6_gamma_pmnist and <RBN_RUNS>/fig6_gamma_ptb (5 runs each). Needs MNIST and PTB.
"""

import os

from _launch import finish, preset, sweep

TASKS = os.environ.get("RBN_TASK", "pmnist,ptb").split(",")
GAMMAS = "0.1,0.3,0.5,0.7,1.0"  # an explicit list: Hydra's range(0.1, ...) gives 0.30000000000000004

if __name__ == "__main__":
    finish([sweep(f"fig6_gamma_{task}", [preset(task), "model=bn_lstm", f"model.gamma_init={GAMMAS}"])
            for task in TASKS])
