"""Linear probing: feature passes (early stop, batched timesteps), heads, outputs, resume, two processes."""
import hashlib
import json
import re
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import linear
from evaluation.accuracy import count_correct
from evaluation.cells import probe_cells
from evaluation.features import extract_features, extract_grid_features
from evaluation.frozen import prepare_frozen
from evaluation.heads import ProbeHeads, evaluate_heads
from evaluation.throughput import feature_pass_throughput
from model.blocks import Upsample
from model.ddpm import DDPM
from model.models import build_diffusion, feature_dims, load_config, load_diffusion
from model.schedules import make_schedule
from tests.helpers import CPU, interrupt_on_call, make_checkpoint, make_config, read_scalars, small_sets
from tests.launch import REPO, run_two_processes
from utils import data
from utils.checkpoint import load_checkpoint
from utils.data import SyntheticImages, build_loader
from utils.errors import UserError
from utils.provenance import short_digest


def test_probe_cells(tmp_path):
    ddpm, _ = make_config(tmp_path)
    assert probe_cells(ddpm, grid=True) == ([1, 11, 21], ["out_1", "out_2", "out_3", "out_4"])
    assert probe_cells(ddpm) == ([11], ["out_2"])
    edm, _ = make_config(tmp_path, "EDM")
    assert probe_cells(edm, grid=True) == ([3, 4, 5], ["out_1", "out_2", "out_3", "out_4"])
    assert probe_cells(edm) == ([4], ["out_2"])


def test_probe_cells_reject_timesteps_outside_the_schedule(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"key 'linear.timestep' must be in 1..18 \(the EDM feature schedule"):
        make_config(tmp_path, "EDM", timestep=19)  # the config's own check, before any script runs
    short, _ = make_config(tmp_path, overrides=["diffusion.n_T=10", "linear.timestep=5"])
    # a DDPM grid follows noise level, so it always lies within 1..n_T; a fixed grid is checked against the range
    assert probe_cells(short, grid=True)[0] == [1, 2, 3]
    monkeypatch.delattr(DDPM, "probe_grid_for")
    with pytest.raises(UserError, match=r"--grid: timestep 11 is outside 0..10 \(diffusion.n_T\)"):
        probe_cells(short, grid=True)


def _alphabar(settings):
    return make_schedule(*settings["betas"], settings["n_T"], True, settings["schedule"])["alphabar_t"]


@pytest.mark.parametrize("config", ["ADM_improved_cifar10.yaml", "ADM_guided_256_uncond.yaml", "DDPM_ddpm.yaml"])
def test_ddpm_grid_probes_the_noise_levels_of_the_originals_grid(config):
    """--grid on any DDPM schedule: the timesteps of the original's alphabar at 1, 11, 21 (nearest), and
    linear.timestep of a shipped config is the grid's middle one (the noise level of DDAE's t = 11)."""
    cfg = load_config(REPO / "config" / config)
    grid, _ = probe_cells(cfg, grid=True)
    original = _alphabar(DDPM.ORIGINAL_SCHEDULE)[[1, 11, 21]]
    alphabar = _alphabar(cfg.diffusion)
    for t, target in zip(grid, original):
        gaps = (alphabar[1:] - target).abs()
        assert gaps[t - 1] == gaps.min()
    assert grid[1] == cfg.linear.timestep
    if cfg.diffusion.n_T == 1000 and cfg.diffusion.schedule == "linear":
        assert grid == [1, 11, 21]  # the original's grid, exactly
    else:
        assert grid == [9, 92, 174]  # improved-diffusion's 4000-step cosine schedule


def _noisy_input(diffusion, model_type, x0, t, noise):
    """The network input and conditioning at timestep t, computed here from the published formulas."""
    x = 2 * x0 - 1
    if model_type == "DDPM":
        alphabar = diffusion.ddpm_alphabar_t[t]
        return alphabar.sqrt() * x + (1 - alphabar).sqrt() * noise, torch.full((x.shape[0],), t / diffusion.n_T)
    sigma = diffusion.schedule(18).flip(0)[t].float()
    c_in = 1 / (sigma ** 2 + diffusion.sigma_data ** 2).sqrt()
    return c_in * (x + sigma * noise), torch.full((x.shape[0],), (sigma.log() / 4).item())


