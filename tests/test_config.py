"""Shipped configs carry the original's values; every bad input is a one-line UserError naming file and key."""
import argparse
from pathlib import Path

import pytest
import yaml

from model.ddpm import DDPM
from model.edm import EDM
from model.models import block_names, load_config
from utils.config import LinearConfig, add_config_args, config_name, save_config, settings_of
from utils.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
F, T = False, True

# The original's configs, one row per file.
SPEC_TABLE = {
    "DDPM_ddpm": dict(model_type="DDPM", ch_mults=[1, 2, 2, 2], is_attn=[F, T, F, F], n_blocks=2, res=False,
                      dropout=0.1, augment_dim=0, batch_size=128, warm_epoch=13, ema=0.9999, n_epoch=2000,
                      timestep=11, blockname="out_6", n_blocks_total=12),
    "EDM_ddpm": dict(model_type="EDM", ch_mults=[1, 2, 2, 2], is_attn=[F, T, F, F], n_blocks=2, res=False,
                     dropout=0.13, augment_dim=0, batch_size=128, warm_epoch=200, ema=0.9993, n_epoch=2000,
                     timestep=4, blockname="out_7", n_blocks_total=12),
    "DDPM_ddpmpp": dict(model_type="DDPM", ch_mults=[2, 2, 2], is_attn=[F, T, F], n_blocks=4, res=True,
                        dropout=0.1, augment_dim=0, batch_size=64, warm_epoch=13, ema=0.9999, n_epoch=2000,
                        timestep=11, blockname="out_6", n_blocks_total=15),
    "EDM_ddpmpp": dict(model_type="EDM", ch_mults=[2, 2, 2], is_attn=[F, T, F], n_blocks=4, res=True,
                       dropout=0.13, augment_dim=0, batch_size=64, warm_epoch=200, ema=0.9993, n_epoch=2000,
                       timestep=4, blockname="out_7", n_blocks_total=15),
    "EDM_ddpmpp_aug": dict(model_type="EDM", ch_mults=[2, 2, 2], is_attn=[F, T, F], n_blocks=4, res=True,
                           dropout=0.13, augment_dim=9, batch_size=64, warm_epoch=200, ema=0.9993, n_epoch=4000,
                           timestep=4, blockname="out_7", n_blocks_total=15),
}
EDM_VALUES = dict(sigma_data=0.5, p_mean=-1.2, p_std=1.2, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                  S_min=0.01, S_max=1.0, S_noise=1.007)


@pytest.mark.parametrize("name", sorted(SPEC_TABLE))
def test_shipped_config_matches_spec(name):
    row = SPEC_TABLE[name]
    cfg = load_config(CONFIG_DIR / f"{name}.yaml")
    assert (cfg.model_type, cfg.net_type) == (row["model_type"], "UNet")
    net = cfg.network
    assert net.image_shape == [3, 32, 32] and net.n_channels == 128
    assert net.ch_mults == row["ch_mults"] and net.is_attn == row["is_attn"]
    assert net.n_blocks == row["n_blocks"] and net.use_res_for_updown is row["res"]
    assert net.dropout == row["dropout"] and net.augment_dim == row["augment_dim"]
    assert len(block_names(cfg, grid=True)) == row["n_blocks_total"]
    assert (cfg.batch_size, cfg.warm_epoch, cfg.ema, cfg.n_epoch) == (
        row["batch_size"], row["warm_epoch"], row["ema"], row["n_epoch"])
    assert (cfg.dataset, cfg.classes, cfg.lrate, cfg.load_epoch, cfg.flip) == ("cifar", 10, 1e-4, -1, True)
    assert (cfg.n_sample, cfg.save_dir, cfg.save_model) == (30, f"./output_{name}", True)
    assert (cfg.optim, cfg.optim_args, cfg.ckpt_interval, cfg.seed) == ("Adam", {}, 100, 1337)
    # The spec's values, and every key it does not name at its class's default: a new optional key needs no edit
    # here, a shipped file that changes a value (or sets a new key away from its default) still fails.
    assert cfg.linear.to_kwargs() == with_defaults(LinearConfig, dict(
        n_epoch=15, batch_size=128, lrate=1e-3, timestep=row["timestep"], blockname=row["blockname"], head="linear"))
    if row["model_type"] == "DDPM":
        assert cfg.diffusion_kwargs() == with_defaults(DDPM, {"n_T": 1000, "betas": [1e-4, 0.02], "schedule": "linear"})
    else:
        augment_prob = 0.12 if name.endswith("_aug") else 0.0
        assert cfg.diffusion_kwargs() == with_defaults(EDM, dict(EDM_VALUES, augment_prob=augment_prob))


def with_defaults(cls, values):
    """``values`` over the defaults of ``cls``'s other YAML keys, as a loaded config holds them."""
    skip = 0 if cls is LinearConfig else 1
    defaults = {key: list(default) if isinstance(default, tuple) else default
                for key, (_, default) in settings_of(cls, skip).items()}
    return {**defaults, **values}


