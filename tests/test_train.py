"""train.py on the CPU: exact resume, the checkpoint layout, the data paths, gradient accumulation,
and resuming from a checkpoint of the original code."""
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import train
from model.models import diffusion_state_dict, load_config
from model.training import restore_training, save_training_checkpoint
from tests.helpers import IMAGES, assert_same_tensors, parse, run, small_synthetic, write_config
from utils.checkpoint import find_resume_checkpoint, load_checkpoint
from utils.data import SyntheticImages, TrainData, uint8_images
from utils.logging import read_jsonl

GOLDEN = Path(__file__).resolve().parent / "golden"


@pytest.fixture(scope="module")
def straight_run(tiny_setup, tmp_path_factory):
    """Two epochs in one go; checkpoints after epoch 0 and epoch 1 (the last). Also returns the loss
    of every step."""
    folder = tmp_path_factory.mktemp("straight")
    config = write_config(folder)
    losses, step = [], train.train_step

    def recording_step(state, images):
        loss = step(state, images)
        losses.append(float(loss))
        return loss

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "train_step", recording_step)
        state = run(config, folder / "run")
    return config, folder / "run", state, losses


def test_checkpoint_layout_and_outputs(straight_run):
    config, run_dir, state, losses = straight_run
    cfg = load_config(config, [f"save_dir={run_dir}"])
    checkpoint = load_checkpoint(run_dir / "ckpts" / "model_1.pth")  # weights_only loading
    assert set(checkpoint) == {"MODEL", "EMA", "opt", "scaler", "epoch", "step", "rng", "config"}
    assert checkpoint["epoch"] == 1 and checkpoint["step"] == 2 * IMAGES // 16
    assert checkpoint["scaler"] is None  # fp32
    assert checkpoint["config"] == cfg.to_dict()
    assert checkpoint["rng"]["world_size"] == 1 and len(checkpoint["rng"]["ranks"]) == 1
    assert all(key.startswith("nn_model.") for key in checkpoint["MODEL"])
    assert_same_tensors(checkpoint["MODEL"], state.diffusion.state_dict())
    ema = checkpoint["EMA"]
    assert int(ema["step"]) == checkpoint["step"] and bool(ema["initted"])
    assert_same_tensors({k: v for k, v in ema.items() if k.startswith("ema_model.")},
                        {f"ema_model.{k}": v for k, v in state.ema.ema_model.state_dict().items()})
    weight = "nn_model.image_proj.weight"
    assert not torch.equal(diffusion_state_dict(checkpoint, "ema")[weight], checkpoint["MODEL"][weight])
    first = load_checkpoint(run_dir / "ckpts" / "model_0.pth")
    assert not torch.equal(first["MODEL"][weight], checkpoint["MODEL"][weight])
    assert len(checkpoint["opt"]["state"]) == len(list(state.diffusion.parameters()))

    records = read_jsonl(run_dir / "log.jsonl")
    assert [r["epoch"] for r in records] == [0, 1]
    assert [r["lr"] for r in records] == [1.0e-3 / 2, 1.0e-3]  # warm-up over 2 epochs
    assert [r["step"] for r in records] == [8, 16]
    steps = IMAGES // 16
    assert len(losses) == 2 * steps
    for epoch, record in enumerate(records):
        assert set(record) == {"epoch", "step", "steps", "loss", "lr", "img_per_s", "peak_mem_gib", "seconds"}
        assert record["loss"] == pytest.approx(sum(losses[epoch * steps:(epoch + 1) * steps]) / steps, rel=1e-6)
        assert record["img_per_s"] > 0 and record["peak_mem_gib"] > 0
    for epoch in (0, 1):
        with Image.open(run_dir / "visual" / f"image_ep{epoch}_ema.png") as grid:
            assert grid.size == (10 * 18 + 2, 2 * 18 + 2)  # 2 rows of 10 16x16 images, 2-pixel padding
    assert (run_dir / "loss.png").stat().st_size > 0
    assert load_config(run_dir / "config.yaml") == cfg


@pytest.mark.cpu_only  # two runs compared bitwise: CPU kernels repeat exactly, CUDA attention backward need not
@pytest.mark.parametrize("workers, how", [(0, "--resume"), (2, "load_epoch")])
def test_resume_continues_exactly(straight_run, tmp_path, workers, how):
    config, straight_dir, _, _ = straight_run
    run(config, tmp_path / "run", "--num_workers", str(workers), n_epoch=1)
    if how == "--resume":
        state = run(config, tmp_path / "run", "--resume", "--num_workers", str(workers))
    else:
        state = run(config, tmp_path / "run", "--num_workers", str(workers), load_epoch=0)
    assert state.epoch == 2 and state.step == 16
    straight = load_checkpoint(straight_dir / "ckpts" / "model_1.pth")
    resumed = load_checkpoint(tmp_path / "run" / "ckpts" / "model_1.pth")
    assert_same_tensors(straight["MODEL"], resumed["MODEL"])
    assert_same_tensors(straight["EMA"], resumed["EMA"])
    assert straight["step"] == resumed["step"]
    assert [r["epoch"] for r in read_jsonl(tmp_path / "run" / "log.jsonl")] == [0, 1]


