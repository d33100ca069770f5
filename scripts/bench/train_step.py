"""One training step of Hugging Face transformers + peft on SmolLM2-135M's architecture,
the Python side of `cargo xtask bench train --compare-python`.

The same step as `peft-benches`' `train-step`: random weights with SmolLM2-135M's config,
random token ids, labels = input ids, LoRA r=16 (alpha 32, no dropout) on q, k, v, o, gate,
up and down (or QLoRA over an NF4 base, or full fine-tuning), gradient clipping at 1.0,
torch.optim.AdamW. Prints one JSON line like the Rust binary.

    python scripts/bench/train_step.py --method lora --threads 2 --batch 4 --seq-len 128
"""

import argparse
import json
import os
import resource
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="lora", choices=["lora", "qlora", "full"])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    import transformers
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=a.layers, num_attention_heads=9, num_key_value_heads=3,
        rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
        tie_word_embeddings=True, hidden_act="silu", bos_token_id=1, eos_token_id=2,
    )
    t0 = time.perf_counter()
    if a.method == "qlora":
        # transformers' route to a 4-bit base: save the random model, reload it quantized.
        import tempfile
        from transformers import BitsAndBytesConfig

        d = tempfile.mkdtemp()
        LlamaForCausalLM(config).save_pretrained(d)
        bnb = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32,
        )
        model = LlamaForCausalLM.from_pretrained(d, quantization_config=bnb, device_map=a.device)
    else:
        model = LlamaForCausalLM(config).to(a.device)
    if a.method in ("lora", "qlora"):
        lora = peft.LoraConfig(
            r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            task_type="CAUSAL_LM",
        )
        model = peft.get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, config.vocab_size, (a.batch, a.seq_len), generator=g).to(a.device)

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    for _ in range(a.warmup):
        step()
    if a.device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    step_s = (time.perf_counter() - t) / a.steps
    print(json.dumps({
        "method": a.method, "backend": f"pytorch-{a.device}", "batch": a.batch,
        "seq_len": a.seq_len, "rank": a.rank, "layers": a.layers, "threads": a.threads,
        "trainable": trainable, "build_s": build_s, "steps": a.steps, "step_s": step_s,
        "tokens_per_s": a.batch * a.seq_len / step_s,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "loss": loss,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }))


if __name__ == "__main__":
    main()