def test_demo_config_is_tiny_and_valid():
    cfg = load_config(CONFIG_DIR / "demo.yaml")
    assert cfg.dataset == "synthetic" and cfg.save_dir == "./output_demo"
    assert block_names(cfg, grid=True) == ["out_1", "out_2", "out_3", "out_4"]
    assert block_names(cfg) == ["in_1", "in_2", "mid", "out_1", "out_2", "out_3", "out_4"]
    assert cfg.linear.blockname in block_names(cfg)


def test_sections_unpack_as_keywords():
    cfg = load_config(CONFIG_DIR / "EDM_ddpmpp_aug.yaml")

    def take(**kwargs):
        return kwargs

    assert take(**cfg.network) == cfg.network_kwargs() == {
        "image_shape": [3, 32, 32], "n_channels": 128, "ch_mults": [2, 2, 2], "is_attn": [F, T, F],
        "dropout": 0.13, "n_blocks": 4, "use_res_for_updown": True, "augment_dim": 9}
    assert take(**cfg.diffusion) == cfg.diffusion_kwargs()
    assert cfg.diffusion.augment_prob == 0.12 and cfg.diffusion.sigma_data == 0.5


def test_overrides_nested_list_bool_and_float():
    cfg = load_config(CONFIG_DIR / "DDPM_ddpm.yaml", [
        "linear.n_epoch=1", "network.ch_mults=[1,2]", "network.is_attn=[False, True]", "flip=False",
        "lrate=1e-4", "diffusion.betas=[1e-4, 2e-2]", "optim=AdamW", "optim_args.weight_decay=0.05",
        "save_dir=/tmp/run=1"])
    assert cfg.linear.n_epoch == 1
    assert cfg.network.ch_mults == [1, 2] and cfg.network.is_attn == [False, True]
    assert cfg.flip is False
    assert cfg.lrate == 1e-4 and isinstance(cfg.lrate, float)
    assert cfg.diffusion.betas == [1e-4, 0.02]
    assert (cfg.optim, cfg.optim_args) == ("AdamW", {"weight_decay": 0.05})
    assert cfg.save_dir == "/tmp/run=1"


def test_missing_sections_take_defaults(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump({
        "model_type": "EDM", "network": {"ch_mults": [1, 2], "is_attn": [False, True], "n_channels": 32},
        "batch_size": 8, "n_epoch": 1, "lrate": 1e-4, "warm_epoch": 1, "ema": 0.99,
        "linear": {"timestep": 4, "blockname": "out_1"}}))
    cfg = load_config(path)
    assert cfg.diffusion == with_defaults(EDM, dict(EDM_VALUES, augment_prob=0.0))
    assert cfg.save_dir == "./output_small" and config_name(path) == "small"
    assert (cfg.num_workers, cfg.ckpt_interval, cfg.seed) == (-1, 100, 1337)  # -1: workers from the CPUs


def test_saved_config_round_trips(tmp_path):
    for name in [*SPEC_TABLE, "demo"]:
        cfg = load_config(CONFIG_DIR / f"{name}.yaml", ["optim_args.betas=[0.9, 0.99]"])
        saved = save_config(cfg, tmp_path / name / "config.yaml")
        assert load_config(saved) == cfg
        assert yaml.safe_load(saved.read_text()) == cfg.to_dict()


def test_config_args_parse():
    parser = add_config_args(argparse.ArgumentParser())
    args = parser.parse_args(["--config", "c.yaml", "--set", "a=1", "--set", "linear.n_epoch=2"])
    assert (args.config, args.set) == ("c.yaml", ["a=1", "linear.n_epoch=2"])
    assert parser.parse_args(["--config", "c.yaml"]).set == []


# A complete config as text, fixed here (not read from config/) so that the line numbers below hold.
DEMO_TEXT = """\
# A tiny DDPM on synthetic 32x32 images: the whole pipeline in minutes on a CPU.
model_type: DDPM
net_type: UNet
diffusion:
  n_T: 1000
  betas: [1.0e-4, 0.02]

network:
  image_shape: [3, 32, 32]
  n_channels: 32
  ch_mults: [1, 2]
  is_attn: [False, True]
  dropout: 0.1
  n_blocks: 1
  use_res_for_updown: False

# training
dataset: synthetic
classes: 10
batch_size: 64
n_epoch: 4
lrate: 5.0e-4
warm_epoch: 1
load_epoch: -1
flip: True
ema: 0.999
ckpt_interval: 2         # epochs between checkpoints and sample grids
num_workers: 0           # the synthetic images are already in memory

# testing
n_sample: 30
save_dir: './output_demo'
save_model: True

# linear probing
linear:
  n_epoch: 2
  batch_size: 128
  lrate: 1.0e-3
  timestep: 11           # DDPM timestep
  blockname: out_2       # out_1, out_2 at 16x16; out_3, out_4 at 32x32
"""


