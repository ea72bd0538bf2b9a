"""shards.build / shards.writer: raw formats -> shards, manifest-last publishing, bad input, S3."""

from __future__ import annotations

import itertools
import json
import os

import pytest

from conftest import read_split
from raw_fixtures import make_records, write_raw
from shards.build import convert
from shards.build import main as build_main
from shards.readers import FORMATS
from shards.writer import DatasetWriter, group_shard_counts, plan_shards


@pytest.mark.parametrize("dataset", sorted(FORMATS))
def test_conversion_round_trips_each_format(tmp_path, dataset):
    root, out = str(tmp_path / "raw"), str(tmp_path / "out")
    records = write_raw(root, dataset)
    assert build_main(["--dataset", dataset, "--root", root, "--out", out, "--shard-size", "3",
                       "--min-shards", "2"]) == 0
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    fmt = FORMATS[dataset]
    assert set(manifest["splits"]) == set(fmt.splits)
    train_pids = sorted({r["id"] for r in records if r["split"] == "train"})
    assert manifest["num_train_ids"] == len(train_pids)
    for split in fmt.splits:
        mine = [r for r in records if r["split"] == split]
        info = manifest["splits"][split]
        assert info["images"] == len(mine)
        assert info["captions"] == sum(len(r["captions"]) for r in mine)
        assert info["ids"] == len({r["id"] for r in mine})
        assert sum(s["samples"] for s in info["shards"]) == len(mine)
        for s in info["shards"]:  # listed sizes and hashes are the real ones
            data = open(os.path.join(out, s["name"]), "rb").read()
            assert len(data) == s["bytes"]
            import hashlib
            assert hashlib.sha256(data).hexdigest() == s["sha256"]
            assert s["name"].startswith(f"{split}-") and s["name"].endswith(".tar")
        back = {s["path"]: s for s in read_split(out, split)}
        assert len(back) == len(mine)
        for r in mine:
            s = back[r[fmt.path_field]]
            assert s["captions"] == r["captions"]
            assert s["pid"] == r["id"]
            assert s["image"] == open(os.path.join(root, "imgs", r[fmt.path_field]), "rb").read()
            expected = train_pids.index(r["id"]) if split == "train" else -1
            assert s["train_id"] == expected


def test_val_from_train_carves_an_identity_disjoint_val_split(tmp_path, capsys):
    """#17 item 5: ICFG-PEDES has no val split; --val-from-train moves a fraction of the train identities (all their
    images) into one, so checkpoints are selected on val, never on test."""
    root, out = str(tmp_path / "raw"), str(tmp_path / "out")
    records = write_raw(root, "icfg-pedes")
    assert build_main(["--dataset", "icfg-pedes", "--root", root, "--out", out, "--shard-size", "3",
                       "--min-shards", "1", "--val-from-train", "0.25"]) == 0
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert set(manifest["splits"]) == {"train", "val", "test"}
    train, val = read_split(out, "train"), read_split(out, "val")
    train_ids, val_ids = {s["pid"] for s in train}, {s["pid"] for s in val}
    assert len(val_ids) == 1 and len(train_ids) == 3 and not train_ids & val_ids  # 25 % of 4 ids, disjoint
    source = [r for r in records if r["split"] == "train"]
    assert len(train) + len(val) == len(source)  # every train image once, in one of the two
    assert manifest["num_train_ids"] == 3 and sorted({s["train_id"] for s in train}) == [0, 1, 2]
    assert all(s["train_id"] == -1 for s in val)
    assert manifest["val_from_train"] == {"fraction": 0.25, "ids": 1, "images": len(val), "seed": 0}
    assert "1 of 4 identities" in capsys.readouterr().err
    # a dataset with its own val split refuses it; a bad fraction is a usage error
    root2 = str(tmp_path / "raw2")
    write_raw(root2, "cuhk-pedes")
    assert build_main(["--dataset", "cuhk-pedes", "--root", root2, "--out", str(tmp_path / "o2"),
                       "--val-from-train", "0.25"]) == 2
    assert "has its own val split" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_main(["--dataset", "icfg-pedes", "--root", root, "--out", out, "--val-from-train", "1.5"])


