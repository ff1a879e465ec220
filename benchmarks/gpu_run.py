#!/usr/bin/env python
"""The GPU run of record (issue #21), in resumable phases: a lent GPU allows 10 minutes a command.

    python benchmarks/gpu_run.py main          # train the default job (bf16); evaluate; judge (verdict probabilities)
    python benchmarks/gpu_run.py compare-base  # the study's base-model arms (raw / chat, greedy / n samples)
    python benchmarks/gpu_run.py compare-s0    # the study's adapters and their arms, training seed 0 (then s1, s2)
    python benchmarks/gpu_run.py compare       # all of the above for the study, in one go (--seeds of them)
    python benchmarks/gpu_run.py fp16          # the default job in float16 (what a Colab T4 gets) against the bf16 one
    python benchmarks/gpu_run.py bench         # benchmarks/bench.py
    python benchmarks/gpu_run.py repro         # the base model's greedy arms again, into humaneval-repro/ (run-to-run check)
    python benchmarks/gpu_run.py profile-gen   # where a sampled arm's generation time goes (cost of a step, top-p, attention)

Everything goes under --work (default outputs/gpu); each phase skips what is already finished (a study arm, an
adapter, a run), so a phase cut off by the time limit is run again to go on. Each phase's wall time goes into
wall_times.json, the study's per-arm generation seconds into humaneval/generation_times.json (target: <= 60 s for
an n=20 arm of one fold on an H200). Results (no checkpoints, no model weights but the final adapter) are packed
into --pack as gzipped tar parts of at most 15 MB. `benchmarks/gpu_session.sh` shows how it is run on a lent machine.
"""
import argparse, io, json, os, sys, tarfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


OVERRIDES = []  # --set KEY=VALUE, for every phase's config (a small model and job to try the phases on a CPU)


def record_environment(work):
    "environment.json: machine, versions and commit (`environment` reads QLORA_NB_COMMIT on a copy without git)."
    from qlora_nb.train import write_json, environment
    write_json(work/'environment.json', environment())


def phase_main(work):
    from qlora_nb.core import load_config
    from qlora_nb.train import train
    from qlora_nb.evaluate import evaluate_run, judge_run
    cfg = load_config(overrides=[f'output.output_dir={work}', 'output.run_name=main', 'train.logging_steps=1',
                                 'train.eval_steps=5', 'train.save_steps=10', 'eval.num_samples=16', *OVERRIDES])
    run = cfg.run
    record_environment(work)
    t = time.time()
    if not run.summary_file.exists(): train(cfg, live=False)
    if not run.metrics_file.exists(): evaluate_run(run)
    if not run.judge_file.exists(): judge_run(run)
    return {'main_s': time.time() - t}


def study_config(n, seeds):
    from qlora_nb.core import load_config
    return load_config(overrides=[f'eval.humaneval_n={n}', f'eval.training_seeds={seeds}', *OVERRIDES])


def phase_compare_base(work, n, batch_size):
    "The base model's arms of the study (no training), into WORK/humaneval."
    from qlora_nb.core import Study
    from qlora_nb.study import run_comparison
    t = time.time()
    run_comparison(study_config(n, 1), Study(work/'humaneval'), batch_size=batch_size, workers=os.cpu_count(), adapters=False)
    return {'compare_base_s': time.time() - t}


def phase_compare_seed(work, n, batch_size, seed, sample_adapters=True):
    "The study's adapters of training seed number `seed` and their arms (seeds' phases may run side by side)."
    from qlora_nb.core import Study
    from qlora_nb.study import run_comparison
    t = time.time()
    run_comparison(study_config(n, seed + 1), Study(work/'humaneval'), batch_size=batch_size,
                   workers=os.cpu_count(), sample_adapters=sample_adapters, seeds=[seed])
    return {f'compare_s{seed}_s': time.time() - t}


def generation_times(work):
    "Per arm of the study: the seconds its generation took, the samples it generated, how, and on what."
    from qlora_nb.core import Study
    study, out = Study(work/'humaneval'), {}
    for r in sorted(study.dir.glob('*/' + Study.ARM_RESULTS)):
        x = json.loads(r.read_text())
        out[r.parent.name] = {k: x.get(k) for k in ('generation_s', 'n_problems', 'batch_size', 'attention', 'device')}
        out[r.parent.name] |= {k: x['spec'].get(k) for k in ('n', 'generator', 'training_seed')}
    if out: (study.dir/'generation_times.json').write_text(json.dumps(out, indent=2))
    return out


