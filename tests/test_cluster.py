"""Cluster launch: the launcher YAMLs pass Ray's own validation (and a broken copy does not), the KubeRay manifests
name real modules/configs/keys, and a real two-node Ray cluster on loopback trains with one worker per node, each
reading a disjoint part of the shards from the S3 server, through the loss of a node and its return (elastic
workers)."""

from __future__ import annotations

import copy
import glob
import importlib.util
import json
import os
import re
import shlex

import pytest
import yaml

from conftest import ROOT, SECRET, files_holding

CLUSTER = os.path.join(ROOT, "cluster")
LAUNCHER = ["aws.yaml", "gcp.yaml"]


def _ray_validate(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_yaml_passes_ray_validation(name):
    config = yaml.safe_load(open(os.path.join(CLUSTER, name)))
    prepared = _ray_validate(config)
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "Train workers must not land on the head"
    gpu_types = [t for t, v in types.items() if v["resources"].get("GPU", 0) > 0]
    assert len(gpu_types) >= 2 and any(types[t]["resources"]["GPU"] == 8 for t in gpu_types)
    assert all(types[t]["min_workers"] == 0 for t in gpu_types), "GPU nodes autoscale from zero"
    assert 0 < prepared["idle_timeout_minutes"] <= 30
    start = " ".join(prepared["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start, "the dashboard must not listen on public interfaces"
    setup = " ".join(prepared["setup_commands"])
    assert "cluster/constraints.txt" in setup and '-e "$HOME/tbps[all]"' in setup  # every extra: sweeps, search
    assert prepared["file_mounts"] == {"~/tbps": "."}
    if name == "aws.yaml":
        assert all("IamInstanceProfile" in v["node_config"] for v in types.values())
    else:
        assert all(v["node_config"].get("serviceAccounts") for v in types.values())


@pytest.mark.parametrize("name", LAUNCHER)
@pytest.mark.parametrize("breakage", ["cpu_type", "unknown_field", "missing_head_type"])
def test_broken_launcher_yaml_fails_ray_validation(name, breakage):
    import jsonschema

    config = yaml.safe_load(open(os.path.join(CLUSTER, name)))
    if breakage == "cpu_type":
        config["available_node_types"]["head"]["resources"]["CPU"] = "eight"
    elif breakage == "unknown_field":
        config["idle_timeout"] = 10
    else:
        config["head_node_type"] = "no_such_type"
    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError)):
        _ray_validate(config)


def test_no_credentials_in_cluster_files():
    pattern = re.compile(r"AKIA[0-9A-Z]{12,}|aws_secret_access_key|secret_access_key|private_key|BEGIN [A-Z ]*PRIVATE"
                         r"|password\s*[:=]", re.I)
    files = [p for p in glob.glob(os.path.join(CLUSTER, "**", "*"), recursive=True) if os.path.isfile(p)]
    assert len(files) >= 8
    for path in files:
        text = open(path).read()
        assert not pattern.search(text), f"{path} looks like it holds a credential"


def _entrypoint_checks(entrypoint: str):
    from tbps.config import load_config
    from tune.space import load_sweep

    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"], entrypoint
    module = argv[2]
    assert importlib.util.find_spec(module) is not None, f"no module {module}"
    assert argv[3] == "--config"
    config, overrides = argv[4], argv[5:]
    if module == "tbps.train":
        cfg = load_config(config, overrides)  # every key and type is checked
        assert cfg.train.use_gpu and cfg.train.storage_path.startswith("s3://")
    elif module == "tune.sweep":
        spec = load_sweep(config, overrides)
        assert spec.storage_path.startswith("s3://") and spec.gpus > 0
    else:
        raise AssertionError(f"unexpected entrypoint module {module}")
    return module


def test_kuberay_manifests_parse_and_name_real_modules_and_configs():
    import ray

    modules = set()
    kinds = []
    for path in sorted(glob.glob(os.path.join(CLUSTER, "kuberay", "*.yaml"))):
        for doc in yaml.safe_load_all(open(path)):
            assert doc["apiVersion"] == "ray.io/v1", path
            kinds.append(doc["kind"])
            spec = doc["spec"]
            cluster = spec["rayClusterSpec"] if doc["kind"] == "RayJob" else spec
            assert cluster["rayVersion"] == ray.__version__, path
            head = cluster["headGroupSpec"]
            assert head.get("serviceType", "ClusterIP") == "ClusterIP", "the dashboard stays cluster-internal"
            assert head["rayStartParams"].get("num-gpus") == "0"
            for group in [head] + cluster["workerGroupSpecs"]:
                pod = group["template"]["spec"]
                assert pod["serviceAccountName"] == "tbps"  # storage access via the service account, no keys
                for c in pod["containers"]:
                    assert "env" not in c or not any("SECRET" in e["name"] for e in c["env"])
            for group in cluster["workerGroupSpecs"]:
                gpus = group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
                assert int(gpus) >= 1
            if doc["kind"] == "RayJob":
                modules.add(_entrypoint_checks(spec["entrypoint"]))
    assert kinds.count("RayCluster") == 1 and kinds.count("RayJob") == 2
    assert modules == {"tbps.train", "tune.sweep"}
    docker = open(os.path.join(CLUSTER, "kuberay", "Dockerfile")).read()
    assert f"rayproject/ray:{ray.__version__}" in docker


def _pins(path: str) -> dict:
    """name (normalised) -> version of every `name==version` line."""
    pins = {}
    for line in open(path):
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)\s*$", line)
        if m:
            pins[re.sub(r"[-_.]+", "-", m[1]).lower()] = m[2]
    return pins