def test_duplicate_image_records_are_merged_into_one_gallery_image(tmp_path):
    root, out = str(tmp_path / "raw"), str(tmp_path / "out")
    records = make_records("cuhk-pedes")
    dup = dict(records[0], captions=["another caption of the same image."])
    write_raw(root, "cuhk-pedes", records + [dup])
    assert build_main(["--dataset", "cuhk-pedes", "--root", root, "--out", out]) == 0
    back = {s["path"]: s for s in read_split(out, "train")}
    assert len(back) == len([r for r in records if r["split"] == "train"])
    assert back[records[0]["file_path"]]["captions"] == records[0]["captions"] + dup["captions"]


def test_an_evaluation_split_sharing_people_with_train_is_counted_and_warned(tmp_path, capsys):
    """The benchmarks' splits share no person with train; an edited annotation file that moves one test person's
    records into train would make test measure a person the model trained on: counted in the manifest
    (``ids_in_train``, which pre-flight warns about again) and warned at conversion."""
    root, out = str(tmp_path / "raw"), str(tmp_path / "out")
    records = write_raw(root, "cuhk-pedes")
    assert build_main(["--dataset", "cuhk-pedes", "--root", root, "--out", out]) == 0
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["splits"]["val"]["ids_in_train"] == manifest["splits"]["test"]["ids_in_train"] == 0
    assert "also appear in train" not in capsys.readouterr().err
    test_pid = next(r["id"] for r in records if r["split"] == "test")
    moved = next(r for r in records if r["id"] == test_pid)
    moved["split"] = "train"  # one of that person's two images now in train
    write_raw(root, "cuhk-pedes", records)
    assert build_main(["--dataset", "cuhk-pedes", "--root", root, "--out", out]) == 0
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["splits"]["test"]["ids_in_train"] == 1 and manifest["splits"]["val"]["ids_in_train"] == 0
    assert "1 of the 2 person ids of split 'test' also appear in train" in capsys.readouterr().err


def _corrupt(kind: str, root: str):
    records = make_records("cuhk-pedes")
    raw_json = None
    if kind == "bad-json":
        raw_json = json.dumps(records)[:-40] + "}{"
    elif kind == "missing-field":
        del records[3]["captions"]
    elif kind == "empty-caption":
        records[3]["captions"][1] = "   "
    elif kind == "unknown-split":
        records[3]["split"] = "dev"
    write_raw(root, "cuhk-pedes", records, raw_json)
    path = os.path.join(root, "imgs", records[3]["file_path"])
    if kind == "missing-image":
        os.remove(path)
    elif kind == "undecodable-image":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 3])
    return records


