"""Noise-conditional classifiers: noising against the schedules, the DDAE head, both scripts end to
end on tiny synthetic runs, exact resume of the WRN script, result files, plots, two processes."""
import hashlib
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import noisy_classifier_DDAE as ddae_script
import noisy_classifier_WRN as wrn_script
from evaluation.noisy import ImageNoiser
from model.ddpm import DDPM
from model.models import build_diffusion, load_config
from tests.helpers import read_scalars
from tests.launch import LAUNCHER_VARS, REPO, run_two_processes
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.logging import read_jsonl
from utils.provenance import short_digest
from utils.noisy import (RESULT_FILE, draw_comparison, eval_levels, find_results, main as noisy_cli_main,
                         parse_args as noisy_cli_args, read_results, write_results)

GOLDEN = Path(__file__).parent / "golden"
DDPM_TIMESTEPS = [1, 51, 101, 151, 201, 251, 301, 351, 401, 451, 501, 551, 601, 651, 701, 751, 801, 851, 901, 951]
TINY_WRN = ["--dataset", "synthetic", "--image_size", "16", "--blocks_per_group", "1", "--width", "1",
            "--batch_size", "64", "--max_images", "256", "--num_workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module", autouse=True)
def single_process():
    """Plain ``python``: no launcher variables."""
    saved = {name: os.environ.pop(name) for name in LAUNCHER_VARS if name in os.environ}
    yield
    os.environ.update(saved)


def test_reported_levels():
    assert eval_levels("DDPM") == DDPM_TIMESTEPS
    assert eval_levels("EDM") == list(range(1, 19))


def test_ddpm_noising_matches_the_schedule():
    schedule = torch.load(GOLDEN / "ddpm_tiny.pt", weights_only=True)["ddpm_schedule"]
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 8, generator=generator) * 2 - 1
    noise = torch.randn(4, 3, 8, 8, generator=generator)
    t = torch.tensor([1, 51, 500, 1000])
    noiser = ImageNoiser("DDPM")

    x_t, conditioning = noiser.training_batch(x, noise=noise, rnd=t)
    expected = schedule["sqrtab"][t].view(-1, 1, 1, 1) * x + schedule["sqrtmab"][t].view(-1, 1, 1, 1) * noise
    torch.testing.assert_close(x_t, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_t, DDPM(nn.Identity()).perturb(x, t, noise), rtol=0, atol=0)
    assert conditioning.tolist() == pytest.approx([0.001, 0.051, 0.5, 1.0])

    x_951, conditioning = noiser.test_batch(x, 951, noise=noise)
    torch.testing.assert_close(x_951, schedule["sqrtab"][951] * x + schedule["sqrtmab"][951] * noise)
    assert conditioning.tolist() == pytest.approx([0.951] * 4)

    # Training draws integer t in 1..1000 and noises each image at its own t.
    x_t, conditioning = noiser.training_batch(torch.zeros(4000, 1, 1, 1), noise=torch.ones(4000, 1, 1, 1))
    drawn_t = (conditioning * 1000).round().long()
    torch.testing.assert_close(conditioning * 1000, drawn_t.float())
    assert drawn_t.min() >= 1 and drawn_t.max() <= 1000 and drawn_t.unique().numel() > 900
    torch.testing.assert_close(x_t.flatten(), schedule["sqrtmab"][drawn_t])


