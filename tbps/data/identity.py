"""Identity-sampled training batches (``data.sampler=identity``): IVT's ``RandomIdentitySampler_DDP_CUHK``.

The official sampler, over the train list of (image, caption) pairs:
1. each identity's pairs are shuffled and cut into chunks of K (``data.instances_per_id``, 4); an identity with
   fewer than K pairs gives one chunk drawn with replacement, a remainder below K is dropped;
2. the chunk sequence: while at least P identities still have a chunk, draw P of them without replacement and append
   one chunk of each, P = (batch / blocks) // K;
3. a rank's batch: the sequence is cut into blocks of batch / blocks consecutive samples, dealt to ``blocks`` ranks in
   turn, and each rank's batch is its next ``blocks`` blocks. The official code divides the per-GPU batch (28) by the
   world size (4) as if it were the global batch, so its 4-GPU batches are 4 blocks of 7 samples, whose identity
   groups are split (4+3, 1+4+2, 2+4+1 or 3+4 per block) rather than 7 whole groups of 4. ``data.identity_blocks``
   reproduces that (the ``ivt`` preset: 4); 1 gives whole groups (the official single-GPU sampler).

Ours runs this per (rank, loader worker) over the identities of the shards it streams, so the train split must keep
identities whole within shards (``shards.build --group-ids``). Each loader worker yields its full batches, then what
they leave of its sequence (``leftover_samples``: whole blocks); the rank's loader joins those into full batches, as
for random batches, so a rank leaves out one remainder below a batch, not one per loader worker (the official
sampler's one sequence leaves out one). Every rank still yields the same number of batches: the count is a lower
bound computed from the manifest's per-identity counts (``identity_rank_batches``), and the stream is cut to it.
"""

from __future__ import annotations

import random
from typing import Hashable, Sequence

SAMPLERS = ("random", "identity")


def check_identity_config(cfg) -> None:
    """The identity sampler's settings (``cfg`` is a DataConfig)."""
    if cfg.sampler not in SAMPLERS:
        raise ValueError(f"data.sampler must be one of {', '.join(SAMPLERS)}, got {cfg.sampler!r}")
    if cfg.sampler != "identity":
        return
    if cfg.instances_per_id < 1:
        raise ValueError(f"data.instances_per_id must be >= 1, got {cfg.instances_per_id}")
    if cfg.identity_blocks < 1 or cfg.batch_size % cfg.identity_blocks:
        raise ValueError(f"data.identity_blocks must be >= 1 and divide data.batch_size ({cfg.batch_size}), got "
                         f"{cfg.identity_blocks}")


def check_identity_layout(shards: list[dict], url: str = "", split: str = "train") -> None:
    """The identity sampler needs shards that keep identities whole, with per-identity counts in the manifest."""
    if any("id_counts" not in s for s in shards):
        raise ValueError(f"data.sampler=identity needs the {split!r} split of {url or 'this dataset'} written by "
                         "identity (shards that keep each identity whole, with per-identity counts in the manifest): "
                         "convert it with python -m shards.build --group-ids (or shards.synth --group-ids), or set "
                         "data.sampler=random")


