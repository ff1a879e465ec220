"""Shared test settings: the closing summary says which CPU compute dtypes the notebook tests exercised, so a CI log
shows both were tried whatever CPU ran it."""
import re


def _native_bf16():
    try:
        import torch
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception: return None


def pytest_terminal_summary(terminalreporter):
    counts = {}
    for outcome in ('passed', 'failed'):
        for rep in terminalreporter.stats.get(outcome, []):
            m = re.search(r'test_notebook\[.*\[(float32|bfloat16)\]\]', getattr(rep, 'nodeid', ''))
            if m and rep.when == 'call': counts.setdefault(m[1], {}).setdefault(outcome, 0); counts[m[1]][outcome] += 1
    if not counts: return
    native = {True: 'yes', False: 'no', None: 'unknown'}[_native_bf16()]
    terminalreporter.write_sep('-', f'CPU compute dtypes exercised (this CPU has native bf16: {native})')
    for dtype, c in sorted(counts.items()):
        terminalreporter.write_line(f'{dtype}: ' + ', '.join(f'{n} notebooks {o}' for o, n in sorted(c.items())))
