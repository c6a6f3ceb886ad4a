"""Running traces on NDIF, or on nnsight's local simulation of it.

``remote`` is ``None`` (local forwards and hooks), ``"ndif"`` (nnsight's ``remote=True``: the
trace is serialized and runs on the NDIF server) or ``"local"`` (the same serialization, run
here: a dry run that shows a study will run remotely before it waits in a queue).

Only :mod:`behaviorlens.interventions.access` and :mod:`behaviorlens.interventions.kinds`
travel with a request (by value: their source ships); every other project module is absent on
the server. :class:`StrictSimulation` makes the local simulation hide the installed
``behaviorlens`` package as well (nnsight's own hides only modules outside site-packages, and an
editable install would slip through), so a trace that reaches for any other project code fails
here exactly as it would on NDIF.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .errors import BehaviorLensError

MODES = ("local", "ndif")
SHIPPED = ("behaviorlens.interventions.access", "behaviorlens.interventions.kinds", "behaviorlens.interventions.server",
           "behaviorlens.circuits.split")
CRITICAL = ("nnsight", "transformers", "torch")


def mode(remote: Any, where: str = "remote") -> str | None:
    """``None``, ``"local"`` or ``"ndif"`` from a flag, an experiment value or a string."""
    value = remote.lower() if isinstance(remote, str) else remote
    if value in (None, False, "false"):
        return None
    if value is True or value in ("ndif", "true"):
        return "ndif"
    if value == "local":
        return "local"
    raise BehaviorLensError(f"{where}: {remote!r} is not one of local, ndif, true, false")


def ship() -> None:
    """Register the modules a request needs to carry by value."""
    import importlib

    import nnsight

    for name in SHIPPED:
        nnsight.register(importlib.import_module(name))


class _Blocker:
    """An import finder that refuses the project's package, as a server without it would."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.split(".")[0] == "behaviorlens":
            raise ModuleNotFoundError(f"No module named {name!r} (hidden: NDIF does not have it)")


def strict_simulation(lm: Any) -> Any:
    """nnsight's local NDIF simulation, with the ``behaviorlens`` package hidden too."""
    from nnsight.intervention.backends.local import LocalSimulationBackend

    class StrictSimulation(LocalSimulationBackend):
        def _hide_local_modules(self) -> dict:
            hidden = super()._hide_local_modules()
            for name in list(sys.modules):
                if name.split(".")[0] == "behaviorlens":
                    hidden["modules"][name] = sys.modules.pop(name)
            sys.meta_path.insert(0, _Blocker())
            return hidden

        def _restore(self, hidden: dict) -> None:
            sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Blocker)]
            super()._restore(hidden)

    return StrictSimulation(lm)


def trace_kwargs(remote: str | None, lm: Any) -> dict[str, Any]:
    """The keyword arguments that send an nnsight trace to ``remote``."""
    if remote is None:
        return {}
    ship()
    if remote == "local":
        return {"backend": strict_simulation(lm)}
    return {"remote": True}


def check_ndif(repo_id: str) -> None:
    """Before loading for NDIF: a key, matching versions and a served model, else one line."""
    import nnsight
    from nnsight.ndif import compare, is_model_running

    if not nnsight.CONFIG.API.APIKEY:
        raise BehaviorLensError("--remote: no NDIF API key; set NDIF_API_KEY or run "
                                "nnsight.CONFIG.set_default_api_key(KEY) once")
    try:
        diff = compare()
    except Exception as err:  # noqa: BLE001 (no network, server down, bad host)
        raise BehaviorLensError(f"--remote: cannot reach NDIF at {nnsight.CONFIG.API.HOST}: "
                                f"{type(err).__name__}: {err}") from None
    bad = [p for p in CRITICAL if p in diff.mismatches]
    if bad:
        raise BehaviorLensError("--remote: versions differ from NDIF's: " + ", ".join(
            f"{p} {diff.local['packages'].get(p)} here, {diff.remote['packages'].get(p)} there" for p in bad))
    if not is_model_running(repo_id):
        raise BehaviorLensError(f"--remote: NDIF does not serve {repo_id!r} now; see nnsight.status() "
                                "for the models it runs")


