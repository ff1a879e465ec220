#!/usr/bin/env python
"""Training speed and memory, side by side in one run: the seeds' QLoRA recipe against qlora_nb's path.

    python benchmarks/bench.py              # on a GPU: the full benchmark (about 5 minutes on an H100)
    python benchmarks/bench.py --tiny       # anywhere: the same code on a tiny model, a few steps (CI runs this)

Writes benchmarks/results/<tag>.json (or --out). Both recipes build the 4-bit model the same way (NF4 + double
quantization, bf16 compute), quantizing in memory: the weights' values do not change speed or memory, and an
8B checkpoint need not exist. Both train with the same loop (forward, backward, optimizer step); they differ
only in what the recipes differ in:

* baseline (the seeds): peft's `prepare_model_for_kbit_training` (which upcasts embeddings, norms and lm_head to
  float32), gradient checkpointing (use_reentrant=False) always, every example padded to max_seq_length.
* qlora_nb: no upcast, no padding (batches of one real-length example, or length-grouped batches), gradient
  checkpointing only for the 8B shape (where memory needs it), the seed's batch 1 x accumulation 4 run as one batch of 4, Liger kernels (fused linear cross-entropy,
  RMSNorm, SwiGLU, RoPE) when `liger-kernel` and a GPU are present.

Shared: LoRA r=16, alpha=32, dropout 0.05 on q,k,v,o,gate,up,down; paged AdamW 8-bit, lr 2e-4; seed 0.

Model FLOPs per trained token (the convention of the MFU column): 4*N_frozen (forward + input gradients of the
frozen base; no weight gradients) + 6*N_lora + 12*L*s*d_attn for attention scores and values (forward + backward,
no causal discount); recomputation from checkpointing is not counted. The peak is a measured bf16 matmul.
"""
import argparse, datetime, gc, json, platform, random, sys, time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']


def quantize_linears(model, device):
    "Replace every nn.Linear but lm_head by a bitsandbytes NF4 + double-quant Linear4bit (as from_pretrained would)."
    import bitsandbytes as bnb
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear) and name != 'lm_head':
                with torch.device('meta'):
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.bfloat16, quant_type='nf4', compress_statistics=True)
                q.weight = bnb.nn.Params4bit(child.weight.data.to(torch.bfloat16), requires_grad=False,
                                             quant_type='nf4', compress_statistics=True)
                setattr(mod, name, q.to(device))
                del child
    gc.collect(); torch.cuda.empty_cache() if device.type == 'cuda' else None
    model.is_loaded_in_4bit = True
    model.config.quantization_config = {'load_in_4bit': True, 'bnb_4bit_quant_type': 'nf4'}
    return model


def random_4bit_model(config, device, seed=0):
    "A model of `config` with random weights, quantized to NF4."
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return quantize_linears(model, device)


def pretrained_4bit_model(path, device):
    "A real checkpoint (bf16 on disk), quantized the same way."
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device)
    return quantize_linears(model, device)


def try_liger(model):
    "Patch `model` with Liger kernels where they apply; the reason when they do not."
    if not torch.cuda.is_available(): return 'not used: no GPU (Liger kernels are Triton)'
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True,
                                        cross_entropy=False, fused_linear_cross_entropy=True)
        return 'fused linear cross-entropy, RMSNorm, SwiGLU, RoPE'
    except Exception as e:
        return f'not used: {type(e).__name__}: {e}'.splitlines()[0][:200]


def with_lora(model, recipe, checkpointing):
    "The recipe's preparation and the shared LoRA adapters."
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from qlora_nb.lora import prepare_for_qlora
    notes = {}
    if recipe == 'baseline':
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={'use_reentrant': False})
    else:
        notes['liger'] = try_liger(model)
        model = prepare_for_qlora(model, checkpointing)
    model.config.use_cache = False
    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type='CAUSAL_LM')
    return get_peft_model(model, cfg), notes


def optimizer(model):
    import bitsandbytes as bnb
    params = [p for p in model.parameters() if p.requires_grad]
    if torch.cuda.is_available(): return bnb.optim.PagedAdamW8bit(params, lr=2e-4)
    return torch.optim.AdamW(params, lr=2e-4)  # bitsandbytes' 8-bit optimizers need a GPU


def sync():
    if torch.cuda.is_available(): torch.cuda.synchronize()


def step(model, opt, batch):
    out = model(**batch)
    out.loss.backward()
    opt.step(); opt.zero_grad(set_to_none=True)
    return out.loss.item()


