"""Table 3: LSTM and BN-LSTM on text8.

    python experiments/table3_text8.py [hydra overrides ...]       # CPU scale (256 units, 3,000 steps)
    RBN_SCALE=paper python experiments/table3_text8.py

Sweeps into <RBN_RUNS>/table3_text8. Needs text8 (`make data`, 31 MB from mattmahoney.net): without it every job
fails with a one-line message saying so, and the sweep exits 1.
"""

from _launch import finish, preset, sweep

if __name__ == "__main__":
    finish([sweep("table3_text8", [preset("text8"), "model=lstm,bn_lstm"])])
