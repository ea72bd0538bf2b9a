"""Shared fixtures: a real S3 server (moto) on loopback, tiny datasets and tokenizers built on the fly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "tbps-test-secret-6c1f9e0b2d7a"  # the S3 server fixture's AWS_SECRET_ACCESS_KEY
# Ray Train's controller polls its workers every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so it notices a finished
# or failed worker group up to 2 s late; the suite runs some 25 Ray Train runs. Every Ray process the tests start
# inherits this (a faster poll, not a different behaviour).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def fresh_s3_clients() -> None:
    """Forget the s3fs clients made so far (tbps's per-process ones and fsspec's cache): the next ones read
    AWS_ENDPOINT_URL and the credentials from the environment as it is now."""
    from shards import storage

    storage._FS_BY_PROCESS.clear()
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()


def files_holding(secret: str, *roots: str) -> list[str]:
    """Every file under ``roots`` whose bytes contain ``secret``."""
    hits = []
    for root in roots:
        for d, _, names in os.walk(root):
            for n in names:
                path = os.path.join(d, n)
                try:
                    with open(path, "rb") as f:
                        if secret.encode() in f.read():
                            hits.append(path)
                except OSError:
                    pass
    return hits


# ports Ray gives its own components by default (GCS, dashboard, client server, dashboard agent, worker range): a
# port a test hands to `ray start` or to a server beside Ray must not be one of them
RAY_DEFAULT_PORTS = {6379, 8265, 10001, 52365, *range(10002, 20000)}


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in RAY_DEFAULT_PORTS:
            return port


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server process on 127.0.0.1 (free port); clients find it through AWS_ENDPOINT_URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto server did not start")
            time.sleep(0.1)
    # distinctive credentials (moto takes any): tests search every file a run writes for the secret (#18 item 7)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "AKIATBPSTESTKEY00001",
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="tbps")
    try:
        yield {"endpoint": endpoint, "bucket": "tbps", "env": env}
    finally:
        proc.terminate()
        proc.wait(10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def synth_tiny(tmp_path_factory):
    """ToyPEDES 'tiny' as shards, with a word-level tokenizer built from its train captions."""
    from shards.synth import generate
    from tbps.data import build_tokenizer, split_captions

    out = str(tmp_path_factory.mktemp("synth") / "shards")
    generate(out=out, size="tiny", seed=0, min_shards=4, progress=False)
    captions = split_captions(out, "train")
    build_tokenizer(captions, os.path.join(out, "tokenizer"))
    return out


def assert_plain_tar_members(directory) -> int:
    """Every member of every shard in a local dataset directory is a plain ustar header + its data, with mtime 0: no
    PAX extended header before it (Python's tarfile writes one for a float mtime: 1 KB more per member, and twice the
    time to read the shard back). Returns the number of members checked."""
    import glob
    import tarfile

    count = 0
    for path in sorted(glob.glob(os.path.join(str(directory), "*.tar"))):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                assert m.pax_headers == {} and m.mtime == 0, (path, m.name, m.pax_headers, m.mtime)
                count += 1
    return count


def renamed_dataset(url: str, out, dataset: str) -> str:
    """A copy of a published dataset whose manifest names it ``dataset`` (as shards.build --dataset does), e.g.
    ``icfg-pedes``: what tbps picks per dataset (IVT's word-level rule, its evaluation protocol) reads that name."""
    import shutil

    shutil.copytree(url, out)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "dataset": dataset}))
    return str(out)


def read_split(url: str, split: str) -> list[dict]:
    """Every sample of a published split, decoded metadata plus raw image bytes."""
    import webdataset as wds

    from shards.storage import join
    from tbps.data import load_manifest
    from tbps.data.stream import split_shards

    out = []
    for shard in split_shards(load_manifest(url), split):
        for s in wds.DataPipeline(wds.SimpleShardList([join(url, shard["name"])]), wds.tarfile_to_samples()):
            meta = json.loads(s["json"])
            meta["image"] = next(s[k] for k in ("jpg", "png") if k in s)
            meta["key"] = s["__key__"]
            out.append(meta)
    return out
