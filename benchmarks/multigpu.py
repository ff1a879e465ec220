#!/usr/bin/env python
"""Several GPUs of one host: DDP's scaling and FSDP-QLoRA's memory, with the product's own training path (04b_multi_gpu).

    python benchmarks/multigpu.py              # on a host with >= 2 GPUs: every case
    python benchmarks/multigpu.py --only fsdp  # only the cases whose names contain a word (others already measured stay)
    python benchmarks/multigpu.py --tiny       # anywhere: the same code on a tiny model, 2 CPU processes (gloo)
    python benchmarks/multigpu.py --only ddp-8b --set train.optim=adamw_torch --profile
                                               # a variant (rows named 'ddp-8b+train.optim=adamw_torch'), profiled

Run it from the repository root, with the GPU machine's environment, e.g.
    PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        python benchmarks/multigpu.py
(the three NVLS variables are also set for every process this script launches).

Writes benchmarks/results/multigpu-<date>.json (or --out) after every case, so an interrupted run keeps what it measured
and a second command runs only the cases still missing. Its top-level "summary" holds exactly: ddp_scaling_2gpu,
ddp_loss_matches_single, fsdp_peak_gib_per_gpu_8b, single_gpu_peak_gib_8b, fsdp_largest_shape; "rows" holds every case.

Each case is one launch of this file with --case: one process for the single-GPU case, or 2 processes through
`accelerate launch` with the product's own accelerate config (`qlora_nb.distributed.accelerate_config`, DDP or FSDP-QLoRA;
in --tiny mode on the CPU, where torch's gloo backend joins the processes). Each process builds a random-weight Llama-shaped model in memory, quantized to NF4
(`bench.py`'s approach: the values do not change speed or memory, and no checkpoint need exist; under FSDP the 4-bit codes
are stored as bfloat16, as `load_model` stores them), layer by layer so that a 70B shape never exists in 16 bits. Then the
product trains it: `add_run_lora` + `build_trainer` + `trainer.train` through `bench.product_trainer`, on the real
lengths of the default job's data (HumanEval SFT examples, `bench.real_rows`), with the product's config defaults, a
timing callback only.

* single-8b / ddp-8b: the 8B shape on 1 GPU, then on 2 GPUs with DDP, 60 steps of the same global batch (per-device 4 x
  accumulation 2 on one GPU; 4 x 1 on each of two: `split_batch`). ddp_scaling_2gpu is the ratio of their real tokens/s
  from the second step on (60 steps: step times vary 10-20% with the batches' lengths);
  ddp_loss_matches_single says whether the first 20 losses agree within 2% (LoRA dropout 0.05 draws
  different masks in the two runs, so they are close, not equal). The training rows are cut to whole global batches:
  DDP fills a partial last batch by repeating examples on the other ranks, which changes that step's loss.
* single-8b-micro: one GPU, one micro-batch of 4 per step: what each GPU of ddp-8b computes per step (diagnosis).
  Since CUDA graphs by `auto` (2026-11-23) one GPU replays these passes as graphs; since `5130c15` (2026-11-24) the
  accumulated single-8b and each rank of ddp-8b replay them too (`04_training`, *Replays under DDP*).
* halves-8b-balanced / halves-8b-grouped: single-8b with each micro-batch timed on its own (the GPU synchronized at
  each boundary): the work each GPU of ddp-8b would do at that step, so one GPU predicts DDP's scaling
  (`predicted_ddp_scaling`), with the product's balanced micro-batches and with transformers' length-grouped ones.
* fsdp-8b: the 8B shape sharded over 2 GPUs with FSDP-QLoRA, 6 steps; its per-GPU peak against single-8b's.
* fsdp-70b, then fsdp-32b, fsdp-13b until one succeeds: the largest shape trained for >= 5 steps with FSDP-QLoRA.
* cli-ddp, cli-fsdp: the command itself, `qlora_nb train --gpus 2 [--fsdp]`, on the default model (the product's
  `load_model` path, its accelerate configs, sharded checkpoints, `--resume`, the gathered final adapter): 4 steps, then
  resumed to 6. No speed is read from them.

If one command would run past a time limit, split it: `--only 8b` and then `--only 70b 32b 13b cli` (cases already in
the results file are kept and not run again; failed ones are tried again). In --tiny mode the FSDP cases are skipped
(torch FSDP needs an accelerator), and cli-ddp runs the command `--gpus 2` would run (`launch_command`) on the CPU.
"""
import argparse, datetime, json, os, subprocess, sys, time, types
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT/'benchmarks'))
NVLS_OFF = {'NCCL_NVLS_ENABLE': '0', 'TORCH_SYMM_MEM_DISABLE_MULTICAST': '1', 'NVSHMEM_DISABLE_NVLS': '1'}
SUMMARY_KEYS = ('ddp_scaling_2gpu', 'ddp_loss_matches_single', 'fsdp_peak_gib_per_gpu_8b', 'single_gpu_peak_gib_8b',
                'fsdp_largest_shape')


