#!/usr/bin/env python
"""Where the product's training step waits for the GPU, and what not waiting is worth (issue #17's
`default_model_gpu_busy`). The default job's profile (`bench.py`'s `profile_case`: `train()` on the default model, its
fourth epoch traced), with the waits put back one by one, side by side in one process:

* `product`: the code as it ships (`SyncFreeSFTTrainer`, TRL's head scoring every position, batches copied to the GPU
  without blocking);
* `compact head`: the same with TRL's head picking the trained positions (four waits per step);
* `trl metrics`: TRL's own `compute_loss` and `log` (five waits per micro-batch more, the compact head);
* `blocking copies`: the product with accelerate's default, a blocking copy of each batch;
* `before`: the product before 2026-11-23 (TRL's metrics and head, blocking copies);
* `module walks`: the product with transformers' own bookkeeping, which walks every module of the model each step
  (its FLOP count, `model.train()`, clipping and zeroing over all parameters), as before `ModelWalks` (04).

Each arm runs `--repeats` times, interleaved. Then one more run of the product under
`torch.cuda.set_sync_debug_mode('warn')` over the same window lists every wait left, by the line that asked for it.

    python benchmarks/host_waits.py --out benchmarks/results/host-waits-<gpu>-<date>.json
    python benchmarks/host_waits.py --arms product "module walks" --out ...   # the arms named
    python benchmarks/host_waits.py --tiny     # anywhere: the same code on the tiny model (a CPU has no waits to list)
"""
import argparse, collections, json, sys, warnings
from contextlib import ExitStack
from pathlib import Path
from unittest.mock import patch

import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT/'benchmarks'))
import bench
import qlora_nb.train as product
from trl import SFTTrainer


def waits_put_back(arm):
    "The patches that put back the waits an arm names (none for `product`)."
    from contextlib import nullcontext
    patches = []
    if arm == 'compact head': patches.append(patch.object(product, 'every_position_scored', nullcontext))
    if arm in ('trl metrics', 'before'):
        patches.append(patch.multiple(product.SyncFreeSFTTrainer, compute_loss=SFTTrainer.compute_loss,
                                      log=SFTTrainer.log))
    if arm == 'module walks':
        patches.append(patch.multiple(product.SyncFreeSFTTrainer, train=SFTTrainer.train,
                                      floating_point_ops=SFTTrainer.floating_point_ops,
                                      _clip_grad_norm=SFTTrainer._clip_grad_norm))
    if arm in ('blocking copies', 'before'):
        shipped = product.sft_config
        blocking = lambda cfg, compiled=False, **kw: shipped(cfg, compiled, **{**kw, 'accelerator_config': {'non_blocking': False}})
        patches.append(patch.object(product, 'sft_config', blocking))
    return patches


def profiled(arm, model_path, max_len, work, window):
    with ExitStack() as stack:
        for p in waits_put_back(arm): stack.enter_context(p)
        r = bench.profile_case(model_path, max_len, work, **window)
    untraced = sum(r['unprofiled_step_wall_s']) / len(r['unprofiled_step_wall_s'])
    keep = ('gpu_busy_fraction', 'gpu_busy_fraction_untraced', 'step_wall_s', 'gpu_busy_s_per_step', 'kernels_per_step',
            'tokens_per_step', 'cuda_graph_passes', 'first_profiled_step', 'graph_captures_in_window')
    return {'arm': arm, **{k: r.get(k) for k in keep}, 'untraced_step_s': untraced,
            'untraced_tokens_per_s': r['tokens_per_step'] / untraced, 'step_s': r['step_s']}


class SyncWarnings(TrainerCallback):
    "Records every wait for the GPU (torch's sync debug mode) in steps `first` + 1 to `first` + `steps`."
    def __init__(self, first, steps): self.first, self.steps, self.caught, self.ctx = first, steps, [], None
    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.first and torch.cuda.is_available():
            self.ctx = warnings.catch_warnings(record=True); self.caught = self.ctx.__enter__()
            warnings.simplefilter('always'); torch.cuda.set_sync_debug_mode('warn')
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.first + self.steps and self.ctx is not None:
            torch.cuda.set_sync_debug_mode('default'); self.ctx.__exit__(None, None, None); self.ctx = None
    def report(self):
        where = collections.Counter(f'{Path(w.filename).name}:{w.lineno}' for w in self.caught
                                    if 'synchronizing' in str(w.message))
        return {'waits_per_step': sum(where.values()) / self.steps,
                'by_line': {k: v / self.steps for k, v in where.most_common()}}


def sync_census(model_path, max_len, work, first, steps):
    cb, cfg = SyncWarnings(first, steps), bench.default_job_config(work, 'census', model_path, max_len)
    product.train(cfg, callbacks=[cb, bench.StopAfter(first + steps)], live=False)
    return cb.report()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--tiny', action='store_true', help='the tiny model, a short window (checks the code)')
    ap.add_argument('--repeats', type=int, default=2)
    ap.add_argument('--arms', nargs='+', default=['product', 'compact head', 'before'])
    ap.add_argument('--out', required=True)
    args = ap.parse_args(argv)
    import tempfile
    from qlora_nb.weights import resolve_model, tiny_model_dir
    model_path = str(tiny_model_dir() if args.tiny else resolve_model('default'))
    max_len, window = (512, bench.TINY_PROFILE_WINDOW) if args.tiny else (2048, bench.PROFILE_WINDOW)
    work, out = Path(tempfile.mkdtemp(prefix='qlora_nb_waits_')), Path(args.out)
    res = {'environment': bench.environment(), 'window': window, 'runs': []}
    for i in range(args.repeats):
        for arm in args.arms:
            res['runs'].append(profiled(arm, model_path, max_len, work / f'{arm}-{i}'.replace(' ', '_'), window))
            print(json.dumps({k: v for k, v in res['runs'][-1].items() if k != 'step_s'}), flush=True)
            out.write_text(json.dumps(res, indent=1))
    res['census'] = sync_census(model_path, max_len, work / 'census', window['first'], window['steps'])
    print(json.dumps(res['census'], indent=1))
    out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == '__main__':
    main()