EXPECTED = {
    "bad-json": "not valid JSON at line 1",
    "missing-field": "record #3 (train/p1/img1.jpg): missing field(s) 'captions'",
    "empty-caption": "record #3 (train/p1/img1.jpg): caption 1 is empty",
    "unknown-split": "record #3 (train/p1/img1.jpg): unknown split 'dev'",
    "missing-image": "record #3 (train/p1/img1.jpg): image not found",
    "undecodable-image": "record #3 (train/p1/img1.jpg): cannot decode image",
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_bad_input_names_the_record_and_publishes_nothing(tmp_path, capsys, kind):
    root, out = str(tmp_path / "raw"), str(tmp_path / "out")
    _corrupt(kind, root)
    assert build_main(["--dataset", "cuhk-pedes", "--root", root, "--out", out]) == 2
    err = capsys.readouterr().err
    assert "reid_raw.json" in err and EXPECTED[kind] in err, err
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    assert not [f for f in os.listdir(out) if f.endswith(".tar")] if os.path.exists(out) else True


@pytest.mark.parametrize("kind", sorted(set(EXPECTED) - {"bad-json"}))
def test_skip_bad_skips_and_counts(tmp_path, capsys, kind):
    root, out = str(tmp_path / "raw"), str(tmp_path / "out")
    _corrupt(kind, root)
    assert build_main(["--dataset", "cuhk-pedes", "--root", root, "--out", out, "--skip-bad"]) == 0
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["num_skipped"] == 1
    assert manifest["skipped"][0]["record"] == 3
    assert "skipped: " in capsys.readouterr().err
    original = make_records("cuhk-pedes")
    assert manifest["splits"]["train"]["images"] == len([r for r in original if r["split"] == "train"]) - 1


def test_rerun_replaces_dataset_cleanly(tmp_path):
    root, out = str(tmp_path / "raw"), str(tmp_path / "out")
    write_raw(root, "cuhk-pedes")
    assert build_main(["--dataset", "cuhk-pedes", "--root", root, "--out", out, "--shard-size", "1"]) == 0
    many = sorted(f for f in os.listdir(out) if f.endswith(".tar"))
    assert build_main(["--dataset", "cuhk-pedes", "--root", root, "--out", out, "--shard-size", "100",
                       "--min-shards", "1"]) == 0
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    listed = sorted(s["name"] for info in manifest["splits"].values() for s in info["shards"])
    assert sorted(f for f in os.listdir(out) if f.endswith(".tar")) == listed
    assert len(listed) < len(many)


def test_interrupted_write_leaves_no_manifest_and_no_shards(tmp_path):
    out = str(tmp_path / "out")

    def samples():
        for i in range(5):
            yield {"__key__": f"train-{i:08d}", "json": {"pid": i}}
        raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"):
        with DatasetWriter(out, "x", shard_size=2, progress=False) as w:
            w.write_split("train", samples(), 8)
            w.publish()
    assert os.listdir(out) == []


def test_plan_shards_balances_and_covers_workers():
    assert plan_shards(10, 1000, 8) == [2, 2, 1, 1, 1, 1, 1, 1]
    assert plan_shards(2500, 1000, 1) == [834, 833, 833]
    assert plan_shards(3, 1000, 8) == [1, 1, 1]
    assert plan_shards(0, 10, 8) == []


def test_conversion_to_s3_and_streaming_back(tmp_path, s3_server):
    from tbps.config import DataConfig
    from tbps.data import build_eval_loader, build_tokenizer, build_train_loader

    root = str(tmp_path / "raw")
    records = write_raw(root, "rstpreid")
    url = "s3://tbps/datasets/rstp"
    assert build_main(["--dataset", "rstpreid", "--root", root, "--out", url, "--shard-size", "2",
                       "--min-shards", "2"]) == 0
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls("tbps/datasets/rstp"))
    assert "manifest.json" in names
    back = read_split(url, "test")
    assert sorted(s["path"] for s in back) == sorted(r["img_path"] for r in records if r["split"] == "test")

    tok = build_tokenizer([c for r in records for c in r["captions"]], str(tmp_path / "tok"))
    cfg = DataConfig(url=url, image_size=[32, 16], batch_size=2, loader_workers=2, text_length=16)
    keys = []
    for rank in range(2):
        loader = build_train_loader(cfg, tok, rank=rank, world_size=2)
        batches = list(loader)
        assert len(batches) == len(loader) > 0
        keys.append({k for b in batches for k in b["keys"]})
    assert not keys[0] & keys[1]
    gallery = sum(len(b["images"]) for b in build_eval_loader(cfg, tok, "test", batch_size=3))
    assert gallery == len([r for r in records if r["split"] == "test"])


