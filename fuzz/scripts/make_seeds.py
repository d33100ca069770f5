"""Builds the seed corpora of the fuzz targets (fuzz/corpus/<target>/seed-*) from the
project's test fixtures and demo data. Run from the repository root:
python3 fuzz/scripts/make_seeds.py. Plain Python, no packages needed."""

import json
import os
import shutil
import struct

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")


def out(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(os.path.join(d, "seed-" + name), mode) as f:
        f.write(data)


def copy(target, name, rel):
    with open(os.path.join(ROOT, rel), "rb") as f:
        out(target, name, f.read())


def read_st(rel):
    with open(os.path.join(ROOT, rel), "rb") as f:
        b = f.read()
    n = struct.unpack("<Q", b[:8])[0]
    header = json.loads(b[8 : 8 + n])
    return header, b[8 + n :]


def write_st(tensors, metadata=None):
    """tensors: list of (name, dtype, shape, bytes) -> safetensors bytes."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    data = b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def one_layer(rel, prefix):
    """The tensors of one 4-bit layer of a bitsandbytes checkpoint, as a small file."""
    header, data = read_st(rel)
    tensors = []
    for k, v in sorted(header.items()):
        if k.startswith(prefix + "."):
            s, e = v["data_offsets"]
            tensors.append((k, v["dtype"], v["shape"], data[s:e]))
    return write_st(tensors, {"format": "pt"})


def gguf_string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_value(v):
    """(type id, bytes) of a metadata value: str, bool, int (u32), float (f32), or a list."""
    if isinstance(v, str):
        return 8, gguf_string(v)
    if isinstance(v, bool):
        return 7, struct.pack("<B", v)
    if isinstance(v, int):
        return 4, struct.pack("<I", v)
    if isinstance(v, float):
        return 6, struct.pack("<f", v)
    t, _ = gguf_value(v[0])
    return 9, struct.pack("<IQ", t, len(v)) + b"".join(gguf_value(x)[1] for x in v)


def small_llama_gguf():
    """A one-layer Llama GGUF (hidden size 8) with a byte-level BPE tokenizer and a chat
    template in its metadata, F32 and Q8_0 tensors."""
    tokens = ["<|im_start|>", "<|im_end|>", "a", "b", "c", "ab", "bc", "Ġ", "Ġa", "h", "i", "hi"]
    meta = {
        "general.architecture": "llama",
        "llama.block_count": 1,
        "llama.context_length": 64,
        "llama.embedding_length": 8,
        "llama.feed_forward_length": 16,
        "llama.attention.head_count": 2,
        "llama.attention.head_count_kv": 1,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.rope.freq_base": 10000.0,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3] + [1] * (len(tokens) - 2),
        "tokenizer.ggml.merges": ["a b", "b c", "Ġ a", "h i"],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    }
    v = len(tokens)
    tensors = [
        ("token_embd.weight", [8, v], 0),
        ("output_norm.weight", [8], 0),
        ("blk.0.attn_q.weight", [32, 8], 8),
    ]
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta))
    for k, val in meta.items():
        t, b = gguf_value(val)
        out += gguf_string(k) + struct.pack("<I", t) + b
    data = b""
    for name, dims, ty in tensors:
        n = 1
        for d in dims:
            n *= d
        if ty == 0:
            raw = b"".join(struct.pack("<f", ((i * 37) % 11 - 5) / 10) for i in range(n))
        else:  # Q8_0: blocks of 32: f16 scale, 32 int8
            raw = b"".join(struct.pack("<e", 0.01) + bytes((i * 7) % 256 for i in range(32)) for _ in range(n // 32))
        data += b"\0" * (-len(data) % 32)
        out += gguf_string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ty, len(data))
        data += raw
    out += b"\0" * (-len(out) % 32)
    return out + data


def main():
    if os.path.isdir(CORPUS):
        shutil.rmtree(CORPUS)
    fx = "crates/peft-models/tests/fixtures"
    copy("gguf", "tiny.gguf", f"{fx}/gguf/tiny.gguf")
    copy("gguf", "aligned64.gguf", f"{fx}/gguf/aligned64.gguf")
    out("gguf", "llama_tokenizer.gguf", small_llama_gguf())

    copy("safetensors", "lora_llama", "crates/peft-core/tests/fixtures/lora_llama/adapter_model.safetensors")
    copy("safetensors", "ia3_llama", "crates/peft-core/tests/fixtures/ia3_llama/adapter_model.safetensors")
    copy("safetensors", "prefix", "crates/peft-prompt/tests/fixtures/prefix/adapter_model.safetensors")
    copy("safetensors", "qwen2_bf16_shard2", f"{fx}/qwen2_bf16_sharded/model-00002-of-00002.safetensors")

    for name, rel in [
        ("lora_llama", "crates/peft-core/tests/fixtures/lora_llama"),
        ("ia3_llama", "crates/peft-core/tests/fixtures/ia3_llama"),
        ("dora_llama", "crates/peft-lora/tests/fixtures/dora_llama"),
        ("lora_bias_qwen2", "crates/peft-lora/tests/fixtures/lora_bias_qwen2"),
        ("prefix", "crates/peft-prompt/tests/fixtures/prefix"),
        ("p_tuning_lstm", "crates/peft-prompt/tests/fixtures/p_tuning_lstm"),
        ("prompt_tuning_text", "crates/peft-prompt/tests/fixtures/prompt_tuning_text"),
    ]:
        copy("adapter_config", name + ".json", rel + "/adapter_config.json")

    for name in ["llama3_rope", "mistral", "qwen2", "bert_seq_cls", "llama_gqa"]:
        copy("model_config", name + ".json", f"{fx}/{name}/config.json")

    q = "crates/peft-qlora/tests/fixtures"
    out("bnb_quant_state", "nf4_double", one_layer(f"{q}/llama_gqa_nf4/model.safetensors", "model.layers.0.self_attn.q_proj"))
    out("bnb_quant_state", "fp4", one_layer(f"{q}/llama_gqa_fp4/model.safetensors", "model.layers.0.self_attn.k_proj"))

    with open(os.path.join(ROOT, "data/demo/train.jsonl")) as f:
        lines = f.read().splitlines()
    out("train_jsonl", "prompt_completion.jsonl", "\n".join(lines[:2]) + "\n")
    out(
        "train_jsonl",
        "chat.jsonl",
        json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]})
        + "\n\n"
        + json.dumps({"text": "Plain text, learned whole."})
        + "\n",
    )
    with open(os.path.join(ROOT, "data/demo/preferences.jsonl")) as f:
        lines = f.read().splitlines()
    out("preference_jsonl", "demo.jsonl", "\n".join(lines[:2]) + "\n")

    copy("train_toml", "demo.toml", "data/demo/demo.toml")
    out(
        "train_toml",
        "qlora.toml",
        'model = "model"\nmethod = "qlora"\ndata = "d.jsonl"\nout = "o"\nquantize = "fp4"\n'
        'schedule = "cosine"\nmax_grad_norm = 0.0\nnum_virtual_tokens = 4\npack = true\n',
    )


if __name__ == "__main__":
    main()
