"""Compile the Triton LSTM kernels for sm_80 (A100) and sm_90 (H100/H200) without a GPU and report their resources.

For the paper's three shapes (pMNIST B 100 H 100, PTB B 64 H 1000, text8 B 128 H 2000) and each kernel the layers
launch there (forward and backward; the plain LSTM and vbn_lstm's loop, bn_lstm in training and in evaluation,
ln_lstm), with the block sizes and warps `triton_lstm.launch_config` picks, it prints registers per thread, shared
memory and spill bytes. No spills at these shapes is the target.

API used (triton 3.6 and 3.8): `triton.compile(triton.compiler.ASTSource(fn, signature, constexprs),
target=triton.backends.compiler.GPUTarget("cuda", arch, 32), options={"num_warps": ...})` compiles to PTX and cubin
with no device; shared memory is the compiled kernel's `metadata.shared`; registers and spills come from running
the ptxas that ships with triton (`triton/backends/nvidia/bin/ptxas -v`) on the PTX, since the compiled kernel's
`n_regs`/`n_spills` need a driver to load the cubin. Run with TRITON_INTERPRET unset.

    python scripts/gpu_kernels.py [--arch 80 90]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("gpu_kernels.py compiles the kernels: unset TRITON_INTERPRET")

import triton  # noqa: E402
import triton.backends.nvidia  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from recurrent_bn import triton_kernels, triton_lstm  # noqa: E402

SHAPES = {"pmnist": (100, 100), "ptb": (64, 1000), "text8": (128, 2000)}
# model: (recurrent kind, cell kind, has β_c); bn_lstm in evaluation uses the folded per-timestep affine maps.
MODELS = {
    "lstm/vbn": (triton_lstm.NONE, triton_lstm.NONE, False),
    "bn train": (triton_lstm.BATCH, triton_lstm.BATCH, True),
    "bn eval": (triton_lstm.AFFINE, triton_lstm.AFFINE, False),
    "ln": (triton_lstm.LAYER, triton_lstm.LAYER, True),
}
PTXAS = Path(triton.backends.nvidia.__file__).parent / "bin" / "ptxas"


def compile_kernel(fn, constants: dict, arch: int, num_warps: int):
    names = fn.arg_names
    signature = {n: "constexpr" if n in constants else ("*fp32" if n.endswith("_ptr") else "i32") for n in names}
    source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constants.items()})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def ptxas_report(ptx: str) -> dict:
    target = re.search(r"^\.target (\S+)", ptx, re.MULTILINE).group(1)  # sm_90a for arch 90
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "kernel.ptx"
        path.write_text(ptx)
        result = subprocess.run([str(PTXAS), f"-arch={target}", "-v", str(path), "-o", str(path.with_suffix(".o"))],
                                capture_output=True, text=True, check=True)
    text = result.stdout + result.stderr
    registers = re.search(r"Used (\d+) registers", text)
    stores = re.search(r"(\d+) bytes spill stores", text)
    loads = re.search(r"(\d+) bytes spill loads", text)
    return {
        "registers": int(registers.group(1)) if registers else -1,
        "spill_stores": int(stores.group(1)) if stores else -1,
        "spill_loads": int(loads.group(1)) if loads else -1,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    print(f"triton {triton.__version__}, ptxas {PTXAS}")
    print(f"{'shape':7} {'arch':5} {'model':9} {'kernel':17} {'blocks':22} {'warps':>5} {'regs':>5} {'smem B':>7} "
          f"{'spill st/ld B':>13} {'compile s':>9}")
    cache: dict = {}
    spilled = 0
    for shape in args.shapes:
        batch, hidden = SHAPES[shape]
        for arch in args.arch:
            for model, (kr, kc, beta_c) in MODELS.items():
                rows = triton_lstm.layout((kr, kc)) == "rows"
                launch = triton_lstm.launch_config(batch, hidden, rows)
                for direction in ("forward", "backward"):
                    fn = getattr(triton_kernels, f"lstm_step_{direction}_{'rows' if rows else 'columns'}")
                    constants = {"KR": kr, "KC": kc, "HAS_BETA_C": beta_c, **launch["blocks"]}
                    if rows:  # the rows kernels take H as a constant (triton_kernels.py's docstring)
                        constants["H"] = hidden
                    if direction == "forward":
                        constants["HAS_BETA_R"] = False
                    key = (fn.__name__, arch, launch["num_warps"], tuple(sorted(constants.items())))
                    start = time.perf_counter()
                    elapsed = "same"  # the same kernel as at an earlier shape
                    if key not in cache:
                        compiled = compile_kernel(fn, constants, arch, launch["num_warps"])
                        cache[key] = {"shared": compiled.metadata.shared, **ptxas_report(compiled.asm["ptx"])}
                        elapsed = f"{time.perf_counter() - start:.1f}"
                    report = cache[key]
                    spilled += report["spill_stores"] + report["spill_loads"] > 0
                    blocks = ",".join(f"{k}={v}" for k, v in launch["blocks"].items())
                    name = f"{direction} {'rows' if rows else 'columns'}"
                    print(f"{shape:7} sm_{arch:<2} {model:9} {name:17} {blocks:22} {launch['num_warps']:>5} "
                          f"{report['registers']:>5} {report['shared']:>7} "
                          f"{report['spill_stores']:>6}/{report['spill_loads']:<6} {elapsed:>9}", flush=True)
    print(f"{spilled} kernel compilations with spills")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