@pytest.mark.parametrize("model_type", ["DDPM", "EDM"])
def test_features_equal_the_full_forward_and_later_blocks_are_not_run(tmp_path, model_type):
    cfg, _ = make_config(tmp_path, model_type)
    torch.manual_seed(0)
    diffusion = prepare_frozen(build_diffusion(cfg), CPU)
    net = diffusion.nn_model
    x0, noise = torch.rand(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = 11 if model_type == "DDPM" else 4

    x_input, conditioning = _noisy_input(diffusion, model_type, x0, t, noise)
    _, activations = net(x_input, conditioning, ret_activation=True)  # every block and the output conv

    called = []
    hooks = [module.register_forward_hook(lambda module, args, out: called.append(module))
             for module in [*net.up, net.final]]
    features = extract_features(diffusion, x0, t, ["out_2"], noise=noise)
    for hook in hooks:
        hook.remove()

    torch.testing.assert_close(features["out_2"], activations["out_2"].mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)
    blocks = [module for module in net.up if not isinstance(module, Upsample)]
    assert called[-1] is blocks[1], "the pass must end at the block that gives out_2"
    assert net.final not in called and blocks[2] not in called and blocks[3] not in called

    normed = extract_features(diffusion, x0, t, ["out_2"], norm=True, noise=noise)["out_2"]
    torch.testing.assert_close(normed, F.normalize(features["out_2"], dim=1))


def test_grid_pass_equals_one_pass_per_timestep(tmp_path):
    cfg, _ = make_config(tmp_path)
    torch.manual_seed(0)
    diffusion = prepare_frozen(build_diffusion(cfg), CPU)
    x0, noise = torch.rand(5, 3, 8, 8), torch.randn(5, 3, 8, 8)
    timesteps, blocks = probe_cells(cfg, grid=True)
    grid = extract_grid_features(diffusion, x0, timesteps, blocks, noise=noise)
    assert sorted(grid) == sorted((t, block) for t in timesteps for block in blocks)
    for t in timesteps:
        single = extract_features(diffusion, x0, t, blocks, noise=noise)
        for block in blocks:
            assert grid[(t, block)].dtype == torch.float32 and grid[(t, block)].shape == single[block].shape
            torch.testing.assert_close(grid[(t, block)], single[block], rtol=1e-5, atol=1e-6)
    # different timesteps must give different features
    assert not torch.allclose(grid[(1, "out_4")], grid[(21, "out_4")])
    assert feature_pass_throughput(diffusion, timesteps, blocks, (3, 8, 8), batch_size=4, precision="fp32",
                                   n_batches=1, warmup=0) > 0


def test_probe_heads_losses_and_correct_counts():
    torch.manual_seed(0)
    heads = ProbeHeads({"out_1": 6, "out_2": 4}, [1, 11], ["out_1", "out_2"], num_classes=3)
    assert heads.cells == [(1, "out_1"), (1, "out_2"), (11, "out_1"), (11, "out_2")]
    assert heads.labels == ["1/out_1", "1/out_2", "11/out_1", "11/out_2"]
    features = [torch.randn(5, 6 if block == "out_1" else 4) for _, block in heads.cells]
    labels = torch.tensor([0, 2, 1, 1, 0])
    logits = heads(features)
    assert logits.shape == (4, 5, 3)
    expected = torch.stack([F.cross_entropy(head(feature), labels) for head, feature in zip(heads.heads, features)])
    torch.testing.assert_close(heads.losses(logits, labels), expected)

    crafted = torch.zeros(2, 5, 3)
    crafted[0, torch.arange(5), labels] = 1  # all right
    crafted[1, torch.arange(5), (labels + 1) % 3] = 1  # all wrong but the first two
    crafted[1, :2] = 0
    crafted[1, 0, 0] = crafted[1, 1, 2] = 1
    assert count_correct(crafted, labels).tolist() == [5, 2]


def _heads_of(state_path):
    return load_checkpoint(state_path)["heads"]


def test_probe_writes_outputs_and_resumes_to_identical_heads(tmp_path, monkeypatch):
    cfg, _ = make_config(tmp_path)
    checkpoint = make_checkpoint(cfg, 3)
    timesteps, blocks = probe_cells(cfg, grid=True)
    train_set, test_set = small_sets()

    def probe(out_dir):
        diffusion = prepare_frozen(load_diffusion(cfg, checkpoint), CPU)
        return linear.run_probe(cfg, diffusion, train_set, test_set, timesteps, blocks, CPU, out_dir, "probe",
                                heatmap=True, source=checkpoint)

    straight = tmp_path / "straight"
    result = probe(straight)
    assert [record["epoch"] for record in result["epochs"]] == [0, 1]
    assert [record["lr"] for record in result["epochs"]] == pytest.approx([1e-3, 5e-4])  # cosine over 2 epochs
    assert result["test_images"] == len(test_set) == 64
    assert set(result["accuracy"]) == {"1", "11", "21"} and set(result["accuracy"]["11"]) == set(blocks)
    final = result["epochs"][-1]["test_accuracy"]
    correct_counts = [value * 64 / 100 for value in final.values()]
    assert len(final) == 12 and correct_counts == pytest.approx([round(count) for count in correct_counts])
    best = result["best"]
    assert final[f"{best['timestep']}/{best['block']}"] == best["accuracy"] == max(final.values())
    assert json.loads((straight / "probe.json").read_text()) == json.loads(json.dumps(result))
    assert (straight / "probe.png").stat().st_size > 0

    # A run killed during its second epoch, then started again.
    resumed = tmp_path / "resumed"
    original = interrupt_on_call(monkeypatch, linear, "train_one_epoch")
    with pytest.raises(KeyboardInterrupt):
        probe(resumed)
    assert load_checkpoint(resumed / "probe.state.pth")["epoch"] == 1
    assert not (resumed / "probe.json").exists()
    monkeypatch.setattr(linear, "train_one_epoch", original)
    again = probe(resumed)

    straight_heads, resumed_heads = _heads_of(straight / "probe.state.pth"), _heads_of(resumed / "probe.state.pth")
    assert all(torch.equal(straight_heads[key], resumed_heads[key]) for key in straight_heads)
    for first, second in zip(result["epochs"], again["epochs"]):
        assert (first["train_loss"], first["test_accuracy"]) == (second["train_loss"], second["test_accuracy"])

    longer, _ = make_config(tmp_path, overrides=["linear.n_epoch=3"])
    diffusion = prepare_frozen(load_diffusion(cfg, checkpoint), CPU)
    with pytest.raises(UserError, match=r"probe.state.pth holds a probe with n_epoch=2, not 3; .*delete it"):
        linear.run_probe(longer, diffusion, train_set, test_set, timesteps, blocks, CPU, straight, "probe")


WORKER = """
import sys
import torch
import linear
from model.models import load_config, load_diffusion
from utils.data import SyntheticImages, probe_train_transform
from utils.distributed import cleanup, init_distributed
from evaluation.frozen import prepare_frozen

torch.set_num_threads(1)
config, checkpoint, out_dir = sys.argv[1:4]
cfg = load_config(config, ["linear.timestep=0", "linear.n_epoch=1"])
device = init_distributed("cpu")
diffusion = prepare_frozen(load_diffusion(cfg, checkpoint), device)
train_set = SyntheticImages(128, image_size=8, seed=1, transform=probe_train_transform(8))
test_set = SyntheticImages(101, image_size=8, seed=1, train=False)
linear.run_probe(cfg, diffusion, train_set, test_set, [0], ["out_2", "out_4"], device, out_dir, "probe",
                 source=checkpoint)
cleanup()
"""


def test_two_processes_count_every_test_image_once(tmp_path):
    cfg, config_path = make_config(tmp_path)
    checkpoint = make_checkpoint(cfg, 3)
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    out_dir = tmp_path / "probe"
    result = run_two_processes(script, config_path, checkpoint, out_dir, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out_dir / "probe.json").read_text())
    assert report["world_size"] == 2 and report["provenance"]["processes"] == 2
    assert report["provenance"]["weights"]["sha256"] == hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()
    assert report["test_images"] == 101  # 50 + 51 images, none padded or repeated

    # At t = 0 the features carry no noise, so the same heads must score the same on one process.
    diffusion = prepare_frozen(load_diffusion(cfg, checkpoint), CPU)
    heads = ProbeHeads(feature_dims(diffusion, cfg.image_shape), [0], ["out_2", "out_4"], cfg.classes)
    heads.load_state_dict(_heads_of(out_dir / "probe.state.pth"))
    test_set = SyntheticImages(101, image_size=8, seed=1, train=False)
    loader = build_loader(test_set, 32, train=False, rank=0, world_size=1)
    accuracy, total = evaluate_heads(diffusion, heads, loader, CPU)
    assert total == 101
    assert accuracy == [report["accuracy"]["0"]["out_2"], report["accuracy"]["0"]["out_4"]]


