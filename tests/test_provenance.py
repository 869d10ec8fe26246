"""Results belong to the model they name: two checkpoints of one file name into one save_dir never share a
probe, k-NN, classifier, fine-tuning or export, and every result record names the weights' hash, the config
and the command (utils/provenance.py); a finished fine-tuning run keeps its result, not its optimizer."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import contrastive
import export_features
import finetune
import knn
import linear
import noisy_classifier_DDAE
import sample
from tests.helpers import TINY_OVERRIDES, make_checkpoint, make_config, small_sets, tiny_config, tiny_diffusion
from tests.launch import REPO
from utils import data, provenance
from utils.checkpoint import save_checkpoint
from utils.data import SyntheticImages


def sha256(path):
    return hashlib.new("sha256", Path(path).read_bytes()).hexdigest()


def checks_record(record, checkpoint, config_key="save_dir"):
    """The provenance record names ``checkpoint`` by its file's hash, the config and this process's command."""
    assert record["weights"]["sha256"] == sha256(checkpoint)
    assert record["weights"]["path"] == os.path.abspath(checkpoint)
    assert config_key in record["config"] and record["command"] == sys.argv
    assert record["version"] == provenance.code_version() and record["torch"] == torch.__version__
    assert record["processes"] == 1 and record["device"] == "cpu"


def test_a_checkpoint_rewritten_with_other_bytes_of_the_same_size_and_time_gets_a_new_hash(tmp_path):
    path = tmp_path / "model_1.pth"
    path.write_bytes(os.urandom(3 * provenance.CHUNK + 5))  # several chunks and a short last one
    assert provenance.weights_identity(path)["sha256"] == sha256(path)
    assert provenance.short_digest(path) == f"sha{sha256(path)[:8]}"
    stat = path.stat()
    path.write_bytes(os.urandom(stat.st_size))  # rewritten in place: same size, and the same time below
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_mtime_ns == stat.st_mtime_ns and path.stat().st_size == stat.st_size
    assert provenance.weights_identity(path)["sha256"] == sha256(path)
    assert provenance.short_digest(path) == f"sha{sha256(path)[:8]}"


def diffusers_folder(root, layout="pipeline"):
    """A folder with the files DiffusersUNet reads (contents need not be a real model for the identity)."""
    unet = root / "unet" if layout == "pipeline" else root
    unet.mkdir(parents=True)
    (unet / "config.json").write_text(json.dumps({"flip_sin_to_cos": True, "freq_shift": 0}))
    (unet / "diffusion_pytorch_model.bin").write_bytes(b"bin")
    (unet / "diffusion_pytorch_model.safetensors").write_bytes(b"safetensors")  # diffusers prefers it
    scheduler = root / "scheduler" / "scheduler_config.json" if layout == "pipeline" else root / "scheduler_config.json"
    scheduler.parent.mkdir(exist_ok=True)
    scheduler.write_text(json.dumps({"num_train_timesteps": 1000}))
    (root / "model_index.json").write_text("{}")  # names the parts, defines none of them
    return root


@pytest.mark.parametrize("layout", ["pipeline", "bare"])
def test_a_diffusers_folder_is_identified_by_its_configs_and_weights_as_sha256sum_prints_them(tmp_path, layout):
    folder = diffusers_folder(tmp_path / "ddpm", layout)
    identity = provenance.weights_identity(folder)
    unet = "unet/" if layout == "pipeline" else ""
    scheduler = "scheduler/scheduler_config.json" if layout == "pipeline" else "scheduler_config.json"
    assert sorted(identity["files"]) == sorted([f"{unet}config.json", f"{unet}diffusion_pytorch_model.safetensors",
                                                scheduler])
    assert identity["files"][f"{unet}diffusion_pytorch_model.safetensors"] == hashlib.sha256(b"safetensors").hexdigest()
    if shutil.which("sha256sum"):  # the documented command prints the same hash
        printed = subprocess.run(["bash", "-c", identity["check"]], capture_output=True, text=True, check=True)
        assert printed.stdout.split()[0] == identity["sha256"]
    seen = {identity["sha256"]}
    for name, text in ((f"{unet}config.json", '{"flip_sin_to_cos": false, "freq_shift": 1}'),
                       (scheduler, '{"num_train_timesteps": 500}'),
                       (f"{unet}diffusion_pytorch_model.safetensors", "other weights")):
        (folder / name).write_text(text)
        seen.add(provenance.weights_identity(folder)["sha256"])
    assert len(seen) == 4  # each file that defines the model changes the identity
    (folder / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}')
    assert provenance.weights_identity(folder)["sha256"] in seen


def test_code_version_is_the_commit_or_says_it_is_unknown(tmp_path):
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if commit.returncode == 0:
        assert provenance.code_version().split("+")[0] == commit.stdout.strip()
    shutil.copytree(REPO / "utils", tmp_path / "utils")  # a copy of the code outside any checkout
    script = "from utils.provenance import code_version; print(code_version())"
    printed = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": "", "GIT_CEILING_DIRECTORIES": str(tmp_path)})
    assert printed.stdout.strip() == "unknown (not a git checkout)", printed.stderr


@pytest.fixture
def two_models(tmp_path):
    """The issue's case: save_dir/ckpts/model_3.pth and other/model_3.pth, other weights under the same name."""
    cfg, config_path = make_config(tmp_path, overrides=["linear.n_epoch=1"])
    first = make_checkpoint(cfg, 3, seed=0)
    second = tmp_path / "other" / "model_3.pth"
    second.parent.mkdir()
    shutil.copy(make_checkpoint(cfg, 4, seed=1), second)
    os.remove(Path(cfg.save_dir) / "ckpts" / "model_4.pth")
    return cfg, config_path, Path(first), second


