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
    assert set(res['summary']) == SUMMARY_KEYS and res['tiny'] is True and 'memory_lean' in res
    s = res['summary']
    for k in ('product_vs_seed_8b_2048', 'product_vs_seed_real_lengths', 'default_model_tokens_per_s'): assert s[k] > 0, k
    assert abs(s['eval_loss_rel_diff_real']) < 1e-3, s  # measured 2e-4: the same tokens, trained to the same loss
    real = res['results']['default model real data']
    assert real['seed']['padding_fraction'] > 0.2  # the seed pads every example to max length
    product = res['results']['llama3-8b-shape 2048x1']['qlora_nb']
    assert {'checkpointing', 'liger', 'group_by_length'} <= set(product)  # the product's own choices, recorded
    assert (tmp_path/'w'/'qlora_nb-128x1-0.05'/'training_history.json').exists()  # the product's trainer ran
    prof = res['results']['profile']['qlora_nb']  # the GPU profile's code, run on the CPU: no kernels, the steps timed
    # step 2 untraced; 3 warms the host trace up, 4-6 traced; 7 warms the GPU trace up, 8-9 traced
    assert len(prof['step_s']) == 9 and prof['first_profiled_step'] == 8 and prof['captured'] == [False] * 9, prof
    assert prof['unprofiled_step_wall_s'] == prof['step_s'][1:2] and prof['gpu_busy_fraction_untraced'] == 0.0
    assert prof['with_host_trace']['top_cpu_ops'] and prof['graph_captures_in_window'] == 0


def test_peak_allocations_reads_what_is_alive_at_the_peak():
    "The memory-history reader replays allocations to the peak and groups what is alive by its frame outside torch."
    sys.path.insert(0, str(ROOT/'benchmarks'))
    from bench import peak_allocations
    frames = lambda f, line: [{'filename': '/v/torch/nn/functional.py', 'line': 1, 'name': 'linear'},
                              {'filename': f'/v/site-packages/{f}', 'line': line, 'name': 'forward'}]
    trace = [dict(action='alloc', addr=1, size=2**29, frames=frames('peft/lora.py', 10)),
             dict(action='alloc', addr=2, size=3 * 2**29, frames=frames('trl/utils.py', 5)),
             dict(action='free_completed', addr=1, size=2**29, frames=[]),
             dict(action='alloc', addr=3, size=2**29, frames=frames('peft/lora.py', 10)),
             dict(action='free_requested', addr=3, size=2**29, frames=[]),  # requested is not yet freed
             dict(action='free_completed', addr=2, size=3 * 2**29, frames=[])]
    got = peak_allocations({'device_traces': [trace]}, before=2**30)
    assert got['peak_gib'] == 3.0 and got['before_gib'] == 1.0  # 1 GiB before + 0.5 + 1.5 alive at once
    assert got['at_peak'] == [{'where': 'trl/utils.py:5 forward', 'gib': 1.5}, {'where': 'peft/lora.py:10 forward', 'gib': 0.5}]


def test_cudagraphs_probe_runs_the_product_path(tmp_path):
    "The CUDA-graphs probe (its CPU-safe switches: padding, the recompute policy) still drives the product's own path."
    import os
    out = tmp_path/'probe.json'
    env = {**os.environ, 'PAD_MULTIPLE': '64', 'RECOMPUTE_ALL': '1'}
    r = subprocess.run([sys.executable, str(ROOT/'benchmarks'/'cudagraphs_probe.py'), '--tiny', '--only', '2048x1 ckpt',
                        '--recipes', 'qlora_nb', '--variant', 'ckpt=train.gradient_checkpointing=true',
                        '--out', str(out), '--work', str(tmp_path/'w')], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads(out.read_text())['results']['llama3-8b-shape 2048x1 ckpt']['qlora_nb']
    assert row['checkpointing'] is True and row['tokens_per_s'] > 0
    assert (tmp_path/'w'/'qlora_nb-128x1-0.05-train.gradient_checkpointing=true'/'training_history.json').exists()


def test_host_waits_puts_each_wait_back_and_takes_it_away(tmp_path):
    "Each arm of host_waits.py runs the product with exactly its waits put back, and the product is whole after it."
    from unittest.mock import patch
    sys.path.insert(0, str(ROOT/'benchmarks'))
    import host_waits
    from qlora_nb import train as product
    def parts(): return product.SyncFreeSFTTrainer.compute_loss, product.sft_config, product.every_position_scored
    shipped, seen, profile_case = parts(), [], host_waits.bench.profile_case
    def spy(*args, **kw):
        seen.append(tuple(a is b for a, b in zip(parts(), shipped)))
        return profile_case(*args, **kw)
    with patch.object(host_waits.bench, 'profile_case', spy):
        res = host_waits.main(['--tiny', '--repeats', '1', '--arms', 'product', 'compact head', 'before',
                               '--out', str(tmp_path/'waits.json')])
    # (our loss and metrics, non-blocking copies, every position scored) for each arm
    assert seen == [(True, True, True), (True, True, False), (False, False, True)], seen
    assert parts() == shipped
    assert [r['arm'] for r in res['runs']] == ['product', 'compact head', 'before']
    assert all(r['untraced_step_s'] > 0 for r in res['runs']) and res['census']['waits_per_step'] == 0  # a CPU never waits


def test_graph_captures_counts_the_runs_captures():
    "The profile leaves capturing steps out of its reference: it reads the captures off the model's GraphedDecoder."
    import torch
    sys.path.insert(0, str(ROOT/'benchmarks'))
    from bench import StepTimer, graph_captures
    from qlora_nb.train import GraphedDecoder
    from qlora_nb.weights import tiny_model_dir
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir()).train()
    assert graph_captures(model) == 0  # no graphs in this run
    graphed = GraphedDecoder(model.model, capture=lambda body, tensors: body)  # a CPU "captures" the pass itself
    timer = StepTimer(); timer.on_train_begin(None, None, None, model=model)  # the timer finds the graphs once
    for n in (8, 8, 16):
        model(input_ids=torch.randint(0, 100, (2, n)), labels=torch.randint(0, 100, (2, n)))
        timer.on_step_end(None, None, None, model=model)
    assert (graph_captures(model), graphed.replays) == (2, 3)  # one capture per batch shape
    assert timer.captured() == [True, False, True]  # the steps that captured


