"""Imported once by the worker's fork server (services/worker/host/supervisor.py), before it forks any instance
process: every engine's libraries, so that a new instance process starts with them in memory (6.7-7.4 s of
imports on a 2-core machine) instead of importing them itself. Importing runs no OpenMP, CUDA or thread-pool
code, so the forked children start clean."""

import torch  # noqa: F401
import transformers  # noqa: F401
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

import zinfer.services.worker.instance.child  # noqa: F401
import zinfer.services.worker.instance.embed_batcher  # noqa: F401
import zinfer.services.worker.instance.llm_batcher  # noqa: F401
from zinfer.services.worker.instance.backends import sentence_backend, transformers_backend  # noqa: F401

try:  # llama-cpp-python: absent where it failed to build; the ggufv2 launch says so then
    from zinfer.services.worker.instance.backends import llama_cpp_backend  # noqa: F401
except ImportError:
    pass

import sentence_transformers  # noqa: E402, F401
import tokenizers  # noqa: E402, F401

try:
    import llama_cpp  # noqa: E402, F401
    from llama_cpp import _internals  # noqa: E402, F401
except ImportError:
    pass
