"""Cluster launch: the launcher YAMLs pass Ray's own validation (and a broken copy does not), the KubeRay manifests
name real modules/configs/keys, and a real two-node Ray cluster on loopback trains with one worker per node, each
reading a disjoint part of the shards from the S3 server."""

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


def test_constraints_pin_what_we_test_with():
    from importlib.metadata import version

    pins = dict(line.split("==") for line in open(os.path.join(CLUSTER, "constraints.txt"))
                if "==" in line and not line.startswith("#"))
    for pkg in ("ray", "deepspeed", "torch", "webdataset", "transformers", "timm"):
        assert pins[pkg].strip() == version(pkg).split("+")[0], pkg


# ------------------------------------------------------------------------------------------------ two nodes
@pytest.mark.slow
def test_two_node_cluster_one_worker_per_node_disjoint_s3_shards(s3_server, synth_tiny, tmp_path):
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
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    info = json.loads(info_path.read_text())
    metrics = json.load(open(tmp_path / "runs" / "two-node" / "metrics.json"))
    workers = sorted(metrics["workers"], key=lambda w: w["rank"])
    assert [w["rank"] for w in workers] == [0, 1]
    assert [w["niceness"] for w in workers] == [0, 0], "Train workers at normal priority, not Ray's default 15"
    assert {w["node_id"] for w in workers} == set(info["nodes"]), "one worker on each of the two nodes"
    a, b = (set(w["shards"]) for w in workers)
    assert a and b and not a & b, f"ranks read overlapping shards: {a & b}"
    manifest = json.loads(fs.cat(url[5:] + "/manifest.json"))
    train = {s["name"] for s in manifest["splits"]["train"]["shards"]}
    assert a | b <= train
    assert set(metrics["test"]) >= {"R1", "mAP"} and metrics["history"][-1]["epoch"] == 1
    # no credential written anywhere: run outputs (config, metrics, checkpoints, TensorBoard) and Ray's session logs
    assert s3_server["env"]["AWS_SECRET_ACCESS_KEY"] == SECRET
    assert os.listdir(os.path.join(info["session_dir"], "logs"))
    assert files_holding(SECRET, str(tmp_path / "runs"), info["session_dir"]) == []


TWO_NODE_DRIVER = r'''
import json, os, sys
import ray
from ray.cluster_utils import Cluster

url, storage, info_path = sys.argv[1], sys.argv[2], sys.argv[3]
from tbps.engine.launcher import forwarded_env

env = forwarded_env()  # endpoint and region; the credentials reach the raylets (started from here) by inheritance
# two raylets on loopback, one CPU each: a 2-worker run can only place one worker per node
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True,
                                                         "dashboard_host": "127.0.0.1"})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
ray.init(address=cluster.address, runtime_env={"env_vars": env})
nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
assert len(nodes) == 2, nodes

from tbps.config import load_config
from tbps.engine.launcher import fit

cfg = load_config("clip_tiny", [f"data.url={url}", "data.batch_size=8", "train.epochs=1", "train.num_workers=2",
                                f"train.storage_path={storage}", "train.run_name=two-node"])
result = fit(cfg)
assert result.error is None, result.error
with open(info_path, "w") as f:
    json.dump({"nodes": nodes, "session_dir": ray._private.worker._global_node.get_session_dir_path()}, f)
ray.shutdown()
cluster.shutdown()
'''
