"""Two processes train what one process trains, and only rank 0 writes (04b_multi_gpu).

The same `qlora_nb train` config runs once in one process and once in two, started as `qlora_nb train --gpus 2` starts
them (`launch_command`: `accelerate launch` with the product's DDP config; on a CPU, the gloo backend): the two-process
run splits the gradient accumulation (`split_batch`), so both take the same 4 examples per optimizer step, in the same
order. LoRA dropout is off and the compute dtype is float32, so nothing random or coarse differs: the gradients differ
only by the order of floating-point sums (the all-reduce). Adam's first updates are about lr x sign(gradient), so a
gradient component near zero whose sign that order flips moves its weight the other way: the losses from the third step
on differ a little, hence a relative tolerance of 1e-4. The evaluation is gathered from both ranks by the `Trainer`, on
those slightly different weights, hence 1e-3. Measured on this 2-core CPU: 1.3e-5 (training), 1.6e-4 (evaluation),
5e-6 (resumed against uninterrupted); the whole file takes 90 to 120 s.

Every process records the files it opens for writing (an audit hook in a `sitecustomize` on its path); rank 1 must write
nothing under the output folder, and the one file of its own in a checkpoint, `rng_state_1.pth`, must be there (torch
writes it from C++, which the hook does not see). A second run resumes the two-process run from its first checkpoint and
must reach the same losses."""
import json, os, shutil, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
AUDIT = '''import os, sys
_log = os.environ.get('QLORA_NB_WRITE_LOG')
if _log:
    _path, _busy = f"{_log}.{os.environ.get('RANK', '0')}", []
    def _hook(event, args):
        if event != 'open' or _busy or not isinstance(args[0], (str, bytes, os.PathLike)): return
        mode, flags = args[1], args[2] if len(args) > 2 else 0
        if not ((isinstance(mode, str) and any(m in mode for m in 'wax+'))
                or (mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))): return
        _busy.append(1)
        try:
            with open(_path, 'a') as f: f.write(os.path.abspath(os.fsdecode(args[0])) + '\\n')
        finally: _busy.pop()
    sys.addaudithook(_hook)
'''


def _train_args(model, out, steps=4, resume=False):
    return ['train', '--model', str(model), '--set', f'output.output_dir={out}', '--set', 'output.report_to=[]',
            '--set', 'data.max_samples=16', '--set', 'data.max_seq_length=256', '--set', f'train.max_steps={steps}',
            '--set', 'train.per_device_train_batch_size=2', '--set', 'train.gradient_accumulation_steps=2',
            '--set', 'train.logging_steps=1', '--set', 'train.eval_steps=2', '--set', 'train.save_steps=2',
            '--set', 'lora.lora_dropout=0', *(['--resume'] if resume else [])]


def _run(cmd, tmp, log):
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(tmp/'audit'), str(ROOT), os.environ.get('PYTHONPATH', '')]),
           'QLORA_NB_WRITE_LOG': str(tmp/log), 'QLORA_NB_CPU_DTYPE': 'float32', 'CUDA_VISIBLE_DEVICES': '',
           'TQDM_DISABLE': '1'}
    r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    (tmp/f'{log}.out').write_text(r.stdout)
    return r


def _losses(run_dir):
    h = json.loads((run_dir/'training_history.json').read_text())
    return [e['loss'] for e in h if 'loss' in e], [e['eval_loss'] for e in h if 'eval_loss' in e]


def _writes(tmp, log, rank):
    p = tmp/f'{log}.{rank}'
    return set(p.read_text().split()) if p.exists() else set()


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    from qlora_nb.weights import tiny_model_dir
    tmp, model = tmp_path_factory.mktemp('multi'), tiny_model_dir()
    (tmp/'audit').mkdir(); (tmp/'audit'/'sitecustomize.py').write_text(AUDIT)
    from qlora_nb.distributed import launch_command
    two = lambda out, resume=False: launch_command(_train_args(model, out, resume=resume), 2, 'ddp', tmp)
    _run(two(tmp/'two'), tmp, 'two')
    _run([sys.executable, '-m', 'qlora_nb.cli'] + _train_args(model, tmp/'one'), tmp, 'one')
    # an interrupted two-process run: only its first checkpoint survives, then `--resume` continues it
    shutil.copytree(tmp/'two'/'qlora-run'/'checkpoint-2', tmp/'resumed'/'qlora-run'/'checkpoint-2')
    _run(two(tmp/'resumed', resume=True), tmp, 'resumed')
    return tmp


