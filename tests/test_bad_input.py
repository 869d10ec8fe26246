"""Bad input to train.py: each case prints one line on stderr, exits non-zero without a traceback and
leaves every existing file as it was. The cases run as subprocesses, launched together."""
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
TINY = {
    "model_type": "DDPM",
    "network": {"image_shape": [3, 16, 16], "n_channels": 32, "ch_mults": [1, 2], "is_attn": [False, True],
                "n_blocks": 1},
    "dataset": "synthetic", "batch_size": 16, "n_epoch": 2, "lrate": 1.0e-3, "warm_epoch": 1, "ema": 0.99,
    "num_workers": 0,
    "linear": {"timestep": 11, "blockname": "out_2"},
}
# Downloads go to a closed local port: the offline case fails at once and nothing leaves the machine.
OFFLINE = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}


def write_config(folder, text=None, **changes):
    path = folder / "tiny.yaml"
    config = {**TINY, "save_dir": str(folder / "run"), **changes}
    path.write_text(text if text is not None else yaml.safe_dump(config))
    return path


def existing_run(folder, checkpoint_bytes):
    """A run folder from earlier work: its config, log and one checkpoint file."""
    run = folder / "run"
    (run / "ckpts").mkdir(parents=True)
    (run / "config.yaml").write_text("earlier run\n")
    (run / "log.jsonl").write_text('{"epoch": 0, "loss": 0.5}\n')
    (run / "ckpts" / "model_0.pth").write_bytes(checkpoint_bytes)
    return run


def malformed_yaml(folder):
    config = write_config(folder, text="model_type: DDPM\nnetwork: {image_shape: [3, 16\n")
    return [config], f"{config}: line"


def unknown_key(folder):
    return [write_config(folder, bogus_key=1)], "unknown key 'bogus_key'"


def wrong_type(folder):
    return [write_config(folder, batch_size="sixteen")], "key 'batch_size' must be an int"


def missing_config(folder):
    return [folder / "absent.yaml"], "absent.yaml: file not found"


def dataset_offline(folder):
    (folder / "data").mkdir()
    config = write_config(folder, dataset="cifar", network={**TINY["network"], "image_shape": [3, 32, 32]})
    return [config, "--data_root", folder / "data"], "CIFAR-10 not found under"


def corrupt_checkpoint(folder):
    run = existing_run(folder, b"PK\x03\x04 this is not a finished checkpoint")
    return [write_config(folder, save_dir=str(run)), "--resume"], "not a readable PyTorch checkpoint"


def other_architecture(folder):
    run = existing_run(folder, (GOLDEN / "original_ckpt_tiny_DDPM.pth").read_bytes())  # ch_mults [1]
    return [write_config(folder, save_dir=str(run)), "--resume"], "made for another network"


def nothing_to_resume(folder):
    (folder / "run").mkdir()
    return [write_config(folder), "--resume"], "no checkpoint to resume"


def missing_resume_file(folder):
    return [write_config(folder), "--resume", folder / "model_9.pth"], "model_9.pth: file not found"


def save_dir_under_a_file(folder):
    (folder / "notes.txt").write_text("a file, not a folder\n")
    config = write_config(folder, save_dir=str(folder / "notes.txt" / "run"))
    return [config], "is a file, not a folder"


def fresh_run_over_checkpoints(folder):
    run = existing_run(folder, (GOLDEN / "original_ckpt_tiny_DDPM.pth").read_bytes())
    return [write_config(folder, save_dir=str(run))], "pass --resume to continue that run"


CASES = [malformed_yaml, unknown_key, wrong_type, missing_config, dataset_offline, corrupt_checkpoint,
         other_architecture, nothing_to_resume, missing_resume_file, save_dir_under_a_file,
         fresh_run_over_checkpoints]


def snapshot(folder):
    """Every file and folder under ``folder``, with the files' bytes."""
    return {path.relative_to(folder): path.read_bytes() if path.is_file() else None
            for path in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Set up every case, then run them all at once: {name: (result, expected text, before, after)}."""
    env = {key: value for key, value in os.environ.items()
           if key.lower() not in ("no_proxy", "rank", "local_rank", "world_size")}
    env.update(OFFLINE, OMP_NUM_THREADS="1")
    prepared = {}
    for case in CASES:
        folder = tmp_path_factory.mktemp(case.__name__)
        argv, expected = case(folder)
        prepared[case.__name__] = (folder, [sys.executable, "train.py", "--device", "cpu", "--config",
                                            *map(str, argv)], expected, snapshot(folder))

    def launch(name):
        folder, command, expected, before = prepared[name]
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
        return name, (result, expected, before, snapshot(folder))

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(launch, prepared))


@pytest.mark.parametrize("case", [case.__name__ for case in CASES])
def test_one_line_error_and_nothing_touched(outcomes, case):
    result, expected, before, after = outcomes[case]
    output = result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, output
    assert "Traceback" not in output
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert expected in lines[0]
    assert after == before