def test_module_walks_arm_puts_transformers_bookkeeping_back():
    "host_waits.py's 'module walks' arm runs transformers' own per-step bookkeeping, and the product is whole after it."
    from contextlib import ExitStack
    sys.path.insert(0, str(ROOT/'benchmarks'))
    import host_waits
    from trl import SFTTrainer
    from qlora_nb.train import SyncFreeSFTTrainer
    names = ('train', 'floating_point_ops', '_clip_grad_norm')
    shipped = [vars(SyncFreeSFTTrainer)[n] for n in names]
    with ExitStack() as stack:
        for p in host_waits.waits_put_back('module walks'): stack.enter_context(p)
        assert [getattr(SyncFreeSFTTrainer, n) for n in names] == [getattr(SFTTrainer, n) for n in names]
    assert [vars(SyncFreeSFTTrainer)[n] for n in names] == shipped
    assert all(getattr(SFTTrainer, n) is not s for n, s in zip(names, shipped))


def test_host_profile_names_where_the_host_time_goes(tmp_path):
    "host_profile.py profiles the default job's window on the tiny model and reports functions and packages by share."
    sys.path.insert(0, str(ROOT/'benchmarks'))
    import host_profile
    res = host_profile.main(['--tiny', '--out', str(tmp_path/'hp.json')])
    assert json.loads((tmp_path/'hp.json').read_text())['profiled_step_ms'] == res['profiled_step_ms'] > 0
    assert abs(sum(res['own_share_by_package'].values()) - 1) < 1e-6 and 'torch (C)' in res['own_share_by_package']
    assert res['top_own'][0]['own_ms_per_step'] >= res['top_own'][-1]['own_ms_per_step'] > 0
    assert any(r['function'].startswith('train.py:') for r in res['top_cumulative'])  # the product's own calls, named
    assert res['untraced_step_ms'] > 0 and res['window'] == host_profile.bench.TINY_PROFILE_WINDOW


def test_real_epoch_counts_the_tokens_trl_counts(tmp_path):
    """The real-length epoch logs as users' runs log and counts its real tokens on the host, batch by batch: the
    same count as TRL's own `num_tokens` from a run that logs every step (steps 2 to the end, as the seed's)."""
    import torch
    sys.path.insert(0, str(ROOT/'benchmarks'))
    import bench
    from qlora_nb.weights import tiny_model_dir
    from transformers import AutoModelForCausalLM
    tok, data = bench.real_rows(str(tiny_model_dir()), 512, 12)
    def epoch(name, extra=()):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir())
        cfg = bench.product_config(tmp_path, name, 512, 4, model=str(tiny_model_dir()), extra=extra)
        return cfg, bench.product_epoch(cfg, model, tok, data)
    cfg, (_, _, real, losses, notes) = epoch('default')
    assert cfg.train.logging_steps > notes['steps'] == 3 and losses == []  # no log inside this short epoch
    _, (_, _, real_logged, logged, _) = epoch('logged', ['train.logging_steps=1'])
    history = json.loads((tmp_path/'logged'/'training_history.json').read_text())
    seen = [h['num_tokens'] for h in history if 'loss' in h]  # TRL's running count, after each step
    assert len(logged) == len(seen) == 3 and 0 < real == real_logged == seen[-1] - seen[0]


def test_memory_lean_reads_the_budget_row_against_the_same_seed_and_unsloth():
    sys.path.insert(0, str(ROOT/'benchmarks'))
    from bench import memory_lean, summary
    s8 = 'llama3-8b-shape 2048x1'
    results = {s8: {'seed': {'tokens_per_s': 2000.0}, 'qlora_nb': {'tokens_per_s': 10000.0, 'peak_gib': 19.0},
                    'unsloth': {'tokens_per_s': 5000.0}},
               f'{s8} budget': {'qlora_nb': {'tokens_per_s': 8000.0, 'peak_gib': 6.2}}}
    lean = memory_lean(results)
    assert set(lean) - {'case'} == {k for k in SUMMARY_KEYS if k.endswith('8b_2048')}
    assert (lean['product_vs_seed_8b_2048'], lean['product_peak_gib_8b_2048'], lean['product_vs_unsloth_8b_2048']) == (4.0, 6.2, 1.6)
    assert summary(results)['product_peak_gib_8b_2048'] == 19.0  # the summary's contract stays the default's row
    assert memory_lean({s8: results[s8]})['product_vs_seed_8b_2048'] is None  # no budget row: nothing claimed
