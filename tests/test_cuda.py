"""What only a GPU can show: no host syncs in a training step or a sampler, and CUDA graphs that
give the eager results. Skipped without CUDA (so in CI); bench/device_run.sh runs them first.

    python -m pytest -q tests/test_cuda.py     # on a machine with a GPU, about two minutes
"""
import contextlib

import pytest
import torch

import sample
import train
from model.models import build_diffusion, load_config
from model.noise import PerImageNoise

pytestmark = pytest.mark.cuda  # skipped without a CUDA device (tests/conftest.py)

DEVICE = torch.device("cuda")
# A small network with the paper's structure (attention at the second level) on 16x16 images.
SMALL = ["network.n_channels=64", "network.ch_mults=[1,2]", "network.is_attn=[False,True]", "network.n_blocks=2",
         "network.image_shape=[3,16,16]", "dataset=synthetic", "batch_size=32", "linear.blockname=out_2"]
CONFIGS = {"DDPM": "config/DDPM_ddpm.yaml", "EDM": "config/EDM_ddpm.yaml"}


@contextlib.contextmanager
def sync_errors():
    """Turn every synchronising CUDA call (``.item()``, a blocking copy, ...) into an error."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@contextlib.contextmanager
def full_fp32():
    """fp32 convolutions and matmuls without TF32, so that two code paths can be compared closely."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(autouse=True)
def fresh_compiler():
    torch.compiler.reset()
    yield
    torch.compiler.reset()
    torch.cuda.empty_cache()


def training_state(tmp_path, *flags, overrides=()):
    cfg = load_config("config/demo.yaml", SMALL + [f"save_dir={tmp_path}", *overrides])
    args = train.parse_args(["--config", "config/demo.yaml", "--gpu_data", *flags])
    return train.build_training(cfg, args, DEVICE)


@pytest.mark.parametrize("flags", [("--use_amp",), ("--precision", "bf16", "--channels_last")],
                         ids=["use_amp", "bf16"])
def test_a_training_step_never_waits_for_the_gpu(tmp_path, flags):
    """train.py's step (fused Adam, GradScaler, clipping, sync-free EMA) queues work and returns."""
    state = training_state(tmp_path, *flags)
    images = next(state.data.batches(0))
    train.train_step(state, images)  # the first step initialises optimizer state and kernels
    with sync_errors():
        losses = [train.train_step(state, images) for _ in range(3)]
    assert torch.isfinite(torch.stack(losses)).all()


def test_an_augmented_edm_training_step_never_waits_for_the_gpu(tmp_path):
    """EDM_ddpmpp_aug's step: the augmentation decides everything from its CPU draws and sends them
    over in one asynchronous copy."""
    cfg = load_config(CONFIGS["EDM"], SMALL + ["diffusion.augment_prob=0.5", "network.augment_dim=9",
                                              f"save_dir={tmp_path}"])
    args = train.parse_args(["--config", CONFIGS["EDM"], "--gpu_data", "--precision", "bf16"])
    state = train.build_training(cfg, args, DEVICE)
    images = next(state.data.batches(0))
    train.train_step(state, images)
    with sync_errors():
        losses = [train.train_step(state, images) for _ in range(3)]
    assert torch.isfinite(torch.stack(losses)).all()


@pytest.mark.parametrize("model_type", ["DDPM", "EDM"])
def test_samplers_never_wait_for_the_gpu(model_type):
    cfg = load_config(CONFIGS[model_type], SMALL)
    diffusion = build_diffusion(cfg).to(DEVICE).eval().requires_grad_(False)
    options = {"eta": 1.0} if model_type == "DDPM" else {}

    def draw():
        noise = PerImageNoise(range(8), DEVICE)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return diffusion.sample(x_T=noise((3, 16, 16)), steps=5, noise=noise, **options)

    draw()  # first calls set up kernels and workspaces
    noise = PerImageNoise(range(8), DEVICE)
    x_T = noise((3, 16, 16))
    with sync_errors(), torch.autocast("cuda", dtype=torch.bfloat16):
        images = diffusion.sample(x_T=x_T, steps=5, noise=noise, **options)
    assert torch.isfinite(images).all()


def test_cuda_graph_sampling_gives_the_eager_images():
    with full_fp32():
        cfg = load_config(CONFIGS["DDPM"], SMALL)
        eager = build_diffusion(cfg).to(DEVICE).eval().requires_grad_(False)
        graphed = build_diffusion(cfg).to(DEVICE).eval().requires_grad_(False)
        graphed.load_state_dict(eager.state_dict())
        sample.prepare_network(graphed, "reduce-overhead", channels_last=False)
        x_T = PerImageNoise(range(16), DEVICE)((3, 16, 16))
        expected = eager.sample(x_T=x_T, steps=10)
        first = graphed.sample(x_T=x_T, steps=10)
        second = graphed.sample(x_T=x_T, steps=10)  # replayed graphs, not the recording run
    assert torch.allclose(first, expected, atol=1e-3)
    assert torch.allclose(second, expected, atol=1e-3)


def test_cuda_graph_training_steps_give_the_eager_loss_and_gradients(tmp_path):
    """Same weights, same batches, no dropout, fp32 without TF32: CUDA graphs (with gradient accumulation
    over two micro-batches) compute the eager step's loss and gradients, in the warm-up, the recording
    and two replays. Before each step the graphed network takes the eager one's weights, so rounding
    never compounds through chained Adam steps (whose first updates are about lr * sign(gradient), so a
    gradient near zero may move either way). Within one step only inductor's fused kernels sum in
    another order: float32 rounding, far below rtol 1e-4; atol 1e-6 covers entries whose terms cancel
    (the clipped gradients have norm at most 1)."""
    flags = ("--precision", "fp32", "--accum", "2")
    states = {}
    with full_fp32():
        for label, extra in (("eager", ()), ("graphs", ("--compile", "reduce-overhead"))):
            torch.manual_seed(0)
            states[label] = training_state(tmp_path / label, *flags, *extra, overrides=["network.dropout=0"])
        eager, graphed = states["eager"], states["graphs"]
        batches = eager.data.batches(0)
        for step in range(4):
            images = next(batches)
            with torch.no_grad():
                for target, source in zip(graphed.diffusion.parameters(), eager.diffusion.parameters()):
                    target.copy_(source)  # in place: the graphs' parameter addresses stay
            torch.manual_seed(1 + step)  # the same timesteps and noise in both
            expected = train.train_step(eager, images)
            torch.manual_seed(1 + step)
            got = train.train_step(graphed, images)
            assert torch.isfinite(got), step
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=0, msg=f"loss of step {step}")
            pairs = zip(graphed.diffusion.named_parameters(), eager.diffusion.parameters())
            for (name, parameter), reference in pairs:
                torch.testing.assert_close(parameter.grad, reference.grad, rtol=1e-4, atol=1e-6,
                                           msg=f"gradient of {name} in step {step}")