def shapes(tiny):
    "Llama-style configs by name: the 8B benchmark shape and the FSDP ladder (70B, 32B, 13B); one tiny shape in --tiny."
    from transformers import LlamaConfig
    if tiny:
        t = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
        return {'8b': t, '70b': t, '32b': t, '13b': t}
    from qlora_nb.model import llama3_8b_config
    big = lambda h, i, n, a, kv, v: LlamaConfig(vocab_size=v, hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                                               num_attention_heads=a, num_key_value_heads=kv, tie_word_embeddings=False)
    return {'8b': llama3_8b_config(), '70b': big(8192, 28672, 80, 64, 8, 128256),  # Llama 3 70B
            '32b': big(5120, 27648, 64, 40, 8, 152064),  # Qwen2.5 32B's sizes
            '13b': big(5120, 13824, 40, 40, 40, 32000)}  # Llama 2 13B


CASES = {  # name: (shape, processes, distributed, steps, per-device batch, accumulation as configured)
    'single-8b': ('8b', 1, 'ddp', 60, 4, 2), 'ddp-8b': ('8b', 2, 'ddp', 60, 4, 2),
    'single-8b-micro': ('8b', 1, 'ddp', 60, 4, 1),  # one micro-batch per step: a DDP rank's share of ddp-8b
    # single-8b's micro-batches timed one by one (each is one rank's share of a ddp-8b step), with the product's
    # balanced micro-batches and with transformers' length-grouped ones (what the product drew before `958782c`)
    'halves-8b-balanced': ('8b', 1, 'ddp', 60, 4, 2), 'halves-8b-grouped': ('8b', 1, 'ddp', 60, 4, 2),
    'fsdp-8b': ('8b', 2, 'fsdp', 6, 4, 2),  # the single GPU's micro-batch of 4: peaks compare
    'fsdp-70b': ('70b', 2, 'fsdp', 6, 1, 2), 'fsdp-32b': ('32b', 2, 'fsdp', 6, 1, 2), 'fsdp-13b': ('13b', 2, 'fsdp', 6, 1, 2)}
LADDER = ('fsdp-70b', 'fsdp-32b', 'fsdp-13b')
CLI_CASES = ('cli-ddp', 'cli-fsdp')  # the command itself, `qlora_nb train --gpus 2 [--fsdp]`, on the default model
NO_FSDP_ON_CPU = 'skipped in --tiny mode: torch FSDP needs an accelerator (CUDA, XPU, ...)'


# ---------------------------------------------------------------- one process of a case (--case)
class TrainPeak(TrainerCallback):
    """Peak GPU memory from the start of training: after FSDP has sharded the model (the random model is built whole on
    each GPU first, which the product's CPU-RAM-efficient loading avoids), and after DDP has wrapped it."""
    def __init__(self): self.at_start = None
    def on_train_begin(self, args, state, control, **kw):
        if torch.cuda.is_available():
            self.at_start = torch.cuda.memory_allocated() / 2**30; torch.cuda.reset_peak_memory_stats()