LOCK = os.path.join(ROOT, "requirements-lock.txt")


def test_cluster_constraints_pin_the_versions_ci_installs():
    """The cluster nodes get what CI tests with: cluster/constraints.txt agrees with requirements-lock.txt (what
    run.sh installs) on every package both pin, and with run.sh's default TORCH_SPEC on torch and torchvision."""
    cluster, lock = _pins(os.path.join(CLUSTER, "constraints.txt")), _pins(LOCK)
    for pkg in ("ray", "deepspeed", "transformers", "tokenizers", "timm", "webdataset", "s3fs", "fsspec"):
        assert pkg in cluster and pkg in lock, pkg
    assert {k: v for k, v in cluster.items() if k in lock and lock[k] != v} == {}
    torch_spec = re.search(r'TORCH_SPEC=\$\{TORCH_SPEC:-"([^"]*)"\}', open(os.path.join(ROOT, "run.sh")).read())[1]
    assert {f"{k}=={cluster[k]}" for k in ("torch", "torchvision")} == set(torch_spec.split())


def test_installed_versions_are_the_lock():
    """run.sh installed the locked versions (not whatever PyPI has newest today), so a release upstream cannot change
    what CI tests. Skipped on an interpreter or platform the lock was not resolved for (run.sh then falls back to the
    newest compatible releases, with a warning)."""
    import platform
    import sys
    from importlib.metadata import PackageNotFoundError, version

    m = re.search(r"for CPython (\d+\.\d+)\.\d+ on (\S+) (\S+?);", open(LOCK).read(1000))
    here = (".".join(platform.python_version_tuple()[:2]), sys.platform, platform.machine())
    if m.groups() != here:
        pytest.skip(f"the lock is resolved for Python {m[1]} on {m[2]} {m[3]}; this is Python {' on '.join(here)}")
    off = {}
    for pkg, want in _pins(LOCK).items():
        try:
            have = version(pkg)
        except PackageNotFoundError:  # a dependency of another platform or Python (environment markers)
            continue
        if have != want:
            off[pkg] = f"{have} installed, {want} locked"
    assert off == {}, f"{off}: re-run ./run.sh setup (it installs with -c requirements-lock.txt)"
    for pkg in ("ray", "deepspeed", "transformers", "timm", "webdataset", "moto"):
        version(pkg)


# ------------------------------------------------------------------------------------------------ two nodes
@pytest.mark.slow
def test_two_node_cluster_loses_a_node_continues_on_one_worker_and_grows_back(s3_server, synth_tiny, tmp_path):
    """Two raylets on loopback, one CPU each, elastic workers [1, 2] at ZeRO-1 reading from the S3 server: after
    the first epoch the second node is killed (a spot preemption), the run continues on one worker from the last
    checkpoint (optimizer state resharded), the node comes back, Ray Train grows the run back to two workers (one
    per node, disjoint shards) and it finishes; metrics.json records every epoch's world size."""
    import subprocess
    import sys

    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    url = "s3://tbps/datasets/two-node"
    fs.put(synth_tiny.rstrip("/") + "/", url[5:] + "/", recursive=True)
    env = {**os.environ, **s3_server["env"], "RAY_AUTH_MODE": "disabled", "PYTHONPATH": ROOT}
    script = tmp_path / "two_node.py"
    script.write_text(TWO_NODE_DRIVER)
    info_path = tmp_path / "nodes.json"  # a file: worker log lines reach stdout asynchronously, after any marker
    out = subprocess.run([sys.executable, str(script), url, str(tmp_path / "runs"), str(info_path)], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    (tmp_path / "driver.log").write_text(log)
    assert out.returncode == 0, log[-6000:]
    info = json.loads(info_path.read_text())
    assert [e[0] for e in info["events"]] == ["removed", "added"], info["events"]
    metrics = json.load(open(tmp_path / "runs" / "two-node" / "metrics.json"))
    sizes = [h["world_size"] for h in metrics["history"]]
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3, 4], metrics["history"]
    assert sizes == [2, 1, 2, 2], f"world sizes per epoch: {sizes}"
    assert "world size changed: 2 -> 1" in log and "world size changed: 1 -> 2" in log, log[-6000:]
    assert "DeepSpeed universal checkpoint" in log, "ZeRO-1 optimizer state was not resharded"
    # the last worker group: one worker on each of the two live nodes (the head and the returned one)
    workers = sorted(metrics["workers"], key=lambda w: w["rank"])
    assert [w["rank"] for w in workers] == [0, 1]
    assert [w["niceness"] for w in workers] == [0, 0], "Train workers at normal priority, not Ray's default 15"
    assert {w["node_id"] for w in workers} == set(info["nodes"]), "one worker on each of the two nodes"
    a, b = (set(w["shards"]) for w in workers)
    assert a and b and not a & b, f"ranks read overlapping shards: {a & b}"
    manifest = json.loads(fs.cat(url[5:] + "/manifest.json"))
    train = {s["name"] for s in manifest["splits"]["train"]["shards"]}
    assert a | b <= train
    assert set(metrics["test"]) >= {"R1", "mAP"}
    # no credential written anywhere: run outputs (config, metrics, checkpoints, TensorBoard) and Ray's session logs
    assert s3_server["env"]["AWS_SECRET_ACCESS_KEY"] == SECRET
    assert os.listdir(os.path.join(info["session_dir"], "logs"))
    assert files_holding(SECRET, str(tmp_path / "runs"), info["session_dir"]) == []