def matmul_peak_tflops(device):
    "Measured bf16 matmul throughput (the MFU denominator)."
    if device.type != 'cuda': return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16); b = torch.randn_like(a)
    for _ in range(3): a @ b
    sync(); t = time.time()
    for _ in range(20): a @ b
    sync()
    return 2 * 8192 ** 3 * 20 / (time.time() - t) / 1e12


def flops_per_token(config, n_lora, seq):
    c, hd = config, config.hidden_size // config.num_attention_heads
    per_layer = c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * hd + c.hidden_size * c.hidden_size \
                + 3 * c.hidden_size * c.intermediate_size
    n_frozen = c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size  # lm_head is a matmul; the input embedding a lookup
    return 4 * n_frozen + 6 * n_lora + 12 * config.num_hidden_layers * seq * config.hidden_size


def reset_memory():
    gc.collect()
    if torch.cuda.is_available(): torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def synthetic_case(config, recipe, seq, batch, steps, warmup, device, peak_tflops):
    "Tokens/s and peak memory of `recipe` on random tokens (every token trained)."
    reset_memory()
    model = random_4bit_model(config, device)
    model, notes = with_lora(model, recipe, checkpointing=True)
    opt = optimizer(model)
    gc.collect()
    if torch.cuda.is_available(): torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()  # building in bf16 is not training
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g).to(device)
    data = {'input_ids': ids, 'attention_mask': torch.ones_like(ids), 'labels': ids}
    for _ in range(warmup): step(model, opt, data)
    sync(); t = time.time()
    losses = [step(model, opt, data) for _ in range(steps)]
    sync(); dt = time.time() - t
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tps = batch * seq * steps / dt
    res = {'recipe': recipe, 'seq': seq, 'batch': batch, 'steps': steps, 'tokens_per_s': tps, 'peak_gib': peak_gib(),
           'loss_last': losses[-1], 'lora_params': n_lora, **notes}
    if peak_tflops: res['mfu'] = tps * flops_per_token(config, n_lora, seq) / (peak_tflops * 1e12)
    del model, opt; reset_memory()
    return res


def pad_batch(rows, width, pad_id):
    pad = lambda x, v: x + [v] * (width - len(x))
    return {'input_ids': torch.tensor([pad(r['input_ids'], pad_id) for r in rows]),
            'attention_mask': torch.tensor([pad(r['attention_mask'], 0) for r in rows]),
            'labels': torch.tensor([pad(r['labels'], -100) for r in rows])}


def train_group(model, opt, rows, recipe, max_len, pad_id, device):
    """One optimizer step on a group of examples (the seed's batch 1 x accumulation 4).
    baseline: one example at a time, each padded to max_len, gradients accumulated with token weights;
    qlora_nb: the group as one batch padded to its longest example. Both minimise the token mean of the group."""
    n_group = sum(sum(l != -100 for l in r['labels'][1:]) for r in rows)
    if recipe == 'baseline':
        chunks = [([r], max_len) for r in rows]
    else:
        chunks = [(rows, max(len(r['input_ids']) for r in rows))]
    total, cells = 0.0, 0
    for chunk, width in chunks:
        b = {k: v.to(device) for k, v in pad_batch(chunk, width, pad_id).items()}
        n = int((b['labels'][:, 1:] != -100).sum())
        loss = model(**b).loss * n / n_group
        loss.backward(); total += loss.item(); cells += b['input_ids'].numel()
    opt.step(); opt.zero_grad(set_to_none=True)
    return total, cells


def real_case(model_path, recipe, device, max_len, max_examples, group, peak_tflops):
    "One epoch of the default model on HumanEval SFT examples at their real lengths; time, tokens/s, eval loss."
    from qlora_nb.core import load_config
    from qlora_nb.data import prepare_data
    from qlora_nb.model import load_tokenizer
    from qlora_nb.evaluate import response_perplexity
    tok = load_tokenizer(model_path)
    cfg = load_config(overrides=[f'model.name={model_path}', f'data.max_seq_length={max_len}']
                      + ([f'data.max_samples={max_examples}'] if max_examples else []))
    data = prepare_data(cfg, tok)
    train, val = data.splits['train'].select_columns(['input_ids', 'attention_mask', 'labels']), data.splits['validation']
    reset_memory(); torch.manual_seed(0)
    model = pretrained_4bit_model(model_path, device)
    model, notes = with_lora(model, recipe, checkpointing=False)
    opt = optimizer(model)
    if torch.cuda.is_available(): torch.cuda.reset_peak_memory_stats()
    model.train()
    order = list(range(len(train))); random.Random(0).shuffle(order)
    rows = [train[i] for i in order]
    sync(); t = time.time(); padded = real = 0; losses = []
    for i in range(0, len(rows), group):
        loss, cells = train_group(model, opt, rows[i:i + group], recipe, max_len, tok.pad_token_id, device)
        losses.append(loss); padded += cells; real += sum(len(r['input_ids']) for r in rows[i:i + group])
    sync(); dt = time.time() - t
    model.eval()
    ev = response_perplexity(model, tok, val, batch_size=4)
    res = {'recipe': recipe, 'examples': len(train), 'steps': len(losses), 'epoch_s': dt, 'tokens_per_s_all': padded / dt,
           'tokens_per_s_real': real / dt, 'padding_fraction': 1 - real / padded, 'peak_gib': peak_gib(),
           'first_train_loss': losses[0], 'final_train_loss': losses[-1], 'eval_loss': ev['loss'], 'eval_tokens': ev['tokens'], **notes}
    del model, opt; reset_memory()
    return res


