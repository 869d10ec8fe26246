"""k-NN evaluation (knn.py), the dataset feature pass it shares with export_features.py, and the
CIFAR-100 / Tiny ImageNet configs."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import knn
from model.models import block_names, build_diffusion, count_parameters, load_config
from tests.helpers import TINY_OVERRIDES, tiny_config, tiny_diffusion
from tests.launch import REPO, run_two_processes
from evaluation.cells import probe_cells
from evaluation.features import extract_dataset_features, extract_grid_features
from evaluation.report import accuracy_table, format_accuracy_table, plot_accuracy_heatmap
from utils.checkpoint import save_checkpoint
from utils.data import SyntheticImages, build_loader
from utils.provenance import short_digest


def tiny_images(n, train, seed=0):
    return SyntheticImages(n=n, image_size=16, train=train, seed=seed)


def test_dataset_features_do_not_depend_on_batch_size_or_sharding(tmp_path):
    cfg = tiny_config(tmp_path)
    diffusion = tiny_diffusion(cfg)
    dataset = tiny_images(7, train=False)
    cells = ([1, 21], ["out_2", "out_4"])
    one_pass, labels = extract_dataset_features(diffusion, build_loader(dataset, 7, train=False, rank=0, world_size=1),
                                                *cells, torch.device("cpu"), seed=5)
    assert labels.tolist() == [dataset[i][1] for i in range(7)]
    assert set(one_pass) == {(t, b) for t in cells[0] for b in cells[1]}
    assert one_pass[(1, "out_2")].shape == (7, 64) and one_pass[(21, "out_4")].shape == (7, 32)

    shards = [extract_dataset_features(diffusion, build_loader(dataset, 2, train=False, rank=rank, world_size=3),
                                       *cells, torch.device("cpu"), seed=5) for rank in range(3)]
    assert torch.equal(torch.cat([shard_labels for _, shard_labels in shards]), labels)
    for cell, feature in one_pass.items():
        sharded = torch.cat([features[cell] for features, _ in shards])
        torch.testing.assert_close(sharded, feature, rtol=1e-5, atol=1e-5)

    # Image 4 on its own, with the noise of its seed, gives row 4 of the whole pass.
    image = dataset[4][0][None]
    noise = torch.randn(image.shape[1:], generator=torch.Generator().manual_seed(5 + 4))[None]
    alone = extract_grid_features(diffusion, image, *cells, noise=noise)
    torch.testing.assert_close(alone[(21, "out_2")][0], one_pass[(21, "out_2")][4], rtol=1e-5, atol=1e-5)
    other_seed, _ = extract_dataset_features(diffusion, build_loader(dataset, 7, train=False, rank=0, world_size=1),
                                             *cells, torch.device("cpu"), seed=6)
    assert not torch.allclose(other_seed[(21, "out_2")], one_pass[(21, "out_2")])


def test_empty_shard_gives_every_cell_with_no_rows(tmp_path):
    cfg = tiny_config(tmp_path)
    dataset = tiny_images(2, train=False)
    loader = build_loader(dataset, 4, train=False, rank=0, world_size=3)  # 2 images over 3 processes
    features, labels = extract_dataset_features(tiny_diffusion(cfg), loader, [11], ["out_1", "out_3"],
                                                torch.device("cpu"), seed=0)
    assert labels.shape == (0,)
    assert features[(11, "out_1")].shape == (0, 64) and features[(11, "out_3")].shape == (0, 32)



def test_accuracy_table_text_and_heatmap(tmp_path):
    cells = [(1, "out_1"), (1, "out_12"), (11, "out_1"), (11, "out_12")]
    table, best = accuracy_table(cells, [10.0, 55.5, 42.0, 7.25])
    assert table == {"1": {"out_1": 10.0, "out_12": 55.5}, "11": {"out_1": 42.0, "out_12": 7.25}}
    assert best == {"timestep": 1, "block": "out_12", "accuracy": 55.5}
    assert format_accuracy_table(table, [1, 11], ["out_1", "out_12"]).splitlines() == [
        "t \\ block  out_1 out_12",
        "1          10.00  55.50",
        "11         42.00   7.25"]
    plot_accuracy_heatmap(table, [1, 11], ["out_1", "out_12"], tmp_path / "map.png", title="t")
    assert (tmp_path / "map.png").read_bytes()[:4] == b"\x89PNG"

@pytest.mark.parametrize("name, dataset, classes, parameters, n_blocks, cell", [
    ("CIFAR100_DDPM_ddpm", "cifar100", 100, 35_746_307, 12, (11, "out_6")),
    ("CIFAR100_EDM_ddpm", "cifar100", 100, 35_746_307, 12, (4, "out_7")),
    ("TinyImageNet_DDPM_ddpm", "tinyimagenet", 200, 45_654_019, 15, (11, "out_9")),
    ("TinyImageNet_EDM_ddpm", "tinyimagenet", 200, 45_654_019, 15, (4, "out_10")),
])
def test_dataset_configs_load_and_build(name, dataset, classes, parameters, n_blocks, cell):
    cfg = load_config(REPO / "config" / f"{name}.yaml")
    assert (cfg.dataset, cfg.classes, cfg.save_dir) == (dataset, classes, f"./output_{name}")
    with torch.device("meta"):  # sizes only: no memory, no initialisation
        diffusion = build_diffusion(cfg)
    print(f"{name}: {count_parameters(diffusion):,} parameters")
    assert count_parameters(diffusion) == parameters
    assert diffusion.nn_model.grid_blocks == block_names(cfg, grid=True) == [f"out_{k}" for k in range(1, n_blocks + 1)]
    timesteps, blocks = probe_cells(cfg, grid=True)
    assert len(timesteps) * len(blocks) == 3 * n_blocks
    assert probe_cells(cfg) == ([cell[0]], [cell[1]])


def test_tiny_imagenet_feature_resolutions():
    # The same level layout, narrower.
    cfg = load_config(REPO / "config" / "TinyImageNet_DDPM_ddpm.yaml", ["network.n_channels=32"])
    net = build_diffusion(cfg).nn_model
    with torch.no_grad():
        activations = net.forward_features(torch.zeros(1, 3, 64, 64), torch.zeros(1), net.block_names)
    sides = [activations[f"out_{k}"].shape[-1] for k in range(1, 16)]
    assert sides == [4] * 3 + [8] * 3 + [16] * 3 + [32] * 3 + [64] * 3


def test_knn_votes_by_hand():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1, 2])
    votes = knn.knn_votes(bank, labels, torch.tensor([[1.0, 0.0]]), num_classes=3, k=2, temperature=0.5)
    # Neighbours: bank[0] (similarity 1.0, class 0) and bank[3] (0.6, class 2).
    assert torch.allclose(votes, torch.tensor([[math.exp(1.0 / 0.5), 0.0, math.exp(0.6 / 0.5)]]))
    # k larger than the bank: every training image votes.
    votes = knn.knn_votes(bank, labels, torch.tensor([[0.0, 1.0]]), num_classes=3, k=50, temperature=1.0)
    expected = [math.exp(0.0), math.exp(1.0) + math.exp(0.0), math.exp(0.8)]
    assert torch.allclose(votes, torch.tensor([expected]))


def test_low_temperature_lets_one_close_neighbour_outvote_two():
    def unit(similarity):  # a unit vector with the given cosine similarity to (1, 0)
        return [similarity, math.sqrt(1 - similarity ** 2)]

    bank = torch.tensor([unit(0.9), unit(0.5), unit(0.45), unit(-0.9)])
    labels = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[1.0, 0.0]])
    sharp = knn.knn_votes(bank, labels, query, num_classes=2, k=3, temperature=0.07)
    flat = knn.knn_votes(bank, labels, query, num_classes=2, k=3, temperature=1.0)
    # exp(0.9 / 0.07) = 3.8e5 against exp(0.5 / 0.07) + exp(0.45 / 0.07) = 1.9e3; at T = 1: 2.46 against 3.22.
    assert sharp.argmax().item() == 0 and flat.argmax().item() == 1
    assert flat[0, 1].item() == pytest.approx(math.exp(0.5) + math.exp(0.45), rel=1e-6)


def brute_force_knn(bank, bank_labels, queries, num_classes, k, temperature):
    """Predictions by sorting every similarity in Python, one query at a time."""
    predictions = []
    for query in queries.tolist():
        similarities = [(sum(q * b for q, b in zip(query, row)), label)
                        for row, label in zip(bank.tolist(), bank_labels.tolist())]
        scores = [0.0] * num_classes
        for similarity, label in sorted(similarities, reverse=True)[:k]:
            scores[label] += math.exp(similarity / temperature)
        predictions.append(max(range(num_classes), key=scores.__getitem__))
    return predictions


def test_knn_matches_brute_force_across_query_chunks(monkeypatch):
    generator = torch.Generator().manual_seed(3)
    bank = F.normalize(torch.randn(60, 5, generator=generator), dim=1)
    bank_labels = torch.randint(0, 4, (60,), generator=generator)
    queries = F.normalize(torch.randn(23, 5, generator=generator), dim=1)
    monkeypatch.setattr(knn, "QUERY_CHUNK", 7)  # chunk edges inside the queries
    predictions = knn.knn_votes(bank, bank_labels, queries, 4, k=5, temperature=0.1).argmax(dim=1)
    assert predictions.tolist() == brute_force_knn(bank, bank_labels, queries, 4, k=5, temperature=0.1)
    test_labels = torch.tensor(brute_force_knn(bank, bank_labels, queries, 4, k=5, temperature=0.1))
    test_labels[:4] = (test_labels[:4] + 1) % 4  # exactly 4 of 23 wrong
    cells = [(1, "a"), (2, "b")]
    accuracy, total = knn.knn_accuracy({cell: bank for cell in cells}, bank_labels,
                                       {cells[0]: queries, cells[1]: queries}, test_labels, cells, 4, 5, 0.1)
    assert total == 23 and accuracy == pytest.approx([100 * 19 / 23] * 2)


def test_run_knn_writes_the_table_that_its_features_give(tmp_path):
    cfg = tiny_config(tmp_path)
    diffusion = tiny_diffusion(cfg)
    train_set, test_set = tiny_images(30, train=True), tiny_images(10, train=False)
    timesteps, blocks = probe_cells(cfg, grid=True)
    result = knn.run_knn(cfg, diffusion, train_set, test_set, timesteps, blocks, torch.device("cpu"), tmp_path,
                         "grid", batch_size=16, k=3, temperature=0.07, seed=11, heatmap=True)
    saved = json.loads((tmp_path / "grid.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert (saved["train_images"], saved["test_images"], saved["k"]) == (30, 10, 3)
    assert list(saved["accuracy"]) == ["1", "11", "21"] and list(saved["accuracy"]["11"]) == blocks

    loader = lambda dataset: build_loader(dataset, 16, train=False, rank=0, world_size=1)  # noqa: E731
    train, train_labels = extract_dataset_features(diffusion, loader(train_set), timesteps, blocks,
                                                   torch.device("cpu"), norm=True, seed=11)
    test, test_labels = extract_dataset_features(diffusion, loader(test_set), timesteps, blocks,
                                                 torch.device("cpu"), norm=True, seed=11 + 30)
    for t in timesteps:
        for block in blocks:
            predictions = brute_force_knn(train[(t, block)], train_labels, test[(t, block)], 10, 3, 0.07)
            correct = sum(p == label for p, label in zip(predictions, test_labels.tolist()))
            assert saved["accuracy"][str(t)][block] == pytest.approx(100 * correct / 10)
    best = saved["best"]
    assert best["accuracy"] == max(max(row.values()) for row in saved["accuracy"].values())


def test_self_retrieval_is_perfect(tmp_path):
    """Test images that are also training images find themselves: k = 1 gives 100%."""
    cfg = tiny_config(tmp_path)
    images = tiny_images(20, train=True)
    result = knn.run_knn(cfg, tiny_diffusion(cfg), images, images, [1], ["out_3"], torch.device("cpu"),
                         tmp_path, "self", batch_size=20, k=1, seed=0)
    assert result["accuracy"] == {"1": {"out_3": 100.0}}


def write_tiny_checkpoint(cfg, path):
    save_checkpoint({"MODEL": tiny_diffusion(cfg).state_dict()}, path)
    return path


def knn_argv(save_dir, checkpoint, extra=()):
    sets = [arg for override in TINY_OVERRIDES + [f"save_dir={save_dir}"] for arg in ("--set", override)]
    return ["--config", str(REPO / "config" / "demo.yaml"), *sets, "--ckpt", str(checkpoint), "--device", "cpu",
            "--max_images", "24", "--batch_size", "8", *extra]


def test_cli_single_process_and_two_processes_agree(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    checkpoint = write_tiny_checkpoint(cfg, tmp_path / "model_3.pth")
    knn.main(knn.build_parser().parse_args(knn_argv(tmp_path / "one", checkpoint, ["--grid", "--k", "5"])))
    tag = f"model_3_{short_digest(checkpoint)}_grid_k5_T0.07_max24"
    one = json.loads((tmp_path / "one" / "knn" / f"{tag}.json").read_text())
    best = one["best"]  # the best: line has linear.py's format (evaluation.report.best_line)
    assert f"\nbest: {best['timestep']}/{best['block']} {best['accuracy']:.2f}% (24 test images; 24 training images; " \
        in capsys.readouterr().out
    assert (tmp_path / "one" / "knn" / f"{tag}.png").is_file()
    assert (one["world_size"], one["train_images"], one["test_images"]) == (1, 24, 24)

    finished = run_two_processes("knn.py", *knn_argv(tmp_path / "two", checkpoint, ["--grid", "--k", "5"]),
                                 cwd=REPO, timeout=120)
    assert finished.returncode == 0, finished.stderr[-2000:]
    two = json.loads((tmp_path / "two" / "knn" / f"{tag}.json").read_text())
    assert (two["world_size"], two["train_images"], two["test_images"]) == (2, 24, 24)
    assert two["accuracy"] == one["accuracy"]


def test_cli_errors_name_the_flag(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    checkpoint = write_tiny_checkpoint(cfg, tmp_path / "model_3.pth")
    with pytest.raises(SystemExit) as stopped:
        knn.main(knn.build_parser().parse_args(knn_argv(tmp_path, checkpoint, ["--k", "0"])))
    assert stopped.value.code == 2 and "--k 0: must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        knn.main(knn.build_parser().parse_args(knn_argv(tmp_path, checkpoint, ["--k", "25"])))
    assert "--k 25: larger than the 24 training images; pass --k 24 or less" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        knn.main(knn.build_parser().parse_args(knn_argv(tmp_path, tmp_path / "missing.pth")))
    assert "--ckpt " in (err := capsys.readouterr().err) and "missing.pth: file not found" in err
