"""Images for the llama.cpp engine: a GGUF vision model's multimodal projector (llama.cpp's mmproj file), through
llama-cpp-python's bindings of llama.cpp's libmtmd, as llama.cpp's own server takes images.

A chat's image parts become libmtmd's media marker in the rendered prompt; `tokenize` splits that prompt into
text tokens and image chunks (each image preprocessed and given its tokens by the projector's own rules: LLaVA's
patches, Gemma 3's image start and end tokens, ...). The backend feeds a sequence's text tokens in its shared
batch as usual; when its prefill reaches an image, `eval` encodes the image and decodes its embeddings into that
sequence's own part of the KV cache (its sequence id and position), between the shared decodes.
"""

from __future__ import annotations

import ctypes
import io

from zinfer.shared.errors import InvalidRequest

IMAGE = -1  # the token id an image's places hold in a prompt's ids (never decoded as a token)


class _Image:
    __slots__ = ("start", "n_tokens", "chunk")

    def __init__(self, start: int, n_tokens: int, chunk):
        self.start, self.n_tokens, self.chunk = start, n_tokens, chunk


class Media:
    """A prompt's image chunks (libmtmd's), in prompt order, each with where its tokens start in the prompt's ids;
    freed with the last sequence that holds them (n choices of one request share them)."""

    def __init__(self, lib, chunks, images: list[_Image]):
        self._lib, self._chunks, self.images = lib, chunks, images

    def __del__(self):
        if self._chunks is not None:
            self._lib.mtmd_input_chunks_free(self._chunks)
            self._chunks = None


class Projector:
    """An mmproj file loaded against the model it was made for (its embeddings must match the model's width)."""

    def __init__(self, path: str, model, device: str, n_threads: int):
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd
        from llama_cpp._logger import llama_log_callback

        self.lib, self.llama = mtmd, llama_cpp
        # libmtmd's chatter through llama-cpp-python's logger, as llama.cpp's own (errors only: set_verbose(False))
        mtmd.mtmd_log_set(llama_log_callback, None)
        mtmd.mtmd_helper_log_set(llama_log_callback, None)
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = device.startswith("cuda")
        params.print_timings = False
        params.n_threads = n_threads
        # As the text context (and llama-cpp-python's own handler on such a context): no flash attention.
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = mtmd.mtmd_init_from_file(path.encode("utf-8"), model, params)
        if not self.ctx:
            raise InvalidRequest(f"multimodal_projector {path}: llama.cpp could not load it for this model (an mmproj "
                                 "file made for another model, or of a kind this llama.cpp lacks)",
                                 field="multimodal_projector")
        if not mtmd.mtmd_support_vision(self.ctx):
            mtmd.mtmd_free(self.ctx)
            self.ctx = None
            raise InvalidRequest(f"multimodal_projector {path}: has no vision encoder (an audio projector?)",
                                 field="multimodal_projector")
        self.marker = mtmd.mtmd_default_marker().decode("utf-8")

    def _bitmap(self, image):
        """An image's pixels for libmtmd: decoded by llama.cpp itself (stb_image, as its server does), else by
        Pillow for the formats stb_image lacks (WebP, TIFF, ...)."""
        data = image.data
        bitmap = self.lib.mtmd_helper_bitmap_init_from_buf(
            self.ctx, (ctypes.c_uint8 * len(data)).from_buffer_copy(data), len(data), False)
        if bitmap:
            return bitmap
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                rgb = im.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise InvalidRequest(f"{image.where}: not an image that can be read ({exc})", field=image.where) from None
        raw = rgb.tobytes()
        bitmap = self.lib.mtmd_bitmap_init(rgb.width, rgb.height, (ctypes.c_uint8 * len(raw)).from_buffer_copy(raw))
        if not bitmap:
            raise InvalidRequest(f"{image.where}: llama.cpp could not take this image", field=image.where)
        return bitmap

    def tokenize(self, text: str, images: list) -> tuple[list[int], Media]:
        """The prompt's ids (IMAGE at each image's places) and its image chunks, for a prompt holding one media
        marker per image of `images` (ImageParts), in order; BOS as the vocabulary asks, special tokens parsed."""
        lib = self.lib
        bitmaps = []
        try:
            for image in images:
                bitmaps.append(self._bitmap(image))
            raw = text.encode("utf-8")
            inp = lib.mtmd_input_text()
            inp.text, inp.text_len, inp.add_special, inp.parse_special = raw, len(raw), True, True
            chunks = lib.mtmd_input_chunks_init()
            media = Media(lib, chunks, [])
            rc = lib.mtmd_tokenize(self.ctx, chunks, ctypes.byref(inp),
                                   (lib.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps), len(bitmaps))
        finally:
            for bitmap in bitmaps:
                lib.mtmd_bitmap_free(bitmap)
        if rc != 0:
            where = images[0].where
            why = (f"the prompt has a different number of image places than the {len(images)} image(s) given (the "
                   f"text may not contain {self.marker!r})" if rc == 1 else "llama.cpp could not preprocess it")
            raise InvalidRequest(f"{where}: {why}", field=where)
        return self._ids(media, chunks), media

    def _ids(self, media: Media, chunks) -> list[int]:
        lib, ids = self.lib, []
        for i in range(lib.mtmd_input_chunks_size(chunks)):
            chunk = lib.mtmd_input_chunks_get(chunks, i)
            if lib.mtmd_input_chunk_get_type(chunk) == lib.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                tokens = lib.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                ids.extend(tokens[j] for j in range(n.value))
            else:
                n_tokens = lib.mtmd_input_chunk_get_n_tokens(chunk)
                media.images.append(_Image(len(ids), n_tokens, chunk))
                ids.extend([IMAGE] * n_tokens)
        if media.images and media.images[-1].start + media.images[-1].n_tokens == len(ids):
            raise InvalidRequest("the prompt ends with an image: the model needs text after it to answer from "
                                 "(add_generation_prompt, or a text part after the image)", field="messages")
        return ids

    def eval(self, lctx, image: _Image, pos: int, seq_id: int, n_batch: int) -> int:
        """Encode one image and decode it into a sequence at `pos`: the position after it."""
        after = self.llama.llama_pos(0)
        rc = self.lib.mtmd_helper_eval_chunk_single(self.ctx, lctx, image.chunk, pos, seq_id, n_batch, False,
                                                    ctypes.byref(after))
        if rc != 0:
            raise RuntimeError(f"llama.cpp could not evaluate an image (code {rc})")
        return after.value

    def close(self) -> None:
        if self.ctx:
            self.lib.mtmd_free(self.ctx)
            self.ctx = None
