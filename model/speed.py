"""Speed switches shared by the scripts: torch.compile with a chosen mode, and cuDNN autotuning.

    python train.py  --config config/DDPM_ddpm.yaml --precision bf16 --compile             # inductor
    python train.py  --config config/DDPM_ddpm.yaml --precision bf16 --compile reduce-overhead
    python sample.py --config config/DDPM_ddpm.yaml --precision bf16 --compile reduce-overhead --cudnn_benchmark

``--compile`` alone is inductor's default mode. ``reduce-overhead`` and ``max-autotune`` also replay
the compiled network as CUDA graphs, which removes the host's per-kernel launch cost, likely the
bottleneck of a 35.7M UNet step at batch 128 (docs/DESIGN.md, "Speed"); on a CPU they compile like
the default mode.
"""
import torch

from utils.cli import COMPILE_MODES

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def _mode_argument(mode):
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    return None if mode == "default" else mode


def compile_module(module, mode):
    """Compile ``module`` in place (its parameter names and state dict stay as they are)."""
    module.compile(mode=_mode_argument(mode))
    return module


def compile_function(function, mode):
    """A compiled version of ``function`` (e.g. a bound ``forward_features``)."""
    return torch.compile(function, mode=_mode_argument(mode))


def uses_cuda_graphs(mode, device):
    """Whether a network compiled with ``mode`` on ``device`` is replayed as CUDA graphs."""
    return mode in CUDA_GRAPH_MODES and torch.device(device).type == "cuda"


def mark_step_begin(mode, device):
    """Tell torch that a new training iteration starts, so that CUDA-graph memory of the previous
    one may be reused; call it before each step's first forward pass. A no-op without CUDA graphs."""
    if uses_cuda_graphs(mode, device):
        torch.compiler.cudagraph_mark_step_begin()
