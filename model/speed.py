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

from utils.distributed import print0

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


FEATURE_PASS = "torch.compile the feature pass (faster on GPUs after a slow first batch)"


def add_speed_args(parser, compile_help=FEATURE_PASS):
    """``--compile [MODE]`` and ``--cudnn_benchmark``; ``compile_help`` says what gets compiled (by
    default the frozen network's feature pass, as in the evaluation scripts)."""
    parser.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                        metavar="MODE",
                        help=f"{compile_help}. MODE is one of {', '.join(COMPILE_MODES)}; --compile alone is "
                             f"default. reduce-overhead and max-autotune add CUDA graphs on GPUs")
    parser.add_argument("--cudnn_benchmark", action="store_true",
                        help="let cuDNN time its convolution algorithms on the first batch of each shape and "
                             "keep the fastest (GPU speed; results stop being bitwise repeatable between runs)")


def configure_backends(args, device):
    """Apply ``--cudnn_benchmark`` for this process (a no-op off CUDA), and warn about a
    ``--channels_last`` that will slow a CPU run down."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(getattr(args, "cudnn_benchmark", False))
    elif getattr(args, "channels_last", False):
        print0(f"note: --channels_last makes GroupNorm several times slower on {device.type} "
               f"(bench/README.md); it pays on GPUs only")


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
