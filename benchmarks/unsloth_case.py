#!/usr/bin/env python
"""Unsloth's side of `bench.py`'s 8B case, run by it in a separate process (Unsloth pins older trl and datasets, and
must be imported before transformers). Same shape, LoRA, optimizer and random tokens as the other recipes; Unsloth's
own loader, LoRA wrapper and gradient checkpointing ("unsloth"). Prints one JSON line.

    PYTHONPATH=/tmp/site_u:$PYTHONPATH python benchmarks/unsloth_case.py --seq 2048 --dropout 0.05
"""
import argparse, json, sys, time
from pathlib import Path

import unsloth  # noqa: F401  (first: it patches transformers and peft on import)
from unsloth import FastLanguageModel
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'benchmarks'))
TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']


def checkpoint(work:Path) -> Path:
    "A random Llama-3-8B-shaped bf16 checkpoint with a small tokenizer (Unsloth loads from a folder)."
    dest = work/'llama3-8b-random'
    if (dest/'config.json').exists(): return dest
    from transformers import AutoModelForCausalLM
    from qlora_nb.model import llama3_8b_config, load_tokenizer
    from qlora_nb.weights import resolve_model
    torch.manual_seed(0)
    with torch.device('cuda'): m = AutoModelForCausalLM.from_config(llama3_8b_config(), dtype=torch.bfloat16)
    m.save_pretrained(dest); load_tokenizer(resolve_model('default')).save_pretrained(dest)
    del m; torch.cuda.empty_cache()
    return dest


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--seq', type=int, default=2048); ap.add_argument('--batch', type=int, default=1)
    ap.add_argument('--steps', type=int, default=8); ap.add_argument('--warmup', type=int, default=2)
    ap.add_argument('--dropout', type=float, default=0.05); ap.add_argument('--work', default='/tmp/unsloth_work')
    ap.add_argument('--optim', default='adamw_torch_fused', choices=['adamw_torch_fused', 'paged_adamw_8bit'])
    a = ap.parse_args()
    path = checkpoint(Path(a.work))
    model, tok = FastLanguageModel.from_pretrained(str(path), max_seq_length=a.seq, dtype=torch.bfloat16, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=a.dropout, target_modules=TARGETS,
                                             bias='none', use_gradient_checkpointing='unsloth', random_state=0)
    import bitsandbytes as bnb
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (bnb.optim.PagedAdamW8bit(params, lr=2e-4) if a.optim == 'paged_adamw_8bit'
           else torch.optim.AdamW(params, lr=2e-4, fused=True))
    torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (a.batch, a.seq), generator=g).cuda()
    batch = {'input_ids': ids, 'attention_mask': torch.ones_like(ids), 'labels': ids}
    model.train()
    def step():
        loss = model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad(set_to_none=True); return loss.item()
    for _ in range(a.warmup): step()
    torch.cuda.synchronize(); t = time.perf_counter()
    losses = [step() for _ in range(a.steps)]
    torch.cuda.synchronize(); dt = time.perf_counter() - t
    import importlib.metadata as md, transformers  # the transformers imported, Unsloth's pin (the product's may be newer)
    print(json.dumps({'recipe': 'unsloth', 'dropout': a.dropout, 'seq': a.seq, 'batch': a.batch, 'steps': a.steps,
                      'tokens_per_s': a.batch * a.seq * a.steps / dt, 'peak_gib': torch.cuda.max_memory_allocated() / 2**30,
                      'loss_last': losses[-1], 'optim': a.optim, 'version': md.version('unsloth'),
                      'transformers': transformers.__version__}))


if __name__ == '__main__':
    main()
