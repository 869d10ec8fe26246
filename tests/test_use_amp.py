"""train.py --use_amp on the CPU (or DDAE_TEST_DEVICE): fp16 autocast, GradScaler and fused Adam, the README's path.

On a GPU --use_amp means exactly this; on a CPU resolve_precision falls back to fp32 for users, so these
tests ask build_training for fp16 directly (torch runs fp16 autocast, GradScaler("cpu") and fused Adam
on a CPU). The step, the skipped step and the resume are train.py's own code.
"""
import pytest
import torch

import train
from model.training import restore_training, save_training_checkpoint
from tests.helpers import DEVICE, TINY, parse, write_config
from utils.checkpoint import load_checkpoint


@pytest.fixture
def fp16_state(tmp_path, monkeypatch, tiny_setup):
    """train.py --use_amp as it runs on CUDA: fp16 autocast, an active GradScaler, fused Adam."""
    monkeypatch.setattr(train, "resolve_precision", lambda args, device: "fp16")
    # fp16 convolutions are slow on a CPU (seconds per step at the tiny config's size): 8x8 images, batch 2
    network = {**TINY["network"], "image_shape": [3, 8, 8]}
    config = write_config(tmp_path, network=network, batch_size=2, optim_args={"fused": True})
    cfg, args = parse(config, tmp_path / "run", "--use_amp")

    def build():
        torch.manual_seed(0)
        return train.build_training(cfg, args, DEVICE)

    return build


def test_fp16_steps_train_through_the_grad_scaler(fp16_state):
    state = fp16_state()
    assert state.precision == "fp16" and state.scaler.is_enabled()
    assert state.optimizer.defaults["fused"]
    batches = state.data.batches(0)
    before = {name: value.clone() for name, value in state.diffusion.state_dict().items()}
    seen = []
    hook = state.diffusion.nn_model.final.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    losses = torch.stack([train.train_step(state, next(batches)) for _ in range(3)])
    hook.remove()
    assert seen == [torch.float16] * 3  # the network ran under fp16 autocast
    assert losses.dtype == torch.float32 and torch.isfinite(losses).all()
    assert state.scaler.get_scale() == 2.0 ** 16  # no overflow: the scale stays until growth_interval
    changed = [name for name, value in state.diffusion.state_dict().items() if not torch.equal(value, before[name])]
    assert len(changed) == len(before)


def test_a_step_with_inf_gradients_is_skipped_and_the_scale_backs_off(fp16_state):
    state = fp16_state()
    batches = state.data.batches(0)
    train.train_step(state, next(batches))
    weights = {name: value.clone() for name, value in state.diffusion.state_dict().items()}
    moments = [value["exp_avg"].clone() for value in state.optimizer.state.values()]
    state.scaler.update(2.0 ** 120)  # scaled fp16 gradients overflow to inf
    train.train_step(state, next(batches))
    assert state.scaler.get_scale() == 2.0 ** 119  # backed off by 0.5
    for name, value in state.diffusion.state_dict().items():
        assert torch.equal(value, weights[name]), name  # the optimizer step was skipped
    for before, saved in zip(moments, state.optimizer.state.values()):
        assert torch.equal(saved["exp_avg"], before)
    assert state.step == 2  # a skipped step still counts


def test_resume_restores_the_scaler_and_continues_exactly(fp16_state, tmp_path):
    state = fp16_state()
    batches = list(state.data.batches(0))
    train.train_step(state, batches[0])
    state.scaler.update(2.0 ** 120)
    train.train_step(state, batches[1])  # skipped: growth tracker reset
    state.scaler.update(2.0 ** 10)
    train.train_step(state, batches[2])  # taken: growth tracker 1
    path = save_training_checkpoint(state, 0, path=tmp_path / "model_0.pth")
    saved = load_checkpoint(path)
    assert saved["scaler"]["scale"] == 2.0 ** 10 and saved["scaler"]["_growth_tracker"] == 1

    resumed = fp16_state()
    restore_training(resumed, saved, path)
    assert resumed.scaler.state_dict() == state.scaler.state_dict()
    torch.manual_seed(5)
    expected = train.train_step(state, batches[3])
    torch.manual_seed(5)
    got = train.train_step(resumed, batches[3])
    assert torch.equal(got, expected)
    for name, value in state.diffusion.state_dict().items():
        assert torch.equal(resumed.diffusion.state_dict()[name], value), name
