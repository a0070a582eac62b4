"""Inference workers, split by process.

`host/`: the worker host, one per device: `service.py` reports the device and its instances to the scheduler and
answers file probes, `supervisor.py` starts one process per instance replica from a fork server (`preload.py`
is what that server imports once; `preloader.py`, one per host, makes those imports once for every worker's fork
server) and restarts the ones that die, `device.py` probes the device. `files.py`
(finding, downloading and sizing model files) and `checks.py` (checking them before a load) serve both sides.

`instance/`: one instance replica's process: `child.py` (its entry, bus connection and reports), `instance.py`
(loading the model, request limits), `compute.py` (the loop on the process's main thread that steps batchers),
the batchers (`llm_batcher.py`, `embed_batcher.py`, `rerank_batcher.py`: requests in, batched steps, replies
out), `output.py`, `answer.py`, `prompts.py`, `grammar.py`, `ggml.py`, and `backends/` (one adapter per engine
library, loaded with a typed `LoadContext`).
"""
