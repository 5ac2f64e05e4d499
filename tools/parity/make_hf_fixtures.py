"""Writes tiny random checkpoints of every architecture Lychee loads, with reference outputs from
Hugging Face transformers, for tests/common/hf_parity_test.cc.

Runs where transformers is installed (the GPU host): python3 tools/parity/make_hf_fixtures.py OUT_DIR
Each case gets OUT_DIR/<case>/{config.json, model.safetensors, refs.json}; refs.json holds the
input ids, the float32 logits of the last position and 8 greedy tokens generated with a KV cache,
all computed in float32 from the saved weights (reloaded, so RoPE frequencies are float32).
"""
import json
import os
import sys

import torch
import transformers
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
              rms_norm_eps=1e-6)

CASES = {
    # Llama-3 rope scaling with an original context short enough that all three bands occur.
    "llama3-scaled-bf16": (LlamaConfig, LlamaForCausalLM, torch.bfloat16, dict(
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=64),
        tie_word_embeddings=False)),
    "qwen2-tied": (Qwen2Config, Qwen2ForCausalLM, torch.float32, dict(
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0), tie_word_embeddings=True)),
    "qwen3-head-dim": (Qwen3Config, Qwen3ForCausalLM, torch.float16, dict(
        head_dim=32, rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        attention_bias=False, tie_word_embeddings=False)),
    "mistral-window": (MistralConfig, MistralForCausalLM, torch.float32, dict(
        sliding_window=16, rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        tie_word_embeddings=False)),
}


def main(out_dir):
    for name, (config_class, model_class, save_dtype, extra) in CASES.items():
        torch.manual_seed(sum(map(ord, name)))
        config = config_class(**COMMON, **extra)
        config._attn_implementation = "eager"
        model = model_class(config).eval()
        with torch.no_grad():
            for parameter_name, parameter in model.named_parameters():
                if parameter.dim() == 1 and "norm" in parameter_name:
                    parameter.copy_(1.0 + 0.1 * torch.randn_like(parameter))
                else:
                    parameter.normal_(0.0, 0.08)
        path = os.path.join(out_dir, name)
        model.to(save_dtype).save_pretrained(path, safe_serialization=True)
        reloaded = model_class.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
        ids = torch.randint(3, COMMON["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            logits = reloaded(ids).logits[0, -1]
            greedy = reloaded.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None,
                                       pad_token_id=0, min_new_tokens=8)[0, ids.shape[1]:]
        with open(os.path.join(path, "refs.json"), "w") as f:
            json.dump(dict(ids=ids[0].tolist(), last_logits=[round(x, 6) for x in logits.tolist()],
                           greedy8=greedy.tolist(), transformers=transformers.__version__), f)
        print(name, "saved as", save_dtype, "logit range", float(logits.min()), float(logits.max()))


if __name__ == "__main__":
    main(sys.argv[1])
