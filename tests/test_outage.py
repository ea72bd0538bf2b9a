"""Storage outages (#18 item 2): reads of shards and checkpoints and uploads of run outputs retry transient
object-storage errors with backoff (bounded, logged) and then give the same bytes as an undisturbed read; an outage
longer than the budget stops with one message naming the object. The outage is real: the moto S3 process is reached
through a TCP proxy on loopback that the test takes down (connections reset, new ones refused) and brings back."""

from __future__ import annotations

import json
import os
import threading
import time

import fsspec
import pytest
import torch

from conftest import fresh_s3_clients
from netfault import FlakyProxy
from shards.storage import StorageUnavailableError, is_transient, with_retries
from tbps.config import DataConfig
from tbps.data import build_eval_loader, build_train_loader, load_tokenizer


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory, synth_tiny):
    """ToyPEDES tiny in 16 train shards of 7-8 images: shards are still being read late in an epoch."""
    from shards.synth import generate

    out = str(tmp_path_factory.mktemp("outage") / "shards")
    generate(out=out, size="tiny", seed=0, min_shards=16, progress=False)
    return out


@pytest.fixture
def flaky_s3(s3_server, many_shards, monkeypatch):
    """That dataset on S3, and the client pointed at it through a proxy that can go down. botocore's own retries
    are set to one attempt so that the outage reaches tbps's retry layer instead of being absorbed."""
    url = f"s3://{s3_server['bucket']}/outage/tiny16"
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    if not fs.exists(f"{url}/manifest.json"):
        fs.put(many_shards.rstrip("/") + "/", url, recursive=True)
    proxy = FlakyProxy(int(s3_server["endpoint"].rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("TBPS_STORAGE_RETRY_S", "60")
    fresh_s3_clients()  # s3fs clients made before this test talk to the server directly
    yield url, proxy
    proxy.close()
    fresh_s3_clients()


def _outage(proxy: FlakyProxy, seconds: float) -> threading.Thread:
    def run():
        proxy.down()
        time.sleep(seconds)
        proxy.up()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _cfg(url: str, workers: int) -> DataConfig:
    return DataConfig(url=url, image_size=[48, 16], batch_size=8, loader_workers=workers, text_length=24,
                      shuffle_buffer=8, sampling="images")


def _batches(loader) -> list[dict]:
    return [{k: v.clone() for k, v in b.items() if torch.is_tensor(v)} for b in loader]


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_transient_errors_are_told_apart_from_real_ones():
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(code, status):
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")
    assert is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert is_transient(ConnectionResetError())
    assert is_transient(TimeoutError())
    assert is_transient(client_error("SlowDown", 503))
    wrapped = OSError("cannot read")
    wrapped.__cause__ = ConnectionRefusedError()
    assert is_transient(wrapped)
    for error in (FileNotFoundError("gone"), PermissionError("denied"), client_error("AccessDenied", 403),
                  ValueError("bad tar"), OSError("disk full")):
        assert not is_transient(error), error


def test_retry_budget_and_pass_through():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "data"
    assert with_retries("read", "s3://b/k", flaky, budget=10) == "data" and len(calls) == 3
    with pytest.raises(FileNotFoundError):  # not retried
        with_retries("read", "s3://b/k", lambda: (_ for _ in ()).throw(FileNotFoundError("s3://b/k")), budget=10)
    t = time.monotonic()
    with pytest.raises(StorageUnavailableError, match=r"read s3://b/k failed \d+ time\(s\).*TBPS_STORAGE_RETRY_S"):
        with_retries("read", "s3://b/k", lambda: (_ for _ in ()).throw(ConnectionRefusedError()), budget=1.5)
    assert time.monotonic() - t < 5


@pytest.mark.parametrize("workers", [0, 2])
def test_an_outage_mid_epoch_gives_the_same_batches(flaky_s3, many_shards, synth_tiny, workers, capfd):
    url, proxy = flaky_s3
    tok = load_tokenizer(os.path.join(synth_tiny, "tokenizer"))
    reference = _batches(build_train_loader(_cfg(many_shards, workers), tok))  # the same data from local disk
    got, outage = [], None
    for i, batch in enumerate(build_train_loader(_cfg(url, workers), tok)):
        got.append({k: v.clone() for k, v in batch.items() if torch.is_tensor(v)})
        if i == 0:  # the first batch is in: the storage goes away for 3 s while the rest is read
            outage = _outage(proxy, 3.0)
    outage.join()
    _same(got, reference)
    err = capfd.readouterr().err
    assert "[tbps] storage: read shard s3://" in err and "retry 1 in" in err, err[-2000:]


def test_an_outage_during_evaluation_reads_and_checkpoint_reads(flaky_s3, many_shards, synth_tiny, tmp_path, capfd):
    from tbps.checkpoint import load_model_state

    url, proxy = flaky_s3
    tok = load_tokenizer(os.path.join(synth_tiny, "tokenizer"))
    reference = _batches(build_eval_loader(_cfg(many_shards, 0), tok, "test", batch_size=16))
    state = {"w": torch.randn(64, 8), "b": torch.arange(5)}
    local = tmp_path / "model.pt"
    torch.save(state, local)
    ckpt = f"{url.rsplit('/', 1)[0]}/ckpt"
    fsspec.filesystem("s3").put(str(local), f"{ckpt}/model.pt")
    outage = _outage(proxy, 2.0)
    time.sleep(0.2)
    loaded = load_model_state(ckpt)  # started while the storage is down
    got = _batches(build_eval_loader(_cfg(url, 0), tok, "test", batch_size=16))
    outage.join()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    _same(got, reference)
    assert f"read {ckpt}/model.pt failed" in capfd.readouterr().err


def test_an_outage_longer_than_the_budget_stops_with_one_message(flaky_s3, synth_tiny, monkeypatch):
    url, proxy = flaky_s3
    monkeypatch.setenv("TBPS_STORAGE_RETRY_S", "2")
    tok = load_tokenizer(os.path.join(synth_tiny, "tokenizer"))
    loader = iter(build_train_loader(_cfg(url, 0), tok))
    next(loader)  # the manifest and the first shards are in
    proxy.down()
    t = time.monotonic()
    with pytest.raises(StorageUnavailableError, match=r"storage unavailable: read shard s3://.*\.tar failed"):
        for _ in loader:
            pass
    assert time.monotonic() - t < 30


def test_an_outage_during_an_upload_of_run_outputs(flaky_s3, capfd):
    from shards.storage import read_json
    from tbps.engine.checkpoint import RunOutputs

    url, proxy = flaky_s3
    outputs = RunOutputs(url.rsplit("/", 1)[0], "run-outage")
    outage = _outage(proxy, 2.0)
    time.sleep(0.2)
    outputs.write_json("metrics.json", {"best": {"R1": 12.5}})  # staged locally, uploaded while the storage is down
    outage.join()
    assert read_json(f"{outputs.url}/metrics.json") == {"best": {"R1": 12.5}}
    assert f"upload {outputs.url}/metrics.json failed" in capfd.readouterr().err


def test_best_on_object_storage_is_never_a_mix_of_two_epochs(s3_server, monkeypatch):
    """#18 item 6: replacing best/ on S3 deletes its meta.json first and uploads it last, so an upload cut short
    leaves a directory readers refuse (no meta.json), not new weights under the old epoch's metadata."""
    import s3fs

    from tbps.engine.checkpoint import RunOutputs

    fresh_s3_clients()
    outputs = RunOutputs("s3://tbps/atomic", "run")

    def build(epoch):
        def write(path):
            os.makedirs(path)
            for name, body in (("model.pt", f"weights {epoch}"), ("config.yaml", "x: 1"),
                               ("meta.json", json.dumps({"epoch": epoch}))):
                with open(os.path.join(path, name), "w") as f:
                    f.write(body)
        return write

    outputs.replace_dir("best", build(1))
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    assert json.loads(fs.cat("tbps/atomic/run/best/meta.json")) == {"epoch": 1}
    order = []
    real_put = outputs.fs.put

    def put(src, dst, *a, **kw):  # the upload dies after the first file of epoch 2
        order.append(dst.rsplit("/", 1)[1])
        if len(order) > 1:
            raise PermissionError("upload cut short")
        return real_put(src, dst, *a, **kw)

    monkeypatch.setattr(outputs.fs, "put", put)
    with pytest.raises(PermissionError):
        outputs.replace_dir("best", build(2))
    fs.invalidate_cache()
    assert order[0] != "meta.json"  # the marker goes last
    assert not fs.exists("tbps/atomic/run/best/meta.json")  # refused by readers, not a mix of epochs 1 and 2
    monkeypatch.setattr(outputs.fs, "put", real_put)
    outputs.replace_dir("best", build(2))
    fs.invalidate_cache()
    assert json.loads(fs.cat("tbps/atomic/run/best/meta.json")) == {"epoch": 2}
    assert fs.cat("tbps/atomic/run/best/model.pt") == b"weights 2"