class StepProfile(TrainerCallback):
    "torch.profiler over optimizer steps [first, last): CUDA and CPU time tables of this process, written at the end."
    def __init__(self, path, first=6, last=9): self.path, self.first, self.last, self.prof = path, first, last, None
    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.first:
            from torch.profiler import ProfilerActivity, profile
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=acts); self.prof.__enter__()
    def on_step_end(self, args, state, control, **kw):
        if self.prof is not None and state.global_step == self.last:
            from bench import sync
            sync(); self.prof.__exit__(None, None, None)
            ka = self.prof.key_averages()
            by = 'cuda_time_total' if torch.cuda.is_available() else 'cpu_time_total'
            Path(self.path).write_text(f'steps {self.first}..{self.last - 1}\n' + ka.table(sort_by=by, row_limit=40)
                                       + '\n' + ka.table(sort_by='self_cpu_time_total', row_limit=30))
            self.prof = None


class MicroBatchTimes(TrainerCallback):
    """Seconds of each step's micro-batches and of its optimizer step, the GPU synchronized at each boundary: on one
    GPU, the work each DDP rank would do alone at that step (`predicted_ddp_scaling`)."""
    def __init__(self): self.steps, self.t = [], None
    def lap(self):
        from bench import sync
        sync(); t = time.perf_counter(); self.steps[-1].append(t - self.t); self.t = t
    def on_step_begin(self, args, state, control, **kw):
        from bench import sync
        sync(); self.t = time.perf_counter(); self.steps.append([])
    def on_substep_end(self, args, state, control, **kw): self.lap()  # a micro-batch, not the step's last
    def on_pre_optimizer_step(self, args, state, control, **kw): self.lap()  # the last micro-batch (and clipping)
    def on_step_end(self, args, state, control, **kw): self.lap()  # the optimizer step


def predicted_ddp_scaling(steps, processes=2):
    """One GPU's time for these steps over the time of `processes` GPUs that each train one micro-batch of every step
    and wait for the slowest (the steps as `MicroBatchTimes` records them, [micro-batch, ..., optimizer]; the first
    step, which warms up, left out). The all-reduce of the adapters' gradients is not counted (under a millisecond)."""
    steps = [s for s in steps[1:] if len(s) == processes + 1]
    return sum(map(sum, steps)) / sum(max(s[:-1]) + s[-1] for s in steps)


def allreduce_ms(numel, device, repeat=10):
    "Milliseconds of one all-reduce of `numel` float32 values across the processes (the LoRA gradients' size)."
    import torch.distributed as dist
    from bench import sync  # the process's own GPU (run_case sets it)
    x = torch.ones(int(numel), device=device)
    dist.all_reduce(x); sync()
    t = time.perf_counter()
    for _ in range(repeat): dist.all_reduce(x)
    sync()
    return (time.perf_counter() - t) / repeat * 1000