def phase_fp16(work):
    "The default job with float16 compute (a T4 has no bfloat16), beside the bf16 main run: losses and wall time."
    from qlora_nb.core import load_config, Run
    from qlora_nb.train import train, write_json
    cfg = load_config(overrides=[f'output.output_dir={work}', 'output.run_name=main-fp16', 'train.logging_steps=1',
                                 'train.eval_steps=5', 'train.save_steps=10', *OVERRIDES, 'quant.compute_dtype=float16'])
    t = time.time()
    if not cfg.run.summary_file.exists(): train(cfg, live=False)
    keys = ('final_train_loss', 'best_eval_loss', 'final_eval_loss', 'final_eval_perplexity', 'wall_time_s', 'global_step')
    runs = {'float16': cfg.run, 'bfloat16': Run(work/'main')}
    from qlora_nb.core import resolve_compute_dtype
    dtype = lambda r: str(resolve_compute_dtype(r.cfg.quant.compute_dtype)).removeprefix('torch.')
    out = {name: {k: s.get(k) for k in keys} | {'compute_dtype': dtype(r), 'git_commit': s['environment'].get('git_commit'),
                                                  'gpu': s['environment'].get('gpu')}
           for name, r in runs.items() if (s := r.read_summary())}
    if len(out) == 2:
        out['eval_loss_difference (fp16 - bf16)'] = out['float16']['final_eval_loss'] - out['bfloat16']['final_eval_loss']
    write_json(work/'fp16.json', out)
    return {'fp16_s': time.time() - t}


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


