"""Class-conditional DDPM / EDM with classifier-free guidance (the sister codebase FutureXiang/Diffusion's DDPM_guide,
EDM_guide and UNet_guide): parity with tensors its own code recorded (bench/guide_golden.py), its configs and
checkpoints, label dropout, training with labels, sample.py's guided class layout and the features' label."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import export_features
import knn
import linear
import sample
import train
from evaluation.features import read_features_with
from model.ema import make_ema
from model.guide import DDPM_guide, EDM_guide, drop_mask
from model.noise import PerImageNoise
from model.models import build_diffusion, count_parameters, load_config, load_diffusion
from model.schedules import make_schedule
from model.unet_guide import UNet_guide
from tests.helpers import GUIDE_GOLDEN, seeded_weights, sister_config, small_sets, small_synthetic
from tests.launch import LAUNCHER_VARS, REPO
from utils import data
from utils.checkpoint import save_checkpoint
from utils.data import SyntheticImages, TrainData
from utils.errors import UserError

# file -> (model_type, net_type, millions of parameters its README gives, schedule or None)
SISTER_MODELS = {"cifar_conditional.yaml": ("DDPM_guide", "UNet_guide", 38.6, "linear"),
                 "cifar_conditional_EDM.yaml": ("EDM_guide", "UNet_guide", 61.1, None),
                 "cifar_conditional_vit.yaml": ("DDPM_guide", "UViT", 44.3, "linear"),
                 "cifar_unconditional_EDM.yaml": ("EDM", "UNet", 56.5, None),
                 "cifar_unconditional_cosine.yaml": ("DDPM", "UNet", 35.7, "minimal_cosine")}


@pytest.fixture(autouse=True)
def plain_python(monkeypatch):
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)


def golden(layout):
    return torch.load(GUIDE_GOLDEN[layout], weights_only=True)


def golden_model(layout):
    """Our kind around our UNet_guide with the golden weights, in eval mode (no dropout)."""
    g = golden(layout)
    net = UNet_guide(**g["network"])
    net.load_state_dict(seeded_weights(g["shapes"], g["seed"]))
    kind = DDPM_guide if layout == "ddpm" else EDM_guide
    return kind(net, **g["diffusion"]).eval(), g


def sister_block_names(net):
    """Our block name of each module the golden file pools (down_k, middle, up_k), resamplers left out."""
    names, ours = {}, iter(net.block_names)
    modules = [(f"down_{k}", m) for k, m in enumerate(net.down)] + [("middle", net.middle)]
    modules += [(f"up_{k}", m) for k, m in enumerate(net.up)]
    for name, module in modules:
        if type(module).__name__ != "Resample":
            names[next(ours)] = name
    return names


@pytest.mark.parametrize("layout", ["ddpm", "edm"])
def test_network_matches_the_sister_code(layout):
    diffusion, g = golden_model(layout)
    net = diffusion.nn_model
    assert {name: list(value.shape) for name, value in net.state_dict().items()} == g["shapes"]
    with torch.no_grad():
        out = net(g["x_net"], g["t_net"], g["labels"], g["mask"])
        features = net.forward_features(g["x_net"], g["t_net"], net.block_names, g["labels"], g["mask"])
    torch.testing.assert_close(out, g["out"], atol=2e-6, rtol=0)
    for ours, theirs in sister_block_names(net).items():
        torch.testing.assert_close(features[ours].mean(dim=(2, 3)), g["pooled"][theirs], atol=2e-6, rtol=0)


@pytest.mark.parametrize("layout", ["ddpm", "edm"])
def test_training_loss_matches_the_sister_code(layout):
    diffusion, g = golden_model(layout)
    draws = {"t": g["t"]} if layout == "ddpm" else {"rnd_normal": g["rnd_normal"]}
    with torch.no_grad():
        fixed = diffusion(g["x0"], g["labels"], noise=g["noise"], drop_mask=g["drop"], **draws)
        torch.manual_seed(g["loss_seed"])  # its forward's own draws: t (or ln sigma), noise, drop mask, in order
        seeded = diffusion(g["x0"], g["labels"])
        changed = diffusion(g["x0"], (g["labels"] + 1) % 10, noise=g["noise"], drop_mask=torch.zeros(4), **draws)
    torch.testing.assert_close(fixed, g["loss"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(seeded, g["loss"], atol=1e-6, rtol=1e-6)
    assert not torch.isclose(changed, g["loss"])  # the labels reach the network


def test_guided_ddpm_samplers_match_the_sister_code():
    diffusion, g = golden_model("ddpm")
    n = g["x_T"].shape[0]
    with torch.no_grad():
        diffusion._guidance = (torch.arange(n), g["w"])
        eps, x0 = diffusion.denoise(g["x_T"], g["step_t"], diffusion.ddim_schedule)
        diffusion._guidance = None
    schedule = diffusion.ddim_schedule
    clipped = x0.clamp(-1, 1)
    torch.testing.assert_close(clipped, g["step_x0"], atol=1e-6, rtol=0)
    torch.testing.assert_close((g["x_T"] - schedule["sqrtab"][11] * clipped) / schedule["sqrtmab"][11], g["step_eps"],
                               atol=1e-5, rtol=0)
    global_noise = lambda shape: torch.randn(n, *shape)  # noqa: E731 (its samplers draw from the global generator)
    for name, settings in (("ddim", dict(steps=4, eta=0.0)), ("ddim_eta", dict(steps=4, eta=0.5)),
                           ("ancestral", dict(mode="DDPM"))):
        torch.manual_seed(g["sample_seed"])
        images = diffusion.sample(n, tuple(g["network"]["image_shape"]), noise=global_noise, w=g["w"], **settings)
        torch.testing.assert_close(images, g[name], atol=1e-5, rtol=0, msg=name)


def test_guided_heun_matches_the_sister_code():
    diffusion, g = golden_model("edm")
    n = g["x_T"].shape[0]
    with torch.no_grad():
        diffusion._guidance = (torch.arange(n), g["w"])
        slope = diffusion._slope(g["step_x"], g["step_sigma"].item())
        correction = diffusion._slope(g["step_x"], g["step_sigma"].item(), correction=True)
        diffusion._guidance = None
        torch.manual_seed(g["sample_seed"])
        images = diffusion.sample(n, tuple(g["network"]["image_shape"]), steps=5, w=g["w"],
                                  noise=lambda shape: torch.randn(n, *shape))
    torch.testing.assert_close(slope, g["step_slope"], atol=1e-5, rtol=0)
    torch.testing.assert_close(correction, g["step_slope_cond"], atol=1e-5, rtol=0)  # its correction: unguided
    torch.testing.assert_close(images, g["heun"], atol=1e-5, rtol=0)


def test_w_zero_is_the_conditional_model_and_null_labels_are_unconditional():
    diffusion, g = golden_model("ddpm")
    x, n = g["x_T"], g["x_T"].shape[0]
    net, t = diffusion.nn_model, torch.full((n,), 11 / diffusion.n_T)
    with torch.no_grad():
        conditional = net(x, t, torch.arange(n), torch.zeros(n))
        unconditional = net(x, t)  # no labels: the null label
        assert torch.equal(unconditional, net(x, t, torch.arange(n).flip(0), torch.ones(n)))  # any label, dropped
        for w in (0.0, 2.0):
            diffusion._guidance = (torch.arange(n), w)
            eps, _ = diffusion.denoise(x, 11)
            torch.testing.assert_close(eps, (1 + w) * conditional - w * unconditional, atol=1e-5, rtol=0)
        diffusion._guidance = None


def test_labels_are_dropped_at_the_configured_rate():
    labels = torch.randint(0, 10, (200_000,), generator=torch.Generator().manual_seed(0))
    for p in (0.1, 0.25):
        torch.manual_seed(1)
        mask = drop_mask(labels, p)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert abs(mask.mean().item() - p) < 0.004, p  # 200,000 draws: standard error <= 0.001
    diffusion, g = golden_model("ddpm")
    diffusion.drop_prob = 0.25
    seen = []
    diffusion.nn_model.forward = lambda x, t, c, drop_mask: seen.append(drop_mask) or x
    torch.manual_seed(2)
    diffusion(torch.rand(20_000, 3, 1, 1), torch.zeros(20_000, dtype=torch.long))
    assert abs(seen[0].mean().item() - 0.25) < 0.012  # the training loss draws at diffusion.drop_prob


@pytest.mark.parametrize("name", sorted(SISTER_MODELS))
def test_the_sister_configs_load_unchanged(tmp_path, name):
    cfg = load_config(sister_config(tmp_path, name))
    model_type, net_type, millions, schedule = SISTER_MODELS[name]
    assert (cfg.model_type, cfg.net_type) == (model_type, net_type)
    with torch.device("meta"):
        diffusion = build_diffusion(cfg)
    assert round(count_parameters(diffusion) / 1e6, 1) == millions
    if schedule:
        assert diffusion.schedule == schedule
    if "_guide" in model_type:
        assert (cfg.w, diffusion.drop_prob, diffusion.nn_model.num_classes) == (0.3, 0.1, 10)


# Our configs of the sister's models: the same model and training, in our layout (with dataset and linear).
SHIPPED = {"DDPM_guide_ddpm.yaml": "cifar_conditional.yaml", "EDM_guide_ddpmpp.yaml": "cifar_conditional_EDM.yaml",
           "DDPM_guide_uvit.yaml": "cifar_conditional_vit.yaml", "DDPM_cosine.yaml": "cifar_unconditional_cosine.yaml"}


@pytest.mark.parametrize("ours", sorted(SHIPPED))
def test_shipped_configs_are_the_sister_models(tmp_path, ours):
    theirs = load_config(sister_config(tmp_path, SHIPPED[ours])).to_dict()
    mine = load_config(REPO / "config" / ours).to_dict()
    for key in ("save_dir", "linear"):
        del theirs[key], mine[key]
    assert mine == theirs


def test_minimal_cosine_is_the_sister_cosine_schedule():
    recorded = golden("ddpm")["cosine_alphabar"]
    for leading_zero, kind in ((True, "DDPM"), (False, "DDIM")):
        ours = make_schedule(1e-4, 0.02, 1000, leading_zero, "minimal_cosine")["alphabar_t"]
        torch.testing.assert_close(ours, recorded[kind], atol=1e-6, rtol=0)


TINY_CONDITIONAL = """\
model_type: {model_type}
network: {{image_shape: [3, 8, 8], n_channels: 32, ch_mults: [1, 2], is_attn: [False, True], dropout: 0.1,
          n_blocks: 1, n_classes: 10}}
{diffusion}
dataset: synthetic
batch_size: 8
n_epoch: 2
lrate: 1.0e-4
warm_epoch: 1
ema: 0.9
num_workers: 0
w: 0.5
save_dir: {save_dir}
linear: {{n_epoch: 1, batch_size: 16, timestep: {timestep}, blockname: out_2}}
"""


def tiny_conditional(folder, model_type="DDPM"):
    """A tiny conditional config in the sister's spelling (network.n_classes) and a checkpoint in its layout
    ({'MODEL': DDP keys, 'EMA': ema-pytorch's, 'opt'}) with EMA weights unlike the online ones."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    diffusion_keys = "diffusion: {n_T: 20, betas: [1.0e-4, 0.02]}" if model_type == "DDPM" else ""
    path = folder / f"cond_{model_type}.yaml"
    path.write_text(TINY_CONDITIONAL.format(model_type=model_type, diffusion=diffusion_keys, save_dir=folder / "run",
                                            timestep=11 if model_type == "DDPM" else 4))
    cfg = load_config(path)
    torch.manual_seed(0)
    diffusion = build_diffusion(cfg)
    ema = make_ema(diffusion, cfg.ema)
    with torch.no_grad():
        for parameter in ema.ema_model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model = {f"module.{key}": value for key, value in diffusion.state_dict().items()}
    save_checkpoint({"MODEL": model, "EMA": ema.state_dict(), "opt": {}}, folder / "run" / "ckpts" / "model_1.pth")
    return path, cfg, ema.ema_model.eval()


def test_a_sister_checkpoint_loads_as_ckpt(tmp_path):
    path, cfg, ema_model = tiny_conditional(tmp_path)
    loaded = load_diffusion(cfg, str(tmp_path / "run" / "ckpts" / "model_1.pth"))
    assert isinstance(loaded, DDPM_guide)
    for key, value in ema_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_training_feeds_each_image_its_label(tmp_path, monkeypatch):
    dataset = SyntheticImages(n=48, image_size=8, seed=3)
    by_image = {dataset[i][0].numpy().tobytes(): dataset[i][1] for i in range(len(dataset))}
    for on_device in (False, True):
        data = TrainData(dataset, 16, torch.device("cpu"), seed=0, flip=False, on_device=on_device, labels=True)
        for images, labels in data.labelled_batches(1, start=1):
            assert labels.tolist() == [by_image[image.numpy().tobytes()] for image in images]
    path, _, _ = tiny_conditional(tmp_path / "cond")
    monkeypatch.setattr(train, "build_dataset", small_synthetic)
    images = small_synthetic("synthetic", None, True, image_size=8)
    by_image = {}
    for i in range(len(images)):  # an image and its flip, as TrainData may flip it
        image, label = images[i]
        by_image[image.numpy().tobytes()] = by_image[image.flip(-1).numpy().tobytes()] = label
    seen = []
    forward = DDPM_guide.forward

    def recording_forward(self, x0, labels, **kwargs):
        seen.append((labels.tolist(), [by_image[image.numpy().tobytes()] for image in x0]))
        return forward(self, x0, labels, **kwargs)

    monkeypatch.setattr(DDPM_guide, "forward", recording_forward)
    args = train.parse_args(["--config", str(path), "--device", "cpu", "--max_steps", "2", "--set",
                             f"save_dir={tmp_path / 'train'}"])
    state = train.train(load_config(args.config, args.set), args)
    assert state.step == 2 and len(seen) == 2
    assert all(len(given) == 8 and given == expected for given, expected in seen)  # each image's own label


def run_sample(config, *flags):
    args = sample.build_parser().parse_args(["--config", str(config), "--device", "cpu", *map(str, flags)])
    return sample.main(args)


@pytest.mark.parametrize("model_type", ["DDPM", "EDM"])
def test_sample_py_writes_every_class_in_the_sister_layout(tmp_path, monkeypatch, model_type):
    path, _, _ = tiny_conditional(tmp_path, model_type)
    kind = DDPM_guide if model_type == "DDPM" else EDM_guide
    calls, original = [], kind.sample
    monkeypatch.setattr(kind, "sample", lambda self, *a, labels=None, w=None, **kw: calls.append((labels, w)) or
                        original(self, *a, labels=labels, w=w, **kw))
    steps = ["--steps", 2] if model_type == "DDPM" else ["--steps", 3]
    result = run_sample(path, "--n_samples", 20, "--batch_size", 7, *steps)  # batches cut across the classes
    assert Path(result["out_dir"]).name.startswith("EMAgenerated_ep1_w0.5_")  # the config's w
    assert torch.cat([labels for labels, _ in calls]).tolist() == [i % 10 for i in range(20)]
    assert {w for _, w in calls} == {0.5}
    assert len(list(Path(result["out_dir"], "pngs").glob("*.png"))) == 20
    calls.clear()
    result = run_sample(path, "--n_samples", 10, "--w", 0, *steps)
    assert "_w0.0_" in Path(result["out_dir"]).name and calls[0][1] == 0.0


def test_sample_py_refuses_unbalanced_counts_and_w_without_classes(tmp_path):
    path, _, _ = tiny_conditional(tmp_path)
    with pytest.raises(SystemExit) as raised:
        run_sample(path, "--n_samples", 25, "--steps", 2)
    assert raised.value.code == 2
    with pytest.raises(UserError, match="--w 0.3: DDPM is not a conditional model"):
        sample.classifier_free_guidance(sample.build_parser().parse_args(["--config", "x", "--w", "0.3"]),
                        load_config(_unconditional(path)), 10)
    with pytest.raises(UserError, match="pass a multiple of 10"):
        sample.classifier_free_guidance(sample.build_parser().parse_args(["--config", "x"]), load_config(path), 25)


def test_features_read_the_null_label_unless_asked(tmp_path):
    path, cfg, ema_model = tiny_conditional(tmp_path)
    for k in range(6):  # two images in each of the class folders 0, 1, 2
        folder = tmp_path / "images" / f"class{k % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (8, 8, 3), generator=torch.Generator().manual_seed(k), dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"{k}.png")
    outputs = {}
    for choice in ("null", "true"):
        export_features.main(export_features.build_parser().parse_args(
            ["--config", str(path), "--device", "cpu", "--images", str(tmp_path / "images"), "--blocks", "out_2",
             "--seed", "0", "--feature_label", choice, "--out", str(tmp_path / choice)]))
        outputs[choice] = torch.from_numpy(np.load(tmp_path / choice / "out_2.npy"))
    labels = torch.from_numpy(np.load(tmp_path / "null" / "labels.npy"))
    files = export_features.ImageFiles(str(tmp_path / "images"), 8)
    images = torch.stack([files[i][0] for i in range(len(files))])
    noise = PerImageNoise(range(len(files)), torch.device("cpu"))((3, 8, 8))  # --seed 0: image i gets seed i
    with torch.no_grad():
        null = ema_model.get_feature(images, 11, name="out_2", noise=noise)
        true = ema_model.get_feature(images, 11, name="out_2", noise=noise, labels=labels)
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]
    torch.testing.assert_close(outputs["null"], null, atol=1e-5, rtol=0)
    torch.testing.assert_close(outputs["true"], true, atol=1e-5, rtol=0)
    assert not torch.allclose(null, true, atol=1e-3)
    with pytest.raises(UserError, match="--feature_label true: the model is not conditional"):
        read_features_with(build_diffusion(load_config(_unconditional(path))), "true")


def _unconditional(path):
    """The tiny conditional config without network.n_classes: an unconditional DDPM."""
    unconditional = path.with_name("uncond.yaml")
    unconditional.write_text(path.read_text().replace(", n_classes: 10", ""))
    return unconditional


def test_linear_and_knn_probe_a_conditional_model_with_either_label(tmp_path, monkeypatch):
    path, _, _ = tiny_conditional(tmp_path)
    train_set, test_set = small_sets(32, 16)
    monkeypatch.setattr(data, "build_dataset", lambda name, root, train, transform, image_size:
                        train_set if train else test_set)
    given, get_feature = [], DDPM_guide.get_feature
    monkeypatch.setattr(DDPM_guide, "get_feature", lambda self, x0, t, *a, labels=None, **kw: given.append(labels)
                        or get_feature(self, x0, t, *a, labels=labels, **kw))
    common = ["--config", str(path), "--device", "cpu", "--epoch", "1", "--blocks", "out_2"]
    for choice in ("null", "true"):
        given.clear()
        linear.main(linear.build_parser().parse_args(common + ["--feature_label", choice]))
        knn.main(knn.build_parser().parse_args(common + ["--feature_label", choice, "--batch_size", "8"]))
        assert given and all((labels is not None) == (choice == "true") for labels in given)
    assert len(list((tmp_path / "run" / "linear").glob("*_truelabel.json"))) == 1
    assert len(list((tmp_path / "run" / "knn").glob("*_truelabel.json"))) == 1
    assert len(list((tmp_path / "run" / "knn").glob("*.json"))) == 2


def test_bad_conditional_settings_are_one_line_errors(tmp_path):
    path, cfg, _ = tiny_conditional(tmp_path)
    with pytest.raises(UserError, match=r"key 'diffusion.drop_prob' must be in \[0, 1\), got 1.5"):
        load_config(path, ["diffusion.drop_prob=1.5"])
    with pytest.raises(UserError, match="key 'network.n_classes' must equal the dataset's classes"):
        load_config(path, ["network.n_classes=7"])
    edm, _, _ = tiny_conditional(tmp_path / "edm", "EDM")
    with pytest.raises(UserError, match="key 'diffusion.augment_prob' must be 0 for EDM_guide"):
        load_config(edm, ["diffusion.augment_prob=0.12"])
    checkpoint = str(tmp_path / "run" / "ckpts" / "model_1.pth")
    with pytest.raises(UserError, match=r"holds UNet_guide weights, but the config describes a UNet network; .*"
                                        r"config/DDPM_guide_ddpm.yaml"):
        load_diffusion(load_config(_unconditional(path)), checkpoint)
