"""Gradient accumulation under DDP (two gloo processes): two ranks with --accum 2 end with the weights
of one process with --accum 4 on the same micro-batches, and reduce their gradients once per step
(the no_sync path), not once per micro-batch."""
import textwrap

import pytest
import torch
import yaml

import train
from model.ddpm import DDPM
from model.models import load_config
from tests.launch import REPO, run_two_processes
from utils.data import SyntheticImages

pytestmark = pytest.mark.cpu_only  # gloo processes on the CPU, whatever the test device; CI runs them

STEPS, MICRO = 3, 4  # optimizer steps; images per micro-batch
CONFIG = {
    "model_type": "DDPM", "diffusion": {"n_T": 20, "betas": [1.0e-4, 0.02]},
    "network": {"image_shape": [3, 16, 16], "n_channels": 32, "ch_mults": [1, 2], "is_attn": [False, True],
                "dropout": 0.0, "n_blocks": 1},
    "dataset": "synthetic", "batch_size": MICRO, "n_epoch": 1, "lrate": 1.0e-3, "warm_epoch": 1, "ema": 0.99,
    "num_workers": 0, "linear": {"timestep": 11, "blockname": "out_2"},
    # Some biases feed a GroupNorm that nearly cancels them: their gradients are float round-off, which
    # Adam's default eps (1e-8) would turn into full-size steps that differ between any two summation
    # orders. A larger eps leaves such parameters still, and the rest comparable to float precision.
    "optim_args": {"eps": 1.0e-3},
}


def micro_batch(step, index):
    """Micro-batch ``index`` (0..3) of optimizer step ``step``: images, timesteps and noise."""
    generator = torch.Generator().manual_seed(1000 * step + index)
    images = torch.rand(MICRO, 3, 16, 16, generator=generator)
    return images, torch.randint(1, 21, (MICRO,), generator=generator), torch.randn(images.shape, generator=generator)


def keyed_loss(original_forward):
    """DDPM.forward with the timesteps and noise of whichever micro-batch it is given, so that the
    loss of a micro-batch does not depend on the process or the order it runs in."""
    known = [micro_batch(step, index) for step in range(STEPS) for index in range(4)]

    def forward(self, x0, t=None, noise=None):
        images, t, noise = next(entry for entry in known if torch.equal(entry[0], x0))
        return original_forward(self, x0, t=t, noise=noise)
    return forward


def small_dataset(name, root, train, transform=None, image_size=None):
    return SyntheticImages(n=64, image_size=image_size, train=train, transform=transform)


# Under torchrun: rank r takes micro-batches 2r and 2r + 1 of every step; its weights, and the number
# of gradient all-reduces of the last --accum 2 step and of one extra --accum 1 step, are saved.
PROBE = textwrap.dedent(f"""
    import os, sys
    sys.path.insert(0, {str(REPO)!r})
    import torch
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    import train
    from model.ddpm import DDPM
    from tests.test_ddp_accumulation import STEPS, keyed_loss, micro_batch, small_dataset
    from model.models import load_config
    from utils.distributed import get_rank, init_distributed

    DDPM.forward = keyed_loss(DDPM.forward)
    train.build_dataset = small_dataset
    args = train.parse_args()
    device = init_distributed(args.device)
    rank = get_rank()
    state = train.build_training(load_config(args.config), args, device)
    reductions = []

    def counting_hook(process_group, bucket):
        reductions.append(state.step)
        return allreduce_hook(process_group, bucket)

    state.model.register_comm_hook(None, counting_hook)
    for step in range(STEPS):
        train.train_step(state, torch.cat([micro_batch(step, 2 * rank + k)[0] for k in range(2)]))
    weights = {{key: value.clone() for key, value in state.diffusion.state_dict().items()}}
    with_accum = reductions.count(STEPS - 1)  # the last step's, after DDP has settled its buckets
    state.accum = 1
    train.train_step(state, micro_batch(0, rank)[0])
    torch.save({{"weights": weights, "reductions_accum2": with_accum,
                "reductions_accum1": reductions.count(STEPS)}}, os.environ["PROBE_OUT"] + f"/rank{{rank}}.pt")
    torch.distributed.destroy_process_group()
""")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp_accum")
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "save_dir": str(folder / "run")}))
    probe = folder / "probe.py"
    probe.write_text(PROBE)
    result = run_two_processes(probe, "--config", config, "--device", "cpu", "--accum", "2", cwd=REPO,
                               env={"PROBE_OUT": str(folder)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return config, [torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]


def test_two_ranks_with_accum_2_equal_one_process_with_accum_4(two_ranks, monkeypatch):
    config, ranks = two_ranks
    monkeypatch.setattr(DDPM, "forward", keyed_loss(DDPM.forward))
    monkeypatch.setattr(train, "build_dataset", small_dataset)
    args = train.parse_args(["--config", str(config), "--device", "cpu", "--accum", "4"])
    single = train.build_training(load_config(args.config), args, torch.device("cpu"))
    initial = {key: value.clone() for key, value in single.diffusion.state_dict().items()}
    for step in range(STEPS):
        train.train_step(single, torch.cat([micro_batch(step, index)[0] for index in range(4)]))
    for key, value in single.diffusion.state_dict().items():
        assert torch.equal(ranks[0]["weights"][key], ranks[1]["weights"][key]), key
        torch.testing.assert_close(ranks[0]["weights"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert any(not torch.equal(value, initial[key]) for key, value in single.diffusion.state_dict().items())


def test_gradients_are_reduced_once_per_optimizer_step(two_ranks):
    _, ranks = two_ranks
    for rank in ranks:
        assert rank["reductions_accum1"] > 0
        assert rank["reductions_accum2"] == rank["reductions_accum1"]