def quantize_layerwise(config, device, dtype, storage):
    """A random model of `config` on `device` in `dtype`, its linears NF4 (double quant) with codes stored as `storage`:
    built on the meta device and materialized one module at a time, so the 16-bit model never exists whole."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM
    with torch.device('meta'): model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear) and name != 'lm_head':
                with torch.device('meta'):
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=dtype, quant_type='nf4', compress_statistics=True,
                                          quant_storage=storage)
                w = torch.randn(child.out_features, child.in_features, dtype=dtype, device=device) * 0.02
                q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type='nf4', compress_statistics=True,
                                             quant_storage=storage, module=q)  # the module keeps the quant state (FSDP)
                setattr(mod, name, q.to(device))
                del w
    # what is left on meta (embeddings, norms, lm_head; the rotary buffers): materialized on the device, one at a time
    for mod in list(model.modules()):
        for n, p in list(mod.named_parameters(recurse=False)):
            if p.is_meta:
                norm = 'norm' in type(mod).__name__.lower()
                value = torch.ones(p.shape, dtype=p.dtype, device=device) if norm else \
                        torch.randn(p.shape, dtype=p.dtype, device=device) * 0.02
                setattr(mod, n, nn.Parameter(value, requires_grad=p.requires_grad))
    rotary = model.model.rotary_emb
    with torch.device(device): model.model.rotary_emb = type(rotary)(model.config)  # its inv_freq, computed again
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers())), 'a tensor was left on the meta device'
    model.is_loaded_in_4bit = True
    model.config.quantization_config = {'load_in_4bit': True, 'bnb_4bit_quant_type': 'nf4'}
    return model


def whole_batches(train, eff, max_len, packing=False, name='case'):
    """The longest prefix of `train` that makes whole global batches of `eff` rows: examples, or the rows TRL packs
    them into. A partial last batch is filled on the other ranks by repeating rows (accelerate's even_batches), so that
    step would train other rows than one GPU does, by construction (04b)."""
    if not packing: return train.select(range(len(train) - len(train) % eff))
    from trl.data_utils import pack_dataset
    cols = train.select_columns(['input_ids', 'labels'])
    rows = lambda n: len(pack_dataset(cols.select(range(n)), max_len, strategy='bfd'))
    n = next((n for n in range(len(train), 0, -1) if rows(n) % eff == 0), None)
    if n is None: raise SystemExit(f"{name}: no prefix of the examples packs into whole global batches of {eff}")
    return train.select(range(n))


def run_case(name, tiny, out_prefix, work, overrides=(), profile=False):
    from bench import StepTimer, chosen, peak_gib, product_config, product_trainer, real_rows, reset_memory
    from qlora_nb.core import resolve_compute_dtype
    from qlora_nb.distributed import fsdp_enabled, local_rank, start_processes, world_size
    from qlora_nb.weights import resolve_model, tiny_model_dir
    shape, procs, distributed, steps, batch, accum = CASES[name]
    steps = min(steps, 5) if tiny else steps  # a bfloat16-less CPU: the code, not the numbers
    start_processes()
    rank = int(os.environ.get('RANK', 0))
    device = torch.device('cuda', local_rank()) if torch.cuda.is_available() else torch.device('cpu')
    if device.type == 'cuda': torch.cuda.set_device(device)
    # only its tokenizer is read (the lengths and prompt masks of real data): a folder without weights will do
    model_path = str(tiny_model_dir() if tiny else resolve_model(os.environ.get('QLORA_NB_BENCH_TOKENIZER', 'default')))
    tok, data = real_rows(model_path, 512 if tiny else 2048, 16 if tiny else None)
    data.splits['train'] = whole_batches(data.splits['train'], batch * accum, 512 if tiny else 2048,
                                         'data.packing=true' in overrides, name)
    reset_memory(); torch.manual_seed(0)
    t0 = time.perf_counter()
    dtype = resolve_compute_dtype('auto')  # bfloat16 on the GPUs; float32 in --tiny mode (QLORA_NB_CPU_DTYPE)
    model = quantize_layerwise(shapes(tiny)[shape], device, dtype, dtype if fsdp_enabled() else torch.uint8)
    build_s, build_peak = time.perf_counter() - t0, peak_gib()
    reset_memory()  # the peak of training, not of building the random model (FSDP shards it when the trainer starts)
    big = ['train.gradient_checkpointing=true'] if name in LADDER else []  # 'auto' does not know FSDP shards the weights
    halves = name.startswith('halves')
    if halves: big.append('train.fold_accumulation=false')  # each micro-batch a pass of its own, as on a DDP rank
    # every step logged: the loss comparison reads the first 20 steps' losses, and the tokens/s TRL's token count
    cfg = product_config(work, name, 512 if tiny else 2048, batch, accum, steps,
                         extra=['train.logging_steps=1', f'train.distributed={distributed}', *big, *overrides])
    trainer, timer, choices = product_trainer(cfg, model, tok, data)
    peak = TrainPeak(); trainer.add_callback(peak)
    if name.endswith('-grouped'):  # transformers' own sampler: consecutive micro-batches of the length-sorted run
        trainer._get_train_sampler = types.MethodType(Trainer._get_train_sampler, trainer)
    if halves: micro = MicroBatchTimes(); trainer.add_callback(micro)
    if profile: trainer.add_callback(StepProfile(f'{out_prefix}.rank{rank}.prof.txt', min(6, steps - 3), min(9, steps)))
    trainer.train()
    logged = [h for h in trainer.state.log_history if 'loss' in h]
    row = {'case': name, 'shape': shape, 'processes': world_size(), 'distributed': distributed, 'fsdp': fsdp_enabled(),
           'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu',
           **chosen(trainer),  # batch, accumulation, optimizer and what `auto` chose, as the run summary records them
           'effective_batch': trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
                              * trainer.args.world_size,
           'steps': trainer.state.global_step, 'build_s': build_s, 'build_peak_gib': build_peak, **choices,
           'allocated_gib_at_train_start': peak.at_start, 'peak_gib': peak_gib(), 'losses': [h['loss'] for h in logged],
           'overrides': list(overrides), 'step_times': [b - a for a, b in zip(timer.times, timer.times[1:])]}
    if world_size() > 1:  # what synchronizing the adapters' gradients costs on this host, on its own
        grads = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        row |= {'trainable_params': grads, 'allreduce_ms': allreduce_ms(grads, device)}
    if len(timer.times) > 1 and len(logged) > 1:  # from the first logged step on: the first step warms kernels up
        first, last = (timer.times[h['step'] - 1] for h in (logged[0], logged[-1]))  # the tokens' own span of steps
        row['tokens_per_s'] = (logged[-1]['num_tokens'] - logged[0]['num_tokens']) / (last - first)
        row['step_s'] = (timer.times[-1] - timer.times[0]) / (len(timer.times) - 1)
    if halves: row |= {'sampler': type(trainer._get_train_sampler()).__name__, 'micro_batch_s': micro.steps,
                       'predicted_ddp_scaling': predicted_ddp_scaling(micro.steps)}
    Path(f'{out_prefix}.rank{rank}.json').write_text(json.dumps(row, indent=2, default=str))


# ---------------------------------------------------------------- the driver
def launch(name, tiny, work, overrides=(), profile=False):
    "Run case `name` in its own process(es); its merged row, or the reason it failed."
    from qlora_nb.distributed import accelerate_config
    _, procs, distributed, *_ = CASES[name]
    prefix = work/f'{name}-{time.time_ns()}'
    me = [str(Path(__file__).resolve()), '--case', name, '--prefix', str(prefix), '--work', str(work)]
    me += (['--tiny'] if tiny else []) + (['--profile'] if profile else [])
    me += [a for o in overrides for a in ('--set', o)]
    if procs == 1: cmd = [sys.executable] + me
    else: cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--config_file',
                 str(accelerate_config(distributed, procs, work))] + me
    env = {**os.environ, **NVLS_OFF, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])}
    if tiny:  # the same launch on the CPU: accelerate starts the processes, and torch's gloo backend joins them
        env |= {'CUDA_VISIBLE_DEVICES': '', 'QLORA_NB_CPU_DTYPE': 'float32', 'TQDM_DISABLE': '1'}
    elif procs == 1: env['CUDA_VISIBLE_DEVICES'] = '0'  # one process seeing two GPUs: Trainer would wrap it in DataParallel
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    ranks = sorted(work.glob(f'{prefix.name}.rank*.json'))
    if r.returncode or len(ranks) != procs:
        return {'case': name, 'failed': True, 'returncode': r.returncode, 'wall_s': wall,
                'error': (r.stderr or r.stdout)[-3000:]}
    rows = [json.loads(p.read_text()) for p in ranks]
    peaks = [x['peak_gib'] for x in rows]
    profiles = {p.name: p.read_text() for p in sorted(work.glob(f'{prefix.name}.rank*.prof.txt'))}
    return {**rows[0], 'peak_gib_by_rank': peaks, 'peak_gib_per_gpu': max(peaks) if None not in peaks else None,
            'step_s_by_rank': [sum(x['step_times'][1:]) / max(1, len(x['step_times']) - 1) for x in rows],
            'wall_s': wall, **({'profiles': profiles} if profiles else {})}


def cli_case(name, tiny, work):
    """`qlora_nb train --gpus 2 [--fsdp]` on the default model, as a user runs it: 4 steps with checkpoints, then
    `--resume` to step 6; the run's files, and whether plain peft loads the adapter it wrote."""
    from qlora_nb.core import Run
    out = work/name
    argv = ['train', '--model', 'default', '--set', f'output.output_dir={out}', '--set', 'output.run_name=run',
            '--set', 'output.report_to=[]', '--set', 'data.max_samples=32', '--set', 'data.max_seq_length=512',
            '--set', 'train.per_device_train_batch_size=2', '--set', 'train.gradient_accumulation_steps=2',
            '--set', 'train.logging_steps=1', '--set', 'train.eval_steps=2', '--set', 'train.save_steps=2']
    env = {**os.environ, **NVLS_OFF, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])}
    if tiny:  # no GPUs: `--gpus 2` refuses, so its launch command itself
        env |= {'CUDA_VISIBLE_DEVICES': '', 'QLORA_NB_CPU_DTYPE': 'float32', 'TQDM_DISABLE': '1'}
        from qlora_nb.distributed import launch_command
        from qlora_nb.weights import tiny_model_dir
        argv[2] = str(tiny_model_dir())
        start, launch_opts = launch_command([], 2, 'ddp', work), []
    else: start, launch_opts = [sys.executable, '-m', 'qlora_nb.cli'], ['--gpus', '2'] + (['--fsdp'] if 'fsdp' in name else [])
    res, t0 = {'case': name, 'processes': 2, 'distributed': 'fsdp' if 'fsdp' in name else 'ddp'}, time.perf_counter()
    for steps, resume in ((4, []), (6, ['--resume'])):
        r = subprocess.run(start + argv + ['--set', f'train.max_steps={steps}'] + resume + launch_opts,
                           env=env, capture_output=True, text=True)
        if r.returncode:
            return res | {'failed': True, 'returncode': r.returncode, 'at_steps': steps, 'error': (r.stderr or r.stdout)[-3000:]}
    run = Run(out/'run')
    s = run.read_summary()
    res |= {'wall_s': time.perf_counter() - t0, 'global_step': s['global_step'], 'resumed_from': s['resumed_from'],
            'effective_batch': s['effective_batch'], 'summary_processes': s['processes'],
            'losses': [h['loss'] for h in run.read_history() if 'loss' in h],
            'checkpoint_files': sorted(p.name for p in run.checkpoints[-1].iterdir()),
            'adapter_files': sorted(p.name for p in run.adapter_dir.iterdir()), 'peak_memory': s['peak_memory']}
    from safetensors.torch import load_file
    weights = load_file(str(run.adapter_dir/'adapter_model.safetensors'))
    res['adapter_tensors'] = len(weights)
    res['adapter_complete'] = bool(weights) and all(t.numel() > 0 for t in weights.values())  # gathered, not a shard
    return res


