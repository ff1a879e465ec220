#!/usr/bin/env python
"""The end-to-end run on a GPU, in resumable phases (a lent GPU allows 10 minutes a command).

    python benchmarks/gpu_run.py main      # train the default model with the default config; evaluate; judge
    python benchmarks/gpu_run.py compare   # the HumanEval comparison (base / control / experiment, 2 folds)
    python benchmarks/gpu_run.py bench     # benchmarks/bench.py
    python benchmarks/gpu_run.py repro     # the base model's greedy arms again, into humaneval-repro/ (run-to-run check)

Everything goes under --work (default outputs/gpu); each phase skips what is already finished, then packs its
results (no checkpoints, no model weights but the final adapter) into --pack as gzipped tar parts of at most 15 MB.
`benchmarks/gpu_session.sh` shows how it was run on a lent machine.
"""
import argparse, io, json, os, sys, tarfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def phase_main(work):
    from qlora_nb.core import load_config
    from qlora_nb.train import train, write_json, environment
    from qlora_nb.evaluate import evaluate_run, judge_run
    cfg = load_config(overrides=[f'output.output_dir={work}', 'output.run_name=main', 'train.logging_steps=1',
                                 'train.eval_steps=5', 'train.save_steps=10', 'eval.num_samples=16'])
    run = cfg.run
    write_json(work/'environment.json', environment())
    t = time.time()
    if not run.summary_file.exists(): train(cfg, live=False)
    if not run.metrics_file.exists(): evaluate_run(run)
    if not run.judge_file.exists(): judge_run(run)
    return {'main_s': time.time() - t}


def phase_compare(work, n, batch_size, sample_adapters=True):
    "The study of `qlora_nb compare`, into WORK/humaneval (the layout of the committed results)."
    from qlora_nb.core import Study, load_config
    from qlora_nb.study import run_comparison
    t = time.time()
    cfg = load_config(overrides=[f'eval.humaneval_n={n}'])
    run_comparison(cfg, Study(work/'humaneval'), batch_size=batch_size, workers=os.cpu_count(), sample_adapters=sample_adapters)
    return {'compare_s': time.time() - t}


def phase_repro(work):
    "Greedy base arms again, with the batch size of the first run, to check they are identical run to run."
    from qlora_nb.core import RunConfig, Study
    from qlora_nb.humaneval import evaluate_arm
    from qlora_nb.study import arm_specs
    from qlora_nb.infer import load_generator
    t, m, study = time.time(), load_generator('default'), Study(work/'humaneval-repro')
    for name in ('base-chat-greedy', 'base-raw-greedy'):
        if not study.arm_results(name).exists():
            evaluate_arm(arm_specs(RunConfig())[name], *m, study.arm_dir(name), batch_size=160, workers=os.cpu_count())
    return {'repro_s': time.time() - t}


def phase_bench(work):
    sys.path.insert(0, str(ROOT/'benchmarks'))
    import bench
    t = time.time()
    bench.main(['--out', str(work/'bench.json')])
    return {'bench_s': time.time() - t}


def keep(path:Path) -> bool:
    "Results worth bringing back: not checkpoints, not the TensorBoard logs."
    if any(p.startswith('checkpoint-') or p == 'logs' for p in path.parts): return False
    # the comparison's adapters stay behind: only their training summaries come back
    from qlora_nb.core import Run
    kept = (Run.SUMMARY, Run.HISTORY, Run.CONFIG)
    return not (path.parts[:2] == ('humaneval', 'runs') and path.name not in kept)


def pack(work:Path, dest:Path, limit=15_000_000):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w:gz') as tar:
        for p in sorted(work.rglob('*')):
            if p.is_file() and keep(p.relative_to(work)): tar.add(p, arcname=str(p.relative_to(work)))
    data = buf.getvalue(); dest.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(data), limit): (dest/f'gpu_results.tgz.{i // limit:02d}').write_bytes(data[i:i + limit])
    print(f'packed {len(data) / 1e6:.1f} MB into {dest}')


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('phases', nargs='+', choices=['main', 'compare', 'bench', 'repro'])
    ap.add_argument('--work', default='outputs/gpu'); ap.add_argument('--pack')
    ap.add_argument('--greedy-adapters', action='store_true', help='adapters: greedy arms only (when GPU time is short)')
    ap.add_argument('--n', type=int, default=20); ap.add_argument('--batch-size', type=int, default=160)
    a = ap.parse_args()
    work = Path(a.work); work.mkdir(parents=True, exist_ok=True)
    times = json.loads((work/'wall_times.json').read_text()) if (work/'wall_times.json').exists() else {}
    try:
        for ph in a.phases:
            times |= {'main': lambda: phase_main(work), 'compare': lambda: phase_compare(work, a.n, a.batch_size, not a.greedy_adapters),
                      'bench': lambda: phase_bench(work), 'repro': lambda: phase_repro(work)}[ph]()
            (work/'wall_times.json').write_text(json.dumps(times, indent=2))
    finally:
        if a.pack: pack(work, Path(a.pack))
