"""`qlora_nb compare --preset stage1`: the HumanEval study from the command line as a quick check on the tiny model.
Interrupted, it resumes and redoes only what was not finished."""
import subprocess
from pathlib import Path

from qlora_nb.core import Study
from qlora_nb.humaneval import read_samples
from qlora_nb.study import read_summary
from qlora_nb.weights import tiny_model_dir


def compare(out):
    return subprocess.run(['qlora_nb', 'compare', '--preset', 'stage1', '--model', str(tiny_model_dir()),
                           '--set', f'output.output_dir={out}', '--set', 'output.report_to=[]',
                           '--set', 'data.max_seq_length=256', '--set', 'eval.humaneval_max_new_tokens=8',
                           '--workers', '2', '--batch-size', '8'],
                          capture_output=True, text=True)


def test_compare_stage1_runs_and_resumes(tmp_path):
    r = compare(tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    study = Study(tmp_path/'compare'/'humaneval')
    summary = read_summary(study)
    assert summary.n == 2 and set(summary.arms) == {'base (raw)', 'base (chat)', 'control', 'experiment'}
    assert summary.arms['base (chat)'].problems == 3  # stage1: the first 3 problems of each fold
    assert summary.arms['control'].problems == 6  # both held-out folds
    assert len(read_samples(study.arm_dir('control-fold1-s1-n2'))) == 3 * 2
    assert summary.training_seeds == 2 and summary.arms['control'].training_seeds == 2  # stage1: 2 seeds per adapter
    assert summary.arms['control'].attention == 'grouped_eager'  # eval.humaneval_attention's default
    assert [t.holm_p is not None for t in summary.greedy_tests] == [True] * 3
    assert summary.hypothesis is not None and study.plot_file.exists()
    assert 'Seed hypothesis' in r.stdout and str(study.summary_file) in r.stdout

    # interrupted while training the last adapter: its folder and its arms are missing
    lost = [study.arm_results('experiment-fold1-s1-greedy'), study.arm_results('experiment-fold1-s1-n2')]
    for p in lost: p.unlink()
    adapter = study.adapter_run('experiment-fold1-s1').adapter_dir
    for f in adapter.iterdir(): f.unlink()
    adapter.rmdir()
    kept = {p: p.stat().st_mtime for p in study.dir.rglob('results.json')}
    r = compare(tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert adapter.exists()
    redone = {p for p in study.dir.rglob('results.json') if kept.get(p) != p.stat().st_mtime}
    assert redone == set(lost)  # only the interrupted adapter's arms, nothing finished
