"""The recipes of docs/EXTENDING.md, made for real on tiny models: a cosine schedule, a network of one's own
named by import path, probing encoder and middle blocks, a dataset of another size/layout (and one by import
path), a probe head of one's own, and a diffusion kind of one's own (rectified flow), no project file changed."""
import json
import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

import finetune
import knn
import linear
import noisy_classifier_DDAE
import sample
import train
from model.ddpm import pool_features, requested_blocks
from model.noise import noise_like, starting_noise
from evaluation.cells import probe_cells
from model.models import block_names, build_diffusion, load_config, load_diffusion
from model.schedules import SCHEDULES
from utils import data
from utils.data import DatasetSpec, SyntheticImages, build_dataset
from utils.errors import UserError


def tiny_synthetic(root, train, transform, size):
    return SyntheticImages(n=32 if train else 16, image_size=size or 16, train=train, transform=transform)


@pytest.fixture(autouse=True)
def tiny_dataset(monkeypatch):
    """Recipe (d) in one line: a dataset is one entry of utils.data.DATASETS (here 32 + 16 images)."""
    monkeypatch.setitem(data.DATASETS, "tiny", DatasetSpec(tiny_synthetic, 10, layout="NCHW"))


def write_config(folder, **changes):
    config = {
        "model_type": "DDPM", "diffusion": {"n_T": 25},  # --grid: t = 1, 3, 4, the noise levels of 1, 11, 21
        "network": {"image_shape": [3, 16, 16], "n_channels": 32, "ch_mults": [1, 2], "is_attn": [False, False],
                    "n_blocks": 1},
        "dataset": "tiny", "batch_size": 16, "n_epoch": 1, "lrate": 1.0e-3, "warm_epoch": 1, "ema": 0.99,
        "num_workers": 0, "n_sample": 2, "save_dir": str(folder / "run"),
        "linear": {"n_epoch": 1, "batch_size": 16, "timestep": 11, "blockname": "out_2"},
    }
    for key, value in changes.items():
        section, _, leaf = key.partition(".")
        if leaf:
            config[section] = {**config[section], leaf: value}
        else:
            config[key] = value
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train_once(config, *flags):
    args = train.parse_args(["--config", str(config), "--device", "cpu", *flags])
    return train.train(load_config(args.config, args.set), args)


def run(script, *argv):
    script.main(script.build_parser().parse_args(list(map(str, argv))))


def result(folder, name):
    (path,) = folder.glob(name)
    return json.loads(path.read_text())


# (a) a cosine noise schedule

def test_cosine_schedule_is_diffusers_squaredcos_cap_v2(tmp_path):
    from diffusers import DDPMScheduler

    cfg = load_config(write_config(tmp_path, **{"diffusion.schedule": "cosine", "diffusion.n_T": 1000}))
    ddpm = build_diffusion(cfg)
    reference = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    # our t in 1..T is diffusers' index t - 1; t = 0 is the clean image
    torch.testing.assert_close(ddpm.ddpm_alphabar_t[1:], reference.alphas_cumprod, rtol=1e-5, atol=1e-7)
    assert ddpm.ddpm_alphabar_t[0] == 1 and ddpm.ddpm_sqrt_beta_t[-1] == pytest.approx(math.sqrt(0.999))
    torch.testing.assert_close(ddpm.ddim_alphabar_t, ddpm.ddpm_alphabar_t)  # DDIM samples with it too


def test_cosine_model_trains_samples_probes_and_keeps_its_schedule(tmp_path):
    config = write_config(tmp_path, **{"diffusion.schedule": "cosine"})
    train_once(config)
    checkpoint = tmp_path / "run" / "ckpts" / "model_0.pth"
    run(sample, "--config", config, "--device", "cpu", "--n_samples", 2, "--steps", 2, "--out_dir", tmp_path / "s")
    assert len(list((tmp_path / "s" / "pngs").glob("*.png"))) == 2
    run(linear, "--config", config, "--device", "cpu", "--num_workers", 0)
    assert result(tmp_path / "run" / "linear", "*t11_out_2*.json")["best"]["accuracy"] >= 0
    linear_cfg = load_config(config, ["diffusion.schedule=linear"])
    with pytest.raises(UserError, match=r"trained with diffusion.schedule = cosine, but the config gives linear"):
        load_diffusion(linear_cfg, checkpoint)
    with pytest.raises(UserError, match=rf"schedule' must be one of {', '.join(SCHEDULES)}, got 'cosin'"):
        load_config(config, ["diffusion.schedule=cosin"])


# (b) a network of one's own, named by import path

