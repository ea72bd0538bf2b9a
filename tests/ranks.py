"""Run a test body on N gloo ranks in fresh processes (torch.multiprocessing.spawn).

Each rank gets MASTER_ADDR/PORT, RANK, LOCAL_RANK and WORLD_SIZE, joins a gloo group, runs ``fn(rank, *args)``
and then leaves with ``os._exit(0)`` once every rank is done (a barrier). Leaving that way skips the interpreter's
teardown: gloo's worker threads and the autograd engine's could otherwise be torn down in an order that aborts the
process ("terminate called without an active exception", SIGABRT) after the test body has already succeeded, which
made a two-rank test fail about 1 run in 3 on CI. A failing body still raises, and spawn reports its traceback.
"""

from __future__ import annotations

import os
import sys

import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port


def _rank(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    fn(rank, *args)
    dist.barrier()  # every rank's results are written before any rank leaves
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, world: int, *args) -> None:
    """``fn(rank, *args)`` on ``world`` gloo ranks; raises if any rank fails."""
    mp.spawn(_rank, args=(world, free_port(), fn, args), nprocs=world, join=True)