def summary(rows):
    ok = lambda n: n in rows and not (rows[n].get('failed') or rows[n].get('skipped'))
    s = dict.fromkeys(SUMMARY_KEYS)
    if ok('single-8b') and ok('ddp-8b'):
        one, two = rows['single-8b'], rows['ddp-8b']
        if one.get('tokens_per_s') and two.get('tokens_per_s'):
            s['ddp_scaling_2gpu'] = two['tokens_per_s'] / one['tokens_per_s']
        n = min(20, len(one['losses']), len(two['losses']))
        rel = [abs(a - b) / abs(b) for a, b in zip(two['losses'][:n], one['losses'][:n])]
        s['ddp_loss_matches_single'] = bool(n == min(20, len(one['losses'])) and max(rel) <= 0.02)
    if ok('single-8b'): s['single_gpu_peak_gib_8b'] = rows['single-8b']['peak_gib_per_gpu']
    if ok('fsdp-8b'): s['fsdp_peak_gib_per_gpu_8b'] = rows['fsdp-8b']['peak_gib_per_gpu']
    done = [n for n in LADDER if ok(n) and rows[n]['steps'] >= 5]
    if done: s['fsdp_largest_shape'] = {'shape': rows[done[0]]['shape'].upper(), 'steps': rows[done[0]]['steps'],
                                        'peak_gib_per_gpu': rows[done[0]]['peak_gib_per_gpu']}
    return s