def _edit(text, old, new):
    assert old in text
    return text.replace(old, new)


# (case, file text, overrides, key the message must name, another phrase it must contain)
BAD_INPUTS = [
    ("malformed yaml", _edit(DEMO_TEXT, "  n_T: 1000", "  n_T: 1000: 5"), [], "n_T: 1000: 5", "line 5"),
    ("unclosed list", _edit(DEMO_TEXT, "ch_mults: [1, 2]", "ch_mults: [1, 2"), [], "line 12",
     "flow sequence started on line 11"),
    ("unknown key", _edit(DEMO_TEXT, "n_channels:", "n_channel:"), [], "network.n_channel",
     "did you mean 'network.n_channels'"),
    ("unknown top key", DEMO_TEXT + "learning_rate: 0.1\n", [], "learning_rate", "unknown key"),
    ("diffusion key of other model", _edit(DEMO_TEXT, "model_type: DDPM", "model_type: EDM"), [],
     "diffusion.n_T", "for model_type EDM"),
    ("wrong type int", _edit(DEMO_TEXT, "batch_size: 64", "batch_size: sixty"), [], "batch_size",
     "must be an int, got str 'sixty'"),
    ("wrong type float", _edit(DEMO_TEXT, "ema: 0.999", "ema: high"), [], "ema", "must be a number"),
    ("wrong type bool", _edit(DEMO_TEXT, "flip: True", "flip: 1"), [], "flip", "True or False"),
    ("wrong type list", _edit(DEMO_TEXT, "ch_mults: [1, 2]", "ch_mults: 2"), [], "network.ch_mults",
     "list of ints"),
    ("wrong list item", _edit(DEMO_TEXT, "ch_mults: [1, 2]", "ch_mults: [1, 2.5]"), [], "network.ch_mults",
     "list of ints"),
    ("section not mapping", DEMO_TEXT.split("\nlinear:\n")[0] + "\nlinear: 3\n", [], "linear",
     "must be a section of keys, got int 3"),
    ("missing required", _edit(DEMO_TEXT, "model_type: DDPM\n", ""), [], "model_type", "missing required"),
    ("missing nested", _edit(DEMO_TEXT, "  blockname: out_2", ""), [], "linear.blockname", "missing required"),
    ("bad model type", _edit(DEMO_TEXT, "model_type: DDPM", "model_type: VP"), [], "model_type", "DDPM, EDM"),
    ("bad net type", _edit(DEMO_TEXT, "net_type: UNet", "net_type: ViT"), [], "net_type", "UNet"),
    ("attn length", _edit(DEMO_TEXT, "is_attn: [False, True]", "is_attn: [False]"), [], "network.is_attn",
     "one entry per resolution"),
    ("blockname out of range", _edit(DEMO_TEXT, "blockname: out_2", "blockname: out_7"), [],
     "linear.blockname", "in_1, in_2, mid, out_1, out_2, out_3, out_4"),
    ("bad optimizer", DEMO_TEXT + "optim: SGD\n", [], "optim", "Adam, AdamW"),
    ("augmentation needs labels", DEMO_TEXT.replace("model_type: DDPM", "model_type: EDM")
     .replace("  n_T: 1000\n  betas: [1.0e-4, 0.02]\n", "  augment_prob: 0.12\n"), [], "network.augment_dim",
     "must be 9"),
    ("top level list", "- 1\n- 2\n", [], "top level", "mapping"),
    ("set without equals", DEMO_TEXT, ["linear.n_epoch"], "linear.n_epoch", "KEY=VALUE"),
    ("set empty key part", DEMO_TEXT, ["linear..n_epoch=1"], "linear..n_epoch", "KEY=VALUE"),
    ("set bad yaml value", DEMO_TEXT, ["network.ch_mults=[1,2"], "network.ch_mults", "not valid YAML"),
    ("set unknown key", DEMO_TEXT, ["linear.n_epochs=1"], "linear.n_epochs",
     "did you mean 'linear.n_epoch'? (from --set linear.n_epochs=1)"),
    ("set below a value", DEMO_TEXT, ["batch_size.x=1"], "batch_size", "not a section"),
    ("set wrong type", DEMO_TEXT, ["linear.timestep=abc"], "linear.timestep", "must be an int"),
]


@pytest.mark.parametrize("case, text, overrides, key, phrase", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_names_file_and_key(tmp_path, case, text, overrides, key, phrase):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and key in message and phrase in message, message


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(UserError, match=r"--config .*nowhere\.yaml: file not found"):
        load_config(path)


def test_numeric_strings_are_read_as_floats(tmp_path):
    path = tmp_path / "sci.yaml"
    path.write_text(_edit(DEMO_TEXT, "lrate: 5.0e-4", "lrate: 5e-4"))
    assert yaml.safe_load(path.read_text())["lrate"] == "5e-4"  # YAML 1.1 sees a string
    assert load_config(path).lrate == 5e-4
