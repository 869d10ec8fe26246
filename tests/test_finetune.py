"""finetune.py: the classifier, its stages and learning rates, the schedule, and resumed runs."""
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

import finetune
from model.blocks import Upsample
from model.models import load_config, load_diffusion
from tests.helpers import TINY_OVERRIDES, interrupt_on_call, read_scalars, tiny_config, tiny_diffusion
from tests.launch import REPO, run_two_processes
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.data import SyntheticImages, probe_train_transform
from utils.errors import UserError
from utils.provenance import short_digest

TINY_STAGES = ["embedding", "down.0", "down.1", "down.2", "middle", "up.0", "up.1"]  # up to out_2


def test_stages_follow_the_module_order_up_to_the_block(tmp_path):
    net = tiny_diffusion(tiny_config(tmp_path)).nn_model
    assert [name for name, _ in finetune.network_stages(net, "out_2")] == TINY_STAGES
    stages = finetune.network_stages(net, "out_3")
    assert [name for name, _ in stages] == TINY_STAGES + ["up.2", "up.3"]
    assert isinstance(stages[-2][1][0], Upsample) and stages[-1][1][0] is net.up[3]
    assert stages[0][1] == [net.image_proj, net.time_emb] and stages[4][1] == [net.middle]


def test_layer_decay_scales_weight_decay_and_trainable_parameters(tmp_path):
    classifier = finetune.DDAEClassifier(tiny_diffusion(tiny_config(tmp_path)), 11, "out_2", 64, 10)
    groups = finetune.parameter_groups(classifier, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): group["lr_scale"] for group in groups for p in group["params"]}
    decay = {id(p): group["weight_decay"] for group in groups for p in group["params"]}
    net = classifier.diffusion.nn_model
    # Eight stages: the head gets 0.5 ** 0, up.1 0.5 ** 1, ..., the embedding 0.5 ** 7.
    assert scale[id(net.image_proj.weight)] == scale[id(net.time_emb.lin2.bias)] == 0.5 ** 7
    assert scale[id(net.down[1].conv.weight)] == 0.5 ** 5
    assert scale[id(net.up[1].res.conv1.weight)] == 0.5
    assert scale[id(classifier.head.weight)] == scale[id(classifier.norm.weight)] == 1.0
    assert decay[id(classifier.head.weight)] == decay[id(net.up[0].res.conv1.weight)] == 0.05
    assert decay[id(classifier.head.bias)] == decay[id(classifier.norm.weight)] == 0.0
    assert decay[id(net.up[0].res.norm1.weight)] == decay[id(net.image_proj.bias)] == 0.0

    trainable = {name for name, p in classifier.named_parameters() if p.requires_grad}
    assert {id(p) for p in classifier.parameters() if p.requires_grad} == set(scale)
    later = ("diffusion.nn_model.up.2.", "diffusion.nn_model.up.3.", "diffusion.nn_model.up.4.",
             "diffusion.nn_model.norm.", "diffusion.nn_model.final.")
    assert not [name for name in trainable if name.startswith(later)]
    expected = {name for name, _ in classifier.named_parameters() if not name.startswith(later)}
    assert trainable == expected


def test_augmentation_label_embedding_stays_frozen():
    cfg = load_config(REPO / "config" / "EDM_ddpmpp_aug.yaml", [
        "network.n_channels=32", "network.ch_mults=[1,2]", "network.is_attn=[False,True]", "network.n_blocks=1",
        "network.image_shape=[3,16,16]", "linear.blockname=out_2"])
    classifier = finetune.DDAEClassifier(tiny_diffusion(cfg), 4, "out_2", 64, 10)
    groups = finetune.parameter_groups(classifier, 0.05, 1.0)
    aug_weight = classifier.diffusion.nn_model.time_emb.aug_emb.weight
    assert not aug_weight.requires_grad and all(p is not aug_weight for g in groups for p in g["params"])
    F.cross_entropy(classifier(torch.rand(2, 3, 16, 16)), torch.tensor([1, 2])).backward()
    assert all(p.grad is not None for g in groups for p in g["params"])  # no unused parameter to upset DDP


def test_warmup_then_cosine():
    factors = [finetune.lr_factor(step, total_steps=6, warm_steps=2) for step in range(7)]
    assert factors == pytest.approx([0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5,
                                     0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0])


def test_zero_head_starts_uniform_and_the_gradient_reaches_the_first_layer(tmp_path):
    classifier = finetune.DDAEClassifier(tiny_diffusion(tiny_config(tmp_path)), 11, "out_2", 64, 10)
    optimizer = torch.optim.AdamW(finetune.parameter_groups(classifier, 0.05, 1.0), lr=1e-2)
    images, labels = torch.rand(4, 3, 16, 16), torch.tensor([0, 3, 5, 9])
    classifier.train()
    for step in range(2):
        logits = classifier(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=0.1)
        if step == 0:
            assert torch.equal(logits, torch.zeros(4, 10)) and loss.item() == pytest.approx(math.log(10))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net = classifier.diffusion.nn_model
    assert net.image_proj.weight.grad.abs().sum() > 0
    assert net.up[3].res.conv1.weight.grad is None  # out_3 is not run


