"""Test accuracy that counts each test image exactly once over all processes.

    counter = AccuracyCounter(n_cells, device)
    counter.update(logits, labels)          # (n_cells, B, classes), (B,)
    accuracy, total = counter.reduce()      # percent per cell, images counted
"""
import torch

from utils.distributed import all_reduce_sum


def count_correct(logits, labels):
    """Correct predictions of every head, (n_cells,) int64, left on the device (no sync)."""
    return (logits.argmax(dim=2) == labels).sum(dim=1)


class AccuracyCounter:
    """Correct / total counts kept on the device; ``reduce`` sums them over processes once.

    With a sampler that gives each process a disjoint shard (``utils.data.EvalShardSampler``), the
    reduced total is exactly the test-set size and every image counts once.
    """

    def __init__(self, n_cells, device):
        self.correct = torch.zeros(n_cells, dtype=torch.int64, device=device)
        self.total = 0

    def update(self, logits, labels):
        self.correct += count_correct(logits, labels)
        self.total += labels.shape[0]

    def reduce(self):
        """Sum over processes; returns (per-cell accuracy in percent as a list, total images)."""
        counts = torch.cat([self.correct, torch.tensor([self.total], device=self.correct.device)])
        counts = all_reduce_sum(counts).cpu()
        total = int(counts[-1])
        accuracy = (counts[:-1].double() * 100 / max(total, 1)).tolist()
        return accuracy, total
