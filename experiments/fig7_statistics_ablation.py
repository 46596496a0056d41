"""Figure 7 (ours): per-timestep vs shared batch-norm statistics, and the ablation of each normalized term.

    python experiments/fig7_statistics_ablation.py [hydra overrides ...]     # pMNIST, CPU scale
    RBN_TASK=ptb RBN_SCALE=paper python experiments/fig7_statistics_ablation.py

Three sweeps on the task $RBN_TASK (default pmnist):
  <RBN_RUNS>/fig7_terms_<task>     bn_lstm normalizing each non-empty subset of {input, recurrent, cell} (7 runs;
                                   the full set is the per-timestep reference of the shared comparison)
  <RBN_RUNS>/fig7_shared_<task>    bn_lstm with statistics shared over time (1 run)
  <RBN_RUNS>/fig7_baseline_<task>  the plain LSTM (1 run)
"""

import os

from _launch import finish, preset, sweep

TASK = os.environ.get("RBN_TASK", "pmnist")
SUBSETS = "[input],[recurrent],[cell],[input,recurrent],[input,cell],[recurrent,cell],[input,recurrent,cell]"

if __name__ == "__main__":
    finish([
        sweep(f"fig7_terms_{TASK}", [preset(TASK), "model=bn_lstm", f"model.norm_terms={SUBSETS}"]),
        sweep(f"fig7_shared_{TASK}", [preset(TASK), "model=bn_lstm", "model.share_statistics_over_time=true"]),
        sweep(f"fig7_baseline_{TASK}", [preset(TASK), "model=lstm"]),
    ])
