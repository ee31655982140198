"""Serving: continuous batching over a causal LM (engine.py, front end; the workers' side is
generation/worker/continuous.py) and the OpenAI-compatible HTTP server on it (server.py)."""

from .engine import Engine, EngineClosed, EngineDead, EngineError, EngineFull
from .requests import Output, Request, SamplingOptions

__all__ = ["Engine", "EngineClosed", "EngineDead", "EngineError", "EngineFull", "Output", "Request", "SamplingOptions"]
