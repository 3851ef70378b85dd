"""Parity of lora.py with the PEFT library, both directions, on tiny random models.

PEFT is not a dependency of this project; run this once in a side environment:
    python -m venv --system-site-packages /tmp/peftenv
    /tmp/peftenv/bin/pip install --no-deps peft
    /tmp/peftenv/bin/python scripts/peft_parity.py
"""
import sys
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lora import add_lora, load_lora, lora_layers, save_lora  # noqa: E402

SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SHAPE)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SHAPE)),
    "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(**SHAPE, head_dim=16)),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def fresh(family):
    torch.manual_seed(0)
    return FAMILIES[family]().eval()


worst = 0.0
ids = torch.randint(0, 128, (2, 12))
for family in FAMILIES:
    for rslora in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            # PEFT writes -> lora.py loads
            torch.manual_seed(1)
            peft_model = get_peft_model(fresh(family), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                  use_rslora=rslora, init_lora_weights=False)).eval()
            with torch.no_grad():
                peft_logits = peft_model(ids).logits
                lora_effect = (peft_logits - fresh(family)(ids).logits).abs().max().item()  # the check is not vacuous
            peft_model.save_pretrained(f"{tmp}/from_peft")
            ours = fresh(family)
            load_lora(ours, f"{tmp}/from_peft")
            with torch.no_grad():
                d1 = (ours(ids).logits - peft_logits).abs().max().item()
            # lora.py writes -> PEFT loads
            ours = fresh(family)
            add_lora(ours, TARGETS, r=4, alpha=8, use_rslora=rslora)
            torch.manual_seed(2)
            for layer in lora_layers(ours).values():
                torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
            with torch.no_grad():
                our_logits = ours(ids).logits
            save_lora(ours, f"{tmp}/from_ours")
            peft_loaded = PeftModel.from_pretrained(fresh(family), f"{tmp}/from_ours").eval()
            with torch.no_grad():
                d2 = (peft_loaded(ids).logits - our_logits).abs().max().item()
            print(f"{family:8s} rslora={rslora!s:5s} | PEFT file -> load_lora: max|diff| {d1:.2e} "
                  f"| save_lora file -> PEFT: max|diff| {d2:.2e} | LoRA's own effect {lora_effect:.2e}")
            worst = max(worst, d1, d2)
print(f"worst max abs difference {worst:.2e} ({'PASS' if worst < 1e-5 else 'FAIL'} at 1e-5)")
sys.exit(0 if worst < 1e-5 else 1)
