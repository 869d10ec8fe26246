"""AMP switches and the host-sync-free EMA update."""
import argparse
import copy

import pytest
import torch
from torch import nn

from model.amp import autocast, make_grad_scaler
from model.ema import SyncFreeEMA, make_ema
from utils.cli import add_amp_args, resolve_precision


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_amp_args(parser)
    return parser.parse_args(list(argv))


def test_use_amp_means_fp16_on_cuda_and_falls_back_on_cpu(capsys):
    assert resolve_precision(parse("--use_amp"), torch.device("cuda")) == "fp16"
    assert resolve_precision(parse("--use_amp"), torch.device("cpu")) == "fp32"
    assert "fp16 autocast needs CUDA" in capsys.readouterr().out
    assert resolve_precision(parse("--use_amp", "--precision", "bf16"), torch.device("cpu")) == "bf16"
    assert resolve_precision(parse(), torch.device("cuda")) == "fp32"


def test_bf16_autocast_on_cpu_and_scaler_only_for_fp16():
    layer = nn.Linear(4, 4)
    with autocast(torch.device("cpu"), "bf16"):
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "fp32"):
        assert layer(torch.randn(2, 4)).dtype == torch.float32
    assert not make_grad_scaler(torch.device("cpu"), "bf16").is_enabled()


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.nn_model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5))
        self.register_buffer("table", torch.arange(4.0), persistent=False)


def test_sync_free_ema_matches_ema_pytorch_update_exactly():
    torch.manual_seed(0)
    online_a = Tiny()
    online_b = copy.deepcopy(online_a)
    reference, fast = make_ema(online_a, 0.9), SyncFreeEMA(make_ema(online_b, 0.9))
    for step in range(12):
        with torch.no_grad():
            for model in (online_a, online_b):
                for i, p in enumerate(model.parameters()):
                    p.add_(torch.sin(torch.tensor(step + i * 0.5)))
                model.nn_model[1].running_mean.add_(0.1 * step)
        reference.update()
        fast.update()
        state_a, state_b = reference.state_dict(), fast.ema.state_dict()
        assert state_a.keys() == state_b.keys()
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), (step, key)
    assert fast.step == 12 and int(fast.ema.step) == 12


def test_sync_free_ema_decay_follows_the_warmup_and_caps_at_beta():
    ema = SyncFreeEMA(make_ema(Tiny(), 0.9999))
    assert ema.decay(1) == 0.0
    assert ema.decay(2) == pytest.approx(1 - 2 ** (-2 / 3))
    assert ema.decay(10**9) == pytest.approx(0.9999)


def test_sync_free_ema_resumes_its_counter_from_the_state_dict():
    ema = make_ema(Tiny(), 0.99)
    for _ in range(5):
        ema.update()
    restored = make_ema(Tiny(), 0.99)
    restored.load_state_dict(ema.state_dict())
    assert SyncFreeEMA(restored).step == 5
