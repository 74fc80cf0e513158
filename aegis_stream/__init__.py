"""aegis_stream: BPF LSM deny of file open/exec, inode-first, on selected cgroups.

The public surface, named here (msgspec-style thin facade; the subpackages hold the
code, see docs/ARCHITECTURE.md).  Names load on first use, so ``import aegis_stream``
(what the CLI does for ``__version__``) stays cheap::

    errors      AegisError > PolicyError > SignatureError, KernelError > LoadError, ...
    events      DecisionEvent, ExplanationEvent, StateEvent, SloEvent, FleetEvent,
                StatusReport  (aegis_stream.pipeline.schema)
    policy      Policy, Lifecycle  (the one apply path)
    agent       Pipeline, PipelineConfig, Normaliser, AgentConfig, run_agent
    health      State, ReasonCode, Mode
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "AegisError": "aegis_stream.errors",
    "PolicyError": "aegis_stream.errors",
    "SignatureError": "aegis_stream.errors",
    "KernelError": "aegis_stream.errors",
    "LoadError": "aegis_stream.errors",
    "StateError": "aegis_stream.errors",
    "DecisionEvent": "aegis_stream.pipeline.schema",
    "ExplanationEvent": "aegis_stream.pipeline.schema",
    "StateEvent": "aegis_stream.pipeline.schema",
    "SloEvent": "aegis_stream.pipeline.schema",
    "FleetEvent": "aegis_stream.pipeline.schema",
    "StatusReport": "aegis_stream.pipeline.schema",
    "Policy": "aegis_stream.policy.model",
    "Lifecycle": "aegis_stream.policy.lifecycle",
    "Pipeline": "aegis_stream.pipeline",
    "PipelineConfig": "aegis_stream.pipeline",
    "Normaliser": "aegis_stream.pipeline.normalise",
    "AgentConfig": "aegis_stream.agent.run",
    "run_agent": "aegis_stream.agent.run",
    "State": "aegis_stream.agent.health",
    "ReasonCode": "aegis_stream.agent.health",
    "Mode": "aegis_stream.kernel.abi",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'aegis_stream' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
