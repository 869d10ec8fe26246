"""Probe heads in linear.py (model/heads.py): token features, the heads by name with their settings in the
file tag, resume state and result, exact resume of attention and fusion, and linear.py run as a user types
it on the demo config (its dataset named by import path)."""
import errno
import json
import os
import subprocess
import sys

import pytest
import torch

import linear
from evaluation.cells import probe_cells
from evaluation.features import extract_features, extract_grid_features
from evaluation.frozen import prepare_frozen
from model.models import build_diffusion, load_diffusion
from tests.helpers import CPU, interrupt_on_call, make_checkpoint, make_config, small_sets, tiny_config
from tests.launch import REPO, run_two_processes
from utils.checkpoint import load_checkpoint
from utils.data import SyntheticImages
from utils.errors import UserError

SMALL_HEAD = ["linear.head_args.width=16", "linear.head_args.heads=2"]


def few_shapes(root, train, transform, image_size):
    """A dataset by import path (``dataset: tests.test_heads.few_shapes``): 48 + 24 synthetic images."""
    return SyntheticImages(n=48 if train else 24, image_size=image_size or 16, train=train, transform=transform)


def test_tokens_are_the_blocks_positions_and_average_to_the_pooled_feature(tmp_path):
    cfg, _ = make_config(tmp_path)
    torch.manual_seed(0)
    diffusion = prepare_frozen(build_diffusion(cfg), CPU)
    x0, noise = torch.rand(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    tokens = extract_grid_features(diffusion, x0, [1, 11], ["out_2", "out_4"], noise=noise, tokens=True)
    pooled = extract_grid_features(diffusion, x0, [1, 11], ["out_2", "out_4"], noise=noise)
    for cell, feature in pooled.items():
        assert tokens[cell].dim() == 3 and tokens[cell].shape[::2] == feature.shape
        torch.testing.assert_close(tokens[cell].mean(dim=1), feature)
    # at t = 0 nothing is noised: token h * W + w is the block's activation at (h, w)
    with torch.no_grad():
        activation = diffusion.nn_model.forward_features(2 * x0 - 1, torch.zeros(3), ["out_4"])["out_4"]
    clean = extract_features(diffusion, x0, 0, ["out_4"], tokens=True)["out_4"]
    assert clean.shape == (3, 64, activation.shape[1])
    torch.testing.assert_close(clean, activation.flatten(2).transpose(1, 2))


@pytest.mark.parametrize("head", ["attention", "fusion", "mlp"])
def test_heads_resume_to_the_straight_run(tmp_path, monkeypatch, head):
    cfg, _ = make_config(tmp_path, overrides=[f"linear.head={head}"] + (SMALL_HEAD if head != "mlp" else []))
    checkpoint = make_checkpoint(cfg, 3)
    timesteps, blocks = probe_cells(cfg, grid=True)
    train_set, test_set = small_sets(64, 32)

    def probe(out_dir):
        diffusion = prepare_frozen(load_diffusion(cfg, checkpoint), CPU)
        return linear.run_probe(cfg, diffusion, train_set, test_set, timesteps, blocks, CPU, out_dir, "probe",
                                heatmap=True, source=checkpoint)

    straight = probe(tmp_path / "straight")
    assert straight["head"] == head and straight["head_args"] == dict(cfg.linear.head_args)
    if head == "fusion":  # one head over the 12 cells
        assert list(straight["accuracy"]) == ["fused"] and straight["best"] is None
        assert not (tmp_path / "straight" / "probe.png").exists()
    else:
        assert sum(len(row) for row in straight["accuracy"].values()) == 12

    original = interrupt_on_call(monkeypatch, linear, "train_one_epoch")
    with pytest.raises(KeyboardInterrupt):
        probe(tmp_path / "resumed")
    state = load_checkpoint(tmp_path / "resumed" / "probe.state.pth")
    assert state["epoch"] == 1 and state["settings"]["head"] == head
    monkeypatch.setattr(linear, "train_one_epoch", original)
    resumed = probe(tmp_path / "resumed")

    first, second = (load_checkpoint(tmp_path / run / "probe.state.pth")["heads"] for run in ("straight", "resumed"))
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)
    for a, b in zip(straight["epochs"], resumed["epochs"], strict=True):
        assert (a["train_loss"], a["test_accuracy"]) == (b["train_loss"], b["test_accuracy"])

    other, _ = make_config(tmp_path, overrides=["linear.head=linear"])
    with pytest.raises(Exception, match=rf"probe.state.pth holds a probe with head='{head}', not 'linear'"):
        linear.run_probe(other, prepare_frozen(load_diffusion(cfg, checkpoint), CPU), train_set, test_set,
                         timesteps, blocks, CPU, tmp_path / "straight", "probe")


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
cfg = load_config(config, ["linear.n_epoch=1", "linear.head=fusion", "linear.head_args.width=16"])
device = init_distributed("cpu")
diffusion = prepare_frozen(load_diffusion(cfg, checkpoint), device)
train_set = SyntheticImages(64, image_size=8, seed=1, transform=probe_train_transform(8))
test_set = SyntheticImages(37, image_size=8, seed=1, train=False)
linear.run_probe(cfg, diffusion, train_set, test_set, [1, 11], ["out_2", "out_4"], device, out_dir, "probe")
cleanup()
"""


def test_a_fused_token_head_trains_on_two_processes(tmp_path):
    cfg, config_path = make_config(tmp_path)
    checkpoint = make_checkpoint(cfg, 3)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    done = run_two_processes(script, config_path, checkpoint, tmp_path / "probe", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert report["world_size"] == 2 and report["test_images"] == 37 and list(report["accuracy"]) == ["fused"]


def test_linear_py_runs_attention_and_fusion_on_the_demo_config(tmp_path):
    save_dir = tmp_path / "run"
    make_checkpoint(tiny_config(save_dir), 3)
    sets = ["network.image_shape=[3,16,16]", "dataset=tests.test_heads.few_shapes", f"save_dir={save_dir}",
            "linear.n_epoch=1", "linear.batch_size=16", *SMALL_HEAD]
    base = [sys.executable, "linear.py", "--config", "config/demo.yaml", "--epoch", "3", "--device", "cpu",
            *[arg for value in sets for arg in ("--set", value)]]
    for flags, name in ((["--head", "attention", "--grid"], "model_3_sha*_grid_attention-width16-heads2_ep1_lr0.05_bs16"),
                        (["--head", "fusion", "--grid"], "model_3_sha*_grid_fusion-width16-heads2_ep1_lr0.05_bs16")):
        done = subprocess.run(base + flags, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        (path,) = (save_dir / "linear").glob(f"{name}.json")
        result = json.loads(path.read_text())
        assert result["test_images"] == 24 and result["head_args"] == {"width": 16, "heads": 2}
    assert "fused fusion head over 12 cell(s)" in done.stdout

    done = subprocess.run(base + ["--head", "attentoin"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "key 'linear.head' must be one of linear, mlp, attention, fusion or the import path" in done.stderr
    assert "did you mean 'attention'? (from --head attentoin)" in done.stderr
    done = subprocess.run(base + ["--head", "attention", "--set", "linear.head_args.widht=8"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "unknown key 'linear.head_args.widht' for linear.head attention; did you mean " \
           "'linear.head_args.width'?" in done.stderr


def test_probe_heads_benchmark_writes_its_table(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    import probe_heads

    out = tmp_path / "bench"
    probe_heads.main(probe_heads.build_parser().parse_args(
        ["--heads", "linear", "fusion", "--train_images", "32", "--test_images", "16", "--epochs", "1",
         "--batch_size", "16", "--width", "16", "--threads", "1", "--out", str(out)]))
    rows = json.loads((out / "probe_heads.json").read_text())["rows"]
    assert [(row["head"], row["heads"]) for row in rows] == [("linear", 4), ("fusion", 1)]
    assert all(0 <= row["best_accuracy"] <= 100 and row["head_ms_per_step"] > 0 for row in rows)
    table = (out / "probe_heads.md").read_text()
    assert "| fusion | width=16, heads=4 | 0.001 | 1 |" in table and (out / "probe_heads.png").stat().st_size > 0


class WideHead(torch.nn.Linear):
    """A probe head of the wrong width: classes + 3 outputs (cross-entropy would train it without a word)."""

    def __init__(self, dim, num_classes):
        super().__init__(dim, num_classes + 3)


class TransposedHead(torch.nn.Linear):
    """(classes, batch) logits."""

    def __init__(self, dim, num_classes):
        super().__init__(dim, num_classes)

    def forward(self, feature):
        return super().forward(feature).t()


class BatchPooledHead(torch.nn.Linear):
    """Pools over the batch instead of the tokens: (classes,) logits."""

    def __init__(self, dim, num_classes):
        super().__init__(dim, num_classes)

    def forward(self, feature):
        return super().forward(feature.mean(dim=0))


class RaisingHead(torch.nn.Linear):
    def __init__(self, dim, num_classes):
        super().__init__(dim, num_classes)

    def forward(self, feature):
        raise ValueError("forgot to pool the tokens")


class FrozenHead(torch.nn.Module):
    """No parameters: a fixed projection."""

    def __init__(self, dim, num_classes):
        super().__init__()
        self.register_buffer("projection", torch.randn(dim, num_classes))

    def forward(self, feature):
        return feature @ self.projection


class OneArgumentHead(torch.nn.Linear):
    """The wrong constructor signature: the classes only."""

    def __init__(self, num_classes):
        super().__init__(8, num_classes)


class FusedTransposedHead(torch.nn.Module):
    """A fused head returning (classes, batch)."""

    fused = True

    def __init__(self, dims, num_classes):
        super().__init__()
        self.classify = torch.nn.Linear(sum(dims), num_classes)

    def forward(self, features):
        return self.classify(torch.cat(features, dim=1)).t()


BAD_HEADS = {
    "WideHead": "its forward returns shape (2, 13) for a batch of 2, not (batch, classes) = (2, 10)",
    "TransposedHead": "its forward returns shape (10, 2) for a batch of 2, not (batch, classes) = (2, 10)",
    "BatchPooledHead": "its forward returns shape (10,) for a batch of 2, not (batch, classes) = (2, 10)",
    "RaisingHead": "its forward fails on a batch of 2 (ValueError: forgot to pool the tokens)",
    "FrozenHead": "the head has no trainable parameters",
    "OneArgumentHead": "OneArgumentHead(channels, 10) failed (TypeError: ",
    "FusedTransposedHead": "its forward returns shape (10, 2) for a batch of 2, not (batch, classes) = (2, 10)",
}


@pytest.mark.parametrize("name", BAD_HEADS)
def test_a_head_that_cannot_train_is_one_line_before_any_epoch(tmp_path, monkeypatch, name):
    cfg, _ = make_config(tmp_path, overrides=[f"linear.head=tests.test_heads.{name}"])
    checkpoint = make_checkpoint(cfg, 3)
    train_set, test_set = small_sets(8, 4)
    trained = []
    monkeypatch.setattr(linear, "train_one_epoch", lambda *args: trained.append(1))
    diffusion = prepare_frozen(load_diffusion(cfg, checkpoint), CPU)
    with pytest.raises(UserError) as refused:
        linear.run_probe(cfg, diffusion, train_set, test_set, [1, 11], ["out_2", "out_4"], CPU, tmp_path / "out",
                         "probe", source=checkpoint)
    message = str(refused.value)
    assert message.startswith(f"linear.head tests.test_heads.{name}: ") and BAD_HEADS[name] in message
    assert "\n" not in message and not trained and not (tmp_path / "out").exists()


def test_the_check_of_a_good_head_changes_no_number(tmp_path, monkeypatch):
    """The check runs before the run is seeded: a probe trains as it would without it."""
    cfg, _ = make_config(tmp_path, overrides=["linear.n_epoch=1", "linear.batch_size=8"])
    checkpoint = make_checkpoint(cfg, 3)
    train_set, test_set = small_sets(16, 8)

    def probe(out_dir):
        diffusion = prepare_frozen(load_diffusion(cfg, checkpoint), CPU)
        return linear.run_probe(cfg, diffusion, train_set, test_set, [1], ["out_2"], CPU, out_dir, "probe")

    checked = probe(tmp_path / "checked")
    monkeypatch.setattr(linear, "check_heads", lambda *args: None)
    unchecked = probe(tmp_path / "unchecked")
    assert checked["epochs"][0]["train_loss"] == unchecked["epochs"][0]["train_loss"]


def test_linear_py_refuses_a_bad_head_in_one_line_on_one_and_two_processes(tmp_path):
    cfg, config_path = make_config(tmp_path)
    make_checkpoint(cfg, 3)
    flags = ["--config", config_path, "--epoch", "3", "--device", "cpu", "--head", "tests.test_heads.WideHead",
             "--set", f"save_dir={tmp_path / 'run'}", "--set", "dataset=tests.test_heads.few_shapes"]
    line = "error: linear.head tests.test_heads.WideHead: its forward returns shape (2, 13) for a batch of 2, " \
           "not (batch, classes) = (2, 10); fix its forward"
    done = subprocess.run([sys.executable, "linear.py", *flags], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert (done.returncode, done.stderr.strip()) == (2, line)
    two = run_two_processes(REPO / "linear.py", *flags, cwd=REPO, launcher="utils.launch")
    assert (two.returncode, two.stderr.strip()) == (2, line), two.stderr[-3000:]
    assert "epoch 0" not in done.stdout + two.stdout and not (tmp_path / "run" / "linear").exists()


def test_a_fused_head_reads_every_cell_it_is_given():
    """Change one cell's feature, the first, a middle or the last: the fused head's logits change."""
    from evaluation.heads import ProbeHeads
    from model.heads import FusionHead

    torch.manual_seed(0)
    heads = ProbeHeads({"out_2": 6, "out_4": 8}, [1, 11], ["out_2", "out_4"], 10, FusionHead,
                       {"width": 16, "heads": 2}).eval()
    features = [torch.randn(2, 3, 6), torch.randn(2, 5, 8), torch.randn(2, 3, 6), torch.randn(2, 5, 8)]
    logits = heads(features)
    assert logits.shape == (1, 2, 10)
    for cell in range(len(features)):
        changed = list(features)
        changed[cell] = features[cell] + 1
        assert not torch.allclose(heads(changed), logits), f"cell {cell} is ignored"


def test_linear_py_one_line_messages(tmp_path, monkeypatch, capsys):
    """head_args for the linear head (which takes none), and a full disk at the probe's state: one line each,
    naming what it is about, exit codes 2 and 1."""
    cfg, config_path = make_config(tmp_path)
    make_checkpoint(cfg, 3)
    argv = ["--config", str(config_path), "--epoch", "3", "--device", "cpu", "--set", f"save_dir={tmp_path / 'run'}",
            "--set", "dataset=tests.test_heads.few_shapes", "--set", "linear.n_epoch=1"]

    def refusal(*extra):
        with pytest.raises(SystemExit) as stopped:
            linear.main(linear.build_parser().parse_args(argv + list(extra)))
        return stopped.value.code, capsys.readouterr().err

    assert refusal("--set", "linear.head_args.width=8") == (2, (
        f"error: {config_path}: unknown key 'linear.head_args.width' for linear.head linear, which takes none: "
        f"remove 'linear.head_args' (from --set linear.head_args.width=8)\n"))

    def full_disk(obj, file):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    code, err = refusal()
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"error: cannot write probe state {tmp_path / 'run' / 'linear'}/model_3_sha"), err
    assert ".state.pth (No space left on device; " in err and "checkpoint" not in err
    assert not list((tmp_path / "run" / "linear").glob("*"))  # no partial state, no result
