"""One loaded model replica: its backend, its batcher on the compute loop, its state and its request limits."""

from __future__ import annotations

import threading
import time

import msgspec

from zinfer.services.worker import adapters, checks, files
from zinfer.services.worker.instance.backends.base import LoadContext
from zinfer.services.worker.instance.compute import ComputeLoop, Job
from zinfer.shared import engines, instances
from zinfer.shared import protocol as p
from zinfer.shared.config import Settings
from zinfer.shared.errors import (
    Cancelled,
    Forbidden,
    InstanceNotReady,
    InvalidRequest,
    TooLarge,
    Unavailable,
    ZinferError,
    reply_from_exception,
)
from zinfer.shared.images import ImagePolicy, check_image
from zinfer.shared.payloads import LoraAdapter


def utf8_over(text: str, limit: int) -> bool:
    """Whether `text` is more than `limit` UTF-8 bytes, without encoding it unless it could be (1-4 bytes a char)."""
    n = len(text)
    return n > limit or (n * 4 > limit and len(text.encode("utf-8", "surrogatepass")) > limit)


def base_report(load: p.LoadInstance, state: instances.InstanceState) -> instances.InstanceReport:
    """What a launch says of its instance before any process has reported on it."""
    status = instances.ReplicaStatus(state=state, memory=load.memory_estimate)
    return instances.InstanceReport(model_uid=load.model_uid, replica=load.replica, incarnation=load.incarnation,
                            info=instances.info_of(load), status=status)


# The requests each model type serves (an LLM embeds only with the embed ability: its batcher checks that).
REQUESTS_OF = {"LLM": (p.Generate, p.Chat, p.Embed, p.RenderChat), "embedding": (p.Embed,), "rerank": (p.Rerank,),
               "audio": (p.Transcribe, p.Speak)}