def run_linear(cfg, config_path, checkpoint, monkeypatch, *extra):
    train_set, test_set = small_sets(48, 24)
    monkeypatch.setattr(data, "build_dataset", lambda name, root, train, transform, image_size:
                        train_set if train else test_set)
    argv = ["--config", str(config_path), "--set", f"save_dir={cfg.save_dir}", "--set", "linear.n_epoch=1",
            "--ckpt", str(checkpoint), "--device", "cpu", *extra]
    linear.main(linear.build_parser().parse_args(argv))


@pytest.mark.parametrize("grid", [[], ["--grid"]])
def test_linear_probes_of_two_same_named_checkpoints_stay_apart(two_models, monkeypatch, capsys, grid):
    cfg, config_path, first, second = two_models
    run_linear(cfg, config_path, first, monkeypatch, *grid)
    capsys.readouterr()
    run_linear(cfg, config_path, second, monkeypatch, *grid)
    assert "resuming" not in capsys.readouterr().out  # the first model's finished probe is not its result
    results = sorted((Path(cfg.save_dir) / "linear").glob("*.json"))
    assert len(results) == 2
    by_hash = {json.loads(path.read_text())["provenance"]["weights"]["sha256"]: path for path in results}
    assert set(by_hash) == {sha256(first), sha256(second)}
    for checkpoint in (first, second):
        record = json.loads(by_hash[sha256(checkpoint)].read_text())
        checks_record(record["provenance"], checkpoint)
        assert record["checkpoint"] == str(checkpoint) and f"_sha{sha256(checkpoint)[:8]}_" in by_hash[
            sha256(checkpoint)].name
    # the same checkpoint again still finds its own finished probe
    before = json.loads(by_hash[sha256(first)].read_text())["accuracy"]
    run_linear(cfg, config_path, first, monkeypatch, *grid)
    assert "1 of 1 epochs done" in capsys.readouterr().out
    assert json.loads(by_hash[sha256(first)].read_text())["accuracy"] == before


def test_linear_state_under_one_tag_refuses_other_weights(two_models, monkeypatch, capsys):
    cfg, config_path, first, second = two_models
    run_linear(cfg, config_path, first, monkeypatch, "--tag", "sweep")
    with pytest.raises(SystemExit) as stopped:
        run_linear(cfg, config_path, second, monkeypatch, "--tag", "sweep")
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and "\n" not in err
    assert f"sweep.state.pth was made with {first} (sha256 {sha256(first)[:12]}...), not {second}" in err


