"""portaserve: an LLM inference and serving engine that runs the same engine on any hardware."""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

#: Decorator for plugin hook implementations: ``@portaserve.hookimpl``.
hookimpl = pluggy.HookimplMarker("portaserve")

__all__ = ["LLM", "SamplingParams", "__version__", "hookimpl"]


def __getattr__(name: str):  # PEP 562: keep ``import portaserve`` light (no torch)
    if name == "SamplingParams":
        from portaserve.core.sampling import SamplingParams

        return SamplingParams
    if name == "LLM":
        from portaserve.core.llm import LLM

        return LLM
    raise AttributeError(f"module 'portaserve' has no attribute {name!r}")
