"""Every command fails cleanly (#18 item 6): an unreachable storage endpoint, missing credentials or a bad input
gives one message and exit code 2 — no traceback unless --verbose — from tbps.train, tbps.evaluate, tbps.search,
tune.sweep, shards.build and shards.verify; errors met inside Ray Train workers are unwrapped to the same message."""

from __future__ import annotations

import pytest

from conftest import free_port, fresh_s3_clients
from raw_fixtures import write_raw
from shards.cli import describe


@pytest.fixture
def storage_down(monkeypatch):
    """An endpoint nothing listens on, one botocore attempt, a 1 s retry budget."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("TBPS_STORAGE_RETRY_S", "1")
    fresh_s3_clients()
    yield
    fresh_s3_clients()


@pytest.fixture
def no_credentials(monkeypatch, tmp_path, s3_server):
    """The S3 server is up but the client has no credentials anywhere (environment, files, instance metadata)."""
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    fresh_s3_clients()
    yield
    fresh_s3_clients()


def _commands(tmp_path):
    from shards.build import main as build_main
    from shards.verify import main as verify_main
    from tbps.evaluate import main as evaluate_main
    from tbps.search import main as search_main
    from tbps.train import main as train_main
    from tune.sweep import main as sweep_main

    raw = str(tmp_path / "raw")
    write_raw(raw, "cuhk-pedes")
    return {
        "tbps.train": lambda: train_main(["--config", "irra_tiny", "data.url=s3://tbps/nowhere"]),
        "tbps.evaluate": lambda: evaluate_main(["--checkpoint", "s3://tbps/nowhere/best"]),
        "tbps.search": lambda: search_main(["--checkpoint", "s3://tbps/nowhere/best", "--gallery", "s3://tbps/x",
                                            "a man in a red jacket", "--out", str(tmp_path / "search")]),
        "tune.sweep": lambda: sweep_main(["--config", "smoke", "data.url=s3://tbps/nowhere"]),
        "shards.build": lambda: build_main(["--dataset", "cuhk-pedes", "--root", raw, "--out", "s3://tbps/new",
                                            "--min-shards", "1"]),
        "shards.verify": lambda: verify_main(["s3://tbps/nowhere"]),
    }


def _check(code, err, words):
    assert code == 2, err
    assert "Traceback" not in err, err
    assert any(w in err for w in words), err


@pytest.mark.parametrize("command", ["tbps.train", "tbps.evaluate", "tbps.search", "tune.sweep", "shards.build",
                                     "shards.verify"])
def test_an_unreachable_endpoint_gives_one_message_and_exit_2(command, storage_down, tmp_path, capsys):
    import ray

    code = _commands(tmp_path)[command]()
    _check(code, capsys.readouterr().err, ("storage unavailable", "cannot reach the storage"))
    assert not ray.is_initialized()  # found before any Ray worker started


@pytest.mark.parametrize("command", ["tbps.train", "tbps.evaluate", "tbps.search", "shards.build", "shards.verify"])
def test_missing_credentials_give_one_message_and_exit_2(command, no_credentials, tmp_path, capsys):
    code = _commands(tmp_path)[command]()
    _check(code, capsys.readouterr().err, ("no usable object-storage credentials",))


def test_verbose_adds_the_traceback(storage_down, capsys):
    from tbps.evaluate import main as evaluate_main

    assert evaluate_main(["--checkpoint", "s3://tbps/nowhere/best", "--verbose"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "error: " in err


@pytest.mark.parametrize("command, args, message", [
    ("tbps.evaluate", ["--checkpoint", "ckpt", "--cmc", "-3"], "argument --cmc: must be an integer >= 0, got -3"),
    ("tbps.evaluate", ["--checkpoint", "ckpt", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    ("tbps.search", ["--checkpoint", "ckpt", "--gallery", "g", "q", "--top-k", "0"], "argument --top-k: must be an "
                                                                                     "integer >= 1, got 0"),
    ("tbps.search", ["--checkpoint", "ckpt", "--gallery", "g", "--serve", "--port", "70000"],
     "argument --port: must be an integer in 0..65535, got 70000"),
    ("shards.build", ["--dataset", "csv", "--root", "r", "--out", "o", "--shard-size", "0"],
     "argument --shard-size: must be an integer >= 1, got 0"),
    ("shards.build", ["--dataset", "csv", "--root", "r", "--out", "o", "--min-shards", "x"],
     "argument --min-shards: expected an integer, got 'x'"),
])
def test_numeric_options_outside_their_range_are_usage_errors(command, args, message, capsys):
    """Before any work: a negative --cmc failed with an IndexError after the whole gallery was embedded, and
    --batch-size 0 embedded the split as one batch."""
    import importlib

    main = importlib.import_module(command).main
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_errors_from_train_workers_are_unwrapped():
    from ray.train import WorkerGroupError

    from tbps.data.stream import CorruptShardError

    bad = CorruptShardError("s3://b/d/train-000003.tar", "sha256 0123... differs from the manifest's 4567...")
    wrapped = WorkerGroupError("rank 1 failed", {1: RuntimeError("in the worker")})
    wrapped.worker_failures[1].__cause__ = bad
    assert describe(wrapped) == str(bad)
    assert describe(WorkerGroupError("rank 0 failed", {0: ZeroDivisionError()})) is None  # a bug keeps its trace


def test_commands_run_from_a_directory_holding_shards_and_tune_folders(tmp_path):
    """#16 item 5: a user's shards/ (converted data) and tune/ folders in the working directory do not shadow our
    packages (./run.sh puts the checkout on sys.path as a path entry, ahead of setuptools' editable import hook)."""
    import os
    import subprocess
    import sys

    for name in ("shards", "tune"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "part-000.tar").write_bytes(b"")
    hint = "a folder shadowed the package: re-run ./run.sh setup (it adds tbps-checkout.pth to the venv)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for command in (["tbps.train", "--config", "clip_tiny"], ["tune.sweep", "--config", "smoke"]):
        key = "data_url" if command[0] == "tune.sweep" else "data.url"
        done = subprocess.run([sys.executable, "-m", *command, f"{key}={tmp_path / 'shards'}"], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120)
        assert "ImportError" not in done.stderr, (hint, done.stderr[-2000:])
        assert done.returncode == 2 and "no manifest.json" in done.stderr, done.stderr[-2000:]


def test_a_run_directory_given_for_a_checkpoint_names_its_best(synth_tiny, tmp_path, capsys):
    """A training run's directory (best/, checkpoint_*/, metrics.json) where a model directory is wanted: evaluate
    and search said config.yaml or meta.json was missing, and model.pretrained failed inside every worker with "holds
    no CLIP checkpoint"; each now names the run's best/, and training stops before Ray starts."""
    import ray

    from tbps.evaluate import main as evaluate_main
    from tbps.train import main as train_main

    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    (run / "best" / "meta.json").write_text("{}")
    (run / "metrics.json").write_text("{}")
    hint = f"{run} is a training run's directory, not a checkpoint: give its best val epoch's weights, {run}/best"
    assert evaluate_main(["--checkpoint", str(run), "--data", synth_tiny]) == 2
    assert f"error: {hint}" in capsys.readouterr().err
    assert train_main(["--config", "irra_tiny", f"data.url={synth_tiny}", f"model.pretrained={run}",
                       f"train.storage_path={tmp_path}"]) == 2
    assert f"config error: model.pretrained: {hint}" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_a_bug_raised_while_a_user_error_is_handled_keeps_its_traceback():
    """An error raised inside an ``except`` block carries the handled one as ``__context__``; describe() followed
    it, so a NameError in a handler of FileNotFoundError printed the missing file as a one-line user error (exit 2)
    and hid the bug -- as happened while a handler in tbps/checkpoint.py was written. A bug type stops the walk there
    (an explicit ``raise ... from`` still leads on), and is not retried as a transient storage error either."""
    from shards.cli import run_command
    from shards.storage import is_transient

    def handler_with_a_bug(handled: Exception):
        try:
            raise handled
        except type(handled):
            raise NameError("name 'undefined_name' is not defined")  # as a typo in the handler raises it

    with pytest.raises(NameError) as bug:
        handler_with_a_bug(FileNotFoundError(2, "No such file or directory", "/data/run/meta.json"))
    assert isinstance(bug.value.__context__, FileNotFoundError)
    assert describe(bug.value) is None
    with pytest.raises(NameError):
        run_command("test", lambda: handler_with_a_bug(FileNotFoundError("meta.json")))
    with pytest.raises(NameError) as bug:
        handler_with_a_bug(ConnectionResetError("reset by peer"))
    assert not is_transient(bug.value)
    wrapped = RuntimeError("while reading the checkpoint")  # a deliberate wrapper leads on to the user error
    wrapped.__context__ = FileNotFoundError("meta.json")
    assert describe(wrapped) == "meta.json"
    attribute = AttributeError("x")
    attribute.__cause__ = FileNotFoundError("explicit")  # raise ... from: followed
    assert describe(attribute) == "explicit"
