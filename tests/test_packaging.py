"""#16 item 7: runtime dependencies apart from extras. The commands import no test tool and no optional package
until a feature needs it; a missing extra is one message naming it (exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib

import pytest

from conftest import ROOT

OPTIONAL = ("optuna", "matplotlib", "faiss", "pytest", "moto")


def test_core_dependencies_hold_no_test_tool_or_optional_package():
    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    core = " ".join(project["dependencies"])
    for name in ("pytest", "moto", "optuna", "matplotlib", "faiss"):
        assert name not in core, name
    extras = project["optional-dependencies"]
    assert {"sweep", "search", "plots", "all", "test"} <= set(extras)
    assert "optuna>=4" in extras["sweep"] and any(d.startswith("faiss") for d in extras["search"])
    assert any(d.startswith("pytest") for d in extras["test"])
    assert '".[all,test]"' in open(os.path.join(ROOT, "run.sh")).read()  # set-up installs everything


def test_commands_import_no_optional_package():
    code = ("import sys\n"
            "import tbps.train, tbps.evaluate, tbps.search, shards.build, shards.verify, tune.sweep\n"
            f"print(sorted(m for m in {OPTIONAL!r} if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout


def test_a_missing_extra_names_what_to_install(monkeypatch):
    from tbps.extras import MissingExtraError, require

    monkeypatch.setitem(sys.modules, "optuna", None)  # an import of it now fails as if it were not installed
    with pytest.raises(MissingExtraError, match=r"tune.sweep needs the Python package 'optuna'.*pip install "
                                                r"'tbps\[sweep\]'"):
        require("optuna", "tune.sweep")


def test_sweep_without_its_extra_exits_2_with_one_message():
    code = ("import sys\nsys.modules['optuna'] = None\nfrom tune.sweep import main\n"
            "sys.exit(main(['--config', 'smoke']))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "pip install 'tbps[sweep]'" in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
