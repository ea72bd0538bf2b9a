"""Shard integrity (#18 item 1): every shard read is checked against the manifest (size, sha256); a truncated, a
bit-flipped (same size) or a missing shard stops training, evaluation and search with one message naming it, or
with data.on_bad_shard=skip is skipped and counted while every rank keeps its batch count; shards.verify checks a
whole dataset."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from tbps.config import DataConfig
from tbps.data import build_eval_loader, build_train_loader, load_manifest, load_tokenizer
from tbps.data.stream import CorruptShardError, split_shards


def _damage(root: str, name: str, kind: str) -> None:
    path = os.path.join(root, name)
    if kind == "missing":
        os.remove(path)
        return
    data = bytearray(open(path, "rb").read())
    if kind == "truncated":
        data = data[: len(data) // 2]
    else:  # 4 KB of flipped bytes in the middle: same size, other content
        mid = len(data) // 2
        data[mid:mid + 4096] = bytes(b ^ 0xFF for b in data[mid:mid + 4096])
    open(path, "wb").write(bytes(data))


@pytest.fixture
def damaged(tmp_path, synth_tiny):
    """A copy of the tiny dataset and a function damaging one shard of a split; returns that shard's name."""
    root = str(tmp_path / "data")
    shutil.copytree(synth_tiny, root)

    def damage(split: str, kind: str, index: int = 1) -> str:
        name = split_shards(load_manifest(root), split)[index]["name"]
        _damage(root, name, kind)
        return name
    return root, damage


def _cfg(url, **kw):
    return DataConfig(url=url, image_size=[48, 16], batch_size=4, loader_workers=kw.pop("loader_workers", 2),
                      text_length=24, shuffle_buffer=8, sampling="images", **kw)


@pytest.mark.parametrize("kind,what", [("truncated", "bytes read, the manifest lists"),
                                       ("flipped", "sha256 .* differs from the manifest's"),
                                       ("missing", "missing: the manifest lists it")])
def test_a_bad_train_shard_stops_with_one_message_naming_it(damaged, synth_tiny, kind, what):
    root, damage = damaged
    name = damage("train", kind)
    tok = load_tokenizer(os.path.join(synth_tiny, "tokenizer"))
    for workers in (0, 2):  # in the training process, and re-raised from a loader worker
        with pytest.raises((CorruptShardError, RuntimeError), match=f"shard .*{name}: .*{what}.*shards.verify"):
            for rank in range(2):
                list(build_train_loader(_cfg(root, loader_workers=workers), tok, rank=rank, world_size=2))


@pytest.mark.parametrize("kind", ["truncated", "flipped", "missing"])
def test_skip_keeps_every_rank_s_batch_count_and_reads_nothing_from_the_bad_shard(damaged, synth_tiny, kind):
    root, damage = damaged
    name = damage("train", kind)
    tok = load_tokenizer(os.path.join(synth_tiny, "tokenizer"))
    cfg = _cfg(root, on_bad_shard="skip")
    counts, skipped = [], set()
    for rank in range(2):
        loader = build_train_loader(cfg, tok, rank=rank, world_size=2)
        batches = list(loader)
        counts.append((len(batches), len(loader)))
        skipped |= loader.skipped
        assert all(s != name for b in batches for s in b["shards"])
    assert counts[0][0] == counts[0][1] == counts[1][0] == counts[1][1] > 0
    assert skipped == {name}


@pytest.mark.parametrize("split", ["val", "test"])
def test_a_bad_eval_shard_stops_evaluation_or_is_skipped_and_counted(damaged, synth_tiny, split):
    from tbps.config import load_config
    from tbps.eval import evaluate
    from tbps.methods import TextSpec, build_method

    root, damage = damaged
    name = damage(split, "flipped", 0)
    tok = load_tokenizer(os.path.join(synth_tiny, "tokenizer"))
    cfg = load_config("clip_tiny", [f"data.url={root}", "data.loader_workers=0"])
    torch.manual_seed(0)
    method = build_method(cfg, TextSpec.from_tokenizer(tok, cfg.data.text_length), 40)
    with pytest.raises(CorruptShardError, match=f"{name}: sha256"):
        evaluate(method, build_eval_loader(cfg.data, tok, split, 64), "cpu")
    cfg.data.on_bad_shard = "skip"
    full = load_manifest(root)["splits"][split]["images"]
    out = evaluate(method, build_eval_loader(cfg.data, tok, split, 64), "cpu")
    lost = split_shards(load_manifest(root), split)[0]["samples"]
    assert out["skipped_shards"] == 1 and out["gallery"] == full - lost


def test_shards_verify_lists_every_bad_shard(damaged, capsys):
    from shards.verify import main as verify_main

    root, damage = damaged
    assert verify_main([root]) == 0
    assert "match the manifest" in capsys.readouterr().out
    bad = {damage("train", "truncated", 0), damage("train", "flipped", 1), damage("test", "missing", 0)}
    assert verify_main([root, "--workers", "3"]) == 2
    out = capsys.readouterr().out
    for name in bad:
        assert f"BAD  {os.path.join(root, name)}" in out
    assert "3 bad" in out and "missing" in out and "differs from the manifest" in out
    assert verify_main([str(os.path.dirname(root))]) == 2  # no manifest: a clear error


def test_evaluate_cli_gives_one_message_and_exit_2_on_a_bad_shard(damaged, synth_tiny, capsys):
    from tbps.evaluate import main as evaluate_main

    root, damage = damaged
    name = damage("test", "truncated", 0)
    code = evaluate_main(["--config", "clip_tiny", "--data", root, f"data.tokenizer={synth_tiny}/tokenizer",
                          "data.loader_workers=0"])
    err = capsys.readouterr().err
    assert code == 2 and f"{name}: " in err and "Traceback" not in err
    lines = err.strip().splitlines()  # a model without weights is named, then the shard's one message
    assert lines[0].startswith("[tbps] warning: --config clip_tiny names no weights (model.pretrained, ")
    assert lines[1].startswith("error: shard ") and len(lines) == 2
