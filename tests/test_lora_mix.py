"""lora_mix.MixedLora: rows of different adapters in one forward give, row by row, what PEFT's own mixed-adapter
batch gives (and what each row gives alone); layers PEFT runs otherwise (a bias on B) keep PEFT's path."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


def tiny_peft(lora_bias_b: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(LlamaForCausalLM(cfg).eval(), LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False), adapter_name="A")
    # B: another rank and scaling, on fewer layers (a layer with A only), optionally with a bias on B
    model.add_adapter("B", LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "down_proj"],
                                      init_lora_weights=False, lora_bias=lora_bias_b))
    return model.eval()


@pytest.mark.parametrize("lora_bias_b", [False, True], ids=["all-fused", "some-layers-peft"])
def test_mixed_rows_equal_peft_and_each_row_alone(lora_bias_b):
    from zinfer.services.worker.instance.backends.lora_mix import MixedLora

    model = tiny_peft(lora_bias_b)
    names = ["A", None, "B", "A", None, "B"]
    ids = torch.randint(0, 64, (len(names), 5), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        peft_mixed = model(input_ids=ids, adapter_names=[n or "__base__" for n in names]).logits
        mix = MixedLora(torch, model)
        fused = sum("forward" in m.__dict__ for m in model.modules())
        assert fused == (10 if lora_bias_b else 14)  # 14 LoRA linear layers; the 4 of B with a bias stay PEFT's
        mix.set_rows(names)
        ours = model.get_base_model()(input_ids=ids).logits
        torch.testing.assert_close(ours, peft_mixed, rtol=0, atol=1e-5)
        for i, name in enumerate(names):
            mix.set_rows([name])
            alone = model.get_base_model()(input_ids=ids[i:i + 1]).logits
            torch.testing.assert_close(alone, ours[i:i + 1], rtol=0, atol=1e-5)
        assert not torch.allclose(ours[0], ours[1])  # the adapters do change the rows
        mix.close()
        assert not any("forward" in m.__dict__ for m in model.modules())
