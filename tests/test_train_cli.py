"""Training from the command line: a run killed mid-training (SIGKILL, no chance to clean up) resumes from its
last checkpoint and ends exactly where an uninterrupted run would."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import pytest
from qlora_nb.weights import tiny_model_dir


STEPS = 12  # enough steps after the first checkpoint that even a fast machine is still running when it is killed


def tiny_args(out, name, steps=6):
    return ['--model', str(tiny_model_dir()), '--set', f'output.output_dir={out}', '--set', f'output.run_name={name}',
            '--set', 'output.report_to=[]', '--set', f'train.max_steps={steps}', '--set', 'train.logging_steps=1',
            '--set', 'train.eval_steps=2', '--set', 'train.save_steps=2', '--set', 'train.save_total_limit=2',
            '--set', 'train.per_device_train_batch_size=2', '--set', 'train.gradient_accumulation_steps=1',
            '--set', 'data.max_seq_length=256']


def history(run_dir):
    return json.loads((run_dir/'training_history.json').read_text())


def test_killed_run_resumes_and_loses_nothing(tmp_path):
    """Killed as soon as its first checkpoint exists, wherever it is then (even mid-way through writing the next one,
    on a fast machine), the run resumes from its newest complete checkpoint and ends as the straight run did."""
    from qlora_nb.train import last_complete_checkpoint
    straight = subprocess.run(['qlora_nb', 'train', *tiny_args(tmp_path, 'straight', STEPS)], capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-3000:]

    run_dir = tmp_path/'killed'
    p = subprocess.Popen(['qlora_nb', 'train', *tiny_args(tmp_path, 'killed', STEPS)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while last_complete_checkpoint(run_dir) is None:
        assert p.poll() is None, 'the run ended before it could be interrupted'
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL); p.wait()
    assert not (run_dir/'run_summary.json').exists()  # it really was cut short
    resume_point = last_complete_checkpoint(run_dir)

    r = subprocess.run(['qlora_nb', 'train', *tiny_args(tmp_path, 'killed', STEPS), '--resume'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run_dir/'run_summary.json').read_text())
    assert summary['global_step'] == STEPS and summary['resumed_from'] == resume_point
    a = [(h['step'], h['loss'], h['learning_rate']) for h in history(tmp_path/'straight') if 'loss' in h]
    b = [(h['step'], h['loss'], h['learning_rate']) for h in history(run_dir) if 'loss' in h]
    assert [s for s, *_ in b] == list(range(1, STEPS + 1))  # every step logged once: nothing lost, nothing repeated
    for (s1, l1, lr1), (s2, l2, lr2) in zip(a, b):
        assert s1 == s2 and lr1 == lr2 and abs(l1 - l2) <= 1e-3 * abs(l1)  # separate processes: multithreaded CPU reductions are not bit-exact


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    r = subprocess.run(['qlora_nb', 'train', *tiny_args(tmp_path, 'fresh'), '--resume'], capture_output=True, text=True)
    assert r.returncode == 2 and 'no checkpoint-* to resume from' in r.stderr


def test_empty_data_fails_before_loading_the_model(tmp_path):
    f = tmp_path/'empty.jsonl'; f.write_text('')
    t = time.time()
    r = subprocess.run(['qlora_nb', 'train', *tiny_args(tmp_path, 'x'), '--set', f'data.source={f}'], capture_output=True, text=True)
    assert r.returncode == 2 and f'{f}: the file is empty' in r.stderr
