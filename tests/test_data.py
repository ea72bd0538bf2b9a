"""tbps.data: rank/worker splitting, equal batch counts, eval stream, tokenizers, ToyPEDES."""

from __future__ import annotations

import io
import json
import os
import random

import pytest
import torch

from conftest import read_split, renamed_dataset
from shards.synth import SLOT_NAMES, generate
from shards.writer import DatasetWriter
from tbps.config import DataConfig
from tbps.data import (DataNeeds, assign_shards, batches_per_epoch, build_eval_loader, build_train_loader,
                       load_manifest, load_tokenizer)
from tbps.data.text import (clause_pieces, mla_texts, mla_word_rule, phrase_pieces, tokenize,
                            word_fallback_pieces)


def _train_samples(url: str) -> list[dict]:
    """The raw samples (key, jpg, json) of a dataset's train split, ready to be written again."""
    import webdataset as wds

    from shards.storage import join
    from tbps.data.stream import split_shards

    samples = []
    for shard in split_shards(load_manifest(url), "train"):
        samples += list(wds.DataPipeline(wds.SimpleShardList([join(url, shard["name"])]), wds.tarfile_to_samples()))
    return [{k: v for k, v in s.items() if k in ("__key__", "jpg", "json")} for s in samples]


@pytest.fixture(scope="module")
def uneven(tmp_path_factory, synth_tiny):
    """The tiny train split re-written into deliberately uneven shards (17, 1, 9, 30, 2, 23, 5, 33 samples)."""
    clean = _train_samples(synth_tiny)
    out = str(tmp_path_factory.mktemp("uneven"))
    counts = [17, 1, 9, 30, 2, 23, 5, 33]
    assert sum(counts) == len(clean) == 120
    with DatasetWriter(out, "uneven", progress=False) as w:
        w.write_split("train", iter(clean), len(clean), stats={"images": 120}, shard_counts=counts)
        w.publish()
    return out


def _rank_epoch(cfg, tok, rank: int, epoch: int, world_size: int = 2) -> list[dict]:
    """Every batch rank ``rank`` of ``world_size`` yields in ``epoch``."""
    loader = build_train_loader(cfg, tok, rank=rank, world_size=world_size)
    loader.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("sampling", ["images", "pairs"])
def test_two_ranks_over_uneven_shards_get_equal_batches_and_disjoint_samples(uneven, synth_tiny, sampling):
    tok = load_tokenizer(os.path.join(synth_tiny, "tokenizer"))
    cfg = DataConfig(url=uneven, image_size=[48, 16], batch_size=4, loader_workers=2, text_length=24,
                     shuffle_buffer=16, sampling=sampling)
    for epoch in range(2):
        counts, keys = [], []
        for rank in range(2):
            batches = _rank_epoch(cfg, tok, rank, epoch)
            counts.append(len(batches))
            # an image (images) or an (image, caption) pair (pairs)
            keys.append([(k, c if sampling == "pairs" else 0) for b in batches
                         for k, c in zip(b["keys"], b["caption_index"])])
            assert all(len(b["keys"]) == 4 for b in batches)
        assert counts[0] == counts[1] > 0
        assert not set(keys[0]) & set(keys[1])
        assert len(set(keys[0])) == len(keys[0])  # nothing twice within a rank's epoch