def loss_diffs(rows):
    "Relative differences of the DDP run's losses from the single GPU's, step by step."
    if any(n not in rows or rows[n].get('failed') for n in ('single-8b', 'ddp-8b')): return None
    return [abs(a - b) / abs(b) for a, b in zip(rows['ddp-8b']['losses'], rows['single-8b']['losses'])]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--tiny', action='store_true', help='a tiny model on 2 CPU processes (checks the code, not the speed)')
    ap.add_argument('--only', nargs='+', help='run only the cases whose names contain one of these words')
    ap.add_argument('--skip', nargs='+', default=[], help='skip the cases whose names contain one of these words')
    ap.add_argument('--out', help='results JSON (default: benchmarks/results/multigpu-<date>.json)')
    ap.add_argument('--work', help='scratch folder (default: a temporary one)')
    ap.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                    help="a config override for the cases run; their rows are named 'case+KEY=VALUE'")
    ap.add_argument('--profile', action='store_true', help="profile steps 6-8 of each process (tables in the row)")
    ap.add_argument('--case', help=argparse.SUPPRESS); ap.add_argument('--prefix', help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import tempfile
    work = Path(args.work or tempfile.mkdtemp(prefix='qlora_nb_multigpu_'))
    work.mkdir(parents=True, exist_ok=True)
    if args.case: return run_case(args.case, args.tiny, args.prefix, work, args.set, args.profile)
    chosen_cases = [n for n in (*CASES, *CLI_CASES) if (not args.only or any(w in n for w in args.only))
                    and not any(w in n for w in args.skip)]
    need = max((CASES[n][1] if n in CASES else 2 for n in chosen_cases), default=1)
    if not args.tiny and torch.cuda.device_count() < need:
        sys.exit(f'{torch.cuda.device_count()} CUDA GPUs visible: these cases need {need} (or --tiny)')
    dest = Path(args.out or ROOT/'benchmarks'/'results'/f"{'tiny-' if args.tiny else ''}multigpu-{datetime.date.today()}.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(dest.read_text())['rows'] if dest.exists() else {}
    rows = {n: r for n, r in rows.items() if not (r.get('failed') or r.get('skipped'))}  # tried again
    def save():
        from bench import environment
        out = {'summary': summary(rows), 'ddp_loss_rel_diffs': loss_diffs(rows), 'tiny': args.tiny,
               'environment': environment(), 'rows': rows}
        dest.write_text(json.dumps(out, indent=2, default=str)); return out
    suffix = ''.join(f'+{o}' for o in args.set) + ('+profile' if args.profile else '')
    for name in chosen_cases:
        if suffix and name in CLI_CASES: continue
        if name + suffix in rows: continue
        if args.tiny and 'fsdp' in name:
            rows[name] = {'case': name, 'skipped': NO_FSDP_ON_CPU}; continue
        if name in LADDER and any(n in rows and not rows[n].get('failed') and rows[n].get('steps', 0) >= 5
                                  for n in LADDER[:LADDER.index(name)]): continue  # a larger shape already trained
        if args.tiny and name in LADDER[1:]: continue  # one tiny shape: the ladder's first rung checks the code
        r = rows[name + suffix] = (cli_case(name, args.tiny, work) if name in CLI_CASES
                                   else launch(name, args.tiny, work, args.set, args.profile))
        print(name, 'FAILED: ' + r['error'][-1500:] if r.get('failed') else
              {k: r.get(k) for k in ('processes', 'steps', 'global_step', 'tokens_per_s', 'step_s_by_rank',
                                     'allreduce_ms', 'peak_gib_per_gpu', 'predicted_ddp_scaling', 'wall_s')},
              flush=True)
        save()
    out = save()
    print(json.dumps(out['summary'], indent=2)); print(f'wrote {dest}')
    return out


if __name__ == '__main__':
    main()
