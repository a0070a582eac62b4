"""Rows of different LoRA adapters in one forward of the transformers engine.

PEFT's mixed-adapter batch (`adapter_names=`) runs, in every LoRA layer, a loop over the batch's adapters: gather
the adapter's rows, its A and B, scale, scatter the rows back. On a small model that loop's dozen small operations a
layer cost more than the arithmetic. Here each plain LoRA linear layer keeps its adapters' A matrices side by side
(in x sum of ranks) and their B matrices stacked (sum of ranks x out), and a mixed forward is

    base(x) + ((x @ A_all) * mix) @ B_all

where `mix` (rows x sum of ranks) holds, in each row, the row's adapter's scaling over that adapter's columns and
zero elsewhere (a base-model row: zero everywhere). Same arithmetic as PEFT's per-adapter path, two matmuls a layer
whatever the mix. Layers PEFT gives something else (DoRA and other variants, a bias on B, embeddings, convolutions)
keep PEFT's own mixed path, through `adapter_names`.
"""

from __future__ import annotations

from typing import Any


class MixedLora:
    """The LoRA layers of one PeftModel, each either fused here or left to PEFT; `set_rows` before a forward."""

    def __init__(self, torch, model) -> None:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora.layer import Linear

        self.torch = torch
        self._names: list[str] = []  # the rows' adapters ("__base__": none), as PEFT's adapter_names
        self._uniform: list[str] | None = None  # the one adapter of every row ([]: none); None: mixed rows
        self._masks: dict[tuple, Any] = {}  # this forward's mix, by a layer's (adapter, rank) layout
        self._undo: list = []
        for module in model.modules():
            if not isinstance(module, LoraLayer):
                continue
            if isinstance(module, Linear) and _plain(module):
                self._fuse(module)
            else:
                handle = module.register_forward_pre_hook(self._peft_names, with_kwargs=True)
                self._undo.append(handle.remove)

    def set_rows(self, names: list[str | None]) -> None:
        """The adapter (None: the base model) of each row of the next forward."""
        first = names[0]
        self._uniform = ([first] if first else []) if names.count(first) == len(names) else None
        self._names = [name or "__base__" for name in names]
        self._masks = {}

    def close(self) -> None:
        """Every layer back to PEFT's own forward."""
        for undo in self._undo:
            undo()
        self._undo = []

    # ------------------------------------------------------------------ the two kinds of layer

    def _peft_names(self, module, args, kwargs):
        if self._uniform is not None:
            module._active_adapter = self._uniform  # what PEFT's set_adapter sets on each layer (no module walk)
        else:
            kwargs["adapter_names"] = self._names
        return args, kwargs

    def _fuse(self, module) -> None:
        torch = self.torch
        names = list(module.lora_A.keys())
        layout = tuple((name, module.lora_A[name].weight.shape[0], float(module.scaling[name])) for name in names)
        a_all = torch.cat([module.lora_A[name].weight for name in names], dim=0).t().contiguous()
        b_all = torch.cat([module.lora_B[name].weight for name in names], dim=1).t().contiguous()
        peft_forward = module.forward

        def forward(x, *args, **kwargs):
            if self._uniform == []:  # the base model for every row: its layer alone, as PEFT with none active
                return module.base_layer(x, *args, **kwargs)
            if self._uniform is not None:  # one adapter for every row (each prefill): PEFT's plain path
                module._active_adapter = self._uniform
                return peft_forward(x, *args, **kwargs)
            result = module.base_layer(x, *args, **kwargs)
            h = (x.to(a_all.dtype) @ a_all) * self._mask(layout, a_all)
            return result + (h @ b_all).to(result.dtype)

        module.forward = forward
        self._undo.append(lambda: module.__dict__.pop("forward", None))

    def _mask(self, layout: tuple, like):
        """(rows, 1, sum of ranks): each row's scaling over its adapter's columns, zero elsewhere."""
        mask = self._masks.get(layout)
        if mask is None:
            rows = [[[scale if name == row else 0.0 for name, rank, scale in layout for _ in range(rank)]]
                    for row in self._names]
            mask = self._masks[layout] = self.torch.tensor(rows, dtype=like.dtype, device=like.device)
        return mask


def _plain(module) -> bool:
    """A LoRA linear layer whose every adapter is vanilla LoRA (no variant such as DoRA, no bias on B)."""
    names = list(module.lora_A.keys())
    return bool(names) and not module.merged and not any(name in module.lora_variant for name in names) \
        and all(module.lora_B[name].bias is None for name in names)
