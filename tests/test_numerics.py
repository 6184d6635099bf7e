"""base.portable_cpu pins oneDNN/MKL to their AVX2 code paths from inside the process (seeds issue, point 2)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO

# Three AdamW steps of a small conv net in channels_last (oneDNN's path), then a digest of its output bits.
SCRIPT = """
import hashlib, sys
import torch
from pipeline.numerics import use_portable_cpu_kernels
torch.manual_seed(0)
torch.set_num_threads(2)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, groups=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, groups=16),
                          torch.nn.Flatten(), torch.nn.Linear(16 * 20 * 20, 10))
x = torch.randn(8, 3, 24, 24).to(memory_format=torch.channels_last)
use_portable_cpu_kernels(sys.argv[1] == "param")  # after the imports and the model, as the stages call it
net = net.to(memory_format=torch.channels_last)
for p in net.parameters():
    torch.nn.init.normal_(p, std=0.1)
opt = torch.optim.AdamW(net.parameters(), 1e-2)
for _ in range(3):
    loss = net(x).logsumexp(1).mean(); opt.zero_grad(); loss.backward(); opt.step()
print(hashlib.md5(net(x).detach().numpy().tobytes()).hexdigest())
"""


def _digest(mode: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "MKL_CBWR")}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        env={**clean, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return out.stdout.strip()


def test_the_param_gives_the_bits_of_the_exported_avx2_pin():
    """Set by the stage after torch is imported (but before the first kernel runs), the pin takes effect exactly as
    the variables exported before the process starts: the README's cross-machine recipe."""
    pinned = _digest("param")
    assert pinned == _digest("none", ONEDNN_MAX_CPU_ISA="AVX2", MKL_CBWR="AVX2")
    import torch

    if torch.backends.cpu.get_cpu_capability() == "AVX512":  # here the native kernels sum in another order
        assert pinned != _digest("none")