def test_train_records_are_written_in_a_seeded_shuffled_order(tmp_path):
    """Annotation files are often grouped by identity; train shards must not be (batches would hold ~20x more
    same-identity pairs than a global shuffle). Val/test keep annotation order (the gallery order breaks ties)."""
    records = []
    for p in range(12):
        for j in range(3):
            records.append({"split": "train" if p < 10 else "test", "id": p + 1, "file_path": f"p{p}/{j}.jpg",
                            "captions": [f"person {p} view {j}.", f"another caption {p} {j}."]})
    write_raw(str(tmp_path / "raw"), "cuhk-pedes", records)
    orders = []
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        convert("cuhk-pedes", str(tmp_path / "raw"), str(tmp_path / run), shard_size=10, min_shards=1, seed=seed,
                log=open(os.devnull, "w"))
        orders.append([r["path"] for r in read_split(str(tmp_path / run), "train")])
    annotation = [r["file_path"] for r in records if r["split"] == "train"]
    assert sorted(orders[0]) == sorted(annotation) and orders[0] != annotation
    assert orders[0] == orders[1] and orders[0] != orders[2]  # deterministic per seed
    assert [r["path"] for r in read_split(str(tmp_path / "a"), "test")] == \
        [r["file_path"] for r in records if r["split"] == "test"]
    # no shard is one identity's: the first shard holds many identities
    assert len({p.split("/")[0] for p in orders[0][:10]}) >= 5


def test_group_shard_counts_cut_at_group_boundaries():
    assert group_shard_counts([3] * 10, 1000, 4) == [(0, 3), (3, 5), (5, 8), (8, 10)]  # targets 8/15/23 -> 9/15/24
    assert group_shard_counts([1] * 10, 3, 1) == [(0, 3), (3, 6), (6, 8), (8, 10)]  # as plan_shards when groups are 1
    assert group_shard_counts([10, 1, 1], 1000, 8) == [(0, 1), (1, 3)]  # fewer shards than planned: groups are whole
    assert group_shard_counts([5], 2, 8) == [(0, 1)]
    assert group_shard_counts([], 10, 8) == []
    with pytest.raises(ValueError, match="at least one sample"):
        group_shard_counts([2, 0], 10, 8)


def test_group_ids_writes_each_identity_whole_with_its_counts(tmp_path):
    """shards.build --group-ids (data.sampler=identity's layout): identities in a seeded random order, never split
    between shards, and id_counts per shard = [images, captions] of each of its identities, in order."""
    records = []
    for p in range(12):
        for j in range(1 + p % 4):  # 1-4 images per identity, 2 or 3 captions each
            records.append({"split": "train" if p < 10 else "test", "id": p + 1, "file_path": f"p{p}/{j}.jpg",
                            "captions": [f"person {p} view {j} caption {c}." for c in range(2 + (p + j) % 2)]})
    write_raw(str(tmp_path / "raw"), "cuhk-pedes", records)
    assert build_main(["--dataset", "cuhk-pedes", "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "a"),
                       "--group-ids", "--shard-size", "6", "--min-shards", "3"]) == 0
    manifest = json.load(open(tmp_path / "a" / "manifest.json"))
    train = manifest["splits"]["train"]
    assert train["layout"] == "by_identity" and "layout" not in manifest["splits"]["test"]
    import webdataset as wds

    seen_in: dict[int, set] = {}
    pid_order = []
    for shard in train["shards"]:
        samples = list(wds.DataPipeline(wds.SimpleShardList([str(tmp_path / "a" / shard["name"])]),
                                        wds.tarfile_to_samples()))
        metas = [json.loads(s["json"]) for s in samples]
        pids = [m["pid"] for m in metas]
        runs = [p for i, p in enumerate(pids) if i == 0 or p != pids[i - 1]]  # each identity contiguous
        assert len(runs) == len(set(runs))
        counts = [[pids.count(p), sum(len(m["captions"]) for m in metas if m["pid"] == p)] for p in runs]
        assert shard["id_counts"] == counts and shard["samples"] == len(samples)
        for p in runs:
            seen_in.setdefault(p, set()).add(shard["name"])
        pid_order += runs
    assert all(len(v) == 1 for v in seen_in.values()) and len(seen_in) == 10  # whole identities, all of them
    assert len(train["shards"]) >= 3 and pid_order != sorted(pid_order)  # shuffled identity order
    # deterministic per seed; another seed gives another order
    convert("cuhk-pedes", str(tmp_path / "raw"), str(tmp_path / "b"), shard_size=6, min_shards=3, group_ids=True,
            log=open(os.devnull, "w"))
    convert("cuhk-pedes", str(tmp_path / "raw"), str(tmp_path / "c"), shard_size=6, min_shards=3, group_ids=True,
            seed=1, log=open(os.devnull, "w"))
    order = [r["path"] for r in read_split(str(tmp_path / "a"), "train")]
    assert order == [r["path"] for r in read_split(str(tmp_path / "b"), "train")]
    assert order != [r["path"] for r in read_split(str(tmp_path / "c"), "train")]