def test_command_line_grid_run_and_bad_epoch(tmp_path, monkeypatch, capsys):
    cfg, config_path = make_config(tmp_path, overrides=["linear.n_epoch=1"])
    stem = f"model_3_{short_digest(make_checkpoint(cfg, 3))}"  # the weights' hash keeps models of one name apart
    train_set, test_set = small_sets(64, 40)
    monkeypatch.setattr(data, "build_dataset", lambda name, root, train, transform, image_size:
                        train_set if train else test_set)
    argv = ["--config", str(config_path), "--set", f"save_dir={cfg.save_dir}", "--set", "linear.n_epoch=1",
            "--epoch", "3", "--grid", "--device", "cpu", "--local-rank=0"]
    linear.main(linear.build_parser().parse_args(argv))
    out = capsys.readouterr().out
    # epochs are numbered from 0, as train.py, log.jsonl and model_{epoch}.pth number them
    assert re.search(r"^epoch 0/1 ", out, re.M) and not re.search(r"^epoch 1/1 ", out, re.M), out
    table = out[out.index("t \\ block"):].splitlines()
    assert table[0].split() == ["t", "\\", "block", "out_1", "out_2", "out_3", "out_4"]
    assert [line.split()[0] for line in table[1:4]] == ["1", "11", "21"]
    report = json.loads((Path(cfg.save_dir) / "linear" / f"{stem}_grid_ep1_lr0.001_bs32.json").read_text())
    assert report["test_images"] == 40 and len(report["epochs"]) == 1
    best = report["best"]
    assert f"\nbest: {best['timestep']}/{best['block']} {best['accuracy']:.2f}% (40 test images)\n" in out
    assert (Path(cfg.save_dir) / "linear" / f"{stem}_grid_ep1_lr0.001_bs32.png").is_file()
    # another learning rate is another probe, not a collision; --tag names it; --tensorboard mirrors the log
    linear.main(linear.build_parser().parse_args(argv + ["--set", "linear.lrate=0.01", "--tensorboard"]))
    assert (Path(cfg.save_dir) / "linear" / f"{stem}_grid_ep1_lr0.01_bs32.json").is_file()
    scalars = read_scalars(Path(cfg.save_dir) / "tb" / f"linear_{stem}_grid_ep1_lr0.01_bs32")
    assert scalars["linear/lr"] == [(1, pytest.approx(0.01))] and len(scalars["accuracy/11/out_2"]) == 1
    report = json.loads((Path(cfg.save_dir) / "linear" / f"{stem}_grid_ep1_lr0.01_bs32.json").read_text())
    assert scalars["linear/best_accuracy"][0][1] == pytest.approx(report["best"]["accuracy"])
    linear.main(linear.build_parser().parse_args(argv + ["--tag", "sweep_a"]))
    assert (Path(cfg.save_dir) / "linear" / "sweep_a.json").is_file()
    capsys.readouterr()

    with pytest.raises(SystemExit) as exit_info:
        linear.main(linear.build_parser().parse_args(argv[:6] + ["--epoch", "5", "--device", "cpu"]))
    assert exit_info.value.code == 2
    assert "no checkpoint for epoch 5" in capsys.readouterr().err