def tiny_run(tmp_path, **changes):
    cfg = tiny_config(tmp_path / "run")
    checkpoint = tmp_path / "model_3.pth"
    if not checkpoint.exists():
        save_checkpoint({"MODEL": tiny_diffusion(cfg).state_dict()}, checkpoint)
    settings = {"checkpoint": str(checkpoint), "timestep": 11, "block": "out_2", "epochs": 2, "lr": 1e-3,
                "weight_decay": 0.05, "warmup_epochs": 1, "batch_size": 8, "layer_decay": 0.8,
                "label_smoothing": 0.1, "seed": 3, "world_size": 1, "dataset": "synthetic", "max_images": 0,
                "precision": "fp32"}
    settings.update(changes)
    train_set = SyntheticImages(n=24, image_size=16, train=True, transform=probe_train_transform(16))
    test_set = SyntheticImages(n=12, image_size=16, train=False)
    return cfg, load_diffusion(cfg, checkpoint), train_set, test_set, settings


def without_timings(result):
    return {**result, "history": [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in result["history"]]}


def test_resumed_run_equals_the_run_that_was_never_stopped(tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    whole = finetune.run_finetune(*tiny_run(tmp_path), cpu, tmp_path / "whole", "tag", save_weights=True)
    assert whole["finished"] and whole["epochs_done"] == 2 and whole["test_images"] == 12

    interrupt_on_call(monkeypatch, finetune, "train_one_epoch")
    with pytest.raises(KeyboardInterrupt):
        finetune.run_finetune(*tiny_run(tmp_path), cpu, tmp_path / "parts", "tag")
    monkeypatch.undo()
    partial = json.loads((tmp_path / "parts" / "tag.json").read_text())
    assert (partial["epochs_done"], partial["finished"]) == (1, False)
    # Every stage ran at its own rate: the last step's rate times 0.8 ** (stages to the head).
    groups = load_checkpoint(tmp_path / "parts" / "tag.state.pth")["opt"]["param_groups"]
    assert {round(group["lr_scale"], 12) for group in groups} == {round(0.8 ** k, 12) for k in range(8)}
    assert all(group["lr"] == pytest.approx(partial["history"][-1]["lr"] * group["lr_scale"]) for group in groups)

    with pytest.raises(UserError, match="tag.state.pth exists: pass --resume"):
        finetune.run_finetune(*tiny_run(tmp_path), cpu, tmp_path / "parts", "tag")
    with pytest.raises(UserError, match="was trained with lr=0.001, not 0.002"):
        finetune.run_finetune(*tiny_run(tmp_path, lr=2e-3), cpu, tmp_path / "parts", "tag", resume=True)
    with pytest.raises(UserError, match="was trained with precision='fp32', not 'bf16'"):  # no mix of two
        finetune.run_finetune(*tiny_run(tmp_path, precision="bf16"), cpu, tmp_path / "parts", "tag", resume=True,
                              precision="bf16")
    resumed = finetune.run_finetune(*tiny_run(tmp_path), cpu, tmp_path / "parts", "tag", resume=True,
                                    save_weights=True)
    assert without_timings(resumed) == without_timings(whole) | {"weights_file": resumed["weights_file"]}
    assert without_timings(json.loads((tmp_path / "parts" / "tag.json").read_text())) == \
        without_timings(json.loads((tmp_path / "whole" / "tag.json").read_text())) | {
            "weights_file": resumed["weights_file"]}
    assert not (tmp_path / "parts" / "tag.state.pth").exists()  # finished: the weights stay, the state goes
    whole_state = load_checkpoint(tmp_path / "whole" / "tag.weights.pth")
    resumed_state = load_checkpoint(tmp_path / "parts" / "tag.weights.pth")
    assert whole_state["model"].keys() == resumed_state["model"].keys()
    for key, value in whole_state["model"].items():
        assert torch.equal(value, resumed_state["model"][key]), key
    # The fine-tuned weights moved away from the checkpoint's.
    start = load_checkpoint(tmp_path / "model_3.pth")["MODEL"]
    tuned = whole_state["model"]
    assert not torch.equal(tuned["diffusion.nn_model.image_proj.weight"], start["nn_model.image_proj.weight"])
    assert torch.equal(tuned["diffusion.nn_model.final.weight"], start["nn_model.final.weight"])


def cli_argv(tmp_path, checkpoint, *extra):
    sets = [arg for override in TINY_OVERRIDES + [f"save_dir={tmp_path / 'run'}"] for arg in ("--set", override)]
    return ["--config", str(REPO / "config" / "demo.yaml"), *sets, "--ckpt", str(checkpoint), "--device", "cpu",
            "--epochs", "1", "--max_images", "16", "--batch_size", "8", *extra]


def test_cli_writes_results_named_by_checkpoint_and_cell(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "run")
    checkpoint = tmp_path / "model_3.pth"
    save_checkpoint({"MODEL": tiny_diffusion(cfg).state_dict()}, checkpoint)
    finetune.main(finetune.build_parser().parse_args(cli_argv(tmp_path, checkpoint, "--timestep", "21",
                                                              "--block", "out_3", "--tensorboard")))
    tag = f"model_3_{short_digest(checkpoint)}_t21_out_3"
    result = json.loads((tmp_path / "run" / "finetune" / f"{tag}.json").read_text())
    assert (result["settings"]["timestep"], result["settings"]["block"], result["test_images"]) == (21, "out_3", 16)
    assert result["settings"]["warmup_epochs"] == 0  # the default is a tenth of --epochs: none for 1 epoch
    scalars = read_scalars(tmp_path / "run" / "tb" / f"finetune_{tag}")
    assert scalars["finetune/test_accuracy"] == [(1, pytest.approx(result["test_accuracy"]))]
    assert scalars["finetune/train_loss"] == [(1, pytest.approx(result["history"][0]["train_loss"]))]
    assert result["finished"] and len(result["history"]) == 1 and result["classes"] == 10
    assert sorted(path.name for path in (tmp_path / "run" / "finetune").iterdir()) == [f"{tag}.json"]  # no state
    out = capsys.readouterr().out  # epochs count from 0, as train.py, linear.py and log.jsonl count them
    assert re.search(r"^epoch 0/1 ", out, re.M) and not re.search(r"^epoch 1/1 ", out, re.M), out


@pytest.mark.parametrize("extra, message", [
    (["--layer_decay", "0"], "--layer_decay 0.0: must be in (0, 1]"),
    (["--warmup_epochs", "3"], "--warmup_epochs 3: must be in 0..--epochs (1)"),
    (["--block", "out_9"], "linear.blockname' must name a block of this network (in_1, in_2, mid, out_1, out_2, "
                           "out_3, out_4), got 'out_9' (from --block out_9)"),
    (["--timestep", "-3"], "must be 0 or positive, got -3 (from --timestep -3)"),
    (["--out", str(REPO / "README.md")], "README.md is a file, not a folder; pass --out with a writable folder"),
])
def test_cli_errors_name_the_setting(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as stopped:
        finetune.main(finetune.build_parser().parse_args(cli_argv(tmp_path, tmp_path / "none.pth", *extra)))
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_too_few_images_for_a_batch_names_this_scripts_flag(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "run")
    checkpoint = tmp_path / "model_3.pth"
    save_checkpoint({"MODEL": tiny_diffusion(cfg).state_dict()}, checkpoint)
    with pytest.raises(SystemExit):
        finetune.main(finetune.build_parser().parse_args(cli_argv(tmp_path, checkpoint, "--max_images", "4")))
    err = capsys.readouterr().err
    assert err.endswith("the training set has 4 images, fewer than one batch on every process (8 x 1); "
                        "lower it with --batch_size\n")


def test_two_process_run(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    checkpoint = tmp_path / "model_3.pth"
    save_checkpoint({"MODEL": tiny_diffusion(cfg).state_dict()}, checkpoint)
    finished = run_two_processes("finetune.py", *cli_argv(tmp_path, checkpoint, "--layer_decay", "0.9",
                                                          "--batch_size", "4"), cwd=REPO, timeout=180)
    assert finished.returncode == 0, finished.stderr[-2000:]
    tag = f"model_3_{short_digest(checkpoint)}_t11_out_2"
    result = json.loads((tmp_path / "run" / "finetune" / f"{tag}.json").read_text())
    assert (result["settings"]["world_size"], result["test_images"], result["finished"]) == (2, 16, True)


def test_a_finished_record_missing_a_key_is_one_line_and_kept(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "run")
    checkpoint = tmp_path / "model_3.pth"
    save_checkpoint({"MODEL": tiny_diffusion(cfg).state_dict()}, checkpoint)
    args = finetune.build_parser().parse_args(cli_argv(tmp_path, checkpoint))
    finetune.main(args)
    (path,) = (tmp_path / "run" / "finetune").glob("*.json")
    record = json.loads(path.read_text())
    for key in ("settings", "epochs_done", "test_accuracy", "settings.timestep", "provenance.weights.sha256"):
        edited = json.loads(json.dumps(record))
        *parents, leaf = key.split(".")
        node = edited
        for parent in parents:
            node = node[parent]
        del node[leaf]
        path.write_text(json.dumps(edited))
        capsys.readouterr()
        with pytest.raises(SystemExit) as stopped:
            finetune.main(args)
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and err == f"error: {path}: this finished run's record has no '{key}' " \
            f"(edited or damaged); restore it, pass --out for a new run, or delete it to train again\n"
        assert json.loads(path.read_text()) == edited