def test_attribute_phrases_are_stored_per_caption_and_feed_the_word_level(tmp_path, capsys):
    """--attributes FILE (IVT's cuhk_pedes_att.json layout: one item per (image, caption), att = {name: phrase})."""
    from tbps.config import load_config
    from tbps.data import build_train_loader, load_tokenizer
    from tbps.data.stream import DataNeeds

    root, out = str(tmp_path / "raw"), str(tmp_path / "out")
    records = write_raw(root, "cuhk-pedes")
    items = {"train": [], "test": []}
    for r in records:
        for k, c in enumerate(r["captions"]):
            if k == 0:  # first captions only: the others fall back to phrase pieces
                items.setdefault(r["split"], []).append({
                    "file_path": r["file_path"], "id": r["id"], "captions": c, "processed_tokens": [],
                    "att": {"hair": f"hair of {r['id']}", "upper": f"coat {k}"}})
    att = tmp_path / "cuhk_pedes_att.json"
    att.write_text(json.dumps(items))
    assert build_main(["--dataset", "cuhk-pedes", "--root", root, "--out", out, "--shard-size", "3",
                       "--min-shards", "2", "--attributes", str(att)]) == 0
    assert f"attributes: {len(records)} of {sum(len(r['captions']) for r in records)} captions" in \
        capsys.readouterr().err
    back = {s["path"]: s for s in read_split(out, "train")}
    for r in records:
        if r["split"] == "train":
            s = back[r["file_path"]]
            assert s["caption_attributes"] == [[f"hair of {r['id']}", "coat 0"]] + [[]] * (len(r["captions"]) - 1)
    # the training stream draws the word level from them
    from tbps.data.text import build_tokenizer

    build_tokenizer([c for r in records for c in r["captions"]] + ["hair of coat"], str(tmp_path / "tok"))
    cfg = load_config("ivt_tiny", [f"data.url={out}", "data.loader_workers=0", "data.batch_size=2",
                                   "data.sampling=pairs"])
    tok = load_tokenizer(str(tmp_path / "tok"))
    loader = build_train_loader(cfg.data, tok, DataNeeds(views=3, mla=True))
    stream = loader.stream
    words = []
    for sample in itertools.islice(stream_samples(stream), 40):
        words.append((sample["caption_index"], sample["mla"][2]))
    assert any(i == 0 and "hair of" in w for i, w in words)
    assert all("hair of" not in w for i, w in words if i > 0)

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": [{"file_path": "x.jpg", "captions": "c", "att": ["not", "a", "dict"]}]}))
    assert build_main(["--dataset", "cuhk-pedes", "--root", root, "--out", str(tmp_path / "o2"),
                       "--attributes", str(bad)]) == 2
    assert "train[0] (x.jpg): att must map attribute names to phrases" in capsys.readouterr().err
    none = tmp_path / "none.json"
    none.write_text(json.dumps({"train": [{"file_path": "elsewhere.jpg", "captions": "c", "att": {}}]}))
    assert build_main(["--dataset", "cuhk-pedes", "--root", root, "--out", str(tmp_path / "o3"),
                       "--attributes", str(none)]) == 2
    assert "no caption of" in capsys.readouterr().err and not os.path.exists(tmp_path / "o3" / "manifest.json")