def test_linear_state_named_before_hashes_is_kept_until_the_user_says_whose(two_models, monkeypatch, capsys):
    cfg, config_path, first, _ = two_models
    run_linear(cfg, config_path, first, monkeypatch)
    folder = Path(cfg.save_dir) / "linear"
    (keyed,) = folder.glob("*.state.pth")
    old = folder / keyed.name.replace(f"_sha{sha256(first)[:8]}", "")
    keyed.rename(old)  # what an older version left: a state named without the hash, recording none
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_linear(cfg, config_path, first, monkeypatch)
    assert f"if it is {first}'s, rename it to {keyed} to resume it" in capsys.readouterr().err
    assert old.is_file() and not keyed.exists()
    old.rename(keyed)
    run_linear(cfg, config_path, first, monkeypatch)
    assert f"resuming {keyed}: 1 of 1 epochs done" in capsys.readouterr().out


def on_first_call(monkeypatch, module, name, action):
    """Run ``action`` once, when ``module.name`` is first called: after the weights were loaded."""
    original, calls = getattr(module, name), []

    def wrapped(*args, **kwargs):
        if not calls:
            calls.append(action())
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


@pytest.mark.parametrize("change", ["replaced", "deleted"])
def test_a_checkpoint_changed_while_a_probe_trains_is_recorded_as_it_was_loaded(two_models, monkeypatch, change):
    """The issue's runs: model_3.pth replaced by another model, or deleted, once the probe has started: the
    result is written, and names the loaded bytes' hash (in its name, record and resume state)."""
    cfg, config_path, first, second = two_models
    loaded = sha256(first)
    on_first_call(monkeypatch, linear, "prepare_frozen",  # after the load, before the data and the epochs
                  lambda: shutil.copy(second, first) if change == "replaced" else first.unlink())
    run_linear(cfg, config_path, first, monkeypatch)
    (result,) = (Path(cfg.save_dir) / "linear").glob("*.json")
    assert json.loads(result.read_text())["provenance"]["weights"]["sha256"] == loaded
    assert f"_sha{loaded[:8]}_" in result.name
    state = torch.load(result.with_name(result.stem + ".state.pth"), weights_only=True)
    assert state["weights"]["sha256"] == loaded and first.exists() == (change == "replaced")