@pytest.mark.cpu_only  # two runs compared bitwise: CPU kernels repeat exactly, CUDA attention backward need not
def test_device_data_path_matches_loader(tiny_setup, tmp_path):
    config = write_config(tmp_path)
    loader = run(config, tmp_path / "loader", "--max_steps", "3")
    on_device = run(config, tmp_path / "device", "--max_steps", "3", "--gpu_data")
    assert loader.step == on_device.step == 3
    assert_same_tensors(loader.diffusion.state_dict(), on_device.diffusion.state_dict())
    assert not (tmp_path / "loader" / "ckpts").exists()  # an epoch cut short is not checkpointed
    assert read_jsonl(tmp_path / "loader" / "log.jsonl")[0]["steps"] == 3
    # channels_last lays out the noise drawn by randn_like differently, so runs differ: check that the
    # network computes the same function, and that a run trains.
    fast = run(config, tmp_path / "fast", "--max_steps", "2", "--gpu_data", "--channels_last")
    initial = train.build_training(*parse(config, tmp_path / "initial"), torch.device("cpu")).diffusion.nn_model
    for name, value in fast.diffusion.nn_model.state_dict().items():
        assert torch.isfinite(value).all(), name
    # The two steps moved every weight away from the same initialisation.
    assert fast.step == 2
    assert all(not torch.equal(value, initial.state_dict()[name]) for name, value in
               fast.diffusion.nn_model.named_parameters())
    x, t = torch.rand(4, 3, 16, 16), torch.rand(4)
    weights = loader.diffusion.nn_model.state_dict()
    fast.diffusion.nn_model.load_state_dict(weights)
    assert fast.diffusion.nn_model.image_proj.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = loader.diffusion.nn_model.eval()(x, t)
        got = fast.diffusion.nn_model.eval()(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_flips_and_order_depend_on_epoch_and_rank_only(tiny_setup, tmp_path, monkeypatch):
    cfg, args = parse(write_config(tmp_path), tmp_path / "run")
    dataset = small_synthetic("synthetic", None, True, image_size=16)
    data = TrainData(dataset, 16, torch.device("cpu"), seed=cfg.seed, num_workers=0)
    epoch0 = torch.cat(list(data.batches(0)))
    assert torch.equal(torch.cat(list(data.batches(0))), epoch0)
    assert not torch.equal(torch.cat(list(data.batches(1))), epoch0)
    # every image appears once per epoch, half of them mirrored
    originals = torch.stack([dataset[i][0] for i in range(len(dataset))])
    mirrored = [bool((originals == image.flip(-1)).flatten(1).all(1).any()) and
                not bool((originals == image).flatten(1).all(1).any()) for image in epoch0]
    assert 0.3 < sum(mirrored) / len(mirrored) < 0.7
    unpacked = torch.utils.data.Subset(dataset, range(len(dataset)))  # no .images: decoded one by one
    assert torch.equal(uint8_images(unpacked), dataset.images)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    other_rank = TrainData(dataset, 16, torch.device("cpu"), seed=cfg.seed, num_workers=0)
    assert len(other_rank) == len(data) // 2


def test_loss_scaler_state_survives_a_checkpoint(tiny_setup, tmp_path):
    """The loss-scaling path of --use_amp (CUDA fp16) keeps its scale across a resume. CPU fp16 kernels
    are slow, so the scaler runs here under bf16 autocast: the scaler's steps are the same."""
    cfg, args = parse(write_config(tmp_path), tmp_path / "run")

    def fp16_state():
        state = train.build_training(cfg, args, torch.device("cpu"))
        state.precision = "bf16"
        state.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
        return state

    state = fp16_state()
    images = next(state.data.batches(0))
    for _ in range(3):
        assert torch.isfinite(train.train_step(state, images))
    path = save_training_checkpoint(state, 0)
    checkpoint = load_checkpoint(path)
    assert checkpoint["scaler"]["scale"] == 2.0 ** 11 and checkpoint["scaler"]["_growth_tracker"] == 1
    resumed = fp16_state()
    restore_training(resumed, checkpoint, path)
    assert resumed.scaler.state_dict() == state.scaler.state_dict()
    assert (resumed.epoch, resumed.step) == (1, 3)


def gradients(state):
    return [p.grad.clone() for p in state.diffusion.parameters()]


def test_accumulation_averages_micro_batches(tiny_setup, tmp_path, monkeypatch):
    cfg, args = parse(write_config(tmp_path), tmp_path / "run", "--accum", "2")
    state = train.build_training(cfg, args, torch.device("cpu"))
    assert state.base_lr == state.optimizer.param_groups[0]["lr"] == 2 * cfg.lrate
    images = next(state.data.batches(0))
    assert images.shape == (2 * cfg.batch_size, 3, 16, 16)

    torch.manual_seed(5)
    losses, micro_gradients = [], []
    for micro_batch in images.chunk(2):
        state.diffusion.zero_grad()
        loss = state.diffusion(micro_batch)
        loss.backward()
        losses.append(loss.detach())
        micro_gradients.append(gradients(state))
    expected = [(first + second) / 2 for first, second in zip(*micro_gradients)]

    monkeypatch.setattr(train, "CLIP_NORM", 1e9)  # compare raw gradients first
    torch.manual_seed(5)
    loss = train.train_step(state, images)
    torch.testing.assert_close(loss, (losses[0] + losses[1]) / 2)
    for got, want in zip(gradients(state), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)

    monkeypatch.setattr(train, "CLIP_NORM", 1.0)
    state = train.build_training(cfg, args, torch.device("cpu"))
    torch.manual_seed(5)
    train.train_step(state, images)
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in expected]))
    assert norm > 1  # so that clipping acts
    for got, want in zip(gradients(state), expected):
        torch.testing.assert_close(got, want / (norm + 1e-6), rtol=1e-4, atol=1e-8)