def stream_samples(stream):
    """The per-sample dicts a ShardStream makes (before batching), in stream order."""
    import random as _random

    from shards.storage import join
    from tbps.data.stream import pair_passes, pair_stream

    urls = [join(stream.url, s["name"]) for w in stream.assignment()[0] for s in w]
    rng = _random.Random(0)
    for raw in pair_stream(urls, pair_passes(stream.shards), 0, 0, 0, 0):
        yield stream._sample(raw, rng)


def test_shard_members_carry_no_pax_headers(synth_tiny):
    """DatasetWriter's shards (shards.build, shards.synth) hold each member behind one plain header: an int mtime,
    where a float one made Python's tarfile write a PAX extended header before every member."""
    from conftest import assert_plain_tar_members

    assert assert_plain_tar_members(synth_tiny) >= 2 * 120  # jpg + json per sample, every split


def _official_word_count(caption: str) -> int:
    """A reference written from IVT's ``RSTPReID._split_word`` (datasets/rstp_reid.py): split on " ", then a piece
    with "." is split on "." (non-empty parts), elif with "," on ",", elif with "?" on "?", else kept as it is."""
    count = 0
    for piece in caption.split(" "):
        if "." in piece:
            count += len([p for p in piece.split(".") if len(p) > 0])
        elif "," in piece:
            count += len([p for p in piece.split(",") if len(p) > 0])
        elif "?" in piece:
            count += len([p for p in piece.split("?") if len(p) > 0])
        else:
            count += 1
    return count


def test_ivt_word_count_is_the_rstpreid_reader_s():
    from shards.readers import ivt_words

    for caption in ("a man in a red coat.", "a man,  wearing a.b,c shirt? yes", "x..y ,, ?? . , ?", "", " lead",
                    "trail ", "one,two,three.four", "why?not,this", "end.", "tab\tinside word"):
        assert len(ivt_words(caption)) == _official_word_count(caption), caption
    assert ivt_words("a man,  wearing a.b,c shirt? yes") == ["a", "man", "", "wearing", "a", "b,c", "shirt", "yes"]


def test_caption_rule_ivt_on_rstpreid_leaves_out_pairs_over_90_words_in_every_split(tmp_path, capsys):
    """IVT's RSTPReid reader leaves a pair whose caption has more than 90 words out of train, val and test; an
    image whose every caption goes leaves the gallery too. Without --caption-rule every caption is kept."""
    root = str(tmp_path / "raw")
    records = make_records("rstpreid")
    long = " ".join(["word"] * 90) + " end."  # 91 words
    records[0]["captions"][0] = long
    records[2]["captions"][0] = " ".join(["word"] * 89) + " last, one."  # 91 words: "one." -> "one"
    edge = " ".join(["word"] * 89) + " end."  # 90 words: kept
    records[3]["captions"][0] = edge
    test = [r for r in records if r["split"] == "test"]
    test[0]["captions"] = [long, long + " more"]  # every caption over: the image is left out
    write_raw(root, "rstpreid", records)
    assert build_main(["--dataset", "rstpreid", "--root", root, "--out", str(tmp_path / "as-is"),
                       "--min-shards", "1"]) == 0
    assert "caption_rule" not in json.load(open(tmp_path / "as-is" / "manifest.json"))
    assert any(long in s["captions"] for s in read_split(str(tmp_path / "as-is"), "train"))
    out = str(tmp_path / "ivt")
    assert build_main(["--dataset", "rstpreid", "--root", root, "--out", out, "--min-shards", "1",
                       "--caption-rule", "ivt"]) == 0
    assert "train: 2 pair(s) left out; val: nothing changed; test: 2 pair(s) left out, 1 image(s) left out" in \
        capsys.readouterr().err
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["caption_rule"] == {"name": "ivt", "splits": {
        "train": {"cut": 0, "left_out": 2, "images_left_out": 0}, "val": {"cut": 0, "left_out": 0,
                                                                        "images_left_out": 0},
        "test": {"cut": 0, "left_out": 2, "images_left_out": 1}}}
    for split in ("train", "val", "test"):
        expected = {r["img_path"]: [c for c in r["captions"] if _official_word_count(c) <= 90]
                    for r in records if r["split"] == split}
        expected = {path: caps for path, caps in expected.items() if caps}
        back = {s["path"]: s["captions"] for s in read_split(out, split)}
        assert back == expected, split
        assert manifest["splits"][split]["captions"] == sum(map(len, expected.values()))
    assert edge in {c for s in read_split(out, "train") for c in s["captions"]}


