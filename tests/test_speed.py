"""model/speed.py, utils/cli.py: --compile [MODE] and --cudnn_benchmark reach torch the same way from every script."""
import argparse

import pytest
import torch
from torch import nn

import export_features
import knn
import linear
import noisy_classifier_DDAE
import sample
import train
from evaluation.frozen import prepare_frozen
from model import speed
from model.models import build_diffusion, feature_dims, load_config
from utils.cli import configure_backends
from utils.data import SyntheticImages

TINY = ["network.n_channels=32", "network.ch_mults=[1,2]", "network.is_attn=[False,True]", "network.n_blocks=1",
        "network.image_shape=[3,8,8]", "dataset=synthetic", "batch_size=4", "diffusion.n_T=20"]


@pytest.fixture
def recorded_compiles(monkeypatch):
    """Replace nn.Module.compile and torch.compile by recorders: which mode reached torch, and
    ("run", name) each time a "compiled" function is called."""
    calls = []

    def module_compile(self, *args, **kwargs):
        calls.append(("module", type(self).__name__, kwargs.get("mode")))

    def function_compile(function, *args, **kwargs):
        name = getattr(function, "__name__", "?")
        calls.append(("function", name, kwargs.get("mode")))

        def compiled(*call_args, **call_kwargs):
            calls.append(("run", name))
            return function(*call_args, **call_kwargs)
        return compiled

    monkeypatch.setattr(nn.Module, "compile", module_compile)
    monkeypatch.setattr(torch, "compile", function_compile)
    return calls


@pytest.mark.parametrize("parse", [train.parse_args, sample.build_parser().parse_args,
                                   linear.build_parser().parse_args, knn.build_parser().parse_args,
                                   export_features.build_parser().parse_args, noisy_classifier_DDAE.parse_args],
                         ids=["train", "sample", "linear", "knn", "export_features", "noisy_classifier_DDAE"])
def test_every_script_takes_compile_with_and_without_a_mode(parse):
    base = ["--config", "config/demo.yaml"]
    assert parse(base).compile is None
    assert parse(base + ["--compile"]).compile == "default"
    assert parse(base + ["--compile", "--cudnn_benchmark"]).compile == "default"
    assert parse(base + ["--compile", "reduce-overhead"]).compile == "reduce-overhead"
    assert parse(base + ["--compile=max-autotune"]).cudnn_benchmark is False


def test_an_unknown_compile_mode_is_a_one_line_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--config", "config/demo.yaml", "--compile", "fastest"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--compile" in error and "fastest" in error and "reduce-overhead" in error


def test_modes_reach_torch_compile(recorded_compiles):
    speed.compile_module(nn.Linear(2, 2), "default")
    speed.compile_module(nn.Linear(2, 2), "reduce-overhead")
    speed.compile_function(len, "max-autotune")
    assert recorded_compiles == [("module", "Linear", None), ("module", "Linear", "reduce-overhead"),
                                 ("function", "len", "max-autotune")]
    with pytest.raises(ValueError, match="compile mode"):
        speed.compile_module(nn.Linear(2, 2), True)


def test_cuda_graphs_only_with_their_modes_on_cuda(monkeypatch):
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    assert speed.uses_cuda_graphs("reduce-overhead", "cuda") and speed.uses_cuda_graphs("max-autotune", "cuda:1")
    assert not speed.uses_cuda_graphs("reduce-overhead", "cpu")
    assert not speed.uses_cuda_graphs("max-autotune-no-cudagraphs", "cuda")
    assert not speed.uses_cuda_graphs(None, "cuda")
    speed.mark_step_begin("reduce-overhead", torch.device("cpu"))
    speed.mark_step_begin("default", torch.device("cuda"))
    assert marks == []
    speed.mark_step_begin("reduce-overhead", torch.device("cuda"))
    assert marks == [1]


