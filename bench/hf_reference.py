#!/usr/bin/env python3
"""Per-token decode latency of Hugging Face transformers on a checkpoint: the outside reference
for bench/e2e_bench.cc (bench/gpu_e2e.sh runs both on the same checkpoint in one command).

    python3 bench/hf_reference.py --model DIR [--contexts 32768,65536,131072] [--batches 1,4]
        [--steps 10] [--warmup 3] [--ours e2e_bench.json]

transformers as installed, attn_implementation="sdpa", a StaticCache of context + steps positions,
no torch.compile, bf16 on cuda:0. The cache is filled directly: one token of prefill allocates it,
then the first `context` positions of every layer's keys and values are overwritten with random
normal bf16 values (prefilling 128K tokens through sdpa would take minutes per sequence and is not
what is measured). Then `warmup` + `steps` forward calls of one new token per sequence, each timed
from the call to torch.cuda.synchronize(); the median is reported.

With --ours, also prints the table that merges e2e_bench's JSON rows with these.
"""
import argparse
import gc
import json
import statistics
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, StaticCache


def load_model(path):
    kwargs = dict(attn_implementation="sdpa", device_map="cuda")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kwargs)
    except TypeError:  # transformers before 4.56 spells it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16, **kwargs)
    return model.eval()


def make_cache(model, batch, max_cache_len):
    try:
        return StaticCache(config=model.config, max_cache_len=max_cache_len)
    except TypeError:  # older transformers size the batch up front
        return StaticCache(config=model.config, max_batch_size=batch, max_cache_len=max_cache_len,
                           device=model.device, dtype=torch.bfloat16)


def cache_tensors(cache):
    if hasattr(cache, "layers"):
        for layer in cache.layers:
            yield layer.keys
            yield layer.values
    else:
        yield from cache.key_cache
        yield from cache.value_cache


def step(model, ids, cache, position):
    batch = ids.shape[0]
    cache_position = torch.tensor([position], device=ids.device)
    return model(input_ids=ids, past_key_values=cache, cache_position=cache_position,
                 position_ids=cache_position.unsqueeze(0).expand(batch, 1), use_cache=True)


def measure(model, batch, context, steps, warmup, generator):
    vocab = model.config.vocab_size
    cache = make_cache(model, batch, context + warmup + steps + 1)
    ids = torch.randint(0, vocab, (batch, 1), device="cuda", generator=generator)
    step(model, ids, cache, 0)  # allocates the cache
    for tensor in cache_tensors(cache):
        tensor[:, :, :context].normal_(generator=generator)
    torch.cuda.synchronize()
    times = []
    for i in range(warmup + steps):
        ids = torch.randint(0, vocab, (batch, 1), device="cuda", generator=generator)
        torch.cuda.synchronize()
        start = time.perf_counter()
        step(model, ids, cache, context + i)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    del cache
    gc.collect()
    torch.cuda.empty_cache()
    return statistics.median(times)


def merged_table(ours_path, reference):
    rows = {}
    with open(ours_path) as f:
        for line in f:
            row = json.loads(line)
            rows[(row["batch"], row["context"], row["attention"])] = row
    print("\n| batch | context | dense ms/token | its limit (ratio) | hybrid ms/token | its limit (ratio) "
          "| hybrid vs dense | transformers ms/token | hybrid vs transformers |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (batch, context), hf_ms in sorted(reference.items()):
        dense, hybrid = rows.get((batch, context, "dense")), rows.get((batch, context, "hybrid"))
        if dense is None or hybrid is None:
            continue
        print(f"| {batch} | {context // 1024}K | {dense['ms']:.2f} | {dense['limit_ms']:.2f} "
              f"({dense['ms'] / dense['limit_ms']:.2f}x) | {hybrid['ms']:.2f} | {hybrid['limit_ms']:.2f} "
              f"({hybrid['ms'] / hybrid['limit_ms']:.2f}x) | {dense['ms'] / hybrid['ms']:.2f}x | {hf_ms:.2f} "
              f"| {hf_ms / hybrid['ms']:.2f}x |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--contexts", default="32768,65536,131072")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ours", help="e2e_bench --json output to merge into one table")
    args = parser.parse_args()
    contexts = sorted(int(c) for c in args.contexts.split(","))
    batches = [int(b) for b in args.batches.split(",")]

    torch.set_grad_enabled(False)
    start = time.time()
    model = load_model(args.model)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name(0)}; "
          f"sdpa, StaticCache, no torch.compile; {args.model} loaded in {time.time() - start:.1f} s", flush=True)
    generator = torch.Generator(device="cuda").manual_seed(1)
    reference = {}
    print(f"{'batch':>5} {'context':>8} {'ms/token':>9}", flush=True)
    for context in contexts:
        for batch in batches:
            try:
                ms = measure(model, batch, context, args.steps, args.warmup, generator)
            except torch.OutOfMemoryError as error:
                print(f"{batch:5d} {context // 1024:7d}K  does not fit: {str(error).splitlines()[0]}", flush=True)
                gc.collect()
                torch.cuda.empty_cache()
                continue
            reference[(batch, context)] = ms
            print(f"{batch:5d} {context // 1024:7d}K {ms:9.2f}", flush=True)
    if args.ours:
        merged_table(args.ours, reference)
    return 0


if __name__ == "__main__":
    sys.exit(main())
