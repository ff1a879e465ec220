"""The benchmark script cannot rot: CI runs it in its tiny CPU mode. On a tiny model the two recipes' real-data
epochs do the same arithmetic (the seed's batch 1 x accumulation 4 vs one batch of 4), so their eval losses agree."""
import json, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_tiny_mode(tmp_path):
    out = tmp_path/'tiny.json'
    r = subprocess.run([sys.executable, str(ROOT/'benchmarks'/'bench.py'), '--tiny', '--out', str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert len(res['ratios']) == 3 and res['tiny'] is True
    for case in res['results'].values():
        assert set(case) == {'baseline', 'qlora_nb'}
    real = [v for k, v in res['ratios'].items() if 'real' in k][0]
    assert abs(real['eval_loss_rel_diff']) < 1e-3, real
    base = [v for k, v in res['results'].items() if 'real' in k][0]['baseline']
    assert base['padding_fraction'] > 0.2  # the baseline pads to max length; qlora_nb does not