def test_cudnn_benchmark_follows_the_flag_on_cuda_only(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    configure_backends(argparse.Namespace(cudnn_benchmark=True), torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    configure_backends(argparse.Namespace(cudnn_benchmark=True), torch.device("cuda"))
    assert torch.backends.cudnn.benchmark is True
    configure_backends(argparse.Namespace(cudnn_benchmark=False), torch.device("cuda"))
    assert torch.backends.cudnn.benchmark is False


def test_channels_last_on_a_cpu_gets_a_note(capsys):
    configure_backends(argparse.Namespace(channels_last=True, cudnn_benchmark=False), torch.device("cpu"))
    assert "--channels_last makes GroupNorm several times slower on cpu" in capsys.readouterr().out
    configure_backends(argparse.Namespace(channels_last=False, cudnn_benchmark=False), torch.device("cpu"))
    assert capsys.readouterr().out == ""


def test_train_compiles_the_network_in_place_and_marks_each_step(recorded_compiles, monkeypatch, tmp_path):
    cfg = load_config("config/demo.yaml", TINY + [f"save_dir={tmp_path}"])
    args = train.parse_args(["--config", "config/demo.yaml", "--compile", "reduce-overhead"])
    state = train.build_training(cfg, args, torch.device("cpu"))
    assert recorded_compiles == [("module", "UNet", "reduce-overhead")]
    assert state.compile_mode == "reduce-overhead"
    assert all(key.startswith("nn_model.") and "_orig_mod" not in key for key in state.diffusion.state_dict())
    steps = []
    monkeypatch.setattr(train, "mark_step_begin", lambda mode, device: steps.append((mode, device.type)))
    images = next(state.data.batches(0))
    train.train_step(state, images)
    train.train_step(state, images)
    assert steps == [("reduce-overhead", "cpu")] * 2


def test_sample_and_probe_pass_their_mode(recorded_compiles):
    cfg = load_config("config/demo.yaml", TINY)
    diffusion = sample.prepare_network(build_diffusion(cfg).eval(), "max-autotune", channels_last=False)
    frozen = prepare_frozen(build_diffusion(cfg), torch.device("cpu"), compile="reduce-overhead")
    prepare_frozen(build_diffusion(cfg), torch.device("cpu"), compile=True)  # linear.py's older boolean
    assert recorded_compiles == [("module", "UNet", "max-autotune"), ("function", "forward_features", "reduce-overhead"),
                                 ("function", "forward_features", None)]
    assert all("_orig_mod" not in key for key in diffusion.state_dict())
    with torch.no_grad():
        frozen.get_feature(torch.rand(2, 3, 8, 8), t=3, name="out_2")
    assert recorded_compiles[3:] == [("run", "forward_features")]  # the feature pass is the compiled one


@pytest.mark.parametrize("config", ["config/DDPM_ddpm.yaml", "config/EDM_ddpmpp_aug.yaml"])
def test_the_network_compiles_as_one_graph(config):
    """No graph breaks in the forward pass or the feature pass: a break would split the compiled
    network, and its CUDA graphs, in two with a slow eager stretch between them."""
    cfg = load_config(config, TINY[:5] + ["linear.blockname=out_2"])
    net = build_diffusion(cfg).nn_model.eval()
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    torch.compiler.reset()
    try:
        with torch.no_grad():
            assert torch.allclose(torch.compile(net, fullgraph=True, backend="eager")(x, t), net(x, t))
            features = torch.compile(net.forward_features, fullgraph=True, backend="eager")(x, t, ["out_2"])
        assert list(features) == ["out_2"]
        if cfg.network.augment_dim:
            out = torch.compile(net, fullgraph=True, backend="eager")(x, t, torch.zeros(2, cfg.network.augment_dim))
            assert out.shape == x.shape
    finally:
        torch.compiler.reset()


def test_feature_dims_never_runs_the_compiled_feature_pass():
    """Its batch of one would cost a compilation and make the compiled batch size dynamic."""
    compiled_graphs = []

    def counting_backend(graph_module, example_inputs):
        compiled_graphs.append(tuple(example_inputs[0].shape) if example_inputs else None)
        return graph_module.forward

    cfg = load_config("config/demo.yaml", TINY)
    diffusion = build_diffusion(cfg).eval().requires_grad_(False)
    net = diffusion.nn_model
    net.forward_features = torch.compile(net.forward_features, backend=counting_backend)
    torch.compiler.reset()
    try:
        assert feature_dims(diffusion, (3, 8, 8)) == {"in_1": 32, "in_2": 64, "mid": 64, "out_1": 64, "out_2": 64,
                                                      "out_3": 32, "out_4": 32}
        assert compiled_graphs == []
        with torch.no_grad():
            diffusion.get_feature(torch.rand(5, 3, 8, 8), t=3, name="out_2")
        assert len(compiled_graphs) >= 1
    finally:
        torch.compiler.reset()


def test_a_really_compiled_sampler_matches_the_eager_one():
    """One real torch.compile (about half a minute on a CPU): the network compiles without errors in a
    CUDA-graph mode and the DDIM sampler gives the eager images."""
    torch.manual_seed(0)
    cfg = load_config("config/demo.yaml", TINY)
    eager = build_diffusion(cfg).eval().requires_grad_(False)
    compiled = build_diffusion(cfg).eval().requires_grad_(False)
    compiled.load_state_dict(eager.state_dict())
    sample.prepare_network(compiled, "reduce-overhead", channels_last=False)
    x_T = torch.randn(3, 3, 8, 8)
    torch.compiler.reset()
    try:
        got = compiled.sample(x_T=x_T, steps=4)
    finally:
        torch.compiler.reset()
    assert torch.allclose(got, eager.sample(x_T=x_T, steps=4), atol=1e-5)


@pytest.mark.parametrize("drop_last, graphs", [(False, [0, 0, 1, 0, 0, 1]), (True, [0, 0, 0, 0])])
def test_the_kept_last_batch_compiles_once_more_and_full_batches_keep_their_graph(monkeypatch, tmp_path, drop_last,
                                                                                   graphs):
    """train.py --compile over two epochs of 40 images at batch 16 (16, 16 and a kept 8), counted with a
    backend that records each compilation: the last batch costs one more compilation, in the first
    epoch only; the full batches run the first graph throughout (--drop_last: one graph)."""
    compiled, calls = [], []

    def counting_backend(graph, example_inputs):
        index = len(compiled)
        compiled.append(graph)

        def run(*inputs):
            calls.append(index)
            return graph.forward(*inputs)
        return run

    module_compile = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile",
                        lambda self, mode=None: module_compile(self, backend=counting_backend))
    monkeypatch.setattr(train, "build_dataset",
                        lambda name, root, train, transform=None, image_size=None:
                        SyntheticImages(n=40, image_size=image_size, train=train, transform=transform))
    torch.compiler.reset()
    cfg = load_config("config/demo.yaml", TINY + ["batch_size=16", "network.dropout=0", f"save_dir={tmp_path}"])
    args = train.parse_args(["--config", "config/demo.yaml", "--compile", *(["--drop_last"] if drop_last else [])])
    state = train.build_training(cfg, args, torch.device("cpu"))
    for epoch in range(2):
        for images in state.data.batches(epoch):
            train.train_step(state, images)
    torch.compiler.reset()
    assert len(compiled) == max(graphs) + 1
    assert calls == graphs
