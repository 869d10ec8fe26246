"""End-to-end fine-tuning of a pre-trained DDAE for classification at one noise level.

    python finetune.py --config config/DDPM_ddpm.yaml --use_amp --epoch 1999
    torchrun --nproc_per_node=4 finetune.py --config config/CIFAR100_DDPM_ddpm.yaml --precision bf16 --layer_decay 0.9
    python finetune.py --config config/DDPM_ddpm.yaml --use_amp --epoch 1999 --resume   # continue a stopped run

The network starts from the checkpoint's EMA weights and runs up to --block (default
linear.blockname) on images noised to --timestep (default linear.timestep), with fresh noise for
every batch as in the linear probe; later blocks are not run. The block's output is averaged over
H and W and goes through a LayerNorm and a zero-initialised Linear layer (the head). The
LayerNorm puts every block and noise level on the same scale, so one learning rate suits the head
wherever it sits; a BatchNorm would instead depend on the per-process batch.

Recipe: AdamW (betas 0.9, 0.999; weight decay on convolution and linear weights only), linear
warm-up then cosine decay to zero, updated every step; cross-entropy with label smoothing; random
crops (padded by 1/8 of the side: 4 pixels at 32x32) and horizontal flips; the config's dropout.
With --layer_decay d < 1 the learning rate of a stage is multiplied by d ** (its distance from the
head), counting stages in the order the network runs them (a UNet: the input convolution with the time
embedding, each down-path module, the middle block, then each up-path module up to --block; a network
without ``stages(block)`` is one stage); the head gets the full rate.
--lr is the peak rate of the run and --batch_size is per process; neither is scaled by the number
of processes.

Writes save_dir/finetune/{tag}.json after every epoch (settings, per-epoch history, final test
accuracy, and the provenance record: the checkpoint's SHA-256, config, command, code version) and
{tag}.state.pth, the latest epoch's complete state (written atomically), which --resume continues from;
the tag names the checkpoint, the start of its weights' hash and the cell (model_1999_sha1a2b3c4d_t11_out_6),
so another model of the same file name has its own files. When the run finishes, the state (about three
times the network's size, with AdamW's moments) is deleted; {tag}.json stays, and with --save_weights
{tag}.weights.pth, the fine-tuned classifier's state dict. The same command run again then only reports
the finished result. With --num_workers 0 a resumed run is bitwise the run that was never
stopped (on the same device type): every epoch seeds its own noise, dropout, crops and flips.
"""
import argparse
import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from evaluation.accuracy import AccuracyCounter
from evaluation.cells import probe_cells
from evaluation.frozen import to_device, use_channels_last
from evaluation.report import probe_tag, settings_tag
from model.amp import autocast, make_grad_scaler, scaled_step
from model.models import count_parameters, feature_dims, load_config, load_diffusion
from utils.atomic import check_writable
from utils.cli import add_amp_args, add_checkpoint_args, checkpoint_from_args, resolve_precision
from utils.config import add_config_args
from utils.data import (add_data_args, add_max_images_arg, build_loader, config_splits, probe_train_transform,
                        resolve_num_workers)
from utils.checkpoint import save_checkpoint
from utils.distributed import (add_launcher_args, barrier, cleanup, get_rank, get_world_size, init_distributed, is_main,
                               print0, wrap_ddp)
from utils.epochs import EpochLoop, EpochTotals, check_saved_run
from utils.errors import UserError, cli_entry
from utils.logging import save_json
from utils.preemption import StopSignals
from utils.progress import batches
from utils.provenance import provenance, refuse_unkeyed_state, weights_identity
from utils.schedule import lr_factor
from utils.tensorboard import Board, add_tensorboard_arg, open_board

# Settings a saved state must share with the run that resumes it (the weights are compared by their hash,
# not by the checkpoint's path, so a copied run folder resumes too).
RESUME_KEYS = ("timestep", "block", "epochs", "lr", "weight_decay", "warmup_epochs", "batch_size",
               "layer_decay", "label_smoothing", "seed", "world_size", "dataset", "max_images", "precision")