def test_assignment_is_balanced_deterministic_and_epoch_dependent():
    shards = [{"name": f"s{i}", "samples": n} for i, n in enumerate([17, 1, 9, 30, 2, 23, 5, 33])]
    a = assign_shards(shards, 2, 2, epoch=0, seed=0)
    assert a == assign_shards(shards, 2, 2, epoch=0, seed=0)
    names = sorted(s["name"] for r in a for w in r for s in w)
    assert names == sorted(s["name"] for s in shards)
    per_rank = [sum(s["samples"] for w in r for s in w) for r in a]
    assert abs(per_rank[0] - per_rank[1]) <= 33
    # each rank's loader workers' remainders are joined into full batches: only the rank's last one is left out
    assert batches_per_epoch(a, 4) == min(sum(s["samples"] for w in r for s in w) // 4 for r in a)
    even = [{"name": f"e{i}", "samples": 10} for i in range(16)]
    orders = {tuple(s["name"] for s in assign_shards(even, 2, 2, epoch=e, seed=0)[0][0]) for e in range(6)}
    assert len(orders) > 1  # each epoch reshuffles


def test_too_small_split_is_a_clear_error(synth_tiny):
    tok = load_tokenizer(os.path.join(synth_tiny, "tokenizer"))
    cfg = DataConfig(url=synth_tiny, batch_size=500, loader_workers=1)
    with pytest.raises(ValueError, match="no full batch of 500"):
        build_train_loader(cfg, tok)


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        load_manifest(str(tmp_path))


def test_train_batch_contents_and_views(synth_tiny):
    tok = load_tokenizer(os.path.join(synth_tiny, "tokenizer"))
    cfg = DataConfig(url=synth_tiny, image_size=[64, 32], batch_size=6, loader_workers=0, text_length=40)
    needs = DataNeeds(views=3, mlm_ratio=0.15, mla=True)
    batch = next(iter(build_train_loader(cfg, tok, needs)))
    assert batch["images"].shape == (6, 3, 3, 64, 32)
    assert batch["text_ids"].shape == batch["mlm_ids"].shape == (6, 40)
    assert batch["mla_ids"].shape == (6, 3, 40)
    assert (batch["train_ids"] >= 0).all() and (batch["train_ids"] < 40).all()
    # the sentence level is the sampled caption itself
    assert torch.equal(batch["mla_ids"][:, 0], batch["text_ids"])


class _SharedProbe(torch.utils.data.IterableDataset):
    """Runs a stream in the loader worker and says, per batch, whether its images were made in shared memory (then
    handing them to the training process copies nothing) and what they are."""

    def __init__(self, stream):
        self.stream = stream

    def __iter__(self):
        for batch in self.stream:
            if "images" in batch:
                yield {"shared": batch["images"].is_shared(), "images": batch["images"].clone()}


@pytest.mark.parametrize("views", [1, 3])
def test_loader_workers_make_the_image_batch_in_shared_memory(synth_tiny, views):
    from torch.utils.data import DataLoader

    tok = load_tokenizer(os.path.join(synth_tiny, "tokenizer"))
    cfg = DataConfig(url=synth_tiny, image_size=[64, 32], batch_size=6, loader_workers=1, text_length=40)
    stream = build_train_loader(cfg, tok, DataNeeds(views=views)).stream
    got = list(DataLoader(_SharedProbe(stream), batch_size=None, num_workers=1))
    assert got and all(b["shared"] for b in got)
    # the same batches as the stream makes in this process, where nothing is shared
    here = [b for b in _SharedProbe(stream)]
    assert [b["shared"] for b in here] == [False] * len(got)
    for a, b in zip(got, here):
        assert a["images"].shape == ((6, 3, 64, 32) if views == 1 else (6, views, 3, 64, 32))
        assert torch.equal(a["images"], b["images"])


def test_batch_augment_writes_into_a_given_batch_and_checks_its_inputs():
    from tbps.data.transforms import BatchAugment

    cfg = DataConfig(image_size=[48, 16], pad=4, flip=0.5, random_erasing=0.5)
    pixels = torch.randint(0, 256, (5, 48, 16, 3), dtype=torch.uint8)
    aug = BatchAugment(cfg, train=True)
    gen = torch.Generator().manual_seed(3)
    views = torch.full((5, 2, 3, 48, 16), float("nan"))
    for v in range(2):
        assert aug(pixels, gen, out=views[:, v]).data_ptr() == views[:, v].data_ptr()
    gen = torch.Generator().manual_seed(3)
    separate = [aug(pixels, gen) for _ in range(2)]  # the same draws in the same order
    assert torch.equal(views, torch.stack(separate, dim=1))  # every element written (no NaN left)
    with pytest.raises(ValueError, match="expected images of 48x16"):
        aug(torch.zeros(5, 40, 16, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="out must be float32"):
        aug(pixels, out=torch.empty(5, 3, 48, 17))


def test_eval_stream_covers_gallery_once_and_every_caption(synth_tiny):
    tok = load_tokenizer(os.path.join(synth_tiny, "tokenizer"))
    cfg = DataConfig(url=synth_tiny, image_size=[64, 32], loader_workers=2)
    manifest = load_manifest(synth_tiny)
    images, queries = [], []
    for rank in range(2):
        for b in build_eval_loader(cfg, tok, "test", batch_size=5, rank=rank, world_size=2):
            images += b["image_index"].tolist()
            queries += b["text_index"].tolist()
    assert sorted(images) == list(range(manifest["splits"]["test"]["images"]))
    assert len(set(queries)) == len(queries) == manifest["splits"]["test"]["captions"]
    with pytest.raises(ValueError, match="evaluation batch size must be >= 1, got 0"):
        build_eval_loader(cfg, tok, "test", batch_size=0)  # would have been one batch of the whole split


def test_caption_indices_stay_unique_and_in_order_for_an_image_with_many_captions(synth_tiny, tmp_path):
    """A caption's index orders the queries (image, then caption) for saved embeddings and IVT's every-second-row
    gallery. It was image * 1000 + caption: an image with over 1000 captions (a generic corpus can hold one) gave
    its caption 1000 the index of the next image's caption 0."""
    tok = load_tokenizer(os.path.join(synth_tiny, "tokenizer"))
    clean = _train_samples(synth_tiny)[:3]
    many = json.loads(clean[0]["json"])
    many["captions"] = [f"caption number {j}" for j in range(1001)]
    clean[0] = dict(clean[0], json=json.dumps(many).encode())
    out = str(tmp_path / "many")
    with DatasetWriter(out, "many", progress=False, min_shards=1) as w:
        w.write_split("test", iter(clean), len(clean), stats={"images": 3})
        w.publish()
    cfg = DataConfig(url=out, image_size=[64, 32], loader_workers=0)
    (batch,) = list(build_eval_loader(cfg, tok, "test", batch_size=8))
    index = batch["text_index"].tolist()
    assert len(set(index)) == len(index) == 1001 + sum(len(json.loads(s["json"])["captions"]) for s in clean[1:])
    order = sorted(range(len(index)), key=index.__getitem__)
    assert [batch["text_image"][i] for i in order] == sorted(batch["text_image"].tolist())
    assert [batch["captions"][i] for i in order][:1001] == many["captions"]


def test_tokenizer_loads_from_s3(synth_tiny, s3_server, tmp_path, monkeypatch):
    import s3fs

    monkeypatch.setenv("TBPS_CACHE", str(tmp_path / "cache"))
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.put(os.path.join(synth_tiny, "tokenizer") + "/", "tbps/tok/", recursive=True)
    tok = load_tokenizer("s3://tbps/tok")
    local = load_tokenizer(os.path.join(synth_tiny, "tokenizer"))
    text = "A person wears a red coat."
    assert tok(text)["input_ids"] == local(text)["input_ids"]
    with pytest.raises(FileNotFoundError, match="tokenizer not found at s3://tbps/nothing"):
        load_tokenizer("s3://tbps/nothing")


def test_mla_phrase_and_word_candidates_are_the_official_ones():
    """Hand-derived from the official code (processor.get_phrase_level_txt, datasets/bases.py split_txt): per
    sentence the longest comma clause and the rest re-joined; pieces over 5 characters before trimming."""
    caption = "A person has long black hair, wears a red coat and carries a bag. They wear white shoes."
    assert phrase_pieces(caption.lower()) == ["wears a red coat and carries a bag", "a person has long black hair",
                                              "they wear white shoes"]
    bracketed = "[a man in a blue shirt, jeans, and black shoes.]"
    assert phrase_pieces(bracketed) == ["a man in a blue shirt", "jeans, and black shoes"]
    assert word_fallback_pieces(bracketed) == ["[a man in a blue shirt", "jeans, and black shoes"]  # '[' kept
    assert phrase_pieces("aaaaaa,bbbbbb") == ["aaaaaa", "bbbbbb"]  # ties: the first clause is the longest
    rng = random.Random(0)
    seen = set()
    for _ in range(50):
        sentence, phrase, word = mla_texts(caption, rng)
        assert sentence == caption.lower()
        assert phrase in phrase_pieces(caption.lower()) and word in word_fallback_pieces(caption.lower())
        seen.add(phrase)
    assert len(seen) == 3
    assert mla_texts("Tiny. ok", rng) == ("tiny. ok",) * 3  # no piece over 5 characters: the caption itself


def test_mla_word_level_is_a_random_subset_of_the_attribute_phrases():
    rng = random.Random(1)
    attributes = ["black hair", "red coat", "white shoes"]
    sizes, orders = set(), set()
    for _ in range(300):
        _, _, word = mla_texts("A person in a red coat.", rng, attributes)
        parts = word.split(",")
        assert set(parts) <= set(attributes) and len(set(parts)) == len(parts) >= 1
        sizes.add(len(parts))
        orders.add(word)
    assert sizes == {1, 2, 3} and len(orders) == 3 + 6 + 6  # every non-empty subset in every order


def test_mla_word_level_on_icfg_pedes_and_rstpreid_is_one_comma_clause():
    """Hand-derived from IVT's ImageDatasetLevelICFG / ImageDatasetLevelRSTP (datasets/bases.py): '.', '[' and ']'
    stripped from the ends, sentences split on '.', every comma clause over 5 characters before trimming."""
    caption = "[a person has long black hair, wears a red coat, jeans and carries a bag. they wear white shoes.]"
    assert clause_pieces(caption) == ["a person has long black hair", "wears a red coat", "jeans and carries a bag",
                                      "they wear white shoes"]
    assert word_fallback_pieces(caption) == ["[a person has long black hair", "wears a red coat, jeans and carries "
                                             "a bag", "they wear white shoes"]  # CUHK-PEDES's rule, for contrast
    assert clause_pieces("a man, in red, ok") == ["in red"]  # "a man" is 5 characters, " in red" 7, " ok" 3
    rng = random.Random(0)
    seen = set()
    for _ in range(60):
        sentence, phrase, word = mla_texts(caption.upper(), rng, ["red coat"], words="clauses")  # attributes unused
        assert sentence == caption and phrase in phrase_pieces(caption) and word in clause_pieces(caption)
        seen.add(word)
    assert len(seen) == 4
    assert mla_texts("Tiny. ok", rng, words="clauses")[2] == "tiny. ok"  # nothing over 5 characters: the caption
    assert [mla_word_rule("auto", d) for d in ("icfg-pedes", "rstpreid", "cuhk-pedes", "toypedes", "jsonl:mals")] == \
        ["clauses", "clauses", "attributes", "attributes", "attributes"]
    assert mla_word_rule("attributes", "icfg-pedes") == "attributes" and mla_word_rule("clauses", "") == "clauses"
    with pytest.raises(ValueError, match="data.mla_words must be auto, attributes or clauses, got 'words'"):
        mla_word_rule("words", "icfg-pedes")


def test_train_loader_draws_ivt_s_word_level_by_the_dataset_s_rule(synth_tiny, tmp_path):
    """data.mla_words=auto: the loader uses the rule of IVT's loader for the dataset its manifest names -- one comma
    clause on ICFG-PEDES and RSTPReid, CUHK-PEDES's pieces elsewhere; in a mixture, each member's own rule (its
    samples told apart by their relabelled pids); an explicit rule applies everywhere."""
    from tbps.config import load_config

    tok = load_tokenizer(os.path.join(synth_tiny, "tokenizer"))
    captions = {s["key"]: s["captions"] for s in read_split(synth_tiny, "train")}
    icfg, rstp, cuhk = (renamed_dataset(synth_tiny, tmp_path / d, d) for d in ("icfg-pedes", "rstpreid", "cuhk-pedes"))

    def words(batch, i, rule):
        """The word-level texts ``rule`` allows for sample i, tokenized as the loader does."""
        caption = captions[batch["keys"][i]][batch["caption_index"][i]].lower()
        return {tuple(tokenize(tok, [p], 48)[0][0].tolist()) for p in rule(caption)}

    def check(url, *more):
        cfg = load_config("ivt_tiny", [f"data.url={url}", "data.loader_workers=0", "data.batch_size=32", *more])
        batch = next(iter(build_train_loader(cfg.data, tok, DataNeeds(views=3, mla=True))))
        return batch, [tuple(batch["mla_ids"][i, 2].tolist()) for i in range(32)]

    for url, rule, other in ((icfg, clause_pieces, word_fallback_pieces), (rstp, clause_pieces, word_fallback_pieces),
                             (cuhk, word_fallback_pieces, clause_pieces), (synth_tiny, word_fallback_pieces,
                                                                          clause_pieces)):
        batch, drawn = check(url)
        assert all(w in words(batch, i, rule) for i, w in enumerate(drawn)), url
        assert any(w not in words(batch, i, other) for i, w in enumerate(drawn)), url  # the rules differ here
    batch, drawn = check(icfg, "data.mla_words=attributes")
    assert all(w in words(batch, i, word_fallback_pieces) for i, w in enumerate(drawn))
    loader = build_train_loader(load_config("ivt_tiny", [f"data.url={icfg}"]).data, tok, DataNeeds(views=3, mla=True))
    assert loader.stream.mla_words_summary() == "clauses (icfg-pedes, data.mla_words=auto)"
    mixture = f"[{{url: {icfg}, eval: true}}, {{url: {cuhk}}}]"
    loader = build_train_loader(load_config("ivt_tiny", [f"data.url={mixture}"]).data, tok, DataNeeds(views=3, mla=True))
    assert loader.stream.mla_words_summary() == \
        "clauses (icfg-pedes); attributes (cuhk-pedes) (data.mla_words=auto)"
    batch, drawn = check(mixture)
    members = (batch["pids"] % 2).tolist()  # pid * 2 + member
    assert set(members) == {0, 1}
    for i, w in enumerate(drawn):
        assert w in words(batch, i, clause_pieces if members[i] == 0 else word_fallback_pieces), i


# ------------------------------------------------------------------------------------------------ ToyPEDES
def test_synth_is_deterministic(tmp_path):
    a = generate(out=str(tmp_path / "a"), size="tiny", seed=3, progress=False)
    b = generate(out=str(tmp_path / "b"), size="tiny", seed=3, progress=False)
    c = generate(out=str(tmp_path / "c"), size="tiny", seed=4, progress=False)
    sha = lambda m: [s["sha256"] for info in m["splits"].values() for s in info["shards"]]
    assert sha(a) == sha(b)
    assert sha(a) != sha(c)


def test_synth_splits_are_identity_disjoint_and_fine_grained(synth_tiny):
    splits = {s: read_split(synth_tiny, s) for s in ("train", "val", "test")}
    pids = {s: {x["pid"] for x in v} for s, v in splits.items()}
    assert not pids["train"] & pids["val"] and not pids["train"] & pids["test"] and not pids["val"] & pids["test"]
    assert len(pids["train"]) == 40 and len(pids["test"]) == 12
    attrs = {}
    for x in splits["test"]:
        attrs[x["pid"]] = tuple(x["attributes"][k] for k in SLOT_NAMES)
        assert len(x["captions"]) == 2 and all(c.endswith(".") for c in x["captions"])
    assert len(set(attrs.values())) == len(attrs)  # an identity is an attribute combination
    combos = list(attrs.values())
    one_apart = sum(1 for i in range(len(combos)) for j in range(i) if
                    sum(a != b for a, b in zip(combos[i], combos[j])) == 1)
    assert one_apart >= 1  # some test identities differ by a single attribute
    train_ids = sorted({x["train_id"] for x in splits["train"]})
    assert train_ids == list(range(40))


def test_synth_raw_layout_builds_with_shards_build(tmp_path):
    from shards.build import main as build_main

    raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
    generate(raw=raw, size="tiny", seed=1, train=5, val=2, test=2, images_per_id=2, progress=False)
    records = json.load(open(os.path.join(raw, "reid_raw.json")))
    assert len(records) == 18 and {r["split"] for r in records} == {"train", "val", "test"}
    assert build_main(["--dataset", "cuhk-pedes", "--root", raw, "--out", out]) == 0
    manifest = load_manifest(out)
    assert manifest["splits"]["train"]["images"] == 10 and manifest["num_train_ids"] == 5


def test_batch_augment_matches_torchvision_transforms(synth_tiny):
    """BatchAugment runs build_transform's operations on a batch: identical at eval, same operations in training."""
    import numpy as np
    from PIL import Image

    from tbps.config import DataConfig
    from tbps.data.transforms import BatchAugment, build_transform, resize_uint8

    cfg = DataConfig(image_size=[96, 32], pad=4, flip=0.5, random_erasing=0.5)
    pil = [Image.open(io.BytesIO(s["image"])).convert("RGB") for s in read_split(synth_tiny, "val")[:12]]
    pixels = torch.from_numpy(np.stack([resize_uint8(im, (96, 32)) for im in pil]))
    # evaluation: resize + normalise, the same numbers as torchvision's per-image pipeline
    ref = torch.stack([build_transform(cfg, train=False)(im) for im in pil])
    got = BatchAugment(cfg, train=False)(pixels)
    assert got.shape == ref.shape == (12, 3, 96, 32)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # flip with p = 1 is the mirror image; pad + crop shifts by at most `pad` and fills with black
    flip = DataConfig(image_size=[96, 32], pad=0, flip=1.0, random_erasing=0.0)
    torch.testing.assert_close(BatchAugment(flip, train=True)(pixels), ref.flip(-1), atol=1e-5, rtol=1e-5)
    crop = DataConfig(image_size=[96, 32], pad=4, flip=0.0, random_erasing=0.0)
    out = BatchAugment(crop, train=True)(pixels, torch.Generator().manual_seed(0))
    black = BatchAugment(crop, train=False)(torch.zeros(1, 96, 32, 3, dtype=torch.uint8))[0, :, 0, 0]
    for b in range(12):
        found = [(i, j) for i in range(-4, 5) for j in range(-4, 5)
                 if torch.allclose(out[b, :, 8:88, 8:24], ref[b, :, 8 + i:88 + i, 8 + j:24 + j], atol=1e-5)]
        assert found, f"image {b} is not a shifted copy"
        i, j = found[0]
        if i < 0:  # shifted down: the top rows came from the padding
            assert torch.allclose(out[b, :, 0, :], black[:, None].expand(3, 32), atol=1e-5)
    # random erasing zeroes a box in about half the images; fixed generator = reproducible
    erase = DataConfig(image_size=[96, 32], pad=0, flip=0.0, random_erasing=0.5)
    a = BatchAugment(erase, train=True)(pixels.repeat(8, 1, 1, 1), torch.Generator().manual_seed(1))
    b = BatchAugment(erase, train=True)(pixels.repeat(8, 1, 1, 1), torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    erased = ((a == 0).all(dim=1).flatten(1).sum(1) > 0).float().mean()
    assert 0.3 < erased < 0.7
    with pytest.raises(ValueError, match="expected uint8"):
        BatchAugment(cfg, train=True)(ref)


@pytest.fixture(scope="module")
def even_pairs(tmp_path_factory, synth_tiny):
    """The tiny train split (120 images x 2 captions) as 8 shards of 15 images: 30 pairs each."""
    clean = _train_samples(synth_tiny)
    out = str(tmp_path_factory.mktemp("even"))
    with DatasetWriter(out, "even", progress=False) as w:
        w.write_split("train", iter(clean), 120, shard_counts=[15] * 8)
        w.publish()
    return out


def test_pair_epochs_see_every_pair_once_across_ranks(even_pairs, synth_tiny):
    """data.sampling=pairs: steps per epoch = pairs / global batch, every (image, caption) pair exactly once per epoch
    across 2 ranks x 2 loader workers, equal batches per rank, and a new order each epoch."""
    tok = load_tokenizer(os.path.join(synth_tiny, "tokenizer"))
    manifest = load_manifest(even_pairs)
    assert [s["captions"] for s in manifest["splits"]["train"]["shards"]] == [30] * 8
    cfg = DataConfig(url=even_pairs, image_size=[48, 16], batch_size=5, loader_workers=2, text_length=24,
                     shuffle_buffer=8, sampling="pairs")
    truth = {s["__key__"]: json.loads(s["json"])["captions"] for s in _train_samples(even_pairs)}

    def decoded(text: str) -> str:  # a caption as the pipeline tokenises it (24 tokens), decoded
        from tbps.data.text import tokenize

        return tok.decode(tokenize(tok, [text], cfg.text_length)[0][0], skip_special_tokens=True)
    orders = []
    for epoch in range(2):
        seen, counts = [], []
        for rank in range(2):
            batches = _rank_epoch(cfg, tok, rank, epoch)
            counts.append(len(batches))
            seen += [(k, c) for b in batches for k, c in zip(b["keys"], b["caption_index"])]
            for b in batches:  # the tokenised caption is the one caption_index names
                for k, c, text in zip(b["keys"], b["caption_index"],
                                      tok.batch_decode(b["text_ids"], skip_special_tokens=True)):
                    assert text == decoded(truth[k][c])
        assert counts[0] == counts[1] == 240 // (5 * 2)  # pairs / global batch
        assert len(seen) == len(set(seen)) == 240  # every pair, once
        orders.append(seen)
    assert orders[0] != orders[1]
    # images mode on the same shards: each image once, one caption
    images = DataConfig(**{**cfg.__dict__, "sampling": "images"})
    assert len(build_train_loader(images, tok, rank=0, world_size=2)) == 120 // (5 * 2)


def test_loader_workers_remainders_are_joined_into_full_batches(even_pairs, synth_tiny):
    """Each loader worker streams its own shards and ends with a partial batch. The loader joins those remainders,
    in worker order, into full batches after the workers' full ones: an epoch of 3 loader workers over 90, 90 and 60
    pairs at batch 7 is 240 // 7 = 34 steps, where dropping each worker's remainder gave 12 + 12 + 8 = 32 (IRRA's one
    shuffled loader: 35, its last batch partial). A joined batch is a batch like any other -- its tensors and lists
    cut at the same samples, its counts (mlm_rows, mla_length) derived again -- and a resumed epoch yields the
    same joined batches."""
    from tbps.data.stream import merge_partials
    from tbps.data.text import mlm_rows, tokenize

    tok = load_tokenizer(os.path.join(synth_tiny, "tokenizer"))
    cfg = DataConfig(url=even_pairs, image_size=[48, 16], batch_size=7, loader_workers=3, text_length=24,
                     shuffle_buffer=8, sampling="pairs")
    needs = DataNeeds(views=3, mlm_ratio=0.15, mla=True)
    truth = {s["__key__"]: json.loads(s["json"]) for s in _train_samples(even_pairs)}
    loader = build_train_loader(cfg, tok, needs)
    per_worker = [sum(s["captions"] for s in w) for w in loader.stream.assignment()[0]]
    assert sorted(per_worker) == [60, 90, 90] and len(loader) == 34
    assert sum(n // 7 for n in per_worker) == 32  # what dropping each worker's remainder gave
    loader.set_epoch(1)
    batches = list(loader)
    assert len(batches) == 34 and all(len(b["keys"]) == 7 for b in batches)
    pairs = [(k, c) for b in batches for k, c in zip(b["keys"], b["caption_index"])]
    assert len(set(pairs)) == 238  # 2 of the 240 pairs left out: the rank's last remainder
    for b in batches:
        assert b["pids"].tolist() == [truth[k]["pid"] for k in b["keys"]]
        assert b["images"].shape == (7, 3, 3, 48, 16) and b["mla_ids"].shape[:2] == (7, 3)
        own = tokenize(tok, [truth[k]["captions"][c] for k, c in zip(b["keys"], b["caption_index"])], 24)[0]
        assert torch.equal(b["text_ids"], own)  # each row is the caption its key and caption_index name
        masked = b["mlm_labels"] != -100
        assert torch.equal(b["mlm_labels"][masked], b["text_ids"][masked])  # masks belong to their captions
        assert b["mlm_rows"] == mlm_rows(b["mlm_labels"])
        assert b["mla_length"] == int(b["mla_mask"].sum(-1).max())
    joined = batches[32:]
    assert all(len(set(b["shards"])) > 1 for b in joined)  # made of several workers' remainders
    # merge_partials on its own: cuts 6 + 6 + 4 samples into 7 + 7, the 2 left over dropped
    parts = [{"keys": [f"{w}{i}" for i in range(n)], "x": torch.arange(n) + 10 * w, "worker": w, "partial": True,
              "mla_mask": (torch.arange(5) < 2 + w).long().expand(n, 3, 5)} for w, n in enumerate([6, 6, 4])]
    out = merge_partials(parts, 7)
    assert [b["keys"] for b in out] == [["00", "01", "02", "03", "04", "05", "10"],
                                        ["11", "12", "13", "14", "15", "20", "21"]]
    assert out[1]["x"].tolist() == [11, 12, 13, 14, 15, 20, 21] and [b["mla_length"] for b in out] == [3, 4]
    assert all("worker" not in b and "partial" not in b for b in out)
    # a resumed epoch: from a position after the first joined batch, the same last batch
    again = build_train_loader(cfg, tok, needs)
    again.set_epoch(1)
    it = iter(again)
    for _ in range(33):
        next(it)
    position = again.position()
    assert position["merged"] == 1 and position["count"] == 33
    resumed = build_train_loader(cfg, tok, needs)
    resumed.set_epoch(1, position)
    (last,) = list(resumed)
    assert last["keys"] == batches[33]["keys"] and last["caption_index"] == batches[33]["caption_index"]
    for key in ("images", "text_ids", "mlm_ids", "mla_ids"):
        assert torch.equal(last[key], batches[33][key]), key
    # data.last_batch=keep (IRRA's drop_last=False) on one rank: the last 2 pairs as a 35th batch, every pair once
    kept = build_train_loader(cfg, tok, needs, keep_last=True)
    kept.set_epoch(1)
    batches = list(kept)
    assert len(kept) == len(batches) == 35 and [len(b["keys"]) for b in batches] == [7] * 34 + [2]
    assert len({(k, c) for b in batches for k, c in zip(b["keys"], b["caption_index"])}) == 240
    assert batches[-1]["mla_length"] == int(batches[-1]["mla_mask"].sum(-1).max())
    with pytest.raises(ValueError, match="last, partial batch can be kept on one rank with data.sampler=random only "
                                         r"\(this loader: 2 ranks"):
        build_train_loader(cfg, tok, needs, world_size=2, keep_last=True)


def test_pair_epochs_need_caption_counts(even_pairs, tmp_path, synth_tiny):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(even_pairs, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for s in manifest["splits"]["train"]["shards"]:
        del s["captions"]  # as shards.build wrote it before pair-level epochs
    (old / "manifest.json").write_text(json.dumps(manifest))
    tok = load_tokenizer(os.path.join(synth_tiny, "tokenizer"))
    with pytest.raises(ValueError, match="no per-shard caption counts.*data.sampling=images"):
        build_train_loader(DataConfig(url=str(old), sampling="pairs"), tok)
    build_train_loader(DataConfig(url=str(old), sampling="images", batch_size=8, loader_workers=1), tok)


def test_irra_resize_and_erasing_fill(synth_tiny):
    """IRRA's transforms: bilinear resize (T.Resize's default) and RandomErasing(value=mean) after Normalize, i.e.
    boxes filled with the mean's numbers in normalised units."""
    import numpy as np
    from PIL import Image

    from tbps.data.transforms import BatchAugment, build_transform, resize_uint8

    mean = [0.48145466, 0.4578275, 0.40821073]
    cfg = DataConfig(image_size=[96, 32], interpolation="bilinear", erasing_value=mean, pad=0, flip=0.0,
                     random_erasing=1.0)
    pil = [Image.open(io.BytesIO(s["image"])).convert("RGB") for s in read_split(synth_tiny, "val")[:6]]
    pixels = torch.from_numpy(np.stack([resize_uint8(im, (96, 32), "bilinear") for im in pil]))
    ref = torch.stack([build_transform(cfg, train=False)(im) for im in pil])
    torch.testing.assert_close(BatchAugment(cfg, train=False)(pixels), ref, atol=1e-5, rtol=1e-5)
    assert not torch.equal(pixels, torch.from_numpy(np.stack([resize_uint8(im, (96, 32)) for im in pil])))
    out = BatchAugment(cfg, train=True)(pixels, torch.Generator().manual_seed(0))
    filled = (out == torch.tensor(mean).view(1, 3, 1, 1)).all(dim=1)
    assert (filled.flatten(1).sum(1) >= 0.02 * 96 * 32 * 0.9).all()  # every image got a mean-filled box


def test_erased_box_shapes_follow_each_mode_s_library():
    """data.erasing_mode constant is torchvision's RandomErasing (IRRA's), pixel timm's (IVT's): their box aspect
    ranges differ, (0.3, 3.3) against (0.3, 1 / 0.3); the batch and the per-image paths draw from each's."""
    import math

    import torchvision.transforms as T
    from timm.data.random_erasing import RandomErasing

    from tbps.data.transforms import BatchAugment, build_transform

    constant = DataConfig(random_erasing=0.5)
    pixel = DataConfig(random_erasing=0.5, erasing_mode="pixel", erasing_scale=[0.02, 1 / 3])
    assert BatchAugment(constant, train=True).ratio == T.RandomErasing().ratio
    timm_pixel = RandomErasing(probability=0.5, mode="pixel", max_count=1, device="cpu")  # IVT's call
    assert [math.log(r) for r in BatchAugment(pixel, train=True).ratio] == pytest.approx(timm_pixel.log_aspect_ratio)
    for cfg in (constant, pixel):
        assert build_transform(cfg, train=True).transforms[-1].ratio == BatchAugment(cfg, train=True).ratio


def test_mla_batches_come_padded_to_their_longest_text(synth_tiny):
    """IVT's one tokenizer call pads the 3B texts to the longest: BMM counts those positions (done in the loader)."""
    from tbps.config import load_config
    from tbps.data import build_train_loader
    from tbps.data.stream import DataNeeds

    cfg = load_config("ivt_tiny", [f"data.url={synth_tiny}", "data.loader_workers=0", "data.batch_size=8"])
    tok = load_tokenizer(os.path.join(synth_tiny, "tokenizer"))
    batch = next(iter(build_train_loader(cfg.data, tok, DataNeeds(views=3, mla=True))))
    mask, length = batch["mla_mask"], batch["mla_length"]
    assert mask.shape == (8, 3, cfg.data.text_length) and length < cfg.data.text_length
    assert mask[..., length - 1].any() and not mask[..., length:].any()  # the longest text of all levels
    from tbps.data.text import trim_padding

    ids, cut = trim_padding(batch["mla_ids"], mask, length)
    assert cut.shape == (8, 3, length) and torch.equal(trim_padding(batch["mla_ids"], mask)[1], cut)


# ------------------------------------------------------------------------------------------------ identity sampler
def _official_ddp_rank_batches(final_idxs: list, per_gpu_batch: int, world_size: int, rank: int) -> list[list]:
    """Written from IVT's datasets/sampler_ddp.py (RandomIdentitySampler_DDP_CUHK.__iter__ and
    __fetch_current_node_idxs) followed by torch's BatchSampler(per_gpu_batch, drop_last=True)."""
    import math

    mini = per_gpu_batch // world_size  # the official code divides the per-GPU batch by the world size
    length = int(math.ceil(len(final_idxs) / world_size))
    block_num = length // mini
    target = []
    for i in range(0, block_num * world_size, world_size):
        target += range(mini * rank + mini * i, min(mini * rank + mini * (i + 1), len(final_idxs)))
    mine = [final_idxs[t] for t in target]
    return [mine[i:i + per_gpu_batch] for i in range(0, len(mine) - per_gpu_batch + 1, per_gpu_batch)]


def _official_sample_list(groups: dict, k: int, picks: int, rng) -> list:
    """RandomIdentitySampler_DDP_CUHK.sample_list (numpy's RNG replaced by ``rng``)."""
    avai, pools, out = list(groups), {}, []
    while len(avai) >= picks:
        for pid in rng.sample(avai, picks):
            if pid not in pools:
                idxs = list(groups[pid])
                if len(idxs) < k:
                    idxs = [rng.choice(idxs) for _ in range(k)]
                rng.shuffle(idxs)
                pools[pid] = idxs
            for _ in range(k):
                out.append(pools[pid].pop(0))
            if len(pools[pid]) < k:
                avai.remove(pid)
    return out


@pytest.mark.parametrize("length", [0, 27, 28, 111, 112, 140, 169, 250, 1001])
def test_identity_blocks_deal_batches_as_the_official_ddp_sampler(length):
    """identity_blocks=4, batch 28: each virtual rank's batches are the official 4-GPU run's batches of that rank
    (4 blocks of 7), and the count formula agrees with the batches made."""
    from tbps.data.identity import block_batches, leftover_samples

    seq = list(range(length))
    ours = block_batches(seq, 28, 4)
    official = [_official_ddp_rank_batches(seq, 28, 4, r) for r in range(4)]
    assert sorted(map(tuple, ours)) == sorted(tuple(b) for r in official for b in r)
    # with the leftover blocks joined (the loader's), a sequence gives its whole blocks over 4 (identity_rank_batches)
    assert len(ours) + len(leftover_samples(seq, 28, 4)) // 28 == length // 7 // 4
    # blocks=1: consecutive batches (the official single-GPU sampler's DataLoader)
    assert block_batches(seq, 28, 1) == [seq[i:i + 28] for i in range(0, length - 27, 28)]


def test_identity_sequence_is_the_official_chunk_sequence():
    """Same RNG draws -> the official sample_list's sequence; chunks per identity are max(1, n // K), units distinct
    when n >= K, drawn with replacement when n < K; the length never falls below the manifest bound."""
    from tbps.data.identity import chunks_of, identity_sequence

    groups = {pid: [(pid, u) for u in range(n)] for pid, n in enumerate([1, 3, 4, 6, 9, 2, 13, 4, 8, 5])}
    for picks in (1, 2, 3):
        for seed in range(5):
            ours = identity_sequence(groups, 4, picks, random.Random(seed))
            assert ours == _official_sample_list(groups, 4, picks, random.Random(seed))
            chunks = [ours[i:i + 4] for i in range(0, len(ours), 4)]
            assert all(len({pid for pid, _ in c}) == 1 for c in chunks)  # a chunk is one identity's
            per_pid = {pid: [u for c in chunks if c[0][0] == pid for u in c] for pid in groups}
            for pid, units in per_pid.items():
                n = len(groups[pid])
                if picks == 1:
                    assert len(units) == 4 * chunks_of(n, 4)
                if n >= 4:
                    assert len(set(units)) == len(units)
                assert set(units) <= set(groups[pid])
            total = sum(chunks_of(len(g), 4) for g in groups.values())
            lost = sum(sorted((chunks_of(len(g), 4) for g in groups.values()), reverse=True)[:picks - 1])
            assert len(chunks) >= total - lost


@pytest.fixture(scope="module")
def grouped(tmp_path_factory, synth_tiny):
    """ToyPEDES tiny (40 train ids) with 5 images per identity (10 pairs), written by identity in 8 shards."""
    out = str(tmp_path_factory.mktemp("grouped"))
    generate(out=out, size="tiny", seed=0, images_per_id=5, min_shards=8, group_ids=True, progress=False)
    return out


@pytest.mark.parametrize("blocks", [1, 2])
def test_identity_sampler_over_two_ranks_and_two_loader_workers(grouped, synth_tiny, blocks):
    """data.sampler=identity on 2 ranks x 2 loader workers: equal batch counts (the manifest bound), batches made of
    identity groups of K pairs (blocks=1: B/K whole groups of distinct identities), no pair twice in an epoch across
    ranks, each identity's pairs at most 4 * floor(10 / 4), and a new composition each epoch."""
    tok = load_tokenizer(os.path.join(synth_tiny, "tokenizer"))
    cfg = DataConfig(url=grouped, image_size=[48, 16], batch_size=8, loader_workers=2, text_length=24,
                     sampler="identity", instances_per_id=4, identity_blocks=blocks)
    truth = {s["__key__"]: json.loads(s["json"]) for s in _train_samples(grouped)}
    compositions = []
    for epoch in range(2):
        counts, seen = [], []
        for rank in range(2):
            loader = build_train_loader(cfg, tok, rank=rank, world_size=2)
            loader.set_epoch(epoch)
            batches = list(loader)
            counts.append((len(batches), len(loader)))
            for b in batches:
                pids = b["pids"].tolist()
                assert len(pids) == 8
                assert pids == [truth[k]["pid"] for k in b["keys"]]
                groups = [pids[i:i + 4] for i in range(0, 8, 4)]
                if blocks == 1:
                    assert all(len(set(g)) == 1 for g in groups) and groups[0][0] != groups[1][0]
                else:  # blocks of 4 = one chunk each (block = K): each block one identity, possibly repeated
                    assert all(len(set(g)) == 1 for g in groups)
                seen += list(zip(b["keys"], b["caption_index"]))
                compositions.append(tuple(pids))
        assert counts[0][0] == counts[1][0] == counts[0][1] == counts[1][1] > 0
        assert len(seen) == len(set(seen))  # 10 pairs per identity >= K: no pair drawn twice
        per_pid = {}
        for key, _ in seen:
            per_pid[truth[key]["pid"]] = per_pid.get(truth[key]["pid"], 0) + 1
        assert max(per_pid.values()) <= 8
        # coverage up to the remainder rule: K * floor(10 / K) = 8 pairs of every identity; with P = 2 identities
        # per step (blocks=1) each of the 4 (rank, worker) pools may leave one identity's chunk unused
        if blocks == 2:
            assert sorted(per_pid.values()) == [8] * 40
        else:
            assert len(seen) >= 8 * (40 - 4)
    assert compositions[: len(compositions) // 2] != compositions[len(compositions) // 2:]


@pytest.mark.parametrize("blocks", [1, 2])
def test_identity_sampler_joins_the_loader_workers_leftovers(grouped, synth_tiny, blocks):
    """Each loader worker runs the identity sampler over its shards' identities; what its full batches leave of its
    sequence (whole blocks of batch / blocks samples; the tail with blocks = 1) is joined with the other workers'
    into full batches, as for random batches: a rank then leaves out one remainder below a batch, not one per
    loader worker. A joined batch has the composition of the others, and a resumed epoch yields the same joined
    batches. (P = 1 identity per step in both settings, so every worker's sequence is exactly its chunks.)"""
    from tbps.data.identity import block_batches, leftover_samples, sequence_length_bound

    tok = load_tokenizer(os.path.join(synth_tiny, "tokenizer"))
    batch, workers_n = (7, 2) if blocks == 1 else (8, 3)
    cfg = DataConfig(url=grouped, image_size=[48, 16], batch_size=batch, loader_workers=workers_n, text_length=24,
                     sampler="identity", instances_per_id=4, identity_blocks=blocks)
    truth = {s["__key__"]: json.loads(s["json"]) for s in _train_samples(grouped)}
    loader = build_train_loader(cfg, tok)
    loader.set_epoch(1)
    workers = loader.stream.assignment()[0]
    # 40 identities x 10 pairs: 2 chunks of 4 each, 80 chunks = 320 pairs in the workers' sequences
    lengths = [sequence_length_bound(w, batch, 4, blocks, True) for w in workers]
    assert sorted(lengths) == ([160, 160] if blocks == 1 else [80, 120, 120])
    separate = sum(len(block_batches(range(n), batch, blocks)) for n in lengths)  # each worker's own batches
    assert (separate, len(loader)) == ((44, 45) if blocks == 1 else (38, 40))  # 6 + 6 left of 160 at 7; 2 + 2 blocks
    batches = list(loader)
    assert len(batches) == len(loader) and all(len(b["keys"]) == batch for b in batches)
    pairs = [(k, c) for b in batches for k, c in zip(b["keys"], b["caption_index"])]
    assert len(set(pairs)) == len(pairs) == len(batches) * batch
    for b in batches:
        pids = b["pids"].tolist()
        assert pids == [truth[k]["pid"] for k in b["keys"]]
        if blocks == 2:  # blocks of 4 = whole chunks of one identity
            assert all(len(set(pids[i:i + 4])) == 1 for i in range(0, batch, 4))
    joined = batches[separate:]
    assert len(joined) == (1 if blocks == 1 else 2)
    if blocks == 1:  # the two workers' tails, 6 pairs of one and 1 of the other
        names = [{s["name"] for s in w} for w in workers]
        assert all(set(joined[0]["shards"]) & mine for mine in names)
    # a resumed epoch from inside the joined batches yields the same last batch
    resumed = build_train_loader(cfg, tok)
    resumed.set_epoch(1)
    it = iter(resumed)
    for _ in range(len(batches) - 1):
        next(it)
    position = resumed.position()
    again = build_train_loader(cfg, tok)
    again.set_epoch(1, position)
    (last,) = list(again)
    assert last["keys"] == batches[-1]["keys"] and torch.equal(last["images"], batches[-1]["images"])
    # leftover_samples: what block_batches leaves, in whole blocks
    for n in (0, 7, 28, 57, 112, 150):
        seq = list(range(n))
        used = {x for b in block_batches(seq, 28, 4) for x in b}
        rest = leftover_samples(seq, 28, 4)
        assert not used & set(rest) and len(rest) % 7 == 0 and len(used) + len(rest) == n // 7 * 7
        assert leftover_samples(seq, 28, 1) == seq[n // 28 * 28:]


def test_preflight_says_how_much_of_the_split_an_epoch_leaves_out(uneven, synth_tiny, capsys):
    """Shards go whole to ranks, every rank stops at the smallest rank's share, and each rank yields only full
    batches: with few shards per rank an epoch trains on a part of the split (RSTPReid's 19 default shards on
    4 GPUs at batch 64: 84 %), which nothing said. Pre-flight gives the count -- the real loaders' batches --,
    what the rest is, and the fix."""
    from tbps.config import load_config
    from tbps.engine.launcher import preflight

    tok = os.path.join(synth_tiny, "tokenizer")
    base = [f"data.url={uneven}", f"data.tokenizer={tok}", "data.sampling=images", "data.loader_workers=1",
            "train.ray_num_cpus=16", "data.image_size=[48,16]", "data.text_length=24", "data.val_split=train",
            "data.test_split=train"]  # (the uneven set is one split)

    def used(ranks: int, batch: int) -> int:  # what the ranks' real loaders yield in epoch 0
        cfg = load_config("clip_tiny", base + [f"data.batch_size={batch}"]).data
        (n,) = {len(_rank_epoch(cfg, load_tokenizer(tok), r, 0, ranks)) for r in range(ranks)}
        return n * batch * ranks

    # 5 ranks: the greedy shares of shards of 33, 30, 23, 17, ... images are 33, 30, 23, 17 and 17
    preflight(load_config("clip_tiny", base + ["train.num_workers=5", "data.batch_size=8"]))
    err = capsys.readouterr().err
    assert used(5, 8) == 80
    assert ("[tbps] warning: an epoch trains on 80 of the 120 images of the train split (66.7 %; another part is left "
            "out each epoch): 35 as the ranks' shares of its 8 shards differ (each rank stops at the smallest; a "
            "multiple of 5 equal shards evens them: shards.build --min-shards 10); 5 as the ranks' remainders "
            "below a full batch of 8") in err
    # 3 ranks: equal shares of 40, but 16-image batches leave 8 on each
    preflight(load_config("clip_tiny", base + ["train.num_workers=3", "data.batch_size=16"]))
    err = capsys.readouterr().err
    assert used(3, 16) == 96
    assert ("an epoch trains on 96 of the 120 images of the train split (80.0 %; another part is left out each epoch): "
            "24 as the ranks' remainders below a full batch of 16") in err and "shares" not in err
    preflight(load_config("clip_tiny", base + ["train.num_workers=3", "data.batch_size=8"]))  # all 120
    assert used(3, 8) == 120 and "an epoch trains on" not in capsys.readouterr().err
    # one rank at 16: 7 batches, 8 images out -- unless the last, partial batch is kept (data.last_batch=keep)
    preflight(load_config("clip_tiny", base + ["train.num_workers=1", "data.batch_size=16"]))
    assert "an epoch trains on 112 of the 120 images" in capsys.readouterr().err
    preflight(load_config("clip_tiny", base + ["train.num_workers=1", "data.batch_size=16", "data.last_batch=keep"]))
    assert "an epoch trains on" not in capsys.readouterr().err


def test_identity_sampler_needs_the_grouped_layout(synth_tiny, grouped, capsys):
    from tbps.config import Config, ConfigError
    from tbps.engine.launcher import preflight

    tok = load_tokenizer(os.path.join(synth_tiny, "tokenizer"))
    with pytest.raises(ValueError, match="by identity.*shards.build --group-ids.*data.sampler=random"):
        build_train_loader(DataConfig(url=synth_tiny, sampler="identity", batch_size=8), tok)
    with pytest.raises(ValueError, match="data.identity_blocks must be >= 1 and divide data.batch_size"):
        build_train_loader(DataConfig(url=grouped, sampler="identity", batch_size=10, identity_blocks=4), tok)
    with pytest.raises(ValueError, match="data.sampler must be one of random, identity"):
        build_train_loader(DataConfig(url=grouped, sampler="pk"), tok)
    cfg = Config()
    cfg.data.url, cfg.data.sampler, cfg.data.batch_size = synth_tiny, "identity", 8
    cfg.data.tokenizer = os.path.join(synth_tiny, "tokenizer")
    with pytest.raises(ConfigError, match="shards.build --group-ids"):
        preflight(cfg)
    cfg.data.url, cfg.data.sampler = grouped, "random"
    preflight(cfg)
    assert "written by identity (shards.build --group-ids) and data.sampler=random" in capsys.readouterr().err
    cfg.data.sampler, cfg.data.loader_workers = "identity", 2  # K * floor(10 / K) = 8 of each identity's 10 pairs
    preflight(cfg)
    assert ("as the identity sampler's remainders: each identity's pairs past a multiple of "
            "data.instances_per_id=4, as IVT's sampler leaves them, and the ranks' remainders below a full batch of "
            "8") in capsys.readouterr().err
    # one loader worker (the whole rank's shards in one pool)
    assert len(build_train_loader(DataConfig(url=grouped, sampler="identity", batch_size=8, loader_workers=1,
                                             image_size=[48, 16], text_length=24), tok)) > 0


def test_loader_workers_default_to_what_the_worker_cpus_allow():
    from tbps.config import ConfigError, load_config
    from tbps.data.stream import resolve_loader_workers
    from tbps.engine.launcher import resolve_worker_settings

    assert resolve_loader_workers(-1, 8) == 7 and resolve_loader_workers(-1, 1) == 1
    assert resolve_loader_workers(0, 8) == 0 and resolve_loader_workers(3, 8) == 3
    assert resolve_loader_workers(-1) >= 1  # this machine's CPUs
    cfg = load_config("irra")  # paper preset: 8 CPUs per GPU worker
    assert cfg.data.loader_workers == -1
    resolve_worker_settings(cfg)
    assert cfg.data.loader_workers == 7  # fixed on the driver: pre-flight, workers and config.yaml agree
    cfg = load_config("irra_tiny", ["data.loader_workers=-1"])
    resolve_worker_settings(cfg)
    assert cfg.data.loader_workers == 1
    with pytest.raises(ConfigError, match=r"data.loader_workers must be >= -1 \(-1 = what the worker's CPUs allow\)"):
        load_config("irra_tiny", ["data.loader_workers=-3"])
    with pytest.raises(ValueError, match="data.loader_workers must be >= 0, or -1"):
        resolve_loader_workers(-3, 8)


def test_a_two_dataset_mixture_samples_the_weights_and_keeps_identities_apart(tmp_path):
    """data.url = [{url, weight, eval}, ...]: each epoch draws weight / sum of weights of its samples from each
    member; person ids stay apart and train ids are offset (the ID classifier spans the union)."""
    from shards.synth import generate
    from tbps.config import ConfigError, load_config
    from tbps.data import build_tokenizer, build_train_loader, load_tokenizer
    from tbps.data.stream import Mixture

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    generate(out=a, size="tiny", seed=0, min_shards=8, progress=False)  # 120 train images, 40 ids, 8 shards
    generate(out=b, size="tiny", seed=1, min_shards=8, progress=False)
    build_tokenizer(["a person in a red coat"], os.path.join(b, "tokenizer"))
    cfg = load_config("clip_tiny", [f"data.url=[{{url: {a}, weight: 3}}, {{url: {b}, weight: 1, eval: true}}]",
                                    "data.loader_workers=0", "data.batch_size=8", "data.sampling=images"])
    assert cfg.data.url == b and [m.url for m in cfg.data.mix] == [a, b]
    mixture = Mixture(cfg.data.mix, cfg.data.train_split)  # what TrainRun reads once: members' manifests
    assert mixture.num_train_ids == 80
    loader = build_train_loader(cfg.data, load_tokenizer(os.path.join(b, "tokenizer")), mixture=mixture)
    assert loader.stream.mixture is mixture  # not read again
    drawn = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        counts, keys = [0, 0], set()
        for batch in loader:
            for pid, tid, key, shard in zip(batch["pids"].tolist(), batch["train_ids"].tolist(), batch["keys"],
                                            batch["shards"]):
                member = pid % 2
                counts[member] += 1
                assert (0 <= tid < 40) if member == 0 else (40 <= tid < 80), (pid, tid)
                if member == 1:
                    keys.add(key)
        total = sum(counts)
        assert total >= 200  # an epoch holds as many images as both members (240), less the partial batches
        assert abs(counts[0] / total - 0.75) < 0.04, counts  # the weights' shares, within shard granularity
        drawn.append(keys)
    assert drawn[0] != drawn[1]  # member b's subset is redrawn each epoch
    with pytest.raises(ConfigError, match="exactly one member marked eval: true"):
        load_config("clip_tiny", [f"data.url=[{{url: {a}}}, {{url: {b}}}]"])
    with pytest.raises(ConfigError, match=r"data.url\[1\] .*weight must be > 0"):
        load_config("clip_tiny", [f"data.url=[{{url: {a}, eval: true}}, {{url: {b}, weight: 0}}]"])


def test_images_decode_upright_by_their_exif_orientation():
    """Phone photos (tbps.search --images, generic corpora) store their pixels sideways with an EXIF orientation tag;
    they used to be embedded sideways. Every orientation now decodes to the upright image (as PIL's exif_transpose,
    and the browser, show it), also through the reduced-scale JPEG decode; an image without the tag (the person
    datasets' crops) decodes to exactly the pixels it did before."""
    import numpy as np
    from PIL import Image, ImageOps

    from tbps.data.stream import decode_image

    T = Image.Transpose
    upright = Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 200, 3), dtype=np.uint8))
    stored_as = {1: None, 2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE,
                 6: T.ROTATE_90, 7: T.TRANSVERSE, 8: T.ROTATE_270}

    def encode(image, fmt, orientation=None, **kw):
        exif = Image.Exif()
        if orientation:
            exif[0x0112] = orientation
        out = io.BytesIO()
        image.save(out, fmt, exif=exif, **kw) if orientation else image.save(out, fmt, **kw)
        return out.getvalue()

    for orientation, transpose in stored_as.items():
        data = encode(upright if transpose is None else upright.transpose(transpose), "PNG", orientation)
        got = np.asarray(decode_image(data))
        assert np.array_equal(got, np.asarray(upright)), orientation
        assert np.array_equal(got, np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")))

    # a large JPEG shot sideways (orientation 6), decoded for a 384x128 crop at reduced scale: upright and at least
    # the target size in both dimensions (the scale is chosen for the upright sides)
    y, x = np.mgrid[0:1600, 0:800]  # 800 wide, 1600 tall: red grows downwards, green rightwards
    smooth = Image.fromarray(np.stack([y * 255 // 1599, x * 255 // 799, np.full_like(x, 90)], -1).astype(np.uint8))
    data = encode(smooth.transpose(T.ROTATE_90), "JPEG", 6, quality=95)
    got = decode_image(data, (384, 128))
    assert got.size[0] < got.size[1] and got.size[0] >= 128 and got.size[1] >= 384, got.size
    reference = np.asarray(smooth.resize(got.size, Image.BILINEAR), dtype=np.float32)
    assert np.abs(np.asarray(got, dtype=np.float32) - reference).max() < 8

    plain = encode(smooth, "JPEG", quality=90)  # no EXIF: the pixels of before, draft and all
    with Image.open(io.BytesIO(plain)) as im:
        im.draft("RGB", (128, 384))
        before = np.asarray(im.convert("RGB"))
    assert np.array_equal(np.asarray(decode_image(plain, (384, 128))), before)


@pytest.mark.parametrize("decode", ["exact", "reduced"])
def test_loaders_feed_the_official_pipeline_s_pixels(synth_tiny, decode):
    """Train and evaluation images equal the official pipelines' (IRRA's ``read_image``: ``Image.open(path)
    .convert("RGB")``, then ``T.Resize``, ``ToTensor``, ``Normalize``) with ``data.decode: exact``, the default, also
    for JPEGs at least twice the input size, which ``reduced`` decodes at reduced scale (ToyPEDES' 64x192 crops for a
    96x32 input: other pixels, up to several levels off)."""
    from PIL import Image

    from tbps.data.transforms import build_transform

    tok = load_tokenizer(os.path.join(synth_tiny, "tokenizer"))
    cfg = DataConfig(url=synth_tiny, image_size=[96, 32], interpolation="bilinear", flip=0.0, pad=0,
                     random_erasing=0.0, loader_workers=0, batch_size=8, sampling="images", decode=decode)
    official = build_transform(cfg, train=False)
    raw = {s["key"]: s["image"] for split in ("train", "val") for s in read_split(synth_tiny, split)}
    assert all(Image.open(io.BytesIO(b)).size == (64, 192) for b in raw.values())  # twice 32 x 96: reducible

    def reference(keys):
        return torch.stack([official(Image.open(io.BytesIO(raw[k])).convert("RGB")) for k in keys])

    train = next(iter(build_train_loader(cfg, tok)))
    evaluation = next(iter(build_eval_loader(cfg, tok, "val", batch_size=8)))
    for images, keys in ((train["images"], train["keys"]), (evaluation["images"], evaluation["image_key"])):
        gap = (images - reference(keys)).abs().max().item()
        if decode == "exact":
            assert gap < 1e-5, gap
        else:
            assert gap > 3 / 255 / 0.27, gap  # over 3 pixel levels somewhere (std ~0.27 in normalised units)


def test_a_config_saved_before_data_decode_keeps_the_decoding_it_trained_with(tmp_path):
    """Runs saved before ``data.decode`` existed decoded large JPEGs at reduced scale: resuming or evaluating one
    keeps that (the resume check sees no change), a new config decodes exactly."""
    import yaml

    from tbps.checkpoint import read_saved_config
    from tbps.config import load_config, to_dict

    cfg = load_config("irra_tiny")
    assert cfg.data.decode == "exact"
    tree = to_dict(cfg)
    del tree["data"]["decode"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree))
    assert read_saved_config(str(tmp_path)).data.decode == "reduced"
    tree["data"]["decode"] = "exact"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree))
    assert read_saved_config(str(tmp_path)).data.decode == "exact"


def test_ivt_resizes_training_images_bicubically_and_evaluation_images_bilinearly(synth_tiny):
    """IVT's loaders (datasets/make_dataloader.py): ``T.Resize(SIZE_TRAIN, interpolation=3)`` in training,
    ``T.Resize(SIZE_TEST)`` -- torchvision's default, bilinear -- for val and test. The ivt preset's
    ``data.eval_interpolation`` gives the loaders those pixels; null (IRRA, the other presets) follows
    ``data.interpolation``."""
    from PIL import Image
    from torchvision import transforms as T

    from tbps.config import load_config
    from tbps.data.transforms import resize_mode

    ivt = load_config("ivt").data
    assert (ivt.interpolation, ivt.eval_interpolation) == ("bicubic", "bilinear")
    irra = load_config("irra").data
    assert resize_mode(irra, train=True) == resize_mode(irra, train=False) == "bilinear"
    tok = load_tokenizer(os.path.join(synth_tiny, "tokenizer"))
    cfg = DataConfig(url=synth_tiny, image_size=[96, 32], interpolation=ivt.interpolation,
                     eval_interpolation=ivt.eval_interpolation, mean=ivt.mean, std=ivt.std, flip=0.0, pad=0,
                     random_erasing=0.0, loader_workers=0, batch_size=8, sampling="images")
    raw = {s["key"]: s["image"] for split in ("train", "test") for s in read_split(synth_tiny, split)}

    def official(keys, **resize):
        steps = T.Compose([T.Resize((96, 32), **resize), T.ToTensor(), T.Normalize(ivt.mean, ivt.std)])
        return torch.stack([steps(Image.open(io.BytesIO(raw[k])).convert("RGB")) for k in keys])

    train = next(iter(build_train_loader(cfg, tok)))
    test = next(iter(build_eval_loader(cfg, tok, "test", batch_size=8)))
    bicubic = {"interpolation": T.InterpolationMode.BICUBIC}
    torch.testing.assert_close(train["images"], official(train["keys"], **bicubic), atol=1e-5, rtol=0)
    torch.testing.assert_close(test["images"], official(test["image_key"]), atol=1e-5, rtol=0)
    assert (test["images"] - official(test["image_key"], **bicubic)).abs().max() > 0.05  # the choice shows