def phase_profile_gen(work, n, batch_size):
    """Where an n-sample arm's generation time goes (the <= 60 s target), side by side in one process: one batch of the
    study's chat prompts timed at two lengths (the difference is the cost of a decoding step) with eager, grouped eager
    and SDPA attention, with and without top-p, with a static cache; one whole arm's generation (fold 0, n samples) with
    eager and grouped eager; greedy reproducibility of grouped eager (twice, and against eager); one short generation
    profiled. Writes profile_gen.json and profile_gen.txt."""
    import torch
    from dataclasses import replace
    from torch.profiler import ProfilerActivity, profile
    from qlora_nb.humaneval import fold_tasks, humaneval_prompt, read_problems
    from qlora_nb.infer import GenerationSettings, generate, load_merged_generator
    cfg, problems = study_config(n, 1), read_problems()
    fold0 = fold_tasks(problems, 0, cfg.data.n_folds, 42)
    tasks = fold0[:max(1, batch_size // n)]
    sys.path.insert(0, str(ROOT/'benchmarks'))
    from bench import sync
    out = {'batch': len(tasks) * n}
    s = GenerationSettings(max_new_tokens=32, temperature=cfg.eval.humaneval_temperature, top_p=0.95, seed=42)
    greedy = GenerationSettings(max_new_tokens=cfg.eval.humaneval_max_new_tokens)
    texts = {}
    for attn in ('grouped_eager', 'eager', 'sdpa'):
        model, tok = load_merged_generator(cfg.model.name, None, cfg.quant, attn_implementation=attn)
        prompts = [humaneval_prompt(problems[t], tok, 'chat') for t in tasks for _ in range(n)]
        def timed(ps=prompts, bs=len(prompts), **kw):
            g = replace(s, **kw)
            sync(); t = time.perf_counter(); generate(model, tok, ps, g, bs); sync()
            return time.perf_counter() - t
        def per_step(**kw):  # EOS held back until the last token, so that both lengths decode every step
            model.generation_config.min_new_tokens = 160
            long = timed(max_new_tokens=160, **kw)
            model.generation_config.min_new_tokens = 32
            short = timed(**kw); model.generation_config.min_new_tokens = None
            return {'s_32_tokens': short, 's_160_tokens': long, 'ms_per_step': (long - short) / 128 * 1e3}
        timed()  # warm-up
        out[f'{attn} top_p=0.95'] = per_step()
        if attn == 'grouped_eager':
            out[f'{attn} top_p=1.0'] = per_step(top_p=1.0)
            model.generation_config.cache_implementation = 'static'
            try: out[f'{attn} top_p=0.95 static cache'] = per_step()
            except Exception as e: out[f'{attn} top_p=0.95 static cache'] = {'error': repr(e)[:300]}
            model.generation_config.cache_implementation = None
        if attn != 'sdpa':  # a whole arm: fold 0's problems, n samples each, in batches of batch_size
            arm_prompts = [humaneval_prompt(problems[t], tok, 'chat') for t in fold0 for _ in range(n)]
            out[f'{attn} whole arm'] = {'s': timed(arm_prompts, batch_size, max_new_tokens=cfg.eval.humaneval_max_new_tokens),
                                        'completions': len(arm_prompts)}
            one_each = [humaneval_prompt(problems[t], tok, 'chat') for t in fold0]
            texts[attn] = [generate(model, tok, one_each, greedy, len(one_each)) for _ in range(2 if attn == 'grouped_eager' else 1)]
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            with profile(activities=acts) as prof: timed()
            by = 'cuda_time_total' if torch.cuda.is_available() else 'cpu_time_total'
            with open(work/'profile_gen.txt', 'a') as f:
                f.write(f'==== {attn}\n' + prof.key_averages().table(sort_by=by, row_limit=30) + '\n'
                        + prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=20) + '\n')
        del model
        if torch.cuda.is_available(): torch.cuda.empty_cache()
    same = lambda a, b: sum(x == y for x, y in zip(a, b))
    g = texts['grouped_eager']
    out['greedy identical'] = {'of': len(g[0]), 'grouped_eager twice': same(*g), 'grouped_eager vs eager': same(g[0], texts['eager'][0])}
    (work/'profile_gen.json').write_text(json.dumps(out, indent=2)); print(json.dumps(out, indent=2))
    return {'profile_gen_s': sum(v.get('s_160_tokens', 0) + v.get('s', 0) for k, v in out.items() if isinstance(v, dict))}


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


PHASES = ['main', 'compare-base', 'compare-s0', 'compare-s1', 'compare-s2', 'compare', 'fp16', 'bench', 'repro',
          'profile-gen']


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('phases', nargs='+', choices=PHASES)
    ap.add_argument('--work', default='outputs/gpu'); ap.add_argument('--pack')
    ap.add_argument('--greedy-adapters', action='store_true', help='adapters: greedy arms only (when GPU time is short)')
    ap.add_argument('--n', type=int, default=20); ap.add_argument('--batch-size', type=int, default=820)
    ap.add_argument('--seeds', type=int, default=3, help="training seeds per adapter arm for 'compare'")
    ap.add_argument('--set', action='append', default=[], metavar='KEY=VALUE', help="a config override for every phase")
    return ap.parse_args(argv)


def phase_runners(work, a) -> dict:
    seed_phase = lambda s: (lambda: phase_compare_seed(work, a.n, a.batch_size, s, not a.greedy_adapters))
    def compare():  # one time for all: the phases' own keys keep the times of the phases run on their own
        t = time.time(); phase_compare_base(work, a.n, a.batch_size)
        for s in range(a.seeds): seed_phase(s)()
        return {'compare_s': time.time() - t}
    return {'main': lambda: phase_main(work), 'compare-base': lambda: phase_compare_base(work, a.n, a.batch_size),
            **{f'compare-s{s}': seed_phase(s) for s in range(3)}, 'compare': compare,
            'fp16': lambda: phase_fp16(work), 'bench': lambda: phase_bench(work), 'repro': lambda: phase_repro(work),
            'profile-gen': lambda: phase_profile_gen(work, a.n, a.batch_size)}


if __name__ == '__main__':
    a = parse_args()
    OVERRIDES += a.set
    work = Path(a.work); work.mkdir(parents=True, exist_ok=True)
    times = {}  # this process's phases; wall_times.json keeps every phase's
    try:
        for ph in a.phases:
            times |= phase_runners(work, a)[ph]()
            if ph.startswith('compare'): generation_times(work)
            # re-read: a phase of another process running beside this one may have written its time meanwhile
            done = json.loads((work/'wall_times.json').read_text()) if (work/'wall_times.json').exists() else {}
            (work/'wall_times.json').write_text(json.dumps(done | times, indent=2))
    finally:
        if a.pack: pack(work, Path(a.pack))