def test_resume_from_the_original_codes_checkpoint(tiny_setup, tmp_path):
    """load_epoch picks up a checkpoint written by the original DDAE code (no epoch, step, RNG)."""
    network = torch.load(GOLDEN / "original_ckpt_tiny_DDPM.expect.pt", weights_only=True)["config"]
    config = write_config(tmp_path, network=network, diffusion={"n_T": 1000, "betas": [1.0e-4, 0.02]},
                          linear={"timestep": 11, "blockname": "out_1"})
    run_dir = tmp_path / "run"
    (run_dir / "ckpts").mkdir(parents=True)
    path = run_dir / "ckpts" / "model_3.pth"
    shutil.copy(GOLDEN / "original_ckpt_tiny_DDPM.pth", path)
    cfg, args = parse(config, run_dir, load_epoch=3, n_epoch=5)
    assert find_resume_checkpoint(cfg, args.resume, args.config) == str(path)
    state = train.build_training(cfg, args, torch.device("cpu"))
    original = load_checkpoint(path)
    restore_training(state, original, str(path))
    assert (state.epoch, state.step, state.ema_updater.step) == (4, 3, 3)
    assert_same_tensors(state.diffusion.state_dict(), diffusion_state_dict(original, "online"))
    assert_same_tensors(state.ema.ema_model.state_dict(), diffusion_state_dict(original, "ema"))
    saved_moments = original["opt"]["state"][0]["exp_avg"]
    assert torch.equal(state.optimizer.state_dict()["state"][0]["exp_avg"], saved_moments)
    images = next(state.data.batches(state.epoch))
    assert torch.isfinite(train.train_step(state, images))
    assert state.step == 4 and state.ema_updater.step == 4


class Unread(torch.utils.data.Dataset):
    """A dataset of a given length whose items are never read: enough to count a loader's batches."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


@pytest.mark.parametrize("world_size, steps, last, dropped_steps", [(1, 391, 80, 390), (4, 98, 84, 97)])
def test_cifar_epochs_keep_the_last_batch_as_the_original(world_size, steps, last, dropped_steps):
    from utils.data import build_loader
    for rank in range(world_size):
        loader = build_loader(Unread(50_000), 128, train=True, rank=rank, world_size=world_size, drop_last=False)
        assert len(loader) == steps and len(loader.sampler) - (steps - 1) * 128 == last
        dropped = build_loader(Unread(50_000), 128, train=True, rank=rank, world_size=world_size)
        assert len(dropped) == dropped_steps


@pytest.mark.cpu_only  # two runs compared bitwise: CPU kernels repeat exactly, CUDA attention backward need not
@pytest.mark.parametrize("flags, steps", [((), 8), (("--drop_last",), 7)])
def test_resume_is_exact_with_a_smaller_last_batch(tmp_path, monkeypatch, capsys, flags, steps):
    """120 images at batch 16: seven full batches and one of 8, kept by default, dropped on request."""
    def synthetic_120(name, root, train, transform=None, image_size=None):
        return SyntheticImages(n=120, image_size=image_size, train=train, transform=transform)

    monkeypatch.setattr(train, "build_dataset", synthetic_120)
    config = write_config(tmp_path)
    straight = run(config, tmp_path / "straight", *flags)
    header = capsys.readouterr().out
    assert f"{steps} steps of 16 images" in header
    assert ("--drop_last: the last 8 images" if flags else "the last of 8") in header
    assert [r["steps"] for r in read_jsonl(tmp_path / "straight" / "log.jsonl")] == [steps, steps]
    assert straight.step == 2 * steps

    run(config, tmp_path / "resumed", *flags, n_epoch=1)
    resumed = run(config, tmp_path / "resumed", "--resume", *flags)
    assert resumed.step == 2 * steps
    for name in ("MODEL", "EMA"):
        assert_same_tensors(load_checkpoint(tmp_path / "straight" / "ckpts" / "model_1.pth")[name],
                            load_checkpoint(tmp_path / "resumed" / "ckpts" / "model_1.pth")[name])
    # The device copy of the data cuts the same batches, the small last one included.
    on_device = run(config, tmp_path / "device", "--gpu_data", *flags, n_epoch=1)
    assert_same_tensors(on_device.diffusion.state_dict(),
                        load_checkpoint(tmp_path / "resumed" / "ckpts" / "model_0.pth")["MODEL"])
