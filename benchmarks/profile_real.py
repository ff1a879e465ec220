#!/usr/bin/env python
"""Where the time of qlora_nb's real-data training step goes (default model, HumanEval SFT lengths, groups of 4).

    python benchmarks/profile_real.py [--out profile.json]

Runs the same steps as bench.py's real-data case under torch.profiler and reports: wall time per step, the time
the GPU was busy (sum of kernel times), the number of kernels launched per step, and the top kernels. A GPU busy a
small fraction of the step means the step is bound by launching kernels (Python + dispatch), not by arithmetic.
"""
import argparse, json, sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent)); sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench


def main(argv=None):
    ap = argparse.ArgumentParser(); ap.add_argument('--out'); ap.add_argument('--steps', type=int, default=5)
    args = ap.parse_args(argv)
    from torch.profiler import ProfilerActivity, profile
    from qlora_nb.core import load_config
    from qlora_nb.data import prepare_data
    from qlora_nb.model import load_tokenizer
    from qlora_nb.weights import resolve_model
    device = torch.device('cuda')
    path = str(resolve_model('default')); tok = load_tokenizer(path)
    data = prepare_data(load_config(overrides=[f'model.name={path}', 'data.max_seq_length=2048']), tok)
    rows = [data.splits['train'].select_columns(['input_ids', 'attention_mask', 'labels'])[i] for i in range(4 * (args.steps + 3))]
    model, notes = bench.with_lora(bench.pretrained_4bit_model(path, device), 'qlora_nb', checkpointing=False)
    opt = bench.optimizer(model); model.train()
    groups = [rows[i:i + 4] for i in range(0, len(rows), 4)]
    for g in groups[:3]: bench.train_group(model, opt, g, 'qlora_nb', 2048, tok.pad_token_id, device)
    torch.cuda.synchronize(); t = time.time()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for g in groups[3:]: bench.train_group(model, opt, g, 'qlora_nb', 2048, tok.pad_token_id, device)
        torch.cuda.synchronize()
    wall = (time.time() - t) / args.steps
    kern = sum(getattr(e, 'self_device_time_total', getattr(e, 'self_cuda_time_total', 0)) for e in prof.key_averages()) / 1e6 / args.steps
    launches = sum(e.count for e in prof.key_averages() if e.key in ('cudaLaunchKernel', 'cuLaunchKernel', 'cudaLaunchKernelExC')) / args.steps
    top = sorted(prof.key_averages(), key=lambda e: -getattr(e, 'self_device_time_total', 0))[:12]
    res = {'step_wall_s': wall, 'gpu_busy_s_per_step': kern, 'gpu_busy_fraction': kern / wall, 'kernel_launches_per_step': launches,
           'liger': notes.get('liger'), 'gpu': torch.cuda.get_device_name(0),
           'top_kernels': [{'name': e.key[:90], 'ms_per_step': getattr(e, 'self_device_time_total', 0) / 1e3 / args.steps, 'calls_per_step': e.count / args.steps} for e in top]}
    print(json.dumps(res, indent=2))
    if args.out: Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == '__main__':
    main()
