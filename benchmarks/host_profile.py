#!/usr/bin/env python
"""Where the host's time goes in the product's training step (issue #17's `default_model_gpu_busy`): the default job
(`bench.py`'s `default_job_config`: `train()` on the default model, its batch, accumulation and logging), with
Python's own profiler (cProfile) over the optimizer steps `first` + 1 to `first` + `steps` (the fourth epoch: the
CUDA graphs of every batch shape captured before it), as `bench.PROFILE_WINDOW`.

torch.profiler's host trace names operators; what it leaves as `ProfilerStep*`'s own time (three quarters of the
traced step on an H200, 2026-11-23) is Python that calls no operator: the trainer's loop, the collator, callbacks.
cProfile names those functions. It slows every Python call, so its times are relative: read shares, not
milliseconds, and the untraced steps (`reference`, as the bench's) give the real step time beside them.

    python benchmarks/host_profile.py --out benchmarks/results/host-profile-<gpu>-<date>.json
    python benchmarks/host_profile.py --tiny --out /tmp/hp.json   # anywhere: the same code on the tiny model
"""
import argparse, cProfile, json, pstats, sys, time
from pathlib import Path

import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT/'benchmarks'))
import bench


class HostProfiled(TrainerCallback):
    "cProfile over optimizer steps `first` + 1 to `first` + `steps` (it measures, it does not train)."
    def __init__(self, first, steps): self.first, self.steps, self.prof, self.wall = first, steps, None, None
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.first:
            bench.sync(); self.prof, self.t = cProfile.Profile(), time.perf_counter(); self.prof.enable()
        elif state.global_step == self.first + self.steps and self.prof is not None:
            self.prof.disable(); bench.sync(); self.wall = time.perf_counter() - self.t


def package(filename:str, name:str) -> str:
    "The package a profiled function belongs to: site-packages' top folder, qlora_nb, or the kind of builtin."
    if filename == '~': return 'torch (C)' if 'torch' in name or 'Tensor' in name else 'builtins (C)'
    parts = Path(filename).parts
    for anchor in ('site-packages', 'site', 'site_u'):
        if anchor in parts and parts.index(anchor) + 1 < len(parts): return parts[parts.index(anchor) + 1]
    return 'qlora_nb' if 'qlora_nb' in parts else 'python'


def report(prof:cProfile.Profile, steps:int, wall:float, top:int=40) -> dict:
    "Own and cumulative time per step of the top functions, and own time by package, as shares of the profiled time."
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, primitive calls, own s, cumulative s, callers)
    own_total = sum(v[2] for v in stats.values())
    rows = [{'function': f'{Path(f).name}:{line}({name})' if f != '~' else name, 'package': package(f, name),
             'calls_per_step': v[1] / steps, 'own_ms_per_step': 1e3 * v[2] / steps,
             'cumulative_ms_per_step': 1e3 * v[3] / steps} for (f, line, name), v in stats.items()]
    by_package = {}
    for r in rows: by_package[r['package']] = by_package.get(r['package'], 0) + r['own_ms_per_step']
    return {'profiled_step_ms': 1e3 * wall / steps, 'own_ms_per_step': 1e3 * own_total / steps,
            'own_share_by_package': {k: v / (1e3 * own_total / steps) for k, v in
                                     sorted(by_package.items(), key=lambda kv: -kv[1])},
            'top_own': sorted(rows, key=lambda r: -r['own_ms_per_step'])[:top],
            'top_cumulative': sorted(rows, key=lambda r: -r['cumulative_ms_per_step'])[:top]}


def host_profile(model_path, max_len, work, window, extra=()):
    "The default job through `train()`, cProfiled over `window`'s GPU-trace steps; the untraced steps for scale."
    from qlora_nb.train import train
    first, steps = window['first'], window['steps']
    prof, timer = HostProfiled(first, steps), bench.StepTimer()
    cfg = bench.default_job_config(work, 'host-profile', model_path, max_len, extra)
    res = train(cfg, callbacks=[prof, timer, bench.StopAfter(first + steps)], live=False)
    step_s = [b - a for a, b in zip([timer.start, *timer.times], timer.times)]
    lo, hi = window['reference']
    untraced = [s for n, s in enumerate(step_s, 1) if lo <= n <= hi and not timer.captured()[n - 1]]
    return {**report(prof.prof, steps, prof.wall), 'untraced_step_ms': 1e3 * sum(untraced) / len(untraced),
            'window': window, 'overrides': list(extra), **res.summary['speed']}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--tiny', action='store_true', help='the tiny model, a short window (checks the code)')
    ap.add_argument('--set', action='append', default=[], help='a product setting KEY=VALUE for the run')
    ap.add_argument('--out', required=True)
    args = ap.parse_args(argv)
    import tempfile
    from qlora_nb.weights import resolve_model, tiny_model_dir
    model_path = str(tiny_model_dir() if args.tiny else resolve_model('default'))
    max_len, window = (512, bench.TINY_PROFILE_WINDOW) if args.tiny else (2048, bench.PROFILE_WINDOW)
    work = Path(tempfile.mkdtemp(prefix='qlora_nb_host_'))
    res = {'environment': bench.environment(), **host_profile(model_path, max_len, work, window, args.set)}
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in ('profiled_step_ms', 'untraced_step_ms', 'own_share_by_package')}, indent=1))
    for r in res['top_own'][:25]: print(f"{r['own_ms_per_step']:8.2f} ms {r['calls_per_step']:8.1f}x  {r['function'][:90]}")
    return res


if __name__ == '__main__':
    main()