class TokenNet(nn.Module):
    """A small patch-token network: (B, T, D) activations, feature_axis -1, blocks ``tok_k``."""

    feature_axis = -1

    def __init__(self, image_shape: list[int] = (3, 16, 16), width: int = 32, depth: int = 2, patch: int = 4):
        super().__init__()
        channels, side = image_shape[0], image_shape[1]
        self.image_shape, self.patch, self.grid = tuple(image_shape), patch, side // patch
        self.embed = nn.Conv2d(channels, width, patch, stride=patch)
        self.time = nn.Linear(1, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU())
                                    for _ in range(depth))
        self.out = nn.Linear(width, channels * patch * patch)
        self.block_names = [f"tok_{k}" for k in range(1, depth + 1)]

    def _run(self, x, t, wanted):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        h = self.embed(x).flatten(2).transpose(1, 2) + self.time(t[:, None])[:, None]  # (B, T, D)
        features = {}
        for name, block in zip(self.block_names, self.blocks):
            h = h + block(h)
            if wanted is None or name in wanted:
                features[name] = h
            if wanted is not None and set(features) == set(wanted):
                return None, features
        b, c, p, g = x.shape[0], self.image_shape[0], self.patch, self.grid
        out = self.out(h).view(b, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(x.shape)
        return out, features

    def forward(self, x, t, aug=None, ret_activation=False):
        out, features = self._run(x, t, None)
        return (out, features) if ret_activation else out

    def forward_features(self, x, t, names, aug=None):
        return self._run(x, t, [names] if isinstance(names, str) else list(names))[1]


def test_own_network_by_import_path_trains_samples_and_is_probed(tmp_path):
    config = write_config(tmp_path, net_type="tests.test_extending.TokenNet",
                          network={"image_shape": [3, 16, 16], "width": 16}, **{"linear.blockname": "tok_2"})
    assert block_names(load_config(config)) == ["tok_1", "tok_2"]
    train_once(config)
    run(sample, "--config", config, "--device", "cpu", "--n_samples", 2, "--steps", 2, "--out_dir", tmp_path / "s")
    run(linear, "--config", config, "--device", "cpu", "--num_workers", 0, "--grid")
    grid = result(tmp_path / "run" / "linear", "*grid*.json")["accuracy"]
    assert list(grid) == ["1", "3", "4"] and all(sorted(row) == ["tok_1", "tok_2"] for row in grid.values())
    run(knn, "--config", config, "--device", "cpu", "--num_workers", 0, "--grid", "--k", 4)
    grid = result(tmp_path / "run" / "knn", "*grid*.json")["accuracy"]
    assert all(sorted(row) == ["tok_1", "tok_2"] for row in grid.values())
    run(finetune, "--config", config, "--device", "cpu", "--num_workers", 0, "--epochs", 1, "--batch_size", 16,
        "--block", "tok_1", "--out", tmp_path / "ft")
    assert result(tmp_path / "ft", "*.json")["epochs_done"] == 1
    with pytest.raises(UserError, match=r"unknown key 'network.widht' for net_type tests.test_extending.TokenNet; "
                                        r"did you mean 'network.width'\?"):
        load_config(config, ["network.widht=8"])
    with pytest.raises(UserError, match=r"key 'net_type' 'tests.nowhere.Net' cannot be imported"):
        load_config(config, ["net_type=tests.nowhere.Net"])


# (c) probe the encoder and middle blocks

def test_grid_over_encoder_middle_and_decoder_blocks(tmp_path):
    config = write_config(tmp_path)
    cfg = load_config(config)
    assert block_names(cfg) == ["in_1", "in_2", "mid", "out_1", "out_2", "out_3", "out_4"]
    net = build_diffusion(cfg).nn_model.eval()
    x, t = torch.rand(2, 3, 16, 16), torch.full((2,), 0.5)
    seen = {}
    net.down[0].register_forward_hook(lambda m, i, o: seen.setdefault("in_1", o))
    net.middle.register_forward_hook(lambda m, i, o: seen.setdefault("mid", o))
    with torch.no_grad():
        features = net.forward_features(x, t, ["in_1", "mid"])
    assert torch.equal(features["in_1"], seen["in_1"]) and torch.equal(features["mid"], seen["mid"])
    seen.clear()
    with torch.no_grad():
        net.forward_features(x, t, ["in_1"])  # stops after the deepest requested block
    assert "mid" not in seen
    train_once(config)
    run(linear, "--config", config, "--device", "cpu", "--num_workers", 0, "--grid", "--blocks", "in_2,mid,out_4")
    cells = result(tmp_path / "run" / "linear", "*in_2-mid-out_4*.json")["accuracy"]
    assert {t: sorted(row) for t, row in cells.items()} == {t: ["in_2", "mid", "out_4"] for t in ("1", "3", "4")}
    with pytest.raises(UserError, match=r"--blocks: unknown block 'in_9'; this network has in_1, in_2, mid, out_1"):
        probe_cells(cfg, grid=True, blocks=["in_9"])


# (d) a dataset of another size and layout

class NCHWImages(torch.utils.data.Dataset):
    """A torchvision-style dataset whose uint8 ``.data`` is stored (N, C, H, W), as STL10's is."""

    def __init__(self, train, transform):
        generator = np.random.default_rng(0 if train else 1)
        self.data = generator.integers(0, 256, (16, 3, 64, 64), dtype=np.uint8)
        self.labels, self.transform = [i % 2 for i in range(16)], transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        return self.transform(torch.from_numpy(self.data[index])), self.labels[index]


def write_folder(root, side=80):
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(8):
            pixels = np.random.default_rng(i + 8 * (label == "b")).integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")


@pytest.mark.parametrize("dataset", ["nchw", "folder"])
def test_64px_datasets_train_identically_with_and_without_gpu_data(tmp_path, monkeypatch, dataset):
    def nchw(root, train, transform, image_size):
        return NCHWImages(train, transform)

    monkeypatch.setitem(data.DATASETS, "nchw", DatasetSpec(nchw, 2, 64, layout="NCHW"))  # as STL10 stores it
    write_folder(tmp_path / "images")
    config = write_config(tmp_path, dataset=dataset, batch_size=8,
                          network={"image_shape": [3, 64, 64], "n_channels": 32, "ch_mults": [1, 2],
                                   "is_attn": [False, False], "n_blocks": 1})
    flags = ["--max_steps", 2, "--data_root", tmp_path / "images"]
    loader = train_once(config, *map(str, flags), "--set", f"save_dir={tmp_path / 'loader'}")
    device = train_once(config, *map(str, flags), "--gpu_data", "--set", f"save_dir={tmp_path / 'device'}")
    for key, value in loader.diffusion.state_dict().items():
        assert torch.equal(value, device.diffusion.state_dict()[key]), key
    image, _ = build_dataset(dataset, tmp_path / "images", train=True, image_size=64)[0]
    assert image.shape == (3, 64, 64)


def test_a_dataset_entry_gives_sampling_and_fid_their_defaults(tmp_path, monkeypatch):
    write_folder(tmp_path / "images", side=80)
    monkeypatch.setitem(data.DATASETS, "big", DatasetSpec(data.DATASETS["folder"].load, image_size=64,
                                                          fid_samples=50_000, resize=True))
    # fid.py's dataset:big REF reads the split without an image size: the entry's 64x64
    assert build_dataset("big", tmp_path / "images", train=True)[0][0].shape == (3, 64, 64)
    cfg = load_config(write_config(tmp_path, dataset="big"))
    assert sample.sample_count(sample.build_parser().parse_args(["--config", "x"]), cfg) == 50_000


def test_a_dataset_by_import_path_needs_no_entry(tmp_path):
    """Recipe (d) without editing utils/data.py: ``dataset:`` names a DatasetSpec (or a load function)."""
    config = write_config(tmp_path, dataset="tests.test_extending.TINY_BY_PATH")
    train_once(config)
    run(linear, "--config", config, "--device", "cpu", "--num_workers", 0)
    assert result(tmp_path / "run" / "linear", "*.json")["test_images"] == 16


TINY_BY_PATH = DatasetSpec(tiny_synthetic, 10, layout="NCHW")


def test_a_wrong_layout_is_one_line_naming_the_entry(tmp_path, monkeypatch):
    def nhwc_as_nchw(root, train, transform, image_size):
        dataset = NCHWImages(train, transform)
        dataset.data = dataset.data.transpose(0, 2, 3, 1).copy()  # stored (N, H, W, C), declared NCHW below
        dataset.transform = lambda image: transform(image.permute(2, 0, 1))
        return dataset

    monkeypatch.setitem(data.DATASETS, "mislaid", DatasetSpec(nhwc_as_nchw, 2, 64, layout="NCHW"))
    config = write_config(tmp_path, dataset="mislaid", batch_size=8,
                          network={"image_shape": [3, 64, 64], "n_channels": 32, "ch_mults": [1, 2],
                                   "is_attn": [False, False], "n_blocks": 1})
    with pytest.raises(UserError, match=r"dataset 'mislaid': its entry's layout 'NCHW' reads .data of shape "
                                        r"\(16, 64, 64, 3\) as \(C, H, W\) images of \(64, 64, 3\), but its items "
                                        r"are \(3, 64, 64\); fix the entry's layout"):
        train_once(config, "--max_steps", "1", "--gpu_data")


# (e) a probe head of one's own

class MaxTokenHead(nn.Module):
    """The largest value of each channel over a block's tokens, scaled, then a linear classifier."""

    tokens = True  # give me the (B, T, C) tokens, not their average

    def __init__(self, dim, num_classes, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.classify = nn.Linear(dim, num_classes)

    def forward(self, tokens):  # (B, T, C) -> (B, classes)
        return self.classify(tokens.amax(dim=1) * self.scale)


def test_own_probe_head_by_import_path(tmp_path, monkeypatch):
    config = write_config(tmp_path)
    train_once(config)
    seen = []
    original = MaxTokenHead.forward
    monkeypatch.setattr(MaxTokenHead, "forward", lambda head, tokens: seen.append(tokens.shape) or original(head, tokens))
    run(linear, "--config", config, "--device", "cpu", "--num_workers", 0, "--grid",
        "--head", "tests.test_extending.MaxTokenHead", "--set", "linear.head_args.scale=2")
    report = result(tmp_path / "run" / "linear", "*_grid_tests.test_extending.MaxTokenHead-scale2_*.json")
    assert report["head_args"] == {"scale": 2.0} and list(report["accuracy"]) == ["1", "3", "4"]
    assert {shape[1] for shape in seen} == {8 * 8, 16 * 16}  # out_1, out_2 at 8x8; out_3, out_4 at 16x16
    with pytest.raises(SystemExit):
        run(linear, "--config", config, "--device", "cpu", "--head", "tests.test_extending.MaxTokenHead",
            "--set", "linear.head_args.scael=2")


# (f) a diffusion kind of one's own: rectified flow with an Euler sampler

class RectifiedFlow(nn.Module):
    """x_t = (1 - t) x + t eps on [-1, 1] images; the network predicts the velocity eps - x at time_scale * t;
    sampling integrates it from t = 1 to 0 in ``sample_steps`` Euler steps. Feature level k is t = k / 20."""

    LEVELS = 20
    probe_grid = (1, 2, 4)                 # --grid's feature levels
    TRAINING_KEYS = ("time_scale",)        # what the network learnt; sample_steps is the sampler's alone

    def __init__(self, nn_model, time_scale: float = 1.0, sample_steps: int = 20):
        super().__init__()
        self.nn_model, self.time_scale, self.sample_steps = nn_model, time_scale, sample_steps

    @staticmethod
    def check_settings(cfg, require):
        require(cfg.diffusion.sample_steps >= 1, "diffusion.sample_steps",
                f"must be at least 1, got {cfg.diffusion.sample_steps}")

    @classmethod
    def feature_timesteps(cls, settings):
        return 0, cls.LEVELS, f"the flow's {cls.LEVELS} feature levels"

    @staticmethod
    def sampler_settings(settings, mode, steps, eta):  # sample.py's --steps; --mode and --eta do not apply
        return {"mode": "Euler", "steps": steps or settings["sample_steps"], "eta": None}

    @classmethod
    def noisy_levels(cls, settings):
        return list(range(1, cls.LEVELS + 1))

    def level_record(self, levels):
        return {}

    def sampler_name(self, sampler):  # sampling.json's record of the sampler
        return f"rectified flow Euler, {sampler['steps']} steps"

    def forward(self, x0, t=None, noise=None):
        x = 2 * x0 - 1
        t = torch.rand(x.shape[0], device=x.device) if t is None else t
        noise = noise_like(noise, x)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
        return nn.functional.mse_loss(self.nn_model(x_t, t * self.time_scale).float(), (noise - x).float())

    def get_feature(self, x0, t, name=None, norm=False, noise=None, tokens=False):
        x = 2 * x0 - 1
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0]).float() / self.LEVELS
        x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise_like(noise, x)
        activations = self.nn_model.forward_features(x_t, t * self.time_scale, requested_blocks(self.nn_model, name))
        return pool_features(activations, name, norm, self.nn_model.feature_axis, tokens)

    @torch.no_grad()
    def sample(self, n_sample=None, size=None, x_T=None, steps=None, mode="Euler", eta=None, noise=None):
        x, _ = starting_noise(x_T, n_sample, size, noise, next(self.parameters()).device)
        steps = steps or self.sample_steps
        for k in range(steps, 0, -1):  # t from 1 down to 1 / steps
            t = torch.full((x.shape[0],), k / steps, device=x.device)
            x = x - self.nn_model(x, t * self.time_scale) / steps
        return (x + 1) / 2


