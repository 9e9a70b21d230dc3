"""Data-parallel training with smoothmax losses: the models, data and loop shared by
``test_distributed_torch.py`` and the worker processes it starts.

Run as ``python _ddp_worker.py KIND RANK WORLD PORT OUT``: joins a gloo process
group on 127.0.0.1:PORT, wraps the model in DistributedDataParallel, trains
``STEPS`` SGD steps on its share of the global batch and saves the gradients
of every step to ``OUT``.
"""
import sys

import torch

STEPS = 3
GLOBAL_BATCH = 8


class SoftDTWRegressor(torch.nn.Module):
    """A per-frame linear map of the input series, trained with a soft-DTW loss (variable lengths)."""

    def __init__(self):
        super().__init__()
        from smoothmax.torch import SoftDTW

        self.lin = torch.nn.Linear(3, 3, dtype=torch.float64)
        self.loss = SoftDTW(gamma=0.5)

    def forward(self, x, y, lx, ly):
        return self.loss(self.lin(x), y, lx, ly).mean()


class CRFTagger(torch.nn.Module):
    """Emissions and transitions trained with the CRF loss (``losses.viterbi_surrogate``)."""

    def __init__(self):
        super().__init__()
        self.emit = torch.nn.Linear(4, 3, dtype=torch.float64)
        self.trans = torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.float64))

    def forward(self, x, tags, lengths):
        from smoothmax import losses

        theta = self.emit(x)[..., :, None] + self.trans
        return losses.viterbi_surrogate(theta, tags, lengths=lengths).mean()


def make(kind):
    torch.manual_seed(0)
    return SoftDTWRegressor() if kind == "softdtw" else CRFTagger()


def data(kind):
    """The global batch (the same in every process)."""
    g = torch.Generator().manual_seed(1)
    B = GLOBAL_BATCH
    if kind == "softdtw":
        return (torch.randn(B, 6, 3, generator=g, dtype=torch.float64),
                torch.randn(B, 5, 3, generator=g, dtype=torch.float64),
                torch.randint(2, 7, (B,), generator=g), torch.randint(1, 6, (B,), generator=g))
    return (torch.randn(B, 7, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (B, 7), generator=g),
            torch.randint(1, 8, (B,), generator=g))


def train(model, module, batch):
    """``STEPS`` SGD steps of ``module`` (the model, or its DDP wrapper) on ``batch``; the gradients."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = []
    for _ in range(STEPS):
        opt.zero_grad()
        module(*batch).backward()
        grads.append([p.grad.detach().clone() for p in model.parameters()])
        opt.step()
    return grads


def main(kind, rank, world, port, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = make(kind)
        share = GLOBAL_BATCH // world
        batch = tuple(a[rank * share:(rank + 1) * share] for a in data(kind))
        torch.save(train(model, DistributedDataParallel(model), batch), out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
