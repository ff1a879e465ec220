"""Containment of model-written code (qlora_nb.sandbox): every hostile program is contained, scored as not passed,
leaves files outside its directory untouched, leaves no process behind, and the evaluator always returns."""
import os, socket, stat, time
from pathlib import Path

import psutil
import pytest

from qlora_nb.sandbox import Limits, SANDBOX_UID, run_program

FAST = Limits(wall_s=5, cpu_s=4)
ROOT = os.geteuid() == 0


@pytest.fixture
def outside(tmp_path_factory):
    "A directory and file outside the sandbox, readable by all, as a user's files are."
    d = tmp_path_factory.mktemp('outside'); os.chmod(d, 0o755)
    f = d/'precious.txt'; f.write_text('keep me'); os.chmod(f, 0o644)
    os.chmod(d.parent, 0o755)
    return f


def hostile(f):
    return {
        'fork bomb': 'import os\nwhile True:\n    try: os.fork()\n    except OSError: pass',
        'loops forever': 'while True: pass',
        'allocates without bound': 'x = []\nwhile True: x.append(bytearray(10**7))',
        'writes a large file': 'with open("big", "wb") as f:\n    while True: f.write(b"x" * 10**6)',
        'deletes files outside': f'import os, shutil\nos.remove({str(f)!r})\nshutil.rmtree({str(f.parent)!r})',
        'opens a network connection': 'import socket\nsocket.create_connection(("1.1.1.1", 53), timeout=2)',
        'reads the home directory': 'import os\nprint(os.listdir("/root"))\nprint(open("/root/.bashrc").read())',
        'kills the parent': 'import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.killpg(os.getpgid(os.getppid()), signal.SIGKILL)',
        'calls sys.exit': 'import sys\nsys.exit(0)',
        'calls os._exit': 'import os\nos._exit(0)',
        'floods stdout': 'while True: print("y" * 100000)',
        'ignores SIGTERM': 'import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: time.sleep(1)',
        'recurses without bound': 'import sys\nsys.setrecursionlimit(10**9)\ndef f(n): return f(n + 1)\nf(0)',
        'escapes its process group': 'import os, time\nif os.fork() == 0:\n    os.setsid(); time.sleep(1000)\nwhile True: time.sleep(1)',
    }


def leftovers():
    return [p.pid for p in psutil.process_iter(['uids', 'status']) if p.info['uids'] and p.info['uids'].real == SANDBOX_UID
            and p.info['status'] != psutil.STATUS_ZOMBIE]  # a zombie holds nothing but its pid, until init reaps it


@pytest.mark.parametrize('guard', [True, False], ids=['with reliability_guard', 'OS limits alone'])
@pytest.mark.parametrize('name', list(hostile(Path('/x'))))
def test_hostile_program_is_contained(name, guard, outside):
    code = hostile(outside)[name]
    start = time.time()
    r = run_program(code, FAST, guard=guard)
    assert r.status in ('failed', 'timed out', 'error'), (name, r)
    assert time.time() - start < FAST.wall_s + 10  # the evaluator always returns
    assert outside.read_text() == 'keep me'  # files outside are untouched
    assert len(r.stdout) <= FAST.output_kb << 10 and len(r.stderr) <= FAST.output_kb << 10  # output is capped
    if ROOT: assert leftovers() == [], f'{name}: processes survived'


def test_environment_holds_no_secrets(monkeypatch):
    monkeypatch.setenv('HF_TOKEN', 'secret-token-value')
    r = run_program('import os\nprint(sorted(os.environ))\nassert "HF_TOKEN" not in os.environ', FAST)
    assert r.status == 'passed', r
    assert 'HF_TOKEN' not in r.stdout and 'QLORA_NB_NONCE' not in r.stdout


def test_stdin_is_closed():
    assert run_program('import sys\nassert sys.stdin is None or sys.stdin.read() == ""', FAST).status == 'passed'


@pytest.mark.skipif(not ROOT, reason='all protections apply when the evaluator runs as root')
def test_all_protections_applied_as_root():
    r = run_program('pass', FAST)
    assert r.status == 'passed'
    assert set(r.protections) == {'own process group', 'no network', 'resource limits', 'unprivileged user'}


def test_many_programs_all_get_a_result():
    codes = ['assert True', 'while True: pass', 'assert False', 'import os\nos._exit(3)', 'raise ValueError("x")'] * 2
    results = [run_program(c, Limits(wall_s=2, cpu_s=2)) for c in codes]
    assert [r.status for r in results] == ['passed', 'timed out', 'failed', 'error', 'error'] * 2