TWO_NODE_DRIVER = r'''
import json, os, sys, threading, time
url, storage, info_path = sys.argv[1], sys.argv[2], sys.argv[3]
run_dir = os.path.join(storage, "two-node")
hold = {e: os.path.join(os.path.dirname(info_path), f"hold-epoch{e}") for e in (1, 2)}
for path in hold.values():
    open(path, "w").close()
# the workers (started by the raylets below, so they inherit this) wait at the start of epoch 2 and of epoch 3
# (0-based 1, 2) while these files exist: the test changes the cluster at known points; Ray Train gives up on
# placing a worker group (its placement group) after 3 s instead of 60
os.environ["TBPS_FAULT_HOLD"] = ",".join(f"two-node:{e}:{p}" for e, p in hold.items())
os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "3"

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from tbps.config import load_config
from tbps.engine.launcher import fit, forwarded_env

env = forwarded_env()  # endpoint and region; the credentials reach the raylets (started from here) by inheritance
# two raylets on loopback, one CPU each: a 2-worker run can only place one worker per node
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True,
                                                         "dashboard_host": "127.0.0.1"})
second = cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
ray.init(address=cluster.address, runtime_env={"env_vars": env})
assert len([n for n in ray.nodes() if n["Alive"]]) == 2

cfg = load_config("clip_tiny", [f"data.url={url}", "data.batch_size=8", "train.epochs=4", "train.num_workers=[1,2]",
                                "train.zero_stage=1", "train.elastic_resize_interval_s=1", "train.max_failures=2",
                                f"train.storage_path={storage}", "train.run_name=two-node"])
results = []
run = threading.Thread(target=lambda: results.append(fit(cfg)))  # the driver; nodes come and go from this thread
run.start()


def wait_for(what, predicate, timeout=240):
    deadline = time.time() + timeout
    while run.is_alive() and time.time() < deadline:
        try:
            if predicate():
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"gave up waiting for {what}: the run {'is held' if run.is_alive() else 'ended'}")


def latest_checkpoint_epoch():
    with open(os.path.join(run_dir, "checkpoint_manager_snapshot.json")) as f:
        return json.load(f)["latest_checkpoint_result"]["metrics"]["epoch"]


def history():
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return json.load(f)["history"]


def refresh_ray_resource_view():
    # Ray Train's elastic policy sees the cluster through Ray Data's AutoscalingCoordinator actor, which re-reads
    # the nodes every 20 s; ask it to now rather than wait
    ray.get(ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")._tick.remote())


def live_train_workers():
    return len(list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]))


events = []
wait_for("the first epoch's checkpoint", lambda: latest_checkpoint_epoch() == 1)  # 2 workers, held at epoch 2
cluster.remove_node(second)  # the second node is lost, and its worker with it
refresh_ray_resource_view()
events.append(["removed", time.time()])
os.remove(hold[1])
wait_for("an epoch on one worker", lambda: history()[-1]["world_size"] == 1)  # 1 worker, held at epoch 3
cluster.add_node(num_cpus=1)  # capacity comes back
refresh_ray_resource_view()
events.append(["added", time.time()])
wait_for("two workers again", lambda: live_train_workers() == 2)
os.remove(hold[2])
run.join()
assert results and results[0].error is None, results
with open(info_path, "w") as f:
    json.dump({"nodes": [n["NodeID"] for n in ray.nodes() if n["Alive"]], "events": events,
               "session_dir": ray._private.worker._global_node.get_session_dir_path()}, f)
ray.shutdown()
cluster.shutdown()
'''
