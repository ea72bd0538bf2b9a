"""Host synchronisations in a training step, found with or without a GPU.

A CUDA step runs asynchronously: the host queues kernels and goes on, as long as nothing makes it wait for the
device. What makes it wait: reading a value back (``.item()``, ``bool(t)``, ``float(t)``, ``tolist()``, ``.cpu()``),
an operator whose output shape depends on the data (``nonzero``, boolean-mask indexing, ``masked_select``,
``unique``, ``repeat_interleave`` without ``output_size``), and a copy from pageable host memory to the device
(``torch.tensor(..., device="cuda")``; ``.to("cuda")`` without ``non_blocking``). Each such wait drains the queue,
and the device then idles while the host launches the next kernels.

``HostSyncAudit`` records each of these in its body with the first source line outside torch that asked for it.
On a CUDA device it records them on device tensors only, as ``torch.cuda.set_sync_debug_mode`` would. On CPU it
cannot tell a tensor that a GPU run would keep on the host from one it would put on the device, so it treats every
tensor as a device tensor (a conservative superset; host-side work by design is for the caller to name, e.g. a
draw from a CPU generator), and it cannot see ``.to(device)`` copies (a CPU-to-CPU ``.to`` is no copy at all). That
is what lets CI check on CPU that the training step asks the device for nothing (tests/test_syncs.py), and
``bench/train_step.py`` count a step's synchronisations on CPU. Compiled graphs are not looked into: audit the
eager step.
"""

from __future__ import annotations

import os
import traceback
from collections import Counter
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# operators that read device memory on the host: a value, or a data-dependent output shape
_READS = {"_local_scalar_dense": "value read", "nonzero": "data-dependent shape",
          "masked_select": "data-dependent shape", "unique": "data-dependent shape",
          "_unique": "data-dependent shape", "_unique2": "data-dependent shape",
          "unique_dim": "data-dependent shape", "unique_consecutive": "data-dependent shape",
          "equal": "value read", "is_nonzero": "value read", "allclose": "value read"}
_TORCH = os.path.dirname(torch.__file__) + os.sep
_HERE = os.path.abspath(__file__)


@dataclass(frozen=True)
class Sync:
    kind: str  # "value read" | "data-dependent shape" | "host-to-device copy" | "device-to-host copy"
    op: str  # the operator or function
    where: str  # "path:line (function)" of the first frame outside torch

    def __str__(self) -> str:
        return f"{self.kind} ({self.op}) at {self.where}"


def _caller(root: str) -> tuple[str, int, str]:
    """(path, line, function) of the first frame outside torch and this module; the path relative to ``root``, or
    to site-packages for an installed package."""
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path == _HERE or path.startswith(_TORCH) or frame.filename.startswith("<"):
            continue
        shown = os.path.relpath(path, root) if path.startswith(root + os.sep) else path
        if "site-packages" + os.sep in shown:
            shown = shown.split("site-packages" + os.sep, 1)[1]
        return shown, frame.lineno, frame.name
    return "?", 0, "?"


class HostSyncAudit:
    """Records the host synchronisations of the code in its body (``syncs``, in order). ``device``: the step's
    device (CPU: every tensor counts, see the module's docstring). ``host_side``: locations (``path:function``
    or a path) of host-side work by design, left out. ``host_tensors``: tensors a GPU run keeps on the host (e.g.
    the step counts of torch's non-capturable optimizers), whose reads are no synchronisation there: left out."""

    def __init__(self, device: torch.device | str = "cpu", host_side: tuple[str, ...] = (), root: str | None = None,
                 host_tensors=()):
        self.device = torch.device(device)
        self.host_side = tuple(host_side)
        self._host_refs = tuple(host_tensors)  # held, so that their ids stay theirs while the audit runs
        self._host_tensors = {id(t) for t in self._host_refs}
        self.root = os.path.abspath(root or os.getcwd())
        self.syncs: list[Sync] = []
        self._modes = ()

    # -- what counts
    def _on_device(self, t) -> bool:
        if not isinstance(t, torch.Tensor) or id(t) in self._host_tensors:
            return False
        return self.device.type == "cpu" or t.device.type == self.device.type

    def _record(self, kind: str, op: str) -> None:
        path, line, function = _caller(self.root)
        if any(h in (path, f"{path}:{function}") for h in self.host_side):
            return
        self.syncs.append(Sync(kind, op, f"{path}:{line} ({function})"))

    def _dispatch(self, func, args, kwargs) -> None:
        name = func._schema.name.split("::")[-1]
        if name in _READS and any(self._on_device(a) for a in args):
            self._record(_READS[name], name)
        elif name == "repeat_interleave" and self._on_device(args[0]) and kwargs.get("output_size") is None \
                and func._overloadname == "Tensor":
            self._record("data-dependent shape", "repeat_interleave")
        elif name == "index" and self._on_device(args[0]) and isinstance(args[1], (list, tuple)) and any(
                i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
            self._record("data-dependent shape", "boolean-mask index")

    def _function(self, func, args, kwargs) -> None:
        name = getattr(func, "__name__", "")
        if name == "tolist" and self._on_device(args[0]):
            self._record("value read", "tolist")
        elif name in ("tensor", "as_tensor") and kwargs.get("device") is not None:
            target = torch.device(kwargs["device"])
            if target.type == self.device.type:
                self._record("host-to-device copy", f"torch.{name}(..., device=)")
        elif name in ("cpu", "numpy") and self._on_device(args[0]):  # on CUDA: a device tensor's
            self._record("device-to-host copy", name)
        elif name in ("to", "cuda") and self.device.type != "cpu" and isinstance(args[0], torch.Tensor):
            src, non_blocking = args[0].device, bool(kwargs.get("non_blocking", False))
            target = _target_device(args[1:], kwargs) if name == "to" else torch.device("cuda")
            if target is not None and src.type == "cpu" and target.type != "cpu" and not (
                    non_blocking and args[0].is_pinned()):
                self._record("host-to-device copy", f"{name} from {'pageable' if not args[0].is_pinned() else 'pinned'}"
                             f" memory{'' if non_blocking else ', blocking'}")
            elif target is not None and src.type != "cpu" and target.type == "cpu":
                self._record("device-to-host copy", name)

    # -- context manager
    def __enter__(self) -> "HostSyncAudit":
        audit = self

        class _Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                audit._dispatch(func, args, kwargs)
                return func(*args, **kwargs)

        class _Function(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                audit._function(func, args, kwargs)
                return func(*args, **kwargs)

        self._modes = (_Function(), _Dispatch())
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)
        self._modes = ()

    # -- reading
    def report(self) -> str:
        if not self.syncs:
            return "no host synchronisation"
        lines = [f"{len(self.syncs)} host synchronisation(s):"]
        lines += [f"  {n} x {s}" for s, n in Counter(self.syncs).most_common()]
        return "\n".join(lines)


def _target_device(args, kwargs) -> torch.device | None:
    target = kwargs.get("device")
    for a in args:
        if isinstance(a, (str, torch.device)):
            target = a
            break
        if isinstance(a, torch.Tensor):
            target = a.device
            break
    return torch.device(target) if target is not None else None
