"""Compiles a host-emulation harness of the CUDA kernels (``tests/extensions/host_emulation``:
the kernels of ``extensions/treessm_cuda`` with host stand-ins for the CUDA names) with
AddressSanitizer and UBSan; skips the test without a C++20 compiler."""
import shutil
import subprocess
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "extensions" / "treessm_cuda"
SHIM = Path(__file__).resolve().parent / "extensions" / "host_emulation"


def compile_harness(out_dir: Path, source: str) -> Path:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = out_dir / Path(source).stem
    # no contraction into fused multiply-adds: the device code decides where it fuses
    cmd = [cxx, "-std=c++20", "-O1", "-g", "-ffp-contract=off", "-fsanitize=address,undefined",
           "-fno-sanitize-recover=undefined", f"-I{SHIM}", f"-I{SRC}", str(SHIM / source),
           "-o", str(exe), "-lpthread"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        if "barrier" in r.stderr and "No such file" in r.stderr:
            pytest.skip("compiler lacks C++20 <barrier>")
        raise AssertionError(r.stderr[-4000:])
    return exe


def run_int64_harness(harness: Path, tmp: Path, header, arrays, *args: str):
    """Runs ``harness IN OUT *args`` on an input file of int64 words (``header``, then every
    tensor of ``arrays``) and returns its output file read as an int64 tensor."""
    import numpy as np
    import torch

    src, dst = tmp / "in.bin", tmp / "out.bin"
    with open(src, "wb") as f:
        np.array(header, np.int64).tofile(f)
        for t in arrays:
            t.numpy().astype(np.int64).tofile(f)
    subprocess.run([str(harness), str(src), str(dst), *args], check=True)
    return torch.from_numpy(np.fromfile(dst, np.int64))