def test_edm_noising_matches_the_schedule():
    sigmas = torch.load(GOLDEN / "edm_tiny.pt", weights_only=True)["schedule_18"].flip(0).float()  # 0, 0.002, ..., 80
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 8, 8, generator=generator) * 2 - 1
    noise = torch.randn(3, 3, 8, 8, generator=generator)
    noiser = ImageNoiser("EDM")

    rnd = torch.tensor([-1.0, 0.0, 2.0])
    x_noisy, conditioning = noiser.training_batch(x, noise=noise, rnd=rnd)
    sigma = torch.exp(rnd * 1.2 - 1.2)
    torch.testing.assert_close(x_noisy, x + sigma.view(-1, 1, 1, 1) * noise)
    torch.testing.assert_close(conditioning, torch.tensor([-2.4, -1.2, 1.2]))

    for index, sigma_expected in ((1, 0.002), (4, sigmas[4].item()), (18, 80.0)):
        x_noisy, conditioning = noiser.test_batch(x, index, noise=noise)
        assert sigmas[index].item() == pytest.approx(sigma_expected, rel=1e-5)
        torch.testing.assert_close(x_noisy, x + sigmas[index] * noise)
        torch.testing.assert_close(conditioning, torch.full((3,), math.log(sigmas[index].item())))


def test_lr_warms_up_linearly_then_follows_a_cosine():
    factors = [wrn_script.lr_factor(step, total_steps=110, warm_steps=10) for step in (0, 4, 9, 10, 60, 110)]
    assert factors == pytest.approx([0.1, 0.5, 1.0, 1.0, 0.5, 0.0])
    assert wrn_script.lr_factor(0, total_steps=5, warm_steps=0) == 1.0