def chunks_of(units: int, k: int) -> int:
    """Chunks of K an identity with ``units`` pairs (or images) gives: at least one (drawn with replacement)."""
    return max(1, units // k) if units > 0 else 0


def picks_per_step(batch_size: int, blocks: int, k: int) -> int:
    """P: identities drawn (without replacement) per step of the chunk sequence."""
    return max(1, (batch_size // blocks) // k)


def _rank_blocks(length: int, block: int, blocks: int) -> list[range]:
    """The full blocks each of ``blocks`` ranks batches from a sequence of ``length``: rank v takes blocks v, v + W,
    ... for the first ceil(length / W) // block of its turns (the official __fetch_current_node_idxs), and its batches
    are its next ``blocks`` blocks each (BatchSampler's drop_last): the turns past its last whole batch are not
    taken (:func:`leftover_samples` gives them to the loader to join)."""
    full = length // block
    turns = -(-length // blocks) // block
    out = []
    for v in range(blocks):
        mine = range(v, min(full, v + blocks * turns), blocks)
        out.append(mine[:len(mine) // blocks * blocks])
    return out


def sequence_length_bound(shards: list[dict], batch_size: int, k: int, blocks: int, pairs: bool) -> int:
    """The length one loader worker's chunk sequence over ``shards`` always reaches (a lower bound: with P > 1 the
    sequence can end with up to P - 1 identities' chunks unused)."""
    unit = 1 if pairs else 0  # id_counts: [images, captions] per identity
    chunks = sorted((chunks_of(c[unit], k) for s in shards for c in s["id_counts"]), reverse=True)
    lost = sum(chunks[: picks_per_step(batch_size, blocks, k) - 1])
    return (sum(chunks) - lost) * k


def identity_rank_batches(workers: list[list[dict]], batch_size: int, k: int, blocks: int, pairs: bool) -> int:
    """The batches a rank whose loader workers stream ``workers`` (each a list of shards) always yields: each
    worker's full batches, then the workers' leftovers joined. In whole blocks of batch / blocks samples (one sample
    with blocks = 1) a worker's sequence gives full batches of ``blocks`` blocks and leftover blocks, so the rank's
    count is its workers' blocks over ``blocks``."""
    block = batch_size // blocks if blocks > 1 else 1
    units = sum(sequence_length_bound(shards, batch_size, k, blocks, pairs) // block for shards in workers)
    return units // (blocks if blocks > 1 else batch_size)


def identity_sequence(groups: dict[Hashable, list], k: int, picks: int, rng: random.Random) -> list:
    """The official chunk sequence (steps 1-2 of the module doc) over ``{identity: [unit, ...]}``."""
    pools: dict[Hashable, list] = {}
    available = [pid for pid, units in groups.items() if units]
    out: list = []
    while len(available) >= picks:
        for pid in rng.sample(available, picks):
            if pid not in pools:
                units = list(groups[pid])
                if len(units) < k:
                    units = [rng.choice(units) for _ in range(k)]
                rng.shuffle(units)
                pools[pid] = units
            pool = pools[pid]
            out += pool[:k]
            del pool[:k]
            if len(pool) < k:
                available.remove(pid)
    return out


def leftover_samples(sequence: Sequence, batch_size: int, blocks: int) -> list:
    """What :func:`block_batches` leaves of ``sequence``, in sequence order, for the rank's loader to join with its
    other loader workers' (``merge_partials``): with blocks = 1 the tail past the last full batch; with blocks > 1
    the whole blocks no virtual rank's batch takes (each rank's last turns, fewer than ``blocks``, and the blocks past
    the official turns), so that a joined batch is ``blocks`` whole blocks too. A last block below batch / blocks
    samples is left out."""
    if blocks == 1:
        return list(sequence[len(sequence) // batch_size * batch_size:])
    block = batch_size // blocks
    taken = {b for turns in _rank_blocks(len(sequence), block, blocks) for b in turns}
    return [x for b in range(len(sequence) // block) if b not in taken for x in sequence[b * block:(b + 1) * block]]


def block_batches(sequence: Sequence, batch_size: int, blocks: int) -> list[list]:
    """Step 3 of the module doc: the batches of all ``blocks`` (virtual) ranks, rank by rank within each step."""
    if blocks == 1:
        return [list(sequence[i:i + batch_size]) for i in range(0, len(sequence) - batch_size + 1, batch_size)]
    block = batch_size // blocks
    per_rank = []
    for turns in _rank_blocks(len(sequence), block, blocks):
        mine = [list(sequence[b * block:(b + 1) * block]) for b in turns]
        per_rank.append([[x for b in mine[j:j + blocks] for x in b] for j in range(0, len(mine), blocks)])
    out = []
    for j in range(max((len(r) for r in per_rank), default=0)):
        out += [r[j] for r in per_rank if j < len(r)]
    return out
