"""Generic image-text corpora (shards/corpus.py, `shards.build --dataset jsonl|csv|wds`): with and without person ids
and splits, bad rows as clear errors or skipped with counts, parallel writers, resume after an interruption, and
datasets the training loader reads."""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile

import pytest

from conftest import assert_plain_tar_members, read_split
from shards.corpus import convert_corpus
from shards.readers import BadRecord
from shards.verify import verify


@pytest.fixture(scope="module")
def toy(synth_tiny):
    """ToyPEDES train + test samples (image bytes, captions, pid)."""
    return read_split(synth_tiny, "train")[:40], read_split(synth_tiny, "test")[:12]


def _images(folder, samples) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    names = []
    for s in samples:
        name = f"{s['key']}.jpg"
        with open(os.path.join(folder, name), "wb") as f:
            f.write(s["image"])
        names.append(name)
    return names


def _read(url: str) -> dict[str, list[dict]]:
    from tbps.data import load_manifest

    manifest = load_manifest(url)
    return {split: read_split(url, split) for split in manifest["splits"]} | {"manifest": manifest}


def test_jsonl_corpus_with_ids_and_splits(toy, tmp_path, capsys):
    train, test = toy
    names = _images(tmp_path / "imgs", train + test)
    lines = []
    for i, (s, name) in enumerate(zip(train + test, names)):
        rec = {"image": f"imgs/{name}", "person_id": f"person-{s['pid']}", "split": "train" if i < 40 else "test"}
        if i % 3 == 0:
            rec["caption"] = s["captions"][0]
        else:
            rec["captions"] = s["captions"]
        if i == 5:
            rec["image"] = str(tmp_path / "imgs" / name)  # an absolute path works too
        lines.append(json.dumps(rec))
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "out")
    manifest = convert_corpus("jsonl", str(tmp_path / "corpus.jsonl"), out, shard_size=16, min_shards=2, workers=2,
                              work_dir=str(tmp_path / "work"), log=io.StringIO())
    assert not os.path.exists(tmp_path / "work")  # published: the work folder is gone
    assert verify(out)["bad"] == {}
    assert assert_plain_tar_members(out) >= 2 * 52  # no PAX header per member (an int mtime)
    assert [len(s) for s in (manifest["splits"]["train"]["shards"], manifest["splits"]["test"]["shards"])] == [3, 2]
    got = _read(out)
    persons = {s["pid"] for s in train}
    assert manifest["num_train_ids"] == len(persons) and manifest["splits"]["train"]["ids"] == len(persons)
    assert [len(got["train"]), len(got["test"])] == [40, 12]
    pid_of = {}
    for i, (src, out_s) in enumerate(zip(train + test, got["train"] + got["test"])):  # order kept
        assert out_s["image"] == src["image"]
        assert out_s["captions"] == (src["captions"][:1] if i % 3 == 0 else src["captions"])
        assert pid_of.setdefault(src["pid"], out_s["pid"]) == out_s["pid"]  # one person, one id
        assert out_s["train_id"] == (-1 if i >= 40 else out_s["train_id"])
    assert sorted({s["train_id"] for s in got["train"]}) == list(range(len(persons)))
    assert manifest["splits"]["test"]["ids_in_train"] == 0  # ToyPEDES' splits share no person
    # a test record of a train person: counted and warned about (evaluation would measure a person it trained on)
    shared = json.loads(lines[45])
    shared["person_id"] = f"person-{train[0]['pid']}"
    lines[45] = json.dumps(shared)
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    log = io.StringIO()
    manifest = convert_corpus("jsonl", str(tmp_path / "corpus.jsonl"), str(tmp_path / "shared"), shard_size=16,
                              min_shards=2, workers=2, work_dir=str(tmp_path / "work"), log=log)
    test_ids = manifest["splits"]["test"]["ids"]
    assert manifest["splits"]["test"]["ids_in_train"] == 1
    assert f"[corpus] warning: 1 of the {test_ids} person ids of split 'test' also appear in train" in log.getvalue()
    from tbps.config import load_config
    from tbps.engine.launcher import preflight

    capsys.readouterr()  # and before training on it: once, though val and test are the same split here
    preflight(load_config("clip_tiny", [f"data.url={tmp_path / 'shared'}", "data.tokenizer=clip", "data.val_split=test",
                                        "data.batch_size=4", "data.loader_workers=0"]))
    assert capsys.readouterr().err.count(f"[tbps] warning: 1 of the {test_ids} person ids of split 'test'") == 1