def test_caption_rule_ivt_on_icfg_pedes_cuts_before_the_91st_processed_token(tmp_path, capsys):
    """IVT's ICFG-PEDES reader cuts a caption of more than 90 processed tokens where the first occurrence of its 91st
    token begins in the caption string -- a substring search, so the cut can fall inside an earlier word."""
    root, out = str(tmp_path / "raw"), str(tmp_path / "out")
    records = make_records("icfg-pedes")
    filler = ["tall"] * 89

    def caption(words):
        return "The man wears " + " ".join(words) + "."

    def tokens(words):  # ICFG-PEDES.json's processed_tokens: lower case, no punctuation
        return ["the", "man", "wears"] + [w.lower() for w in words]

    for r in records:
        r["processed_tokens"] = [c.lower().rstrip(".").split() for c in r["captions"]]
    inside = filler[:87] + ["an", "zebra", "coat"]  # token 91 is "an": first found inside "man"
    proper = filler[:87] + ["zebra", "red", "coat"]  # token 91 is "zebra": found where it stands
    exact = filler[:87]  # 90 tokens: whole
    records[0]["captions"], records[0]["processed_tokens"] = [caption(inside)], [tokens(inside)]
    records[1]["captions"], records[1]["processed_tokens"] = [caption(proper)], [tokens(proper)]
    records[2]["captions"], records[2]["processed_tokens"] = [caption(exact)], [tokens(exact)]
    test = next(i for i, r in enumerate(records) if r["split"] == "test")
    records[test]["captions"], records[test]["processed_tokens"] = [caption(proper)], [tokens(proper)]
    assert len(tokens(inside)) == 93 and tokens(inside)[90] == "an" and len(tokens(exact)) == 90
    write_raw(root, "icfg-pedes", records)
    assert build_main(["--dataset", "icfg-pedes", "--root", root, "--out", out, "--min-shards", "1",
                       "--caption-rule", "ivt"]) == 0
    assert "train: 2 caption(s) cut; test: 1 caption(s) cut" in capsys.readouterr().err
    train = {s["path"]: s["captions"] for s in read_split(out, "train")}
    assert train[records[0]["file_path"]] == ["The m"]
    assert train[records[1]["file_path"]] == ["The man wears " + " ".join(filler[:87])]
    assert train[records[2]["file_path"]] == [caption(exact)]
    assert {s["path"]: s["captions"] for s in read_split(out, "test")}[records[test]["file_path"]] == \
        ["The man wears " + " ".join(filler[:87])]
    assert json.load(open(os.path.join(out, "manifest.json")))["caption_rule"]["splits"]["train"]["cut"] == 2

    # a 91st token not in the caption (IVT's str.index fails), or no processed_tokens: the record is named
    missing = [dict(r) for r in records]
    missing[1]["processed_tokens"] = [tokens(filler[:87] + ["giraffe", "red", "coat"])]
    write_raw(root, "icfg-pedes", missing)
    assert build_main(["--dataset", "icfg-pedes", "--root", root, "--out", str(tmp_path / "o2"),
                       "--caption-rule", "ivt"]) == 2
    assert "record #1 (train/p0/img1.jpg): --caption-rule ivt: caption 0 has 93 processed tokens and its token " \
           "91, 'giraffe', is not in the caption text" in capsys.readouterr().err
    assert build_main(["--dataset", "icfg-pedes", "--root", root, "--out", str(tmp_path / "o3"),
                       "--caption-rule", "ivt", "--skip-bad", "--min-shards", "1"]) == 0
    assert json.load(open(tmp_path / "o3" / "manifest.json"))["skipped"][0]["record"] == 1
    del missing[1]["processed_tokens"]
    write_raw(root, "icfg-pedes", missing)
    assert build_main(["--dataset", "icfg-pedes", "--root", root, "--out", str(tmp_path / "o4"),
                       "--caption-rule", "ivt"]) == 2
    assert "record #1 (train/p0/img1.jpg): --caption-rule ivt needs 'processed_tokens'" in capsys.readouterr().err
    assert build_main(["--dataset", "icfg-pedes", "--root", root, "--out", str(tmp_path / "o5"),
                       "--min-shards", "1"]) == 0  # as-is: processed_tokens are not read
    # CUHK-PEDES (IVT keeps its captions whole) and corpora refuse the rule
    write_raw(str(tmp_path / "cuhk"), "cuhk-pedes")
    assert build_main(["--dataset", "cuhk-pedes", "--root", str(tmp_path / "cuhk"), "--out", str(tmp_path / "o6"),
                       "--caption-rule", "ivt"]) == 2
    assert "--caption-rule ivt applies to icfg-pedes and rstpreid" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_main(["--dataset", "jsonl", "--root", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "o7"),
                    "--caption-rule", "ivt"])