def test_a_resume_state_that_records_no_weights_is_refused(two_models, monkeypatch, capsys):
    cfg, config_path, first, _ = two_models
    run_linear(cfg, config_path, first, monkeypatch, "--tag", "old")
    path = Path(cfg.save_dir) / "linear" / "old.state.pth"
    state = torch.load(path, weights_only=True)
    del state["weights"]  # as a state written before states recorded the weights
    save_checkpoint(state, path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run_linear(cfg, config_path, first, monkeypatch, "--tag", "old")
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1
    assert f"{path} records no hash of the weights it was made with, so it may be another model's" in err


def test_a_rerun_of_a_finished_probe_leaves_its_record_and_another_precision_is_another_probe(
        two_models, monkeypatch, capsys):
    cfg, config_path, first, _ = two_models
    run_linear(cfg, config_path, first, monkeypatch)
    (result,) = (Path(cfg.save_dir) / "linear").glob("*.json")
    before = result.read_bytes()
    capsys.readouterr()
    run_linear(cfg, config_path, first, monkeypatch, "--num_workers", "0")  # another command, no work
    assert "nothing to train" in capsys.readouterr().out
    assert result.read_bytes() == before  # not re-stamped with the rerun's command
    run_linear(cfg, config_path, first, monkeypatch, "--precision", "bf16")
    assert result.read_bytes() == before
    bf16 = result.with_name(result.stem + "_bf16.json")
    assert json.loads(bf16.read_text())["precision"] == "bf16"
    # under one --tag, a state of another precision is refused in one line, not resumed into a mix
    run_linear(cfg, config_path, first, monkeypatch, "--tag", "sweep")
    tagged = (Path(cfg.save_dir) / "linear" / "sweep.json").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run_linear(cfg, config_path, first, monkeypatch, "--tag", "sweep", "--precision", "bf16")
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1
    assert "sweep.state.pth holds a probe with precision='fp32', not 'bf16'" in err
    assert (Path(cfg.save_dir) / "linear" / "sweep.json").read_bytes() == tagged


def demo_argv(save_dir, checkpoint, *extra):
    sets = [arg for override in TINY_OVERRIDES + [f"save_dir={save_dir}"] for arg in ("--set", override)]
    return ["--config", str(REPO / "config" / "demo.yaml"), *sets, "--ckpt", str(checkpoint), "--device", "cpu",
            *map(str, extra)]


@pytest.fixture
def two_demo_models(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    first, second = tmp_path / "a" / "model_3.pth", tmp_path / "b" / "model_3.pth"
    save_checkpoint({"MODEL": tiny_diffusion(cfg, seed=0).state_dict()}, first)
    save_checkpoint({"MODEL": tiny_diffusion(cfg, seed=1).state_dict()}, second)
    return cfg, first, second


def test_knn_results_of_two_same_named_checkpoints_stay_apart(two_demo_models, monkeypatch):
    cfg, first, second = two_demo_models
    for checkpoint in (first, second):
        knn.main(knn.build_parser().parse_args(demo_argv(cfg.save_dir, checkpoint, "--max_images", 16,
                                                         "--batch_size", 8, "--k", 3)))
    for checkpoint in (first, second):
        path = Path(cfg.save_dir) / "knn" / f"model_3_sha{sha256(checkpoint)[:8]}_t11_out_2_k3_T0.07_max16.json"
        checks_record(json.loads(path.read_text())["provenance"], checkpoint)
    # another --max_images is another result, beside the first; the checkpoint deleted mid-run loses nothing
    hashed = sha256(first)
    on_first_call(monkeypatch, knn, "extract_dataset_features", first.unlink)
    knn.main(knn.build_parser().parse_args(demo_argv(cfg.save_dir, first, "--max_images", 8, "--batch_size", 8,
                                                     "--k", 3)))
    results = {path.name: json.loads(path.read_text()) for path in (Path(cfg.save_dir) / "knn").glob("*.json")}
    assert len(results) == 3
    eight = results[f"model_3_sha{hashed[:8]}_t11_out_2_k3_T0.07_max8.json"]
    assert eight["test_images"] == 8 and eight["provenance"]["weights"]["sha256"] == hashed
    assert results[f"model_3_sha{hashed[:8]}_t11_out_2_k3_T0.07_max16.json"]["test_images"] == 16


def test_export_features_of_two_same_named_checkpoints_stay_apart(two_demo_models):
    cfg, first, second = two_demo_models
    for checkpoint in (first, second):
        export_features.main(export_features.build_parser().parse_args(
            demo_argv(cfg.save_dir, checkpoint, "--max_images", 6, "--batch_size", 3, "--seed", 9)))
    arrays = []
    for checkpoint in (first, second):
        out = Path(cfg.save_dir) / "features" / f"model_3_sha{sha256(checkpoint)[:8]}_t11_test_max6_seed9"
        meta = json.loads((out / "meta.json").read_text())
        checks_record(meta["provenance"], checkpoint)
        assert meta["provenance"]["seed"] == 9
        arrays.append((out / "out_2.npy").read_bytes())
    assert arrays[0] != arrays[1]


def test_noisy_ddae_results_of_two_same_named_checkpoints_stay_apart(two_demo_models):
    cfg, first, second = two_demo_models
    for checkpoint in (first, second):
        noisy_classifier_DDAE.main(noisy_classifier_DDAE.parse_args(demo_argv(
            cfg.save_dir, checkpoint, "--max_images", 16, "--set", "linear.n_epoch=1")))
    for checkpoint in (first, second):
        out = Path(cfg.save_dir) / f"noisy_DDAE_ep3_sha{sha256(checkpoint)[:8]}_max16"
        checks_record(json.loads((out / "noisy_accuracy.json").read_text())["provenance"], checkpoint)
        assert (out / "head.pth").is_file()


def finetune_argv(cfg, checkpoint, *extra):
    return demo_argv(cfg.save_dir, checkpoint, "--epochs", 1, "--max_images", 16, "--batch_size", 8, *extra)


def test_finetune_of_two_same_named_checkpoints_and_its_end_state(two_demo_models, capsys):
    cfg, first, second = two_demo_models
    folder = Path(cfg.save_dir) / "finetune"
    for checkpoint, extra in ((first, ["--save_weights"]), (second, [])):
        finetune.main(finetune.build_parser().parse_args(finetune_argv(cfg, checkpoint, *extra)))
    tags = {checkpoint: f"model_3_sha{sha256(checkpoint)[:8]}_t11_out_2" for checkpoint in (first, second)}
    for checkpoint, tag in tags.items():
        result = json.loads((folder / f"{tag}.json").read_text())
        assert result["finished"] and result["settings"]["checkpoint"] == str(checkpoint)
        checks_record(result["provenance"], checkpoint)
    # a finished run keeps its result and, when asked, its weights; not the optimizer's state
    assert sorted(path.name for path in folder.iterdir()) == sorted(
        [f"{tags[first]}.json", f"{tags[first]}.weights.pth", f"{tags[second]}.json"])
    tuned = torch.load(folder / f"{tags[first]}.weights.pth", weights_only=True)
    assert tuned["weights"]["sha256"] == sha256(first) and "head.weight" in tuned["model"]
    assert json.loads((folder / f"{tags[first]}.json").read_text())["weights_file"] == \
        str(folder / f"{tags[first]}.weights.pth")
    capsys.readouterr()

    # the same command again, as a user runs it: it says the run is finished and trains nothing
    again = subprocess.run([sys.executable, "finetune.py", *finetune_argv(cfg, second)], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{tags[second]}.json: finished, 1 epochs, test accuracy" in again.stdout
    assert "nothing to train" in again.stdout and "epoch 0/1" not in again.stdout
    # other settings into the same name are refused, not mixed with the finished run
    with pytest.raises(SystemExit) as stopped:
        finetune.main(finetune.build_parser().parse_args(finetune_argv(cfg, second, "--lr", "0.002")))
    assert stopped.value.code == 2
    assert f"{tags[second]}.json is a finished run with lr=0.0001, not 0.002; pass --out" in capsys.readouterr().err


def test_contrastive_record_names_every_checkpoint_by_hash(tmp_path, monkeypatch):
    cfg, config_path = make_config(tmp_path, overrides=["n_epoch=3"])
    checkpoints = [make_checkpoint(cfg, 1, seed=0), make_checkpoint(cfg, 2, seed=1)]
    monkeypatch.setattr(contrastive, "build_dataset", lambda *args, **kwargs: SyntheticImages(8, image_size=8))
    contrastive.main(contrastive.build_parser().parse_args(
        ["--config", str(config_path), "--set", f"save_dir={cfg.save_dir}", "--set", "n_epoch=3",
         "--epoch_interval", "1", "--device", "cpu"]))
    record = json.loads((Path(cfg.save_dir) / "contrastive.json").read_text())["provenance"]
    assert [weights["sha256"] for weights in record["weights"]] == [sha256(path) for path in checkpoints]
    assert record["config"]["n_epoch"] == 3 and record["command"] == sys.argv


def test_sampling_record_names_the_weights(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path / "run", ["diffusion.n_T=20"])
    checkpoint = make_checkpoint(cfg, 3)
    sample.main(sample.build_parser().parse_args(demo_argv(
        cfg.save_dir, checkpoint, "--set", "diffusion.n_T=20", "--n_samples", 2, "--steps", 2, "--seed", 4,
        "--out_dir", tmp_path / "out")))
    settings_file = tmp_path / "out" / "sampling.json"
    settings = json.loads(settings_file.read_text())
    checks_record(settings["provenance"], checkpoint)
    assert settings["provenance"]["seed"] == 4 and settings["provenance"]["config"]["diffusion"]["n_T"] == 20
    # one hash names the model, the one sha256sum prints
    assert settings["checkpoint_sha256"] == sha256(checkpoint) and "weights_sha256" not in settings
    # a rerun that draws nothing leaves the record; one that draws images is listed apart, not as the producer
    before = settings_file.read_bytes()
    monkeypatch.setattr(sys, "argv", ["sample.py", "--a-later-command"])
    argv = demo_argv(cfg.save_dir, checkpoint, "--set", "diffusion.n_T=20", "--n_samples", 2, "--steps", 2, "--seed",
                     4, "--out_dir", tmp_path / "out")
    assert sample.main(sample.build_parser().parse_args(argv + ["--batch_size", "1"]))["generated"] == 0
    assert settings_file.read_bytes() == before
    (tmp_path / "out" / "pngs" / "1.png").unlink()
    assert sample.main(sample.build_parser().parse_args(argv + ["--batch_size", "1"]))["generated"] == 1
    after = json.loads(settings_file.read_text())
    assert after["provenance"] == settings["provenance"] and after["n_samples"] == 2
    assert [run["images"] for run in after["continued"]] == [1]
    assert after["continued"][0]["provenance"]["weights"]["sha256"] == sha256(checkpoint)


def test_a_diffusers_folder_with_another_unet_config_is_another_model_to_sample_py(tmp_path, capsys):
    """The issue's case: the same safetensors with flip_sin_to_cos and freq_shift changed in unet/config.json
    makes other images; sample.py names it by another hash and refuses to add its images to the folder."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from tests.test_diffusers_sampling import CONFIG, CONFIG_SETS, N_T, TINY_LAYOUT
    root = tmp_path / "ddpm-tiny"
    torch.manual_seed(0)
    DDPMPipeline(unet=UNet2DModel(**TINY_LAYOUT).eval(),
                 scheduler=DDPMScheduler(num_train_timesteps=N_T)).save_pretrained(root)
    out = tmp_path / "out"
    argv = ["--config", str(CONFIG), *[arg for setting in CONFIG_SETS for arg in ("--set", setting)], "--ckpt",
            str(root), "--device", "cpu", "--n_samples", "2", "--steps", "2", "--out_dir", str(out)]
    sample.main(sample.build_parser().parse_args(argv))
    recorded = json.loads((out / "sampling.json").read_text())
    original = recorded["checkpoint_sha256"]
    assert recorded["provenance"]["weights"]["sha256"] == original and "weights_sha256" not in recorded
    if shutil.which("sha256sum"):  # the one documented command confirms it
        check = recorded["provenance"]["weights"]["check"]
        assert subprocess.run(["bash", "-c", check], capture_output=True, text=True).stdout.split()[0] == original
    (out / "pngs" / "1.png").unlink()
    config_path = root / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"flip_sin_to_cos": True, "freq_shift": 0}))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        sample.main(sample.build_parser().parse_args(argv))
    err = capsys.readouterr().err
    changed = provenance.weights_identity(root)["sha256"]
    assert stopped.value.code == 2 and err.count("\n") == 1 and changed != original
    assert f"{out} holds images sampled with checkpoint_sha256={original}, but this run has " \
           f"checkpoint_sha256={changed}" in err
    assert not (out / "pngs" / "1.png").exists()


LAUNCHED = """import json, sys
from utils.provenance import provenance
print("COMMAND " + json.dumps(provenance()["command"]), flush=True)
"""


def test_under_the_launcher_the_command_is_what_the_user_typed(tmp_path):
    script = tmp_path / "show_command.py"
    script.write_text(LAUNCHED)
    typed = [sys.executable, "-m", "utils.launch", "--standalone", "--nproc_per_node=1", str(script), "--flag", "x"]
    done = subprocess.run(typed, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("COMMAND ")]
    assert json.loads(line.removeprefix("COMMAND ")) == typed


def test_a_sample_folder_recorded_by_its_tensors_continues_when_they_are_this_models(tmp_path, capsys):
    """sampling.json from before checkpoint_sha256 named the model by its tensors (weights_sha256): the same
    tensors continue the folder and the record takes the file's hash; other tensors are refused."""
    from utils.checkpoint import weights_digest

    cfg = tiny_config(tmp_path / "run", ["diffusion.n_T=20"])
    checkpoint = make_checkpoint(cfg, 3)
    out = tmp_path / "out"
    argv = demo_argv(cfg.save_dir, checkpoint, "--set", "diffusion.n_T=20", "--n_samples", 2, "--steps", 2,
                     "--out_dir", out)
    sample.main(sample.build_parser().parse_args(argv))
    settings_file = out / "sampling.json"
    settings = json.loads(settings_file.read_text())
    loaded = sample.load_diffusion(sample.load_config(str(REPO / "config" / "demo.yaml"),
                                                      TINY_OVERRIDES + ["diffusion.n_T=20"]), str(checkpoint))
    old = {key: value for key, value in settings.items() if key != "checkpoint_sha256"}
    for tensors, refused in (("0" * 64, True), (weights_digest(loaded), False)):
        settings_file.write_text(json.dumps(old | {"weights_sha256": tensors}))
        (out / "pngs" / "1.png").unlink(missing_ok=True)
        if refused:
            with pytest.raises(SystemExit):
                sample.main(sample.build_parser().parse_args(argv))
            assert "holds images sampled with checkpoint_sha256=unknown (other weights: weights_sha256 " \
                   "000000000000...)" in capsys.readouterr().err
        else:
            assert sample.main(sample.build_parser().parse_args(argv))["generated"] == 1
    upgraded = json.loads(settings_file.read_text())
    assert upgraded["checkpoint_sha256"] == sha256(checkpoint) and "weights_sha256" not in upgraded