class Instance:
    """The model of one instance process (services/worker/instance/child.py): its backend and batcher, on that process's
    compute loop."""

    def __init__(self, load: p.LoadInstance, device: str, settings: Settings, loop: ComputeLoop,
                 on_change=lambda: None, threads: int | None = None):
        self.launch = load  # what it loads: the scheduler's LoadInstance (the model, its spec, the options)
        self.on_change = on_change  # the worker reports at once (the launch progress a client shows)
        self.stage = ""
        self.settings = settings
        self.images = ImagePolicy.from_settings(settings)  # limits an image of a chat must keep
        self.loop = loop
        self.uid = load.model_uid
        self.replica = load.replica
        self.device = device
        self.threads = threads
        self.state = "launching"
        self.error: ZinferError | None = None
        self.progress = 0.0
        self.last_active = 0.0
        self.backend = None
        self.batcher = None
        self.files, self.adapter_format = "", ""  # the model's checked files, and the LoRA kind its engine takes
        self.cancelled = threading.Event()  # set by close(): a launch in progress stops at its next step
        self._lock = threading.Lock()

    @property
    def model_name(self) -> str:
        return (self.launch.llm or self.launch.embedding or self.launch.rerank or self.launch.audio).model_name

    # ------------------------------------------------------------------ lifecycle (the process's main thread)

    def _step(self, progress: float, stage: str) -> None:
        self.progress, self.stage = progress, stage
        self.on_change()

    def _loading(self, path: str) -> None:
        self._check_cancelled()
        count, size = files.weights_summary(path)
        self._step(0.3, f"loading {count} weight file{'s' if count != 1 else ''}, {size / 2**20:,.0f} MiB")

    def _check_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled(f"the launch of {self.uid!r} was cancelled (terminated)")

    def _byte_progress(self, start: float, span: float, label: str):
        """progress(done, total) in bytes -> the stage ("LABEL: 12.0 of 104.0 MiB") and progress from start to
        start + span, reported at each whole percent (about 100 reports at most, each one sent at once)."""
        last = [-1.0]

        def progress(done: int, total: int) -> None:
            share = done / total if total else 0.0
            if share - last[0] >= 0.01 or done == total:
                last[0] = share
                self._step(start + span * share, f"{label}: {done / 2**20:,.1f} of {total / 2**20:,.1f} MiB")

        return progress

    def _fetch(self, what: str) -> files.Fetch:
        """Downloads of this launch: their progress between 0.05 and 0.25, stopped by a terminate."""
        return files.Fetch(self._byte_progress(0.05, 0.2, f"downloading {what}"), self.cancelled.is_set,
                           self.settings.hub_endpoints)

    def _convert_ggml(self, path: str, context_length: int) -> str:
        """A GGML v3 file's GGUF in <home>/cache/gguf-from-ggml (converted now, or by an earlier launch)."""
        from zinfer.services.worker.instance import ggml

        self._step(0.25, "converting GGML v3 to GGUF")
        return str(ggml.cached_gguf(path, self.settings.home_path / "cache" / "gguf-from-ggml", context_length,
                                    self._byte_progress(0.25, 0.05, "converting GGML v3 to GGUF"),
                                    self.cancelled.is_set))

    def trust_remote_code(self) -> bool:
        """This worker's own settings decide whether a model's code may run here (never the request)."""
        trusted = self.model_name in self.settings.trust_remote_code_models
        if self.launch.options.trust_remote_code and not trusted:
            raise Forbidden(f"trust_remote_code: model {self.model_name!r} may not run its own code on this worker "
                            "(not in its trust_remote_code_models setting)", field="trust_remote_code")
        return trusted

    def load(self) -> None:
        load = self.launch
        limit = load.options.request_limits or self.settings.instance_queue
        trust = self.trust_remote_code()
        engine_info = engines.of_load(load)
        self._step(0.05, "finding files")
        if load.model_type == "embedding":
            path = files.resolve_embedding_files(load.embedding, self._fetch(load.embedding.model_id))
        elif load.model_type == "rerank":
            path = files.resolve_folder_files(load.rerank.spec, self._fetch(load.rerank.spec.model_id))
        elif load.model_type == "audio":
            path = files.resolve_folder_files(load.audio, self._fetch(load.audio.model_id))
        else:
            path = files.resolve_llm_files(load.spec, load.quantization, self._fetch(load.spec.model_id))
            if load.spec.model_format == "ggmlv3":
                path = self._convert_ggml(path, load.llm.context_length)
        (checks.check_hf_folder if engine_info.files == "hf_folder" else checks.check_gguf)(path)
        projector = load.options.multimodal_projector
        if projector:
            projector = files.resolve_projector(load.spec, path, projector, self._fetch(load.spec.model_id))
            checks.check_projector(projector)
        self.files, self.adapter_format = path, "pytorch" if engine_info.files == "hf_folder" else "ggufv2"
        loras = [(lora, self._adapter_files(lora, "peft_model_config")) for lora in load.loras]
        self._loading(path)
        backend, batcher = engines.loader(engine_info)(LoadContext(
            launch=load, engine=engine_info, path=path, device=self.device, threads=self.threads,
            trust_remote_code=trust, queue_limit=limit, wake=self.loop.wake,
            template_timeout_s=self.settings.template_timeout_s, llama_cpp_amx=self.settings.llama_cpp_amx,
            projector=projector or None))
        try:
            for lora, lora_path in loras:
                batcher.add_adapter(lora, lora_path)
        except BaseException:
            backend.close()
            raise
        with self._lock:  # close() either sees this batcher, or we see its cancel: never neither
            if not self.cancelled.is_set():
                self.backend, self.batcher = backend, batcher
                self.loop.add(batcher)
                self.progress, self.stage = 1.0, ""
                self.state = "ready"
                return
        backend.close()  # terminated while the weights loaded: nobody holds this instance any more
        self._check_cancelled()

    def _adapter_files(self, lora: LoraAdapter, field: str) -> str:
        """A LoRA adapter's files on this host (downloaded if it names a Hub repository), checked to fit the
        model's files."""
        path = adapters.resolve(lora, field, self._fetch(lora.local_path))
        adapters.check(lora, path, self.files, self.adapter_format, field)
        return path

    # ------------------------------------------------------------------ LoRA at run time (from the scheduler)

    def load_lora(self, msg: p.LoadLora, ctx) -> p.Ok:
        """Check the adapter here (off the compute loop), then load it between two steps; the next report
        carries it, so the supervisor restarts this process with it."""
        ctx.require_service(p.SCHEDULER, "LoadLora")
        batcher = self._serving()
        path = self._adapter_files(msg.lora, "lora_path")
        self.loop.call(batcher.add_adapter, msg.lora, path)
        self.launch = msgspec.structs.replace(self.launch, loras=[*self.launch.loras, msg.lora])
        self.on_change()
        return p.Ok(message=f"loaded LoRA adapter {msg.lora.lora_name} into {self.uid}")

    def unload_lora(self, msg: p.UnloadLora, ctx) -> p.Ok:
        ctx.require_service(p.SCHEDULER, "UnloadLora")
        self.loop.call(self._serving().drop_adapter, msg.lora_name)
        self.launch = msgspec.structs.replace(self.launch, loras=[x for x in self.launch.loras
                                                                   if x.lora_name != msg.lora_name])
        self.on_change()
        return p.Ok(message=f"unloaded LoRA adapter {msg.lora_name} from {self.uid}")

    def _serving(self):
        batcher = self.batcher
        if self.state != "ready" or batcher is None:
            raise InstanceNotReady(f"model {self.uid!r} is {self.state}", field="model_uid")
        if not hasattr(batcher, "add_adapter"):
            raise InvalidRequest(f"model {self.uid!r} is {'an' if self.launch.model_type[0] in 'AEL' else 'a'} "
                                 f"{self.launch.model_type} model: LoRA adapters are for LLMs", field="model_uid")
        return batcher

    def fail(self, exc: BaseException) -> None:
        self.state = "failed"
        self.error = exc if isinstance(exc, ZinferError) else ZinferError(f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        """Stop serving: refuse what the batcher still holds, and free the model between two loop steps."""
        with self._lock:
            self.state = "terminating"
            self.cancelled.set()
            batcher, backend = self.batcher, self.backend
            self.batcher = self.backend = None
        if batcher is not None:
            self.loop.remove(batcher)

        def release():
            if batcher is not None:
                batcher.stop(Unavailable(f"model {self.uid!r} was terminated"))
            if backend is not None:
                backend.close()

        self.loop.call(release)

    def report(self) -> instances.InstanceReport:
        batcher = self.batcher
        report = base_report(self.launch, self.state)
        report.status = instances.ReplicaStatus(
            state=self.state, error=reply_from_exception(self.error) if self.error else None,
            progress=self.progress, stage=self.stage, memory=self.launch.memory_estimate,
            queue_depth=batcher.depth() if batcher else 0, inflight=self.inflight(),
            stats=msgspec.structs.replace(batcher.stats) if batcher else None, last_active=self.last_active)
        return report

    def inflight(self) -> int:
        batcher = self.batcher
        if batcher is None:
            return 0
        counter = getattr(batcher, "inflight", None)
        return counter() if counter is not None else 0

    # ------------------------------------------------------------------ requests (the I/O thread)

    def submit(self, msg, ctx) -> None:
        """Check a request against the limits (cheap: no tokenizing here) and queue it on the batcher."""
        if self.state != "ready" or self.batcher is None:
            detail = f": {self.error.message}" if self.error else ""
            raise InstanceNotReady(f"model {self.uid!r} is {self.state}{detail}", field="model_uid")
        self.last_active = time.time()  # what keep_alive counts from (the scheduler reads it in reports)
        model_type = self.launch.model_type
        if not isinstance(msg, REQUESTS_OF[model_type]):
            verb = {p.Generate: "generate", p.Chat: "chat", p.Embed: "embed", p.Rerank: "rerank",
                    p.RenderChat: "render a chat", p.Transcribe: "transcribe audio", p.Speak: "speak"}[type(msg)]
            raise InvalidRequest(f"model {self.uid!r} is {'an' if model_type[0] in 'AaEeL' else 'a'} {model_type} "
                                 f"model: it cannot {verb}", field="model_uid")
        limit = self.settings.max_prompt_bytes
        if isinstance(msg, p.Embed):
            if not msg.input:
                raise InvalidRequest("input must not be empty", field="input")
            if len(msg.input) > self.settings.max_embed_items:
                raise TooLarge(f"input has {len(msg.input)} texts; at most {self.settings.max_embed_items} per "
                               "request (max_embed_items)", field="input")
            if utf8_over("".join(msg.input), limit):
                raise TooLarge(f"input is over {limit:,} bytes in all (max_prompt_bytes)", field="input")
        elif isinstance(msg, p.Rerank):
            if not msg.documents:
                raise InvalidRequest("documents must not be empty", field="documents")
            if len(msg.documents) > self.settings.max_rerank_documents:
                raise TooLarge(f"documents has {len(msg.documents)} entries; at most "
                               f"{self.settings.max_rerank_documents} per request (max_rerank_documents)",
                               field="documents")
            if utf8_over(msg.query + "".join(msg.documents), limit):
                raise TooLarge(f"query and documents are over {limit:,} bytes in all (max_prompt_bytes)",
                               field="documents")
        elif isinstance(msg, p.Chat | p.RenderChat):
            if utf8_over("".join(m.content or "" for m in msg.messages) + msgspec.json.encode(
                    msg.options.tools or []).decode(), limit):
                raise TooLarge(f"messages are over {limit:,} bytes in all (max_prompt_bytes)", field="messages")
            images = [image for m in msg.messages for image in m.images()]
            if len(images) > self.images.max_images:
                where = images[self.images.max_images].where
                raise InvalidRequest(f"{where}: more than {self.images.max_images} images in one request (max_images)",
                                     field=where)
            for image in images:  # the limits again (a bus client may have skipped the edge's checks); the header
                check_image(image.data, image.where, self.images, verify=False)  # only: the model decodes it whole
        elif isinstance(msg, p.Transcribe | p.Speak):
            pass  # the audio's bytes are bounded by the message; its prompt by the message's type
        elif utf8_over(msg.prompt, limit):
            raise TooLarge(f"the prompt is over {limit:,} bytes (max_prompt_bytes)", field="prompt")
        self.batcher.submit(Job(msg, ctx))
