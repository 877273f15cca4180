"""Benchmarks: ``portaserve bench serve | throughput | latency``.

``serve`` is a load generator for any OpenAI-compatible server, with the flags, metric names
and result-JSON keys of ``vllm bench serve`` so that scripts written for it carry over.
``throughput`` and ``latency`` run in-process through :class:`portaserve.LLM`.
Nothing here is imported by the engine; heavy imports (torch, matplotlib) happen lazily.
"""

from __future__ import annotations