def environment():
    import importlib.metadata as md
    vers = {}
    for p in ('torch', 'transformers', 'peft', 'bitsandbytes', 'trl', 'liger-kernel', 'triton'):
        try: vers[p] = md.version(p)
        except md.PackageNotFoundError: pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'), 'gpu': gpu,
            'python': platform.python_version(), 'cpu_count': __import__('os').cpu_count(), 'versions': vers}


def ratios(results):
    "qlora_nb / baseline for each case."
    out = {}
    for case, r in results.items():
        b, q = r['baseline'], r['qlora_nb']
        key = 'tokens_per_s' if 'tokens_per_s' in b else 'tokens_per_s_real'
        out[case] = {'speedup': q[key] / b[key], 'memory_ratio': (q['peak_gib'] / b['peak_gib']) if b['peak_gib'] else None}
        if 'eval_loss' in b: out[case]['eval_loss_rel_diff'] = (q['eval_loss'] - b['eval_loss']) / b['eval_loss']
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--tiny', action='store_true', help='a tiny model and a few steps (CPU-friendly; checks the code, not the speed)')
    ap.add_argument('--model', default='default', help='model of the real-data case')
    ap.add_argument('--steps', type=int, default=8); ap.add_argument('--warmup', type=int, default=2)
    ap.add_argument('--only', choices=['synthetic', 'real'], help='run only these cases')
    ap.add_argument('--out', help='results JSON (default: benchmarks/results/<gpu or cpu>-<date>.json)')
    args = ap.parse_args(argv)
    from qlora_nb.model import llama3_8b_config
    from qlora_nb.weights import resolve_model, tiny_model_dir
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if args.tiny:
        from transformers import LlamaConfig
        shape = LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
        synth = [('tiny-shape 128x1', 128, 1), ('tiny-shape 32x4', 32, 4)]
        model_path, max_len, max_examples, steps, warmup = str(tiny_model_dir()), 512, 4, 2, 1
    else:
        shape = llama3_8b_config()
        synth = [('llama3-8b-shape 2048x1', 2048, 1), ('llama3-8b-shape 512x4', 512, 4)]
        model_path, max_len, max_examples, steps, warmup = str(resolve_model(args.model)), 2048, None, args.steps, args.warmup
    peak = matmul_peak_tflops(device)
    results = {}
    dest = Path(args.out or ROOT/'benchmarks'/'results'/f"{'tiny-' if args.tiny else ''}{'gpu' if peak else 'cpu'}-{datetime.date.today()}.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    def save():  # after every case, so an interrupted run keeps what it measured
        out = {'environment': environment(), 'matmul_peak_tflops': peak, 'tiny': args.tiny, 'results': results, 'ratios': ratios(results)}
        dest.write_text(json.dumps(out, indent=2))
        return out
    real_name = f'{Path(model_path).name} humaneval-sft real lengths, max {max_len}'
    cases = [(real_name, lambda r: real_case(model_path, r, device, max_len, max_examples, 4, peak))]
    cases += [(n, lambda r, seq=seq, b=b: synthetic_case(shape, r, seq, b, steps, warmup, device, peak)) for n, seq, b in synth]
    cases = [c for c in cases if not args.only or (c[0] == real_name) == (args.only == 'real')]
    for name, run in cases:
        results[name] = {r: run(r) for r in ('baseline', 'qlora_nb')}
        print(name, json.dumps(results[name]), flush=True)
        out = save()
    print(json.dumps(out['ratios'], indent=2)); print(f'wrote {dest}')
    return out


if __name__ == '__main__':
    main()
