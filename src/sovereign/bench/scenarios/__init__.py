"""The scenarios: each a coordinator-side ``Spec`` and a process-side worker."""

from __future__ import annotations

from typing import Any

from sovereign.bench.scenarios.base import Outcome, Phase, Spec, WorkerBase
from sovereign.bench.scenarios.fanout import FanoutSpec, FanoutWorker
from sovereign.bench.scenarios.idle import IdleSpec, IdleWorker
from sovereign.bench.scenarios.mixed import MixedSpec, MixedWorker
from sovereign.bench.scenarios.relay import BaselineSpec, RelaySpec, RelayWorker
from sovereign.bench.scenarios.resume import ResumeSpec, ResumeWorker

__all__ = ["SPECS", "Outcome", "Phase", "Spec", "WorkerBase", "worker_for"]

SPECS: dict[str, type[Spec]] = {
    "relay": RelaySpec,
    "baseline": BaselineSpec,
    "fanout": FanoutSpec,
    "resume": ResumeSpec,
    "idle": IdleSpec,
    "mixed": MixedSpec,
}

_WORKERS: dict[str, type[WorkerBase]] = {
    "relay": RelayWorker,
    "baseline": RelayWorker,
    "fanout": FanoutWorker,
    "resume": ResumeWorker,
    "idle": IdleWorker,
    "mixed": MixedWorker,
}


def worker_for(name: str, index: int, common: dict[str, Any]) -> WorkerBase:
    return _WORKERS[name](index, common)