def test_ddae_head_shapes_and_time_embedding():
    torch.manual_seed(0)
    d, classes = 64, 10
    head = ddae_script.NoiseConditionalHead(d, classes)
    emb = head.time_emb
    assert (emb.lin1.in_features, emb.lin1.out_features) == (d // 4, d)
    assert (emb.lin2.in_features, emb.lin2.out_features) == (d, d)
    assert [tuple(layer.weight.shape) for layer in head.classifier if isinstance(layer, nn.Linear)] == \
        [(2 * d, d), (classes, 2 * d)]
    assert not hasattr(emb, "aug_emb")

    features = torch.randn(5, d)
    levels = torch.tensor([1, 2, 18, 500, 1000])
    half = d // 8  # d/4 sinusoidal features: half sines, half cosines
    frequencies = torch.exp(-math.log(10000) * torch.arange(half) / (half - 1))
    angles = levels.float()[:, None] * frequencies  # (B, half)
    sinusoid = torch.cat([angles.sin(), angles.cos()], dim=1)  # (B, d/4)
    time_embedding = emb.lin2(torch.nn.functional.silu(emb.lin1(sinusoid)))  # (B, d)
    expected = head.classifier(features + time_embedding)
    logits = head(features, levels)
    assert logits.shape == (5, classes)
    torch.testing.assert_close(logits, expected)
    # The level changes the prediction: the head is conditioned on it.
    assert not torch.allclose(head(features, torch.full((5,), 3)), head(features, torch.full((5,), 900)))
    with pytest.raises(ValueError, match="multiple of 8"):
        ddae_script.NoiseConditionalHead(20, classes)


def run_wrn(argv):
    wrn_script.main(wrn_script.parse_args(argv))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder that holds run folders of both methods, as the working directory would."""
    return tmp_path_factory.mktemp("workspace")


@pytest.fixture(scope="module")
def wrn_ddpm_run(workspace):
    """Two epochs of a tiny WRN in DDPM mode, uninterrupted."""
    save_dir = workspace / "output_WRN_DDPM"
    run_wrn(["--mode", "DDPM", "--epochs", "2", "--warm_epochs", "1", "--save_dir", str(save_dir), *TINY_WRN,
             "--tensorboard"])
    return save_dir


def test_wrn_ddpm_end_to_end(wrn_ddpm_run, capsys):
    result = read_results(wrn_ddpm_run / RESULT_FILE)
    assert (result["method"], result["mode"], result["label"]) == ("WRN", "DDPM", "WRN-10-1")
    scalars = read_scalars(wrn_ddpm_run / "tb")  # --tensorboard: the log's numbers and the accuracy per level
    log = read_jsonl(wrn_ddpm_run / "log.jsonl")
    assert scalars["noisy/loss"] == [(r["epoch"] + 1, pytest.approx(r["loss"])) for r in log]
    expected = [(t, pytest.approx(a, abs=1e-4)) for t, a in zip(result["levels"], result["accuracies"])]
    assert scalars["noisy/test_accuracy_by_level"] == expected
    assert result["levels"] == DDPM_TIMESTEPS and len(result["accuracies"]) == 20
    assert result["n_test_images"] == 256
    # Each accuracy is a whole number of the 256 test images.
    assert all(abs(a * 256 / 100 - round(a * 256 / 100)) < 1e-3 for a in result["accuracies"])
    assert (wrn_ddpm_run / "noisy_accuracy.png").stat().st_size > 1000
    assert sorted(os.listdir(wrn_ddpm_run / "ckpts")) == ["model_1.pth"]  # older ones are removed
    log = [json.loads(line) for line in (wrn_ddpm_run / "log.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in log] == [0, 1] and all(math.isfinite(r["loss"]) for r in log)
    checkpoint = load_checkpoint(wrn_ddpm_run / "ckpts" / "model_1.pth")
    assert checkpoint["epoch"] == 1 and checkpoint["step"] == 8  # 2 epochs of 256 / 64 steps
    assert checkpoint["settings"]["mode"] == "DDPM"


def test_wrn_resume_equals_the_uninterrupted_run(wrn_ddpm_run, tmp_path, monkeypatch):
    save_dir = tmp_path / "output_WRN_DDPM"
    argv = ["--mode", "DDPM", "--epochs", "2", "--warm_epochs", "1", "--save_dir", str(save_dir), *TINY_WRN]
    real_save = wrn_script.save_epoch_checkpoint

    def save_then_crash(args, epoch, *rest):
        path = real_save(args, epoch, *rest)
        if epoch == 0:
            raise RuntimeError("simulated crash after epoch 0")
        return path

    monkeypatch.setattr(wrn_script, "save_epoch_checkpoint", save_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_wrn(argv)
    monkeypatch.setattr(wrn_script, "save_epoch_checkpoint", real_save)
    assert sorted(os.listdir(save_dir / "ckpts")) == ["model_0.pth"]

    with pytest.raises(SystemExit):  # an existing run is not overwritten without --resume
        run_wrn(argv)
    run_wrn(argv + ["--resume"])

    resumed = load_checkpoint(save_dir / "ckpts" / "model_1.pth")
    uninterrupted = load_checkpoint(wrn_ddpm_run / "ckpts" / "model_1.pth")
    assert resumed["model"].keys() == uninterrupted["model"].keys()
    for key, value in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    assert read_results(save_dir / RESULT_FILE)["accuracies"] == read_results(wrn_ddpm_run / RESULT_FILE)["accuracies"]


def test_wrn_resume_refuses_another_network(wrn_ddpm_run, tmp_path, capsys):
    save_dir = tmp_path / "copy"
    save_checkpoint(load_checkpoint(wrn_ddpm_run / "ckpts" / "model_1.pth"), save_dir / "ckpts" / "model_1.pth")
    argv = ["--mode", "DDPM", "--epochs", "2", "--warm_epochs", "1", "--save_dir", str(save_dir), *TINY_WRN,
            "--width", "2", "--resume"]
    with pytest.raises(SystemExit):
        run_wrn(argv)
    assert "--width 1, not 2; pass --width 1" in capsys.readouterr().err


def test_wrn_identity_is_its_flags_and_its_record_names_its_last_checkpoint(wrn_ddpm_run, tmp_path, capsys):
    record = read_results(wrn_ddpm_run / RESULT_FILE)["provenance"]
    last = wrn_ddpm_run / "ckpts" / "model_1.pth"
    assert record["weights"]["sha256"] == hashlib.sha256(last.read_bytes()).hexdigest()
    assert record["config"]["max_images"] == 256 and record["seed"] == 1337 and record["command"] == sys.argv
    # another subset of the data is another classifier: its run is not continued from this one's state
    save_dir = tmp_path / "copy"
    save_checkpoint(load_checkpoint(last), save_dir / "ckpts" / "model_1.pth")
    argv = ["--mode", "DDPM", "--epochs", "3", "--warm_epochs", "1", "--save_dir", str(save_dir), *TINY_WRN,
            "--max_images", "128", "--resume"]
    with pytest.raises(SystemExit):
        run_wrn(argv)
    assert "--max_images 256, not 128; pass --max_images 256" in capsys.readouterr().err


@pytest.fixture(scope="module")
def wrn_edm_run(workspace):
    """One epoch of a tiny WRN in EDM mode."""
    save_dir = workspace / "output_WRN_EDM"
    run_wrn(["--mode", "EDM", "--epochs", "1", "--warm_epochs", "0", "--save_dir", str(save_dir), *TINY_WRN,
             "--max_images", "128"])
    return save_dir


def test_wrn_edm_end_to_end(wrn_edm_run):
    result = read_results(wrn_edm_run / RESULT_FILE)
    assert (result["method"], result["mode"]) == ("WRN", "EDM")
    assert result["levels"] == list(range(1, 19)) and len(result["accuracies"]) == 18
    assert result["sigmas"][0] == pytest.approx(0.002) and result["sigmas"][-1] == pytest.approx(80.0)


def write_tiny_config(folder, model_type):
    config = {
        "model_type": model_type,
        "network": {"image_shape": [3, 8, 8], "n_channels": 32, "ch_mults": [1, 2], "is_attn": [False, True],
                    "dropout": 0.0, "n_blocks": 1},
        "dataset": "synthetic", "batch_size": 64, "n_epoch": 1, "lrate": 1e-4, "warm_epoch": 1, "ema": 0.999,
        "num_workers": 0, "save_dir": str(folder / f"output_tiny_{model_type}"),
        "linear": {"n_epoch": 1, "batch_size": 64, "lrate": 1e-3, "timestep": 4, "blockname": "out_2"},
    }
    path = folder / f"tiny_{model_type}.yaml"
    path.write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    diffusion = build_diffusion(load_config(path))
    save_checkpoint({"MODEL": diffusion.state_dict()}, folder / f"tiny_{model_type}.pth")
    return path, folder / f"tiny_{model_type}.pth"


@pytest.mark.parametrize("model_type", ["DDPM", "EDM"])
def test_ddae_end_to_end_and_comparison_figure(workspace, model_type, request, capsys):
    request.getfixturevalue(f"wrn_{model_type.lower()}_run")  # the other method's results
    config, checkpoint = write_tiny_config(workspace, model_type)
    ddae_script.main(ddae_script.parse_args(["--config", str(config), "--ckpt", str(checkpoint),
                                             "--max_images", "160", "--device", "cpu"]))
    out_dir = workspace / f"output_tiny_{model_type}" / \
        f"noisy_DDAE_tiny_{model_type}_{short_digest(checkpoint)}_max160"
    result = read_results(out_dir / RESULT_FILE)
    assert (result["method"], result["mode"], result["n_test_images"]) == ("DDAE", model_type, 160)
    expected_levels = DDPM_TIMESTEPS if model_type == "DDPM" else list(range(1, 19))
    assert result["levels"] == expected_levels and len(result["accuracies"]) == len(expected_levels)
    # Each accuracy counts whole images out of the 160 (not, say, a mean of per-batch accuracies
    # over the batches of 64, 64 and 32).
    correct = [accuracy * 160 / 100 for accuracy in result["accuracies"]]
    assert all(0 <= count <= 160 and abs(count - round(count)) < 1e-3 for count in correct), correct
    assert (out_dir / "noisy_accuracy.png").is_file() and (out_dir / "head.pth").is_file()
    head = load_checkpoint(out_dir / "head.pth")
    assert head["feature_dim"] == 64 and head["blockname"] == "out_2"

    # Both methods' results of this mode sit in the workspace: the comparison figure is drawn.
    compare = out_dir / f"noisy_compare_{model_type}.png"  # in the run folder, not the working folder
    assert compare.stat().st_size > 1000
    assert f"wrote {compare}" in capsys.readouterr().out
    methods = sorted(record["method"] for _, record in find_results(str(workspace), model_type))
    assert methods == ["DDAE", "WRN"]


def test_ddae_epoch_flag_names_the_output_folder(tmp_path):
    trained, original = tmp_path / "ckpts" / "model_1999.pth", tmp_path / "original_ckpt.pth"
    trained.parent.mkdir()
    trained.write_bytes(b"weights")
    original.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()[:8]  # the same weights under two names
    assert ddae_script.run_tag(str(trained)) == f"ep1999_sha{digest}"
    assert ddae_script.run_tag(str(original)) == f"original_ckpt_sha{digest}"


def test_comparison_needs_both_methods_and_one_mode(tmp_path, capsys):
    write_results(tmp_path / "a" / RESULT_FILE, "WRN", "DDPM", [1, 51], [90.0, 80.0], "WRN-28-10", 10)
    assert draw_comparison(str(tmp_path), "DDPM") is None
    write_results(tmp_path / "b" / "c" / RESULT_FILE, "DDAE", "DDPM", [1, 51], [95.0, 85.0], "DDAE", 10)
    assert draw_comparison(str(tmp_path), "DDPM") == str(tmp_path / "noisy_compare_DDPM.png")

    out = tmp_path / "cli.png"
    noisy_cli_main(noisy_cli_args(["plot", str(tmp_path / "a" / RESULT_FILE), str(tmp_path / "b" / "c" / RESULT_FILE),
                                   "--out", str(out)]))
    assert out.stat().st_size > 1000
    write_results(tmp_path / "e" / RESULT_FILE, "DDAE", "EDM", [1, 2], [95.0, 85.0], "DDAE", 10)
    with pytest.raises(SystemExit):
        noisy_cli_main(noisy_cli_args(["plot", str(tmp_path / "a" / RESULT_FILE), str(tmp_path / "e" / RESULT_FILE)]))
    assert "mix modes (DDPM, EDM)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        noisy_cli_main(noisy_cli_args(["plot", str(tmp_path / "missing.json")]))
    assert "missing.json not found" in capsys.readouterr().err



def test_wrn_two_processes_count_every_test_image_once(tmp_path):
    argv = ["--mode", "EDM", "--epochs", "1", "--warm_epochs", "0", "--save_dir", str(tmp_path / "run"),
            *TINY_WRN, "--max_images", "129"]  # shards of 64 and 65 test images
    result = run_two_processes(REPO / "noisy_classifier_WRN.py", *argv, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    record = read_results(tmp_path / "run" / RESULT_FILE)
    assert record["n_test_images"] == 129 and len(record["accuracies"]) == 18
    assert all(abs(a * 129 / 100 - round(a * 129 / 100)) < 1e-3 for a in record["accuracies"])


def test_ddae_refuses_a_short_schedule_before_writing_anything(workspace, capsys):
    config, checkpoint = write_tiny_config(workspace, "DDPM")
    save_dir = workspace / "output_short_schedule"
    with pytest.raises(SystemExit) as stopped:
        ddae_script.main(ddae_script.parse_args(["--config", str(config), "--ckpt", str(checkpoint), "--tensorboard",
                                                 "--set", "diffusion.n_T=10", "--set", f"save_dir={save_dir}",
                                                 "--device", "cpu"]))
    assert stopped.value.code == 2
    assert "needs n_T >= 20" in capsys.readouterr().err
    assert not save_dir.exists()  # --tensorboard's folder is not created for a run that never starts
