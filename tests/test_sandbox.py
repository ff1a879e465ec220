"""Containment of model-written code (qlora_nb.sandbox), as the user running pytest and, when that is root (as in CI),
once more as a throwaway unprivileged user this test creates: no forgery is scored passed, no hostile program
reaches outside or leaves a process or a file behind, and the evaluator always returns."""
import json, os, pwd, secrets, shutil, subprocess, sys
from pathlib import Path

import pytest

from qlora_nb import sandbox
from qlora_nb.sandbox import (CHECK, CONTAINED, FORGERIES, HOSTILE, Limits, SandboxUnavailable, containment_check,
                              run_program)

FAST = Limits(wall_s=2, cpu_s=2)
ROOT = os.geteuid() == 0
REPO = Path(__file__).resolve().parents[1]


def check_rows(rows, who, guard):
    "Every forgery fails; no program escapes, damages, kills or leaves anything; the evaluator always returns."
    for r in rows:
        assert not r['escaped'] and r['left behind'] == [], (who, r)
        assert 'without a verdict' not in r['detail'], (who, r)  # no program reaches the launcher or the judge
        assert r['wall_s'] < FAST.wall_s + 6, (who, r)
        assert r['status'] != 'passed' or r['program'] == 'passes, but leaves a daemon behind', (who, r)
    by = {r['program']: r for r in rows}
    if not guard:  # (reliability_guard removes os.fork, which it needs)
        assert by['passes, but leaves a daemon behind']['status'] == 'passed', who  # containment does not break a pass
    assert by['returns an object equal to everything']['opaque'] == ['__main__.A'], who


@pytest.fixture(scope='module', params=[True, False], ids=['with reliability_guard', 'OS alone'])
def rows(request):
    return request.param, containment_check(FAST, guard=request.param)


@pytest.mark.parametrize('name', list(FORGERIES))
def test_forgery_is_not_scored_passed(rows, name):
    r = next(r for r in rows[1] if r['program'] == name)
    assert r['status'] in ('failed', 'error', 'timed out'), r
    assert not r['escaped'] and r['left behind'] == [], r


@pytest.mark.parametrize('name', list(HOSTILE))
def test_hostile_program_is_contained(rows, name):
    r = next(r for r in rows[1] if r['program'] == name)
    assert not r['escaped'] and r['left behind'] == [], r
    assert r['status'] != 'passed' or name == 'passes, but leaves a daemon behind', r
    assert r['wall_s'] < FAST.wall_s + 6, r  # the evaluator always returns


def test_whole_check(rows):
    check_rows(rows[1], 'pytest user', guard=rows[0])


def test_all_protections_applied():
    r = run_program('def f(x): return 2 * x', FAST, tests=CHECK, entry_point='f')
    assert r.status == 'passed', r
    assert set(CONTAINED) <= set(r.protections), r.protections
    assert ('unprivileged user' if ROOT else 'user namespace') in r.protections


def test_refuses_without_containment(monkeypatch):
    monkeypatch.setattr(sandbox, '_TRY_NAMESPACES', False)  # as on a machine without namespaces
    with pytest.raises(SandboxUnavailable, match='cannot be contained'):
        run_program('def f(x): return 2 * x', FAST, tests=CHECK, entry_point='f')
    r = run_program('def f(x): return 2 * x', FAST, tests=CHECK, entry_point='f', allow_unprotected=True)
    assert r.status == 'passed' and 'PID namespace' not in r.protections and 'resource limits' in r.protections
    forged = run_program(FORGERIES['prints a verdict and exits 0'], FAST, tests=CHECK, entry_point='f',
                         allow_unprotected=True)
    assert forged.status != 'passed'  # the judge still decides


def test_environment_holds_no_secrets(monkeypatch):
    monkeypatch.setenv('HF_TOKEN', 'secret-token-value')
    r = run_program('import os\nprint(sorted(os.environ))\nassert "HF_TOKEN" not in os.environ', FAST)
    assert r.status == 'passed', r
    assert 'HF_TOKEN' not in r.stdout


def test_stdin_is_closed():
    assert run_program('import sys\nassert sys.stdin is None or sys.stdin.read() == ""', FAST).status == 'passed'


def test_many_programs_all_get_a_result():
    codes = ['assert True', 'while True: pass', 'assert False', 'import os\nos._exit(3)', 'raise ValueError("x")'] * 2
    assert [run_program(c, FAST).status for c in codes] == ['passed', 'timed out', 'failed', 'error', 'error'] * 2


def _processes_of(uid):
    return [int(p.name) for p in Path('/proc').iterdir() if p.name.isdigit() and sandbox._owner(p) == uid]


@pytest.mark.skipif(not ROOT, reason='creating a throwaway user needs root (CI runs as root)')
def test_containment_as_unprivileged_user():
    "The same checks as a user without root: user + PID + mount namespaces instead of a separate uid."
    python, runuser = sandbox.sandbox_python(), shutil.which('runuser')
    if not (runuser and shutil.which('useradd')): pytest.skip('no runuser or useradd (util-linux, passwd)')
    if not (sandbox._world_executable(REPO) and os.access(REPO/'qlora_nb'/'sandbox.py', os.R_OK)):
        pytest.skip(f'{REPO} is not readable by other users')
    user = f'qnb_sbx_{secrets.token_hex(3)}'
    subprocess.run([shutil.which('useradd'), '--create-home', '--shell', '/usr/sbin/nologin', user], check=True)
    try:
        pw = pwd.getpwnam(user)
        script = (f'import sys, json; sys.path.insert(0, {str(REPO)!r})\n'
                  'from qlora_nb.sandbox import *\n'
                  'try: r = run_program("def f(x): return 2 * x", guard=False, tests=CHECK, entry_point="f")\n'
                  'except SandboxUnavailable as e: print(json.dumps(["refused", str(e), []])); sys.exit()\n'
                  f'rows = containment_check(Limits(wall_s={FAST.wall_s}, cpu_s={FAST.cpu_s}), guard=False)\n'
                  'print(json.dumps([r.status, r.protections, rows]))')
        out = subprocess.run([runuser, '-u', user, '--', python, '-I', '-c', script], capture_output=True, text=True,
                             timeout=300, cwd=pw.pw_dir,
                             env={'PATH': '/usr/bin:/bin', 'HOME': pw.pw_dir, 'LANG': 'C.UTF-8'})
        assert out.returncode == 0, out.stderr[-3000:]
        status, protections, rows = json.loads(out.stdout.strip().splitlines()[-1])
        if status == 'refused':  # right where this kernel has no unprivileged user namespaces, wrong anywhere else
            probe = subprocess.run([runuser, '-u', user, '--', 'unshare', '-Urpf', '--mount-proc', 'true'],
                                   capture_output=True)
            assert probe.returncode != 0, f'refused although user namespaces work here: {protections}'
            pytest.skip(f'no unprivileged user namespaces here; generated code is refused, as it should be: '
                        f'{protections}')
        assert status == 'passed', status
        assert set(CONTAINED) <= set(protections) and 'user namespace' in protections, protections
        check_rows(rows, user, guard=False)
        assert _processes_of(pw.pw_uid) == [], 'processes of the unprivileged user survived'
    finally:
        for pid in _processes_of(pwd.getpwnam(user).pw_uid):  # only if the test failed: they are the test's own
            os.kill(pid, 9)
        subprocess.run([shutil.which('userdel'), '--remove', user], capture_output=True)