def test_csv_corpus_without_ids_or_splits_trains(toy, tmp_path, synth_tiny):
    from tbps.config import load_config
    from tbps.data import build_train_loader, load_tokenizer

    train, _ = toy
    names = _images(tmp_path / "photos", train[:24])
    with open(tmp_path / "corpus.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "captions"])
        for i, (s, name) in enumerate(zip(train, names)):
            if i == 1:
                w.writerow([f"photos/{name}", "", json.dumps(s["captions"])])  # a JSON list
            elif i == 2:
                w.writerow([f"photos/{name}", "", "|".join(s["captions"])])  # |-separated
            else:
                w.writerow([f"photos/{name}", s["captions"][0], ""])
    out = str(tmp_path / "out")
    manifest = convert_corpus("csv", str(tmp_path / "corpus.csv"), out, shard_size=8, min_shards=2, workers=1,
                              work_dir=str(tmp_path / "work"), log=io.StringIO())
    got = _read(out)["train"]
    assert list(manifest["splits"]) == ["train"] and len(got) == 24
    assert manifest["num_train_ids"] == 24 and len({s["pid"] for s in got}) == 24  # each image its own identity
    assert got[1]["captions"] == train[1]["captions"] and got[2]["captions"] == train[2]["captions"]
    # the training loader reads it
    cfg = load_config("clip_tiny", [f"data.url={out}", "data.loader_workers=0", "data.batch_size=8",
                                    f"data.tokenizer={os.path.join(synth_tiny, 'tokenizer')}"])
    batch = next(iter(build_train_loader(cfg.data, load_tokenizer(cfg.data.tokenizer))))
    assert batch["images"].shape[0] == 8 and (batch["train_ids"] >= 0).all()


def test_bad_rows_are_clear_errors_or_skipped_with_counts(toy, tmp_path):
    from shards.build import main as build_main

    train, _ = toy
    names = _images(tmp_path / "imgs", train[:10])
    rows = [json.dumps({"image": f"imgs/{n}", "caption": s["captions"][0]}) for s, n in zip(train, names)]
    rows[2] = '{"image": "imgs/x.jpg", "caption": '  # line 3: not JSON
    rows[4] = json.dumps({"image": f"imgs/{names[4]}"})  # line 5: no caption
    rows[6] = json.dumps({"image": "imgs/missing.jpg", "caption": "a man"})  # line 7: no such image
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(rows) + "\n")
    with pytest.raises(BadRecord, match=r"corpus\.jsonl: record #3: not valid JSON"):
        convert_corpus("jsonl", str(corpus), str(tmp_path / "a"), work_dir=str(tmp_path / "w1"), log=io.StringIO())
    rows[2] = json.dumps({"image": f"imgs/{names[2]}", "caption": "fine"})
    rows[4] = json.dumps({"image": f"imgs/{names[4]}", "caption": "fine too"})
    corpus.write_text("\n".join(rows) + "\n")
    with pytest.raises(BadRecord, match=r"corpus\.jsonl: record #7 \(imgs/missing\.jpg\): image not found"):
        convert_corpus("jsonl", str(corpus), str(tmp_path / "a"), workers=1, work_dir=str(tmp_path / "w2"),
                       log=io.StringIO())
    assert not os.path.exists(tmp_path / "a" / "manifest.json")  # nothing published
    rows[4] = json.dumps({"image": f"imgs/{names[4]}"})
    corpus.write_text("\n".join(rows) + "\n")
    code = build_main(["--dataset", "jsonl", "--root", str(corpus), "--out", str(tmp_path / "b"), "--skip-bad",
                       "--workers", "1", "--min-shards", "2", "--work-dir", str(tmp_path / "w3")])
    assert code == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["num_skipped"] == 2 and {s["record"] for s in manifest["skipped"]} == {5, 7}
    assert manifest["splits"]["train"]["images"] == 8


def test_an_interrupted_conversion_resumes(toy, tmp_path):
    train, _ = toy
    names = _images(tmp_path / "imgs", train[:32])
    good = (tmp_path / "imgs" / names[30]).read_bytes()
    (tmp_path / "imgs" / names[30]).write_bytes(good[:200])  # truncated: the last shard fails
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"image": f"imgs/{n}", "captions": s["captions"]}) + "\n"
                              for s, n in zip(train, names)))
    out, work = tmp_path / "out", str(tmp_path / "work")
    with pytest.raises(BadRecord, match=r"record #31 \(imgs/.*\.jpg\): cannot decode image"):
        convert_corpus("jsonl", str(corpus), str(out), shard_size=8, min_shards=1, workers=1, work_dir=work,
                       log=io.StringIO())
    assert not (out / "manifest.json").exists()
    done = {p: os.path.getmtime(out / p) for p in ("train-000000.tar", "train-000001.tar", "train-000002.tar")}
    (tmp_path / "imgs" / names[30]).write_bytes(good)  # fixed; the same command again
    log = io.StringIO()
    manifest = convert_corpus("jsonl", str(corpus), str(out), shard_size=8, min_shards=1, workers=1, work_dir=work,
                              log=log)
    assert "resuming" in log.getvalue() and "3 of 4 shards already written" in log.getvalue()
    assert {p: os.path.getmtime(out / p) for p in done} == done  # not written again
    assert manifest["splits"]["train"]["images"] == 32 and verify(str(out))["bad"] == {}


def test_webdataset_tars_laion_style(toy, tmp_path):
    train, _ = toy
    root = tmp_path / "laion"
    root.mkdir()
    for t in range(2):
        with tarfile.open(root / f"part-{t:05d}.tar", "w") as tar:
            for i, s in enumerate(train[t * 6:(t + 1) * 6]):
                fields = {"jpg": s["image"]}
                if i % 2:
                    fields["txt"] = s["captions"][0].encode()
                else:
                    fields["json"] = json.dumps({"caption": s["captions"][0], "person_id": s["pid"]}).encode()
                for ext, data in fields.items():
                    info = tarfile.TarInfo(f"{t:05d}{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    manifest = convert_corpus("wds", str(root), str(tmp_path / "out"), min_shards=1, workers=2,
                              work_dir=str(tmp_path / "work"), log=io.StringIO())
    got = _read(str(tmp_path / "out"))["train"]
    assert len(manifest["splits"]["train"]["shards"]) == 2  # one per input tar
    assert [g["image"] for g in got] == [s["image"] for s in train[:12]]
    assert [g["captions"] for g in got] == [s["captions"][:1] for s in train[:12]]