def test_preflight_warns_when_the_shards_caption_rule_is_not_the_method_s(synth_tiny, tmp_path, capsys):
    """IVT on ICFG-PEDES or RSTPReid shards built as-is, and another method on shards built with IVT's rule: a
    warning naming the shards and the fix; the matching pairs say nothing. tbps.evaluate warns the same."""
    from conftest import renamed_dataset
    from tbps.config import load_config
    from tbps.engine.launcher import preflight, run_plan

    icfg = renamed_dataset(synth_tiny, tmp_path / "icfg", "icfg-pedes")
    ruled = renamed_dataset(icfg, tmp_path / "ruled", "icfg-pedes")
    manifest = json.loads((tmp_path / "ruled" / "manifest.json").read_text())
    (tmp_path / "ruled" / "manifest.json").write_text(json.dumps({**manifest, "caption_rule": {"name": "ivt"}}))
    cuhk = renamed_dataset(synth_tiny, tmp_path / "cuhk", "cuhk-pedes")
    base = ["data.loader_workers=1"]
    for preset, url, expected in (("ivt_tiny", icfg, "keeps every caption as written; IVT's icfg-pedes loader cuts"),
                                  ("irra_tiny", ruled, "was built with IVT's caption rule"),
                                  ("ivt_tiny", ruled, None), ("irra_tiny", icfg, None), ("ivt_tiny", cuhk, None)):
        capsys.readouterr()
        preflight(load_config(preset, base + [f"data.url={url}"]))
        err = capsys.readouterr().err
        assert (expected in err and url in err and "--caption-rule" in err) if expected else "caption" not in err, \
            (preset, url, err)
    cfg = load_config("ivt_tiny", base + [f"data.url={ruled}"])  # --check's plan says so
    assert f"train split 'train' of {ruled} (icfg-pedes, built with IVT's caption rule): " in \
        run_plan(cfg, preflight(cfg))[1]
