"""Alignment and uniformity: golden values, batch weighting, checkpoint selection, outputs."""
import json
from pathlib import Path

import pytest
import torch

import contrastive
from contrastive import alignment, checkpoint_epochs, find_checkpoints, measure, uniformity
from evaluation.features import extract_features
from evaluation.frozen import prepare_frozen
from model.models import load_diffusion
from tests.helpers import make_checkpoint, make_config
from utils.data import SyntheticImages, build_loader
from utils.errors import UserError

GOLDEN = Path(__file__).resolve().parent / "golden" / "contrastive.pt"
CPU = torch.device("cpu")


def test_golden_alignment_and_uniformity():
    golden = torch.load(GOLDEN, weights_only=True)
    assert alignment(golden["x"], golden["y"]).item() == pytest.approx(golden["alignment"], rel=1e-5)
    assert uniformity(golden["x"]).item() == pytest.approx(golden["uniformity_x"], rel=1e-5)


def test_uniformity_is_over_pairs_of_distinct_images():
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(7, 5, dtype=torch.float64), dim=1)
    potentials = [torch.exp(-2 * (x[i] - x[j]).pow(2).sum()) for i in range(7) for j in range(7) if i != j]
    torch.testing.assert_close(uniformity(x), torch.stack(potentials).mean().log())
    y = torch.nn.functional.normalize(torch.randn(7, 5, dtype=torch.float64), dim=1)
    torch.testing.assert_close(alignment(x, y), sum((x[i] - y[i]).norm() ** 2 for i in range(7)) / 7)


def test_checkpoint_epochs():
    assert checkpoint_epochs(2000, 400) == [400, 800, 1200, 1600, 1999]
    assert checkpoint_epochs(4000, 400)[-3:] == [3200, 3600, 3999]
    assert checkpoint_epochs(2000, 500) == [500, 1000, 1500, 1999]
    assert checkpoint_epochs(9, 3) == [3, 6, 8]
    assert checkpoint_epochs(10, 9) == [9]
    assert checkpoint_epochs(4, 10) == [3]


def test_missing_checkpoints_are_named_with_the_saved_ones(tmp_path):
    cfg, _ = make_config(tmp_path)
    with pytest.raises(UserError, match=r"no checkpoint for epoch\(s\) 2, 3 in .*ckpts \(saved epochs: none\)"):
        find_checkpoints(cfg.save_dir, [2, 3])
    make_checkpoint(cfg, 0)
    make_checkpoint(cfg, 3)
    with pytest.raises(UserError, match=r"epoch\(s\) 2 in .*ckpts \(saved epochs: 0, 3\); .*--epoch_interval"):
        find_checkpoints(cfg.save_dir, [2, 3])
    found = find_checkpoints(cfg.save_dir, [3])
    assert list(found) == [3] and found[3].endswith("model_3.pth")


def test_measure_weights_batches_by_size(tmp_path):
    cfg, _ = make_config(tmp_path)
    diffusion = prepare_frozen(load_diffusion(cfg, make_checkpoint(cfg, 1)), CPU)
    dataset = SyntheticImages(7, image_size=8, seed=2)
    blocks = ["out_1", "out_3"]
    torch.manual_seed(5)
    measured = measure(diffusion, build_loader(dataset, 3, train=False, rank=0, world_size=1), 11, blocks, CPU)

    # The same noise, batch by batch (3, 3 and 1 images): the last has no pairs for uniformity.
    torch.manual_seed(5)
    images = torch.stack([dataset[i][0] for i in range(7)])
    per_batch = []
    for batch in (images[:3], images[3:6], images[6:]):
        features = extract_features(diffusion, torch.cat([batch, batch]), 11, blocks, norm=True)
        per_batch.append({block: (features[block][:len(batch)], features[block][len(batch):]) for block in blocks})
    for block in blocks:
        pairs = [batch[block] for batch in per_batch]
        expected_alignment = sum(alignment(x, y) * len(x) for x, y in pairs) / 7
        expected_uniformity = sum((uniformity(x) + uniformity(y)) / 2 * len(x) for x, y in pairs[:2]) / 6
        assert measured[block]["alignment"] == pytest.approx(expected_alignment.item(), rel=1e-6)
        assert measured[block]["uniformity"] == pytest.approx(expected_uniformity.item(), rel=1e-6)
        assert 0 < measured[block]["alignment"] < 4 and -4 <= measured[block]["uniformity"] < 0


def test_command_line_histories_json_and_plots(tmp_path, monkeypatch, capsys):
    cfg, config_path = make_config(tmp_path, overrides=["n_epoch=7"])
    make_checkpoint(cfg, 2, seed=0)
    make_checkpoint(cfg, 4, seed=1)
    make_checkpoint(cfg, 6, seed=0)
    dataset = SyntheticImages(40, image_size=8, seed=1)
    monkeypatch.setattr(contrastive, "build_dataset", lambda name, root, train, transform, image_size: dataset)
    argv = ["--config", str(config_path), "--set", f"save_dir={cfg.save_dir}", "--set", "n_epoch=7",
            "--epoch_interval", "2", "--device", "cpu", "--local_rank", "0"]
    contrastive.main(contrastive.build_parser().parse_args(argv))

    report = json.loads((Path(cfg.save_dir) / "contrastive.json").read_text())
    assert report["epochs"] == [2, 4, 6] and report["timestep"] == 11
    assert list(report["blocks"]) == ["out_1", "out_2", "out_3", "out_4"]
    for values in report["blocks"].values():
        alignments, uniformities = values["alignment"], values["uniformity"]
        assert alignments[0] == alignments[2] and uniformities[0] == uniformities[2]  # same weights, same noise
        assert alignments[1] != alignments[0]
    for block in report["blocks"]:
        assert (Path(cfg.save_dir) / "contrastive" / f"{block}.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "alignment / uniformity at t=11, epochs [2, 4, 6]" in out
    assert f"out_3 alignment  {' '.join(f'{v:.4f}' for v in report['blocks']['out_3']['alignment'])}" in out

    def no_data(*args, **kwargs):
        raise AssertionError("the data must not be touched when checkpoints are missing")

    monkeypatch.setattr(contrastive, "build_dataset", no_data)
    with pytest.raises(SystemExit) as exit_info:
        contrastive.main(contrastive.build_parser().parse_args(argv[:6] + ["--epoch_interval", "3"]))
    assert exit_info.value.code == 2
    assert "no checkpoint for epoch(s) 3 in" in capsys.readouterr().err
