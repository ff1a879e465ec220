"""The benchmark cannot rot: CI runs it in its tiny CPU mode. It times the product's own training path (no second
implementation of the step), writes the summary the issue names, and on a tiny model the seed recipe and the product
train the same tokens to the same eval loss."""
import json, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {'product_vs_seed_8b_2048', 'product_peak_gib_8b_2048', 'product_vs_unsloth_8b_2048',
                'product_vs_seed_real_lengths', 'eval_loss_rel_diff_real', 'default_model_tokens_per_s',
                'default_model_gpu_busy', 't4_mode_loss_rel_diff'}


def test_bench_tiny_mode(tmp_path):
    out = tmp_path/'tiny.json'
    r = subprocess.run([sys.executable, str(ROOT/'benchmarks'/'bench.py'), '--tiny', '--out', str(out), '--work', str(tmp_path/'w')],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res['summary']) == SUMMARY_KEYS and res['tiny'] is True
    s = res['summary']
    for k in ('product_vs_seed_8b_2048', 'product_vs_seed_real_lengths', 'default_model_tokens_per_s'): assert s[k] > 0, k
    assert abs(s['eval_loss_rel_diff_real']) < 1e-3, s  # measured 2e-4: the same tokens, trained to the same loss
    real = res['results']['default model real data']
    assert real['seed']['padding_fraction'] > 0.2  # the seed pads every example to max length
    product = res['results']['llama3-8b-shape 2048x1']['qlora_nb']
    assert {'checkpointing', 'liger', 'group_by_length'} <= set(product)  # the product's own choices, recorded
    assert (tmp_path/'w'/'qlora_nb-128x1-0.05'/'training_history.json').exists()  # the product's trainer ran
