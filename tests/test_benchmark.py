"""bench/benchmark.py: the --quick run on the CPU writes every part, and its bookkeeping is right."""
import argparse
import importlib.util
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model.models import load_config
from tests.helpers import DEVICE
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "benchmark.py"
DEMO = ROOT / "config" / "demo.yaml"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


benchmark = load_benchmark()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.md"
    # On a GPU (DDAE_TEST_DEVICE) without compiling, which would take minutes.
    device = ["--device", DEVICE.type] + (["--compile", "off"] if DEVICE.type != "cpu" else [])
    result = subprocess.run([sys.executable, str(BENCH), "--config", str(DEMO), "--quick", "--out", str(out), *device],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out.read_text(), json.loads(out.with_suffix(".json").read_text()), result.stdout


def quick_run_dir(quick_run):
    """The folder of the run's --out, read back from the command in its header."""
    command = shlex.split(quick_run[1]["header"]["command"])
    return Path(command[command.index("--out") + 1]).parent


def test_quick_run_measures_every_variant_of_every_part(quick_run):
    _, results, _ = quick_run
    for part, variants in benchmark.VARIANTS.items():
        rows = results[part]
        assert [row["variant"] for row in rows] == list(variants)
        for row in rows:
            assert row["status"] == "ok", row
            assert math.isfinite(row["img_s"]) and row["img_s"] > 0
            assert row["peak_gib"] > 0
            assert row["compile_s"] >= 0
            if DEVICE.type == "cpu":
                assert row["mfu_pct"] is None  # no peak FLOP/s for a CPU


def test_quick_run_numbers_fit_together(quick_run):
    _, results, _ = quick_run
    train = {row["variant"]: row for row in results["train"]}
    assert train["faithful"]["speedup"] == 1.0
    for name, row in train.items():
        assert row["batch"] == (4 * 8 if name == "use_amp_accum4" else 8)  # --accum 4: four micro-batches a step
        assert row["speedup"] == pytest.approx(row["img_s"] / train["faithful"]["img_s"], rel=1e-12)
    assert train["faithful"]["precision"] == ("fp16" if DEVICE.type == "cuda" else "fp32")  # a CPU falls back
    assert train["fast"]["precision"] == "bf16"
    assert train["fast"]["note"].startswith("compile off")
    for row in results["sample"]:
        guided = " + classifier guidance" if row["variant"] == "bf16_guided" else ""
        assert row["sampler"] == "DDIM 10" + guided and row["batch"] == 4
        assert row["s_50k"] == pytest.approx(50_000 / row["img_s"], rel=1e-12)
    probe = {row["variant"]: row for row in results["probe"]}
    assert [probe[name]["batch"] for name in benchmark.PROBE_VARIANTS] == [8, 8, 16, 16, 16]
    assert {row["cells"] for row in probe.values()} == {"3 t x 4 blocks"}  # DDPM grid 1/11/21, out_1..out_4


def test_quick_run_loss_parity(quick_run):
    _, results, _ = quick_run
    (parity,) = results["parity"]
    assert parity["plot"] == "results_curves.png"
    assert (quick_run_dir(quick_run) / "results_curves.png").stat().st_size > 0
    assert "Loss curves: [results_curves.png](results_curves.png)" in quick_run[0]
    (parity,) = results["parity"]
    assert parity["status"] == "ok" and parity["steps"] == 4 and parity["window"] == 2
    curves = parity["curves"]
    assert len(curves["fp32"]) == len(curves["fast"]) == 4
    assert parity["loss_fp32"] == pytest.approx(sum(curves["fp32"][-2:]) / 2, rel=1e-6)
    assert parity["loss_fast"] == pytest.approx(sum(curves["fast"][-2:]) / 2, rel=1e-6)
    assert parity["difference"] == pytest.approx(parity["loss_fast"] - parity["loss_fp32"], abs=1e-9)
    # z: the difference of the window means in standard errors of that difference; |z| < 3 is noise.
    reference, fast = curves["fp32"][-2:], curves["fast"][-2:]
    z = parity["difference"] / math.sqrt((statistics.variance(reference) + statistics.variance(fast)) / 2)
    assert parity["z"] == pytest.approx(z, rel=1e-6)
    assert parity["within_noise"] is (abs(z) < 3)
    # The two runs start from the same weights and the same first batch: fp32 and bf16 losses agree closely.
    assert curves["fast"][0] == pytest.approx(curves["fp32"][0], rel=0.05)


def test_quick_run_profiles_the_faithful_and_graphs_steps(quick_run):
    markdown, results, _ = quick_run
    rows = {row["variant"]: row for row in results["profile"]}
    assert list(rows) == ["faithful", "graphs"]
    for name, row in rows.items():
        assert row["status"] == "ok" and row["steps"] == 1 and row["batch"] == 8
        if DEVICE.type == "cpu":
            assert row["device_busy_ms"] is None and row["kernels_per_step"] is None  # no GPU here
        assert row["wall_ms"] > 0 and row["ops_per_step"] > 100
        top = row["top"]
        assert 0 < len(top) <= 12
        shares = [entry["share_pct"] for entry in top]
        assert shares == sorted(shares, reverse=True) and sum(shares) <= 100 + 1e-6
        if DEVICE.type == "cpu":
            assert any(entry["op"].startswith("aten::convolution") for entry in top)  # a UNet's step is convolutions
            assert f"### Profile of {name}: top ops by own CPU time" in markdown


def test_quick_run_table_and_header(quick_run):
    markdown, results, stdout = quick_run
    assert markdown.startswith("# Benchmark: demo on CPU")
    for line in ("- torch: " + torch.__version__, "- command: python ", "- peak used for MFU: unknown device"):
        assert line in markdown
    assert "--quick" in results["header"]["command"]
    for title in ("## Training", "## Sampling", "## Probe feature pass (--grid)", "## Loss parity",
                  "## Profile of a training step"):
        assert title in markdown
    assert "| variant | precision | batch | img/s | speedup vs faithful |" in markdown
    precision = "fp16" if DEVICE.type == "cuda" else "fp32"
    faithful = next(line for line in markdown.splitlines() if line.startswith(f"| faithful | {precision} | 8 |"))
    assert faithful.endswith("| ok |")
    assert markdown.strip() in stdout  # printed as well as written


def context_for(cfg, device_label="CPU test"):
    settings = argparse.Namespace(cfg=cfg, compile=False, quick=True)
    context = benchmark.Context(settings, torch.device("cpu"), forward_flops=1e9, flops_source="test",
                                train_flops=3e9, peak=None)
    context.header = {"config": "test", "device": device_label}
    context.original = benchmark.original_figures(cfg)
    return context


def test_a_failing_variant_is_reported_and_the_next_one_runs(tmp_path):
    report = benchmark.Report(context_for(load_config(DEMO)), tmp_path / "r.md")

    def broken():
        raise RuntimeError("torch.compile is not available\nlong details")

    failed = benchmark.run_job(report, "train", "fast", broken, deadline=None)
    assert failed["status"] == "failed: RuntimeError: torch.compile is not available"
    done = benchmark.run_job(report, "train", "faithful", lambda: {"img_s": 10.0}, deadline=None)
    assert done["status"] == "ok" and done["speedup"] == 1.0
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [row["status"] for row in saved["train"]] == [failed["status"], "ok"]
    assert "| fast | - | - | - | - | - | - | - | - | failed: RuntimeError: torch.compile is not available |" \
        in (tmp_path / "r.md").read_text()


def test_a_spent_time_budget_skips_the_variant_without_running_it(tmp_path):
    report = benchmark.Report(context_for(load_config(DEMO)), tmp_path / "r.md")
    calls = []
    row = benchmark.run_job(report, "sample", "bf16", lambda: calls.append(1) or {}, deadline=time.perf_counter())
    assert calls == [] and row["status"] == "skipped: --time_budget_s spent"


def test_comparison_with_the_original_only_on_an_h200():
    h200 = context_for(load_config(ROOT / "config" / "DDPM_ddpm.yaml"), "NVIDIA H200")
    train_row = {"variant": "fast", "img_s": 2 * h200.original["train"][0]}
    benchmark.add_comparisons(h200, "train", train_row, [])
    assert train_row["x_original"] == pytest.approx(2.0) and train_row["speedup"] is None  # no faithful row
    # Sampling compares seconds for 50k images, and only at the original's sampler setting.
    full = {"img_s": 1.0, "sampler": "DDIM 100", "s_50k": h200.original["sample"][0] / 4}
    short = {"img_s": 1.0, "sampler": "DDIM 10", "s_50k": 1.0}
    benchmark.add_comparisons(h200, "sample", full, [])
    benchmark.add_comparisons(h200, "sample", short, [])
    assert full["x_original"] == pytest.approx(4.0) and short["x_original"] is None
    for context in (context_for(load_config(ROOT / "config" / "DDPM_ddpm.yaml"), "NVIDIA H100 80GB HBM3"),
                    context_for(load_config(DEMO), "NVIDIA H200")):  # another GPU; a network never measured
        row = {"variant": "fast", "img_s": 1000.0}
        benchmark.add_comparisons(context, "train", row, [])
        assert "x_original" not in row


def test_flops_come_from_the_spec_for_the_paper_networks_and_are_counted_otherwise():
    ddpm = load_config(ROOT / "config" / "DDPM_ddpm.yaml")
    ddpmpp = load_config(ROOT / "config" / "EDM_ddpmpp_aug.yaml")
    assert benchmark.forward_flops(ddpm) == (12.4e9, "reference table")
    assert benchmark.training_flops(ddpm) == 37.3e9
    assert benchmark.training_flops(ddpmpp) == 129e9
    demo = load_config(DEMO, ["network.image_shape=[3,32,32]"])  # the tiny UNet at 32x32
    flops, source = benchmark.forward_flops(demo)
    assert source == "FlopCounterMode" and 0.4e9 < flops < 0.6e9
    assert benchmark.training_flops(demo) == 3 * flops
    # A U-ViT has none of the UNet's keys: counted, not looked up (it once failed on network.n_channels).
    uvit = load_config(ROOT / "config" / "DDPM_uvit.yaml", ["network.embed_dim=64", "network.depth=2",
                                                                   "linear.blockname=out_1"])
    assert benchmark.forward_flops(uvit)[1] == "FlopCounterMode"
    assert benchmark._mfu(1000.0, 37.3e9, 989e12) == pytest.approx(100 * 37.3e12 / 989e12)


def test_the_most_specific_device_name_sets_the_mfu_peak():
    """'NVIDIA H100 PCIe' contains 'H100' too: the PCIe card must not get the SXM card's peak."""
    assert benchmark.peak_flops("NVIDIA H100 PCIe") < benchmark.peak_flops("NVIDIA H100 80GB HBM3")
    assert benchmark.peak_flops("NVIDIA GeForce RTX 4090") is None  # no MFU rather than a wrong one


@pytest.mark.parametrize("flags, message", [
    (["--train_variants", "faithful,fastest"], "--train_variants 'faithful,fastest'"),
    (["--only", "train,speed"], "--only 'train,speed'"),
    (["--steps", "0"], "--steps 0"),
    (["--num_workers", "-1"], "--num_workers -1: must be 0 or positive"),
    (["--sample_steps", "2000"], "--sample_steps 2000: the DDPM sampler takes 1 to 1000 steps"),
    (["--loss_parity_steps", "10", "--parity_window", "11"], "--parity_window 11 with --loss_parity_steps 10"),
])
def test_bad_arguments_are_one_line_user_errors(flags, message):
    args = benchmark.build_parser().parse_args(["--config", str(DEMO), *flags])
    with pytest.raises(UserError, match="^" + re.escape(message)):
        benchmark.settings_from_args(args, torch.device("cpu"))


UNET_CONFIGS = sorted(path.name for path in (ROOT / "config").glob("*.yaml") if not path.name.startswith("DiT"))


@pytest.mark.parametrize("name", UNET_CONFIGS)
def test_every_shipped_config_gives_the_benchmark_a_worker_count(name, monkeypatch):
    """The configs' num_workers -1 means "choose from the CPUs", as in train.py; --num_workers wins."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    args = benchmark.build_parser().parse_args(["--config", str(ROOT / "config" / name)])
    settings = benchmark.settings_from_args(args, torch.device("cpu"))
    assert settings.num_workers == (0 if settings.cfg.num_workers == 0 else 2)
    args = benchmark.build_parser().parse_args(["--config", str(ROOT / "config" / name), "--num_workers", "3"])
    assert benchmark.settings_from_args(args, torch.device("cpu")).num_workers == 3


def test_the_benchmark_trains_the_shipped_ddpm_config(tmp_path):
    """The 35.7M network of config/DDPM_ddpm.yaml, one step at batch 4, through its own DataLoader workers."""
    out = tmp_path / "train.md"
    result = subprocess.run([sys.executable, str(BENCH), "--config", "config/DDPM_ddpm.yaml", "--device", "cpu",
                             "--only", "train", "--steps", "1", "--warmup_steps", "1", "--batch_size", "4",
                             "--train_variants", "faithful", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(out.with_suffix(".json").read_text())["train"]
    assert row["status"] == "ok" and row["batch"] == 4 and row["img_s"] > 0


DIT_SPEED = ROOT / "bench" / "dit_speed.py"


def test_dit_speed_quick_run_measures_the_feature_pass_and_the_vae_encode(tmp_path):
    """bench/dit_speed.py --quick (issue 15, part 7, rehearsed on the CPU): every row a real measurement."""
    out = tmp_path / "dit.md"
    result = subprocess.run([sys.executable, str(DIT_SPEED), "--quick", "--device", "cpu", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.with_suffix(".json").read_text())
    markdown = out.read_text()
    assert "## DiT feature pass" in markdown and "## VAE encode" in markdown
    assert "(--quick: tiny networks)" in results["header"]["config"]

    dit = {row["variant"]: row for row in results["dit"]}
    assert list(dit) == ["bf16", "bf16_large", "bf16_large_compile"]  # the compiled one last
    assert [dit[name]["batch"] for name in dit] == [4, 8, 8]  # quick: the probe's batch 4, the large one 8
    for row in dit.values():
        assert row["status"] == "ok", row
        assert row["precision"] == "bf16"
        assert row["cell"] == "t=121, layer-1"  # the config's timestep; quick's 2-block network
        assert row["latent_shape"] == [4, 4, 4]
        assert row["feature_shape"] == [row["batch"], 32]  # (B, hidden_size) from the probes' extract_features
        assert row["images"] == 2 * row["batch"]  # 2 timed batches in quick mode
        assert math.isfinite(row["img_s"]) and row["img_s"] > 0
        assert row["timed_s"] == pytest.approx(row["images"] / row["img_s"], rel=1e-12)
        assert 0 < row["timed_s"] < row["wall_s"]  # the timed batches are inside the variant's wall time
        assert row["gflop_per_image"] > 0 and row["peak_gib"] > 0
        assert row["mfu_pct"] is None  # no peak FLOP/s for a CPU
    assert dit["bf16_large_compile"]["note"].startswith("compile off")

    vae = {row["variant"]: row for row in results["vae"]}
    assert list(vae) == ["bf16", "fp32", "bf16_channels_last"]
    assert [vae[name]["precision"] for name in vae] == ["bf16", "fp32", "bf16"]
    for row in vae.values():
        assert row["status"] == "ok", row
        assert row["batch"] == 2 and row["images"] == 2  # one timed batch of 2
        assert row["image_shape"] == [3, 32, 32] and row["latent_shape"] == [4, 4, 4]  # downsampling 8
        assert math.isfinite(row["img_s"]) and row["img_s"] > 0
        assert row["img_s"] == pytest.approx(row["images"] / row["timed_s"], rel=1e-12)
        assert 0 < row["timed_s"] < row["wall_s"]
        assert row["gflop_per_image"] > 0 and row["peak_gib"] > 0


def test_dit_speed_refuses_a_unet_config(tmp_path):
    result = subprocess.run([sys.executable, str(DIT_SPEED), "--device", "cpu", "--config", str(DEMO),
                             "--out", str(tmp_path / "dit.md")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "measures a DiT config" in result.stderr + result.stdout
