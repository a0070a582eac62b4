"""Inference workers. The host side: one worker per device (service.py) whose supervisor (supervisor.py) starts
one process per model instance replica from a fork server, probes files (files.py, checks.py) and reports the
device (device.py). The instance side, in each replica's process: child.py (its bus connection and reports),
instance.py (loading), compute.py (the loop that steps the engine), the engines (llm_engine.py, embed_engine.py,
rerank_engine.py) and the libraries' backends (backends/)."""
