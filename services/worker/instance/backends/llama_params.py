"""llama.cpp's model parameters that llama-cpp-python leaves out: where weights may go on the CPU (its extra buffer
types), for the low-level API and for a high-level Llama alike."""

from __future__ import annotations

import contextlib
import threading


def extra_buffers(system_info: bytes, amx: bool) -> bool:
    """Whether llama.cpp may place weights in the CPU's extra buffer types (AMX first, then repacked layouts).

    Not where this llama.cpp has AMX kernels, unless the `llama_cpp_amx` setting asks for them: on the Sapphire
    Rapids VMs this project runs on, every quantized model segfaulted the whole worker in ggml_backend_amx_mul_mat
    at its first decode (q4_0, q8_0, q4_K_M; the tiny model and a 26M-parameter Llama alike), and llama.cpp
    turns AMX off only together with repacking (use_extra_bufts). F32 and F16 weights use neither.
    """
    return amx or b"AMX_INT8 = 1" not in system_info


_defaults_lock = threading.Lock()


@contextlib.contextmanager
def model_defaults(use_extra_bufts: bool):
    """llama-cpp-python's Llama() takes no use_extra_bufts: while one is built, the model defaults it reads carry
    ours (the low-level API, which the generation path uses, takes them as a parameter)."""
    import llama_cpp.llama_cpp as low

    with _defaults_lock:
        original = low.llama_model_default_params

        def defaults():
            params = original()
            params.use_extra_bufts = use_extra_bufts
            return params

        low.llama_model_default_params = defaults
        try:
            yield
        finally:
            low.llama_model_default_params = original