def test_two_processes_train_what_one_trains(runs):
    (two, two_eval), (one, one_eval) = _losses(runs/'two'/'qlora-run'), _losses(runs/'one'/'qlora-run')
    assert len(two) == len(one) == 4 and len(two_eval) == len(one_eval) == 2
    assert two == pytest.approx(one, rel=1e-4), (two, one)
    assert two_eval == pytest.approx(one_eval, rel=1e-3), (two_eval, one_eval)
    s2, s1 = (json.loads((runs/d/'qlora-run'/'run_summary.json').read_text()) for d in ('two', 'one'))
    assert 'effective batch 4 = 2 per device x 1 accumulation x 2 processes' in (runs/'two.out').read_text()
    assert (s2['processes'], s2['distributed'], s2['effective_batch']) == (2, 'ddp', 4)
    assert (s1['processes'], s1['distributed'], s1['effective_batch']) == (1, None, 4)
    assert s2['tokens_seen'] == s1['tokens_seen'] > 0  # the same tokens, counted over both ranks


def test_only_rank_0_writes(runs):
    out = str(runs/'two')
    rank0, rank1 = _writes(runs, 'two', 0), _writes(runs, 'two', 1)
    ours = {Path(p).name for p in rank0 if p.startswith(out)}
    assert {'.training_history.json.tmp', '.run_summary.json.tmp', '.config.yaml.tmp', 'training.log',
            'training_curves.png', 'adapter_config.json'} <= ours, sorted(ours)  # the hook sees rank 0 write them
    assert [p for p in rank1 if p.startswith(out)] == []
    ckpt = runs/'two'/'qlora-run'/'checkpoint-2'
    assert {'rng_state_0.pth', 'rng_state_1.pth', 'adapter_model.safetensors'} <= {p.name for p in ckpt.iterdir()}
    assert [p for p in _writes(runs, 'resumed', 1) if p.startswith(str(runs/'resumed'))] == []


def test_resume_continues_the_two_process_run(runs):
    full, _ = _losses(runs/'two'/'qlora-run')
    resumed, _ = _losses(runs/'resumed'/'qlora-run')
    assert resumed[-2:] == pytest.approx(full[-2:], rel=1e-4), (resumed, full)
    assert json.loads((runs/'resumed'/'qlora-run'/'run_summary.json').read_text())['global_step'] == 4


def test_benchmark_summary():
    "benchmarks/multigpu.py's summary: exactly the issue's keys, read from the rows it measured (its --tiny mode ran them)."
    sys.path.insert(0, str(ROOT/'benchmarks'))
    import multigpu
    one = {'tokens_per_s': 1000.0, 'losses': [2.0] * 20, 'peak_gib_per_gpu': 30.0, 'steps': 20}
    rows = {'single-8b': one, 'ddp-8b': {**one, 'tokens_per_s': 1900.0, 'losses': [2.0] * 19 + [2.05]},
            'fsdp-8b': {**one, 'peak_gib_per_gpu': 12.0}, 'fsdp-70b': {'failed': True, 'error': 'OOM'},
            'fsdp-32b': {'shape': '32b', 'steps': 6, 'peak_gib_per_gpu': 60.0}}
    s = multigpu.summary(rows)
    assert tuple(s) == multigpu.SUMMARY_KEYS == ('ddp_scaling_2gpu', 'ddp_loss_matches_single', 'fsdp_peak_gib_per_gpu_8b',
                                                 'single_gpu_peak_gib_8b', 'fsdp_largest_shape')
    assert s['ddp_scaling_2gpu'] == pytest.approx(1.9)
    assert s['ddp_loss_matches_single'] is False  # the 20th loss is 2.5% off
    assert (s['fsdp_peak_gib_per_gpu_8b'], s['single_gpu_peak_gib_8b']) == (12.0, 30.0)
    assert s['fsdp_largest_shape'] == {'shape': '32B', 'steps': 6, 'peak_gib_per_gpu': 60.0}  # 70B failed: the next rung
    rows['ddp-8b']['losses'][-1] = 2.03
    assert multigpu.summary(rows)['ddp_loss_matches_single'] is True


