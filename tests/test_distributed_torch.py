"""Data-parallel training under torch.nn.parallel.DistributedDataParallel (gloo, 2 CPU processes).

Each process trains on half of a global batch; DDP averages the gradients of
the per-process mean losses, which must equal the gradient of the mean loss
over the global batch in one process, step after step (the oracle: the same
model trained without DDP on the whole batch). Models and loop: ``_ddp_worker.py``.
"""
import os
import pathlib
import socket
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

import _ddp_worker as W  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORKER = pathlib.Path(__file__).with_name("_ddp_worker.py")
ROOT = WORKER.parents[1]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["softdtw", "crf"])
def test_ddp_gradients_match_one_process(kind, tmp_path):
    world, port = 2, _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
    procs = [subprocess.Popen([sys.executable, str(WORKER), kind, str(r), str(world), str(port), str(outs[r])],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)

    model = W.make(kind)
    reference = W.train(model, model, W.data(kind))
    per_rank = [torch.load(o) for o in outs]
    for step in range(W.STEPS):
        for k, ref in enumerate(reference[step]):
            assert ref.abs().max() > 0  # the loss really trains this parameter
            for grads in per_rank:
                torch.testing.assert_close(grads[step][k], ref, rtol=1e-10, atol=1e-12)
