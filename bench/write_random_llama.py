#!/usr/bin/env python3
"""Writes a Llama-3-8B- or 70B-shaped checkpoint with random bf16 weights (nothing is downloaded).

    python3 bench/write_random_llama.py OUT_DIR [--shape 8b|70b]

OUT_DIR gets config.json (the Llama-3.1-8B config: 32 layers, hidden 4096, 32 heads, 8 KV heads,
head_dim 128, intermediate 14336, vocab 128256, rope theta 500000 with llama3 scaling, 131072
positions) and model.safetensors (about 16 GB); with --shape 70b, the Llama-3.1-70B config (80
layers, hidden 8192, 64 heads, 8 KV heads, intermediate 28672; about 141 GB, for tensor
parallelism across GPUs). Matrices are normal with std 0.02 so that
activations stay finite through 32 layers; norm weights are ones. Tensors are generated on the
GPU when there is one and streamed to the file one at a time, so the host never holds the whole
checkpoint. There is no tokenizer: the benchmarks feed token ids.
"""
import json
import os
import struct
import sys
import time

import torch

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}


# Llama-3.1-70B: what differs from the 8B config.
SHAPE_70B = {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64, "num_hidden_layers": 80}


def tensor_shapes(c):
    hidden, inter, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    q_rows = c["num_attention_heads"] * c["head_dim"]
    kv_rows = c["num_key_value_heads"] * c["head_dim"]
    shapes = [("model.embed_tokens.weight", [vocab, hidden])]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", [hidden]),
            (p + "self_attn.q_proj.weight", [q_rows, hidden]),
            (p + "self_attn.k_proj.weight", [kv_rows, hidden]),
            (p + "self_attn.v_proj.weight", [kv_rows, hidden]),
            (p + "self_attn.o_proj.weight", [hidden, q_rows]),
            (p + "post_attention_layernorm.weight", [hidden]),
            (p + "mlp.gate_proj.weight", [inter, hidden]),
            (p + "mlp.up_proj.weight", [inter, hidden]),
            (p + "mlp.down_proj.weight", [hidden, inter]),
        ]
    shapes += [("model.norm.weight", [hidden]), ("lm_head.weight", [vocab, hidden])]
    return shapes


def main():
    args = sys.argv[1:]
    if len(args) not in (1, 3) or (len(args) == 3 and (args[1] != "--shape" or args[2] not in ("8b", "70b"))):
        sys.exit("usage: write_random_llama.py OUT_DIR [--shape 8b|70b]")
    out_dir = args[0]
    config = dict(CONFIG, **(SHAPE_70B if args[1:] == ["--shape", "70b"] else {}))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)

    shapes = tensor_shapes(config)
    header, offset = {}, 0
    for name, shape in shapes:
        size = 2 * torch.Size(shape).numel()
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the data starts 8-byte aligned

    path = os.path.join(out_dir, "model.safetensors")
    # The same seed writes the same file: one written whole by an earlier run (it is renamed into
    # place only when complete) is kept, so that the GPU scripts of one session share it.
    if os.path.exists(path) and os.path.getsize(path) == 8 + len(header_bytes) + offset:
        print(f"kept {path}, written by an earlier run")
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device).manual_seed(0)
    start = time.time()
    partial = path + ".partial"
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name, shape in shapes:
            if name.endswith("norm.weight"):
                tensor = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensor = (torch.randn(shape, device=device, generator=generator) * 0.02).to(torch.bfloat16)
            f.write(memoryview(tensor.cpu().contiguous().view(torch.uint8).numpy()))
    os.replace(partial, path)
    print(f"wrote {path}: {len(shapes)} tensors, {offset / 1e9:.2f} GB in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
