"""Optional dependencies, grouped as pip extras in pyproject.toml (``sweep``, ``search``, ``plots``; ``all``): a
missing one is one clear message naming the extra to install, raised where the feature starts, not a bare
ImportError from deep inside it. ./run.sh installs every extra."""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRA_OF = {"optuna": "sweep", "matplotlib": "plots", "faiss": "search"}  # import name -> pip extra


class MissingExtraError(ImportError):
    is_user_error = True  # shards.cli: one message and exit code 2


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` saying which extra provides it and what needs it."""
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = EXTRA_OF.get(top, "all")
        raise MissingExtraError(f"{purpose} needs the Python package {top!r}, which is not installed here: "
                                f"pip install 'tbps[{extra}]' (./run.sh installs every extra)") from e


def available(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False