def test_own_diffusion_kind_by_import_path(tmp_path):
    config = write_config(tmp_path, model_type="tests.test_extending.RectifiedFlow", diffusion={"sample_steps": 20},
                          **{"linear.timestep": 5})
    train_once(config)
    run(sample, "--config", config, "--device", "cpu", "--n_samples", 2, "--out_dir", tmp_path / "s",
        "--set", "diffusion.sample_steps=3")  # a sampler-only key: free at sampling
    assert len(list((tmp_path / "s" / "pngs").glob("*.png"))) == 2
    run(linear, "--config", config, "--device", "cpu", "--num_workers", 0, "--grid", "--head", "attention",
        "--set", "linear.head_args.width=16")
    assert sorted(result(tmp_path / "run" / "linear", "*grid_attention*.json")["accuracy"]) == ["1", "2", "4"]
    run(knn, "--config", config, "--device", "cpu", "--num_workers", 0, "--k", 4)
    assert result(tmp_path / "run" / "knn", "*.json")["test_images"] == 16
    noisy_classifier_DDAE.main(noisy_classifier_DDAE.parse_args(["--config", str(config), "--device", "cpu",
                                                                "--num_workers", "0"]))
    assert result(tmp_path / "run", "noisy_DDAE_*/noisy_accuracy.json")["levels"] == list(range(1, 21))
    checkpoint = tmp_path / "run" / "ckpts" / "model_0.pth"
    with pytest.raises(UserError, match=r"trained with diffusion.time_scale = 1.0, but the config gives 1000.0; "
                                        r".*drop the --set diffusion.time_scale override"):
        load_diffusion(load_config(config, ["diffusion.time_scale=1000"]), checkpoint)
    with pytest.raises(UserError, match=r"key 'model_type' 'tests.test_extending.Nowhere' cannot be imported"):
        load_config(config, ["model_type=tests.test_extending.Nowhere"])