RESUME_MISMATCH = ("{path} was trained with {key}={saved!r}, not {wanted!r}; rerun with the same settings to resume "
                   "it, or pass --out for a new run")
FINISHED_MISMATCH = ("{path} is a finished run with {key}={saved!r}, not {wanted!r}; pass --out for a new run, or "
                     "delete it to train again")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    add_amp_args(parser)
    add_checkpoint_args(parser)
    parser.add_argument("--timestep", type=int, default=None,
                        help="noise level: DDPM timestep or EDM index of 18 (default: linear.timestep)")
    parser.add_argument("--block", default=None,
                        help="the block the head reads, e.g. out_6 (default: linear.blockname)")
    parser.add_argument("--epochs", type=int, default=50, help="training epochs over the training split")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (after warm-up)")
    parser.add_argument("--weight_decay", type=float, default=0.05,
                        help="AdamW weight decay of conv and linear weights")
    parser.add_argument("--warmup_epochs", type=int, default=None,
                        help="epochs of linear learning-rate warm-up (default: a tenth of --epochs, 5 of 50)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="images per step and process (default: linear.batch_size)")
    parser.add_argument("--layer_decay", type=float, default=1.0,
                        help="layer-wise learning-rate decay per stage from the head (1: off; e.g. 0.9)")
    parser.add_argument("--label_smoothing", type=float, default=0.1,
                        help="cross-entropy label smoothing, in [0, 1)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the saved state of this run (start fresh if there is none)")
    parser.add_argument("--out", default=None, help="output folder (default: save_dir/finetune)")
    parser.add_argument("--save_weights", action="store_true",
                        help="keep the fine-tuned network and head in {tag}.weights.pth when the run finishes (the "
                             "resume state, with the optimizer's, is deleted then)")
    parser.add_argument("--seed", type=int, default=None, help="default: the config's seed")
    add_data_args(parser)
    add_max_images_arg(parser)
    add_launcher_args(parser)
    add_tensorboard_arg(parser)
    return parser


def check_args(args):
    for name in ("epochs", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} {value}: must be at least 1")
    if args.lr <= 0:
        raise UserError(f"--lr {args.lr}: must be positive")
    if args.warmup_epochs is None:
        args.warmup_epochs = args.epochs // 10
    if args.weight_decay < 0:
        raise UserError(f"--weight_decay {args.weight_decay}: must be 0 or positive")
    if not 0 <= args.warmup_epochs <= args.epochs:
        raise UserError(f"--warmup_epochs {args.warmup_epochs}: must be in 0..--epochs ({args.epochs})")
    if not 0 < args.layer_decay <= 1:
        raise UserError(f"--layer_decay {args.layer_decay}: must be in (0, 1]; 1 turns it off")
    if not 0 <= args.label_smoothing < 1:
        raise UserError(f"--label_smoothing {args.label_smoothing}: must be in [0, 1)")


class DDAEClassifier(nn.Module):
    """A diffusion model's network up to ``block`` at noise level ``timestep``, pooled, then a head.

    Args:
        diffusion: a DDPM or EDM model; its ``get_feature`` noises the images (fresh noise) and
            stops the network after ``block``.
        timestep: DDPM timestep or EDM index of the 18-step schedule.
        block: ``out_k``.
        feature_dim: channels of ``block``.
        num_classes: outputs of the head.
    """

    def __init__(self, diffusion, timestep, block, feature_dim, num_classes):
        super().__init__()
        self.diffusion = diffusion
        self.timestep, self.block = timestep, block
        self.norm = nn.LayerNorm(feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        # A zero head starts at the uniform prediction and sends no gradient into the pre-trained
        # network until it has learnt something, so the first steps cannot scramble the features.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x0):
        """Logits (B, num_classes) of clean images x0 (B, C, H, W) in [0, 1]."""
        feature = self.diffusion.get_feature(x0, self.timestep, name=self.block)  # (B, C) float32
        return self.head(self.norm(feature))


def network_stages(net, block):
    """The modules that compute ``block``, grouped in the order the network runs them: the network's
    ``stages(block)`` when it has one (the UNet does), else one stage, the whole network.

    Returns:
        ``[(name, [modules])]``.
    """
    return net.stages(block) if hasattr(net, "stages") else [("network", [net])]


def parameter_groups(classifier, weight_decay, layer_decay):
    """AdamW parameter groups: per stage (see ``network_stages``) and head, weights with
    ``weight_decay`` and biases / norm parameters without; each group's ``lr_scale`` is
    ``layer_decay ** (stages between it and the head)``.

    Also sets ``requires_grad`` on exactly the parameters that the groups hold.
    """
    stages = network_stages(classifier.diffusion.nn_model, classifier.block)
    stages.append(("head", [classifier.norm, classifier.head]))
    classifier.requires_grad_(False)
    groups = []
    for index, (name, modules) in enumerate(stages):
        scale = layer_decay ** (len(stages) - 1 - index)
        decayed, not_decayed = [], []
        for module in modules:
            for param_name, param in module.named_parameters():
                if param_name.startswith("aug_emb."):
                    continue  # fed augmentation labels only in diffusion training: unused here
                param.requires_grad_(True)
                (decayed if param.dim() > 1 else not_decayed).append(param)
        for params, decay in ((decayed, weight_decay), (not_decayed, 0.0)):
            if params:
                groups.append({"params": params, "weight_decay": decay, "lr_scale": scale, "stage": name})
    return groups


def train_one_epoch(model, loader, optimizer, scaler, lr_at_step, step, device, precision, label_smoothing):
    """One pass over this process's training shard.

    Returns:
        (next step, this process's ``EpochTotals``); the sums stay on the device, so the GPU never
        waits for the host.
    """
    model.train()
    totals = EpochTotals(device)
    for images, labels in batches(loader, "fine-tuning"):
        images, labels = to_device(images, labels, device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at_step(step) * group["lr_scale"]
        with autocast(device, precision):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
        scaled_step(loss, optimizer, scaler)
        totals.add(loss, logits, labels)
        step += 1
    return step, totals


@torch.no_grad()
def evaluate(classifier, loader, device, precision):
    """Test accuracy (%) over all processes, each test image counted once, and the image count."""
    classifier.eval()
    counter = AccuracyCounter(1, device)
    for images, labels in loader:
        images, labels = to_device(images, labels, device)
        with autocast(device, precision):
            logits = classifier(images)
        counter.update(logits.float()[None], labels)  # (1, B, classes)
    (accuracy,), total = counter.reduce()
    return accuracy, total


def finished_result(path, settings, weights):
    """The result record at ``path`` when it is a finished run of these ``settings`` and ``weights``; None when
    there is no finished run; a UserError when it is a finished run of others (not to be overwritten)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as file:
            result = json.load(file)
    except (OSError, ValueError):
        return None  # a damaged record is a run to redo, as one that never finished
    if not result.get("finished"):
        return None
    absent = _absent_key(result)
    if absent:
        raise UserError(f"{path}: this finished run's record has no '{absent}' (edited or damaged); restore it, pass "
                        f"--out for a new run, or delete it to train again")
    check_saved_run(path, result["settings"], settings, FINISHED_MISMATCH, RESUME_KEYS,
                    recorded=(result.get("provenance") or {}).get("weights"), weights=weights,
                    fix="pass --out for a new run, or delete it to train again")
    return result


def _absent_key(result):
    """The first key that ``finished_result`` and its caller read and the record ``result`` lacks, or None."""
    for key in ("settings", "epochs_done", "test_accuracy"):
        if key not in result:
            return key
    if not isinstance(result["settings"], dict):
        return "settings"
    absent = [f"settings.{key}" for key in RESUME_KEYS if key not in result["settings"]]
    weights = (result.get("provenance") or {}).get("weights")
    absent += ["provenance.weights.sha256"] if isinstance(weights, dict) and "sha256" not in weights else []
    return absent[0] if absent else None


def finish(out_dir, tag, result, classifier, settings, weights, save_weights):
    """A finished run's end state: the result record, the fine-tuned weights with ``save_weights``, and no
    resume state (AdamW's two moments of every trained parameter are most of it). Main process; returns the result."""
    if save_weights:
        result["weights_file"] = os.path.abspath(os.path.join(out_dir, f"{tag}.weights.pth"))
        save_checkpoint({"model": classifier.state_dict(), "settings": settings, "weights": weights},
                        result["weights_file"])
    save_json(result, os.path.join(out_dir, f"{tag}.json"))
    state_path = os.path.join(out_dir, f"{tag}.state.pth")
    if os.path.isfile(state_path):
        os.remove(state_path)
    return result


def run_finetune(cfg, diffusion, train_set, test_set, settings, device, out_dir, tag, precision="fp32",
                 num_workers=0, resume=False, board=None, save_weights=False):
    """Fine-tune and test; resumable per epoch. A run that finished before is not trained again: its result
    record is returned.

    Args:
        cfg: the config (``classes`` and ``image_shape`` are read).
        diffusion: the pre-trained model, on any device (it is moved and trained in place).
        train_set, test_set: datasets with the training and test transforms.
        settings: the run's settings (every key of ``RESUME_KEYS``), recorded in every output.
        device: this process's device.
        out_dir, tag: the outputs are ``out_dir/{tag}.json``, ``out_dir/{tag}.state.pth`` until the run
            finishes, and then ``out_dir/{tag}.weights.pth`` with ``save_weights``.
        precision: autocast precision.
        num_workers: data-loader workers per process.
        resume: continue from ``{tag}.state.pth``; without it an existing state is an error.
        board: a ``utils.tensorboard.Board`` that also receives each epoch's numbers.
        save_weights: keep the fine-tuned weights when the run finishes.

    Returns:
        the result dict written to ``{tag}.json``.
    """
    rank, world_size = get_rank(), get_world_size()
    board = board or Board()
    state_path = os.path.join(out_dir, f"{tag}.state.pth")
    weights = weights_identity(settings["checkpoint"])
    done = None if os.path.isfile(state_path) else finished_result(os.path.join(out_dir, f"{tag}.json"), settings,
                                                                   weights)
    if done is not None:
        kept = "" if "weights_file" in done else (
            "; its fine-tuned weights were not kept (pass --out DIR --save_weights to train them again)"
            if save_weights else "")
        print0(f"{os.path.join(out_dir, tag)}.json: finished, {done['epochs_done']} epochs, test accuracy "
               f"{done['test_accuracy']:.2f}%; nothing to train{kept}")
        return done
    if os.path.isfile(state_path) and not resume:
        raise UserError(f"{state_path} exists: pass --resume to continue that run, or --out for a new one")

    diffusion = diffusion.to(device)
    if use_channels_last(device):
        diffusion = diffusion.to(memory_format=torch.channels_last)
    dims = feature_dims(diffusion, cfg.image_shape)
    classifier = DDAEClassifier(diffusion, settings["timestep"], settings["block"], dims[settings["block"]],
                                cfg.classes).to(device)
    groups = parameter_groups(classifier, settings["weight_decay"], settings["layer_decay"])
    optimizer = torch.optim.AdamW(groups, lr=settings["lr"], betas=(0.9, 0.999), fused=device.type == "cuda")
    scaler = make_grad_scaler(device, precision)

    loop = EpochLoop(settings["epochs"], device, board=board, prefix="finetune/",
                     how="the same command with --resume continues it")
    history, start_epoch, step, test_images = [], 0, 0, None
    state = loop.resume(state_path if resume else None, settings, RESUME_MISMATCH, keys=RESUME_KEYS, weights=weights,
                        fix="pass --out for a new run")
    if state is not None:
        classifier.load_state_dict(state["model"])
        optimizer.load_state_dict(state["opt"])
        if state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        history, start_epoch, step, test_images = state["history"], state["epoch"], state["step"], state["test_images"]
    elif resume:
        print0(f"--resume: no saved state at {state_path}; starting fresh")

    model = classifier
    if world_size > 1:
        # The only buffers are the noise schedules, equal everywhere: no need to broadcast them every step.
        # A network without stages trains whole, and its blocks after ``block`` get no gradient.
        model = wrap_ddp(classifier, device, sync_buffers=False,
                         find_unused_parameters=not hasattr(diffusion.nn_model, "stages"))
    batch_size = settings["batch_size"]
    train_loader = build_loader(train_set, batch_size, train=True, num_workers=num_workers, seed=settings["seed"],
                                device=device, batch_flag="--batch_size")
    test_loader = build_loader(test_set, batch_size, train=False, num_workers=num_workers, device=device)
    total_steps = settings["epochs"] * len(train_loader)
    warm_steps = settings["warmup_epochs"] * len(train_loader)

    def lr_at_step(index):
        return settings["lr"] * lr_factor(index, total_steps, warm_steps)

    trainable = sum(p.numel() for p in classifier.parameters() if p.requires_grad)
    print0(f"fine-tuning {trainable:,} of {count_parameters(classifier):,} parameters at t={settings['timestep']}, "
           f"{settings['block']}: {len(train_set)} training images, {world_size} process(es), {precision}")
    # What trained the classifier: this command, or the saved state's when it finished there (nothing to train).
    record = state["provenance"] if state is not None and start_epoch == settings["epochs"] and \
        state.get("provenance") else provenance(settings["checkpoint"], cfg, device, settings["seed"])
    result = None
    for epoch in loop.epochs(start_epoch, train_loader, seed=settings["seed"]):
        step, totals = train_one_epoch(model, train_loader, optimizer, scaler, lr_at_step, step, device, precision,
                                       settings["label_smoothing"])
        train_loss, train_accuracy, images = totals.reduce()
        torch.manual_seed(settings["seed"] + rank)  # the same test noise after every epoch
        test_accuracy, test_images = evaluate(classifier, test_loader, device, precision)
        seconds = loop.seconds
        history.append({"epoch": epoch, "lr": lr_at_step(step - 1), "train_loss": train_loss,
                        "train_accuracy": train_accuracy, "test_accuracy": test_accuracy,
                        "seconds": round(seconds, 2)})
        loop.log(epoch + 1, f"epoch {epoch}/{settings['epochs']}  loss {train_loss:.4f}  "
                            f"train {train_accuracy:.2f}%  test {test_accuracy:.2f}%  ({images / seconds:.0f} img/s)",
                 {key: history[-1][key] for key in ("train_loss", "train_accuracy", "test_accuracy", "lr")}
                 | {"img_per_s": images / seconds})
        result = summary(cfg, settings, history, test_images, trainable, record)
        loop.save(state_path, {"settings": settings, "epoch": epoch + 1, "step": step,
                               "model": classifier.state_dict(), "opt": optimizer.state_dict(),
                               "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                               "history": history, "test_images": test_images, "weights": weights,
                               "provenance": record})
        if is_main():
            save_json(result, os.path.join(out_dir, f"{tag}.json"))
        loop.stop_if_asked(epoch, state_path)
    if result is None:  # resumed a state of a finished run: nothing left to train
        result = summary(cfg, settings, history, test_images, trainable, record)
        if is_main():
            save_json(result, os.path.join(out_dir, f"{tag}.json"))
    if result["finished"]:
        if is_main():
            finish(out_dir, tag, result, classifier, settings, weights, save_weights)
        barrier()
    print0(f"test accuracy after {len(history)} epochs: {result['test_accuracy']:.2f}%")
    return result


def summary(cfg, settings, history, test_images, trainable, record):
    """The result record: settings, per-epoch history, the final test accuracy and the ``record`` of what
    produced it (``utils.provenance.provenance``)."""
    return {"model_type": cfg.model_type, "classes": cfg.classes, "settings": settings,
            "trainable_parameters": trainable, "epochs_done": len(history),
            "finished": len(history) == settings["epochs"], "test_images": test_images,
            "test_accuracy": history[-1]["test_accuracy"] if history else None, "history": history,
            "provenance": record}


def finetune_tag(checkpoint, timestep, block, precision="fp32"):
    """Name of the outputs: checkpoint stem, weights' hash, cell and the precision when not fp32, e.g.
    ``model_1999_sha1a2b3c4d_t11_out_6`` or ``..._out_6_bf16``; the other settings are checked by the
    resume state and the finished record (``RESUME_KEYS``)."""
    return probe_tag(checkpoint, [timestep], [block], grid=False) + settings_tag(precision=precision)


@cli_entry
def main(args):
    check_args(args)
    # --timestep and --block are linear.timestep and linear.blockname for this run, so the
    # config's own checks cover them.
    cfg = load_config(args.config, args.set, flags={"linear.timestep": ("--timestep", args.timestep),
                                                    "linear.blockname": ("--block", args.block)})
    (timestep,), (block,) = probe_cells(cfg)
    out_dir = args.out or os.path.join(cfg.save_dir, "finetune")
    if args.out:
        check_writable(out_dir, "--out", "pass --out with a writable folder")
    else:
        check_writable(out_dir, "save_dir", "pass --out with a writable folder, or --set save_dir=DIR")
    checkpoint = checkpoint_from_args(cfg, args)
    diffusion = load_diffusion(cfg, checkpoint, weights="ema")  # before the tag: its hash is the loaded bytes'
    train_set, test_set = config_splits(cfg, args.data_root, probe_train_transform(cfg.image_shape[-1]),
                                        args.max_images)

    device = init_distributed(args.device)
    board = Board()
    try:
        precision = resolve_precision(args, device)
        tag = finetune_tag(checkpoint, timestep, block, precision)
        old = probe_tag(checkpoint, [timestep], [block], False, False) + settings_tag(precision=precision)
        refuse_unkeyed_state(os.path.join(out_dir, f"{old}.state.pth"), os.path.join(out_dir, f"{tag}.state.pth"),
                             checkpoint, "fine-tuning state")
        board = open_board(args.tensorboard, os.path.join(cfg.save_dir, "tb", f"finetune_{tag}"))
        settings = {"checkpoint": os.path.abspath(checkpoint), "timestep": timestep, "block": block,
                    "epochs": args.epochs, "lr": args.lr, "weight_decay": args.weight_decay,
                    "warmup_epochs": args.warmup_epochs, "batch_size": args.batch_size or cfg.linear.batch_size,
                    "layer_decay": args.layer_decay, "label_smoothing": args.label_smoothing,
                    "seed": cfg.seed if args.seed is None else args.seed, "world_size": get_world_size(),
                    "dataset": cfg.dataset, "max_images": args.max_images, "precision": precision}
        run_finetune(cfg, diffusion, train_set, test_set, settings, device, out_dir=out_dir, tag=tag,
                     precision=precision, num_workers=resolve_num_workers(args, cfg),
                     resume=args.resume, board=board, save_weights=args.save_weights)
    finally:
        board.close()
        cleanup()


if __name__ == "__main__":
    with StopSignals():  # SIGTERM / SIGUSR1: stop once the epoch's state is saved
        main(build_parser().parse_args())