def refuse(model: Any, what: str, why: str) -> None:
    """One line, when ``model`` runs remotely, for a step that has no trace path."""
    if getattr(model, "remote", None) is not None:
        raise BehaviorLensError(f"{what} cannot run remotely ({model.remote}): {why}; run it on a local model")


@dataclass
class RequestCount:
    """The requests nnsight serialized (one per trace or session sent) and their bytes."""

    requests: int = 0
    bytes: int = 0


@contextmanager
def counting_requests() -> Iterator[RequestCount]:
    """Counts every request nnsight serializes while the block runs (NDIF, or its simulation)."""
    from nnsight.schema.request import RequestModel

    count = RequestCount()
    original = RequestModel.__dict__["serialize"]
    serialize = RequestModel.serialize

    def counting(cls: Any, *args: Any, **kwargs: Any) -> bytes:
        blob = serialize(*args, **kwargs)
        count.requests += 1
        count.bytes += len(blob)
        return blob

    RequestModel.serialize = classmethod(counting)
    try:
        yield count
    finally:
        RequestModel.serialize = original


@dataclass(frozen=True)
class SessionLimits:
    """How much one session (one request) may hold: traces, the bytes of its inputs and the
    bytes it returns. NDIF runs a request for at most 3,600 s and buffers 100 MB of it; the
    defaults stay well under both on a model the size of the embedded one (a 70B forward of a
    batch takes seconds). A result is not bound by that buffer: the server stages one above
    its inline size for download from a presigned URL (nnsight's ``RemoteBackend.handle``), so
    ``result_mb`` bounds what the server holds and the download's time."""

    traces: int = 256
    request_mb: float = 32.0
    result_mb: float = 256.0


def payload_bytes(value: Any) -> int:
    """The bytes of the tensors a value carries (through dataclasses, dicts and sequences)."""
    import dataclasses

    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(payload_bytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, dict):
        return sum(payload_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(payload_bytes(v) for v in value)
    return 0


def session_groups(parts: Sequence[Any], limits: SessionLimits, fixed: int = 2,
                   returned: Sequence[int] | None = None) -> list[list[Any]]:
    """``parts`` (one trace each) in order, grouped so that each session holds at most
    ``limits.traces`` traces (``fixed`` of them the session's own), ``limits.request_mb`` of
    inputs and ``limits.result_mb`` of what comes back (``returned``: bytes per part, where that
    is more than a metric)."""
    if limits.traces <= fixed:
        raise BehaviorLensError(f"session limits: {limits.traces} traces leave none for the work "
                                f"(each session runs {fixed} of its own)")
    groups: list[list[Any]] = []
    sent = back = 0.0
    for i, part in enumerate(parts):
        mb, out = payload_bytes(part) / 2**20, (returned[i] if returned is not None else 0) / 2**20
        if (not groups or len(groups[-1]) >= limits.traces - fixed or sent + mb > limits.request_mb
                or back + out > limits.result_mb):
            groups.append([])
            sent = back = 0.0
        groups[-1].append(part)
        sent += mb
        back += out
    return groups


def run_session(model: Any, fn: Callable[..., Any], *args: Any, what: str) -> Any:
    """``fn(lm, *args)`` (a function of a shipped module, which opens its own traces) as one
    session on the model's backend: one request; only its return value comes back. A failed
    session is retried once, then fails in one line naming ``what``. On a local model the traces
    run in place."""
    import nnsight

    lm = model.lm
    if model.remote is None:
        return fn(lm, *args)
    for attempt in (1, 2):
        try:
            with lm.session(**model.trace_kwargs()):
                out = nnsight.save(fn(lm, *args))
            return out
        except BehaviorLensError:
            raise
        except Exception as err:  # a server or network failure, or a bug: one retry
            if attempt == 2:
                raise BehaviorLensError(f"{what}: the session failed twice ({model.remote}): "
                                        f"{type(err).__name__}: {err}") from err
            print(f"behaviorlens: {what}: the session failed ({type(err).__name__}: {err}); retrying once",
                  file=sys.stderr)
    raise AssertionError("unreachable")