def test_benchmark_predicts_ddp_from_one_gpu(tmp_path):
    """multigpu.py's halves cases time each micro-batch of one GPU's steps, the work of one DDP rank: two ranks wait
    for the slower, so one GPU predicts DDP's scaling. The tiny model runs both samplers through the product's trainer."""
    sys.path.insert(0, str(ROOT/'benchmarks'))
    import multigpu
    # [micro-batch, micro-batch, optimizer]; the first step (warm-up) is left out: (2 + 4) / (1 + 3)
    assert multigpu.predicted_ddp_scaling([[9, 9, 9], [1, 1, 0], [3, 1, 0]]) == pytest.approx(1.5)
    assert multigpu.predicted_ddp_scaling([[9, 9, 9], [1, 1, 0.5]]) == pytest.approx(2.5 / 1.5)  # the optimizer, once
    out = tmp_path/'halves.json'
    r = subprocess.run([sys.executable, str(ROOT/'benchmarks'/'multigpu.py'), '--tiny', '--only', 'halves',
                        '--out', str(out), '--work', str(tmp_path/'work')], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())['rows']
    assert {n: rows[n]['sampler'] for n in rows} == {'halves-8b-balanced': 'LengthBalancedSampler',
                                                     'halves-8b-grouped': 'LengthGroupedSampler'}
    for row in rows.values():
        assert row['accumulation'] == 2 and len(row['micro_batch_s']) == row['steps'] == 5
        assert all(len(s) == 3 and min(s) > 0 for s in row['micro_batch_s'])  # two micro-batches, then the optimizer
        assert row['predicted_ddp_scaling'] == pytest.approx(multigpu.predicted_ddp_scaling(row['micro_batch_s']))
        assert 1 < row['predicted_ddp_scaling'] < 2.1


def test_benchmark_pairs_train_whole_batches():
    """multigpu.py trains its single/DDP pairs on whole global batches, of examples or, packed, of the rows TRL packs
    them into: a partial batch is trained as is on one GPU and filled with repeated rows under DDP (04b). The tiny
    data's 16 examples pack into 11 rows of 512 tokens, so packed pairs train a shorter prefix."""
    sys.path.insert(0, str(ROOT/'benchmarks'))
    import multigpu
    from bench import real_rows
    from trl.data_utils import pack_dataset
    from qlora_nb.weights import tiny_model_dir
    _, data = real_rows(str(tiny_model_dir()), 512, 16)
    train = data.splits['train']
    packed_rows = lambda ds: len(pack_dataset(ds.select_columns(['input_ids', 'labels']), 512, strategy='bfd'))
    assert packed_rows(train) % 8  # the case the benchmark met: 16 examples, rows not a multiple of 8
    assert len(multigpu.whole_batches(train.select(range(13)), 8, 512)) == 8  # examples: whole batches of 8
    kept = multigpu.whole_batches(train, 8, 512, packing=True)
    assert 0 < len(kept) < len(train) and packed_rows(kept) % 8 == 0
    assert packed_rows(train.select(range(len(kept) + 1))) % 8  # the longest such prefix
    with pytest.raises(SystemExit, match='no prefix of the examples packs into whole global batches of 64'):
        multigpu.whole_batches(train.select(range(2)), 64, 512, packing=True)
