"""How every command ends on bad input: one message and exit code 2, a traceback only with ``--verbose``.

A *user error* is something the person running the command can fix — a missing or damaged file, checkpoint or
shard, a bad split or key, missing or rejected storage credentials, an endpoint that cannot be reached — as opposed to
a bug, which keeps its traceback (exit code 1). Ray Train's worker-group errors are unwrapped to the worker's own
error first, so a corrupt shard met inside a Train worker reads the same as one met by ``tbps.evaluate``.
"""

from __future__ import annotations

import sys
import traceback
from typing import Callable

from .storage import StorageUnavailableError, error_chain, is_transient

_FILE_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
_CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                      "NoAuthTokenError", "TokenRetrievalError"}
_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                 "AllAccessDisabled", "403"}
_MISSING_CODES = {"NoSuchBucket", "NoSuchKey", "404"}


def describe(error: BaseException) -> str | None:
    """The one-line message for a user error (looking inside wrapped errors), or None for anything else."""
    for e in error_chain(error):
        names = {c.__name__ for c in type(e).__mro__}
        if names & _CREDENTIAL_ERRORS:
            return (f"no usable object-storage credentials ({type(e).__name__}: {e}): set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or run where an instance role provides them")
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response:
            code = str(response["Error"].get("Code", ""))
            if code in _DENIED_CODES:
                return f"the storage refused access ({code}: {e}): check the credentials and the bucket's policy"
            if code in _MISSING_CODES:
                return f"not found on the storage ({code}: {e})"
    for e in error_chain(error):
        if isinstance(e, StorageUnavailableError):
            return str(e)
        if getattr(e, "is_user_error", False):  # CorruptShardError, ConfigError, WeightLoadError, BadRecord
            return str(e)
    for e in error_chain(error):
        if is_transient(e):
            return f"cannot reach the storage ({type(e).__name__}: {e}): check the endpoint (AWS_ENDPOINT_URL) " \
                   "and the network"
        if isinstance(e, (*_FILE_ERRORS, ValueError, KeyError)):
            return str(e) if not isinstance(e, KeyError) else f"missing key {e}"
    return None


def error_line(error: BaseException, limit: int = 300) -> str:
    """An error in one line, for a table or a summary: the message of a user error found in it (``describe``: a bad
    shard, storage, a diverged run), else the innermost error's own last line as ``Type: message`` -- not the first
    line of Ray's wrappers ("ray::ImplicitFunc.train() (pid=..., ip=...)", "Training failed due to worker errors:"),
    which says nothing of what went wrong."""
    import re

    wrappers: tuple = ()
    try:
        from ray.exceptions import RayTaskError
        from ray.train import TrainingFailedError

        wrappers = (RayTaskError, TrainingFailedError)
    except ImportError:  # no Ray here: nothing of it to look through
        pass
    message = describe(error)
    if message is None:
        inner = next((e for e in error_chain(error) if not isinstance(e, wrappers)), error)
        lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
        message = f"{type(inner).__name__}: {lines[-1]}" if lines else type(inner).__name__
    message = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(message.split()))  # Ray colours its task names
    return message if len(message) <= limit else message[:limit - 3] + "..."


def at_least(low: int, high: int | None = None):
    """An argparse ``type``: an integer of at least ``low`` (and at most ``high``); anything else is a usage error
    naming the option (argparse adds its name) and exit code 2."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {value}")
        return value

    return parse


def add_verbose(parser) -> None:
    parser.add_argument("--verbose", action="store_true", help="print the full traceback of an error")


def run_command(prog: str, body: Callable[[], int], verbose: bool = False,
                after: str | None = None) -> int:
    """``body()``'s exit code; a user error prints ``error: <message>`` on one line (and ``after``, e.g. "nothing was
    published") and returns 2, Ctrl-C returns 130, anything else keeps its traceback. ``verbose`` prints the
    traceback of user errors too."""
    try:
        return body()
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        message = describe(e)
        if message is None:
            raise
        if verbose:
            traceback.print_exc()
        print(f"error: {message}" + (f"\n{after}" if after else ""), file=sys.stderr)
        return 2