# (g) the training objective: v-prediction, min-SNR and a timestep distribution by name; one's own by import path

def noisy_half(diffusion, batch_size, device, low: float = 0.5):
    """Recipe (g)'s own timestep distribution: uniform over the noisier part of 1..n_T, from ``low`` n_T."""
    return torch.randint(max(1, int(low * diffusion.n_T)), diffusion.n_T + 1, (batch_size,), device=device)


def snr_ratio(diffusion, t, cap: float = 1.0):
    """Recipe (g)'s own loss weighting: snr / (snr + cap), per sample."""
    snr = diffusion.snr(t)
    return snr / (snr + cap)


@pytest.mark.parametrize("objective", [
    {"prediction": "v", "loss_weighting": "min_snr", "loss_weighting_args": {"gamma": 5.0},
     "t_sampling": "logit_normal", "t_sampling_args": {"loc": 0.0, "scale": 1.0}},
    {"prediction": "x0", "loss_weighting": "tests.test_extending.snr_ratio", "loss_weighting_args": {"cap": 2.0},
     "t_sampling": "tests.test_extending.noisy_half", "t_sampling_args": {"low": 0.6}}])
def test_training_objective_by_name_or_import_path(tmp_path, objective):
    config = write_config(tmp_path, diffusion={"n_T": 25, **objective})
    state = train_once(config)
    assert state.diffusion.prediction == objective["prediction"]
    checkpoint = tmp_path / "run" / "ckpts" / "model_0.pth"
    other_draw = "diffusion.t_sampling_args={loc: 1.0}" if objective["t_sampling"] == "logit_normal" else \
        "diffusion.t_sampling_args={low: 0.1}"
    run(sample, "--config", config, "--device", "cpu", "--n_samples", 2, "--steps", 2, "--out_dir", tmp_path / "s")
    run(sample, "--config", config, "--device", "cpu", "--n_samples", 3, "--steps", 2, "--out_dir", tmp_path / "s",
        "--set", other_draw)  # training-only: sampling ignores it, and the folder continues
    assert len(list((tmp_path / "s" / "pngs").glob("*.png"))) == 3
    run(linear, "--config", config, "--device", "cpu", "--num_workers", 0, "--set", other_draw)  # probing too
    assert result(tmp_path / "run" / "linear", "*t11_out_2*.json")["best"]["accuracy"] >= 0
    with pytest.raises(UserError, match=rf"trained with diffusion.prediction = {objective['prediction']}, but the "
                                        r"config gives eps; the network outputs its training prediction target"):
        load_diffusion(load_config(config, ["diffusion.prediction=eps"]), checkpoint)
