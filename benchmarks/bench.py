#!/usr/bin/env python
"""Training speed and memory, side by side in one run: the seeds' QLoRA recipe, qlora_nb's own training path, and
Unsloth.

    python benchmarks/bench.py              # on a GPU: the full benchmark
    python benchmarks/bench.py --tiny       # anywhere: the same code on a tiny model, a few steps (CI runs this)
    python benchmarks/bench.py --unsloth-site /tmp/site_u   # also Unsloth, in its own process (benchmarks/unsloth_case.py)

Writes benchmarks/results/<tag>.json (or --out), with a top-level "summary". Every recipe gets the same 4-bit model
(NF4 + double quantization, bf16 compute, quantized in memory: the weights' values do not change speed or memory, and
an 8B checkpoint need not exist) and the same LoRA (r=16, alpha=32 on q,k,v,o,gate,up,down; dropout named per row),
lr 2e-4, seed 0; each row names its optimizer (the seed's paged AdamW 8-bit; the product's default, torch's fused AdamW,
for qlora_nb and for Unsloth).

* seed: exactly the seeds' recipe, in its own loop: peft's `prepare_model_for_kbit_training` (which upcasts
  embeddings, norms and lm_head to float32), gradient checkpointing (use_reentrant=False), every example padded to
  max_seq_length, batch 1 x accumulation 4 on real data.
* qlora_nb: the product itself. `add_run_lora` + `build_trainer` + `SFTTrainer.train`, the path `qlora_nb train`
  runs, with the config's defaults deciding checkpointing, length grouping and Liger kernels. Nothing here
  implements its training step a second time: a callback only times the steps.
* unsloth: `FastLanguageModel` with Unsloth's own gradient checkpointing, in a separate process whose packages
  (Unsloth pins older trl/datasets) come first on its path.

Model FLOPs per trained token (the convention of the MFU column): 4*N_frozen (forward + input gradients of the
frozen base; no weight gradients) + 6*N_lora + 12*L*s*d_attn for attention scores and values (forward + backward,
no causal discount); recomputation from checkpointing is not counted. The peak is a measured bf16 matmul.
"""
import argparse, collections, datetime, gc, json, math, platform, random, sys, time
from pathlib import Path

import torch
import torch._dynamo
from torch import nn
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']


def quantize_linears(model, device):
    "Replace every nn.Linear but lm_head by a bitsandbytes NF4 + double-quant Linear4bit (as from_pretrained would)."
    import bitsandbytes as bnb
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear) and name != 'lm_head':
                with torch.device('meta'):
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.bfloat16, quant_type='nf4', compress_statistics=True)
                q.weight = bnb.nn.Params4bit(child.weight.data.to(torch.bfloat16), requires_grad=False,
                                             quant_type='nf4', compress_statistics=True)
                if child.bias is not None:  # Qwen2's q, k, v projections
                    q.bias = nn.Parameter(child.bias.data.to(torch.bfloat16), requires_grad=False)
                setattr(mod, name, q.to(device))
                del child
    gc.collect(); torch.cuda.empty_cache() if device.type == 'cuda' else None
    model.is_loaded_in_4bit = True
    model.config.quantization_config = {'load_in_4bit': True, 'bnb_4bit_quant_type': 'nf4'}
    return model


def random_4bit_model(config, device, seed=0):
    "A model of `config` with random weights, quantized to NF4."
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return quantize_linears(model, device)


def pretrained_4bit_model(path, device):
    "A real checkpoint (bf16 on disk), quantized the same way."
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device)
    return quantize_linears(model, device)


def seed_model(model, dropout=0.05):
    "The seeds' preparation (with its float32 upcast) and the shared LoRA adapters."
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={'use_reentrant': False})
    model.config.use_cache = False
    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=TARGETS, task_type='CAUSAL_LM')
    return get_peft_model(model, cfg)


def seed_optimizer(model):
    import bitsandbytes as bnb
    params = [p for p in model.parameters() if p.requires_grad]
    if torch.cuda.is_available(): return bnb.optim.PagedAdamW8bit(params, lr=2e-4)
    return torch.optim.AdamW(params, lr=2e-4)  # bitsandbytes' paged optimizers are for GPUs


def sync():
    if torch.cuda.is_available(): torch.cuda.synchronize()


def graphed_decoder(model):
    "The `GraphedDecoder` replaying `model`'s decoder in this run (the decoder's forward), or None."
    from qlora_nb.train import GraphedDecoder
    return next((f for m in model.modules() if isinstance(f := vars(m).get('forward'), GraphedDecoder)), None)


def graph_captures(model):
    "How many CUDA graphs the run's `GraphedDecoder` captured so far: the steps it captured in are not the steps' speed."
    graphed = graphed_decoder(model)
    return graphed.captures if graphed else 0


def seed_step(model, opt, batch):
    out = model(**batch)
    out.loss.backward()
    opt.step(); opt.zero_grad(set_to_none=True)
    return out.loss.item()


def matmul_peak_tflops(device):
    "Measured bf16 matmul throughput (the MFU denominator)."
    if device.type != 'cuda': return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16); b = torch.randn_like(a)
    for _ in range(3): a @ b
    sync(); t = time.time()
    for _ in range(20): a @ b
    sync()
    return 2 * 8192 ** 3 * 20 / (time.time() - t) / 1e12


def flops_per_token(config, n_lora, seq):
    c, hd = config, config.hidden_size // config.num_attention_heads
    per_layer = c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * hd + c.hidden_size * c.hidden_size \
                + 3 * c.hidden_size * c.intermediate_size
    n_frozen = c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size  # lm_head is a matmul; the input embedding a lookup
    return 4 * n_frozen + 6 * n_lora + 12 * config.num_hidden_layers * seq * config.hidden_size


def reset_memory():
    gc.collect()
    if torch.cuda.is_available(): torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def peak_allocations(snapshot, before=0, top=12):
    """Where the memory was at the allocation peak of a CUDA memory-history `snapshot`
    (`torch.cuda.memory._snapshot()`): GiB alive per allocating frame, the frame outside torch, nearest the
    allocation; `before` is what was allocated when the recording began (the weights), counted apart."""
    events = [e for e in snapshot['device_traces'][0] if e['action'] in ('alloc', 'free_completed')]
    cur = peak = peak_at = 0
    for i, e in enumerate(events):
        cur += e['size'] if e['action'] == 'alloc' else -e['size']
        if cur > peak: peak, peak_at = cur, i
    live = {}
    for e in events[:peak_at + 1]:
        if e['action'] == 'alloc': live[e['addr']] = e
        else: live.pop(e['addr'], None)
    def where(e):
        frames = [f for f in e.get('frames', []) if f['filename'].endswith('.py') and '/torch/' not in f['filename']]
        if not frames: return '?'
        return f"{frames[0]['filename'].split('site-packages/')[-1]}:{frames[0]['line']} {frames[0]['name']}"
    by = collections.Counter()
    for e in live.values(): by[where(e)] += e['size']
    rows = by.most_common(top)
    return {'before_gib': before / 2**30, 'peak_gib': (before + peak) / 2**30,
            'at_peak': [{'where': w, 'gib': b / 2**30} for w, b in rows]}


def synthetic_data(vocab, seq, n, seed=0):
    "`n` rows of `seq` random tokens, every token trained, as the product's `PreparedData`."
    from datasets import Dataset, DatasetDict
    from qlora_nb.data import PreparedData
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(seed)).tolist() * n  # as the seed's loop
    ds = Dataset.from_dict({'input_ids': ids, 'attention_mask': [[1] * seq] * n, 'labels': ids})
    return PreparedData(DatasetDict(train=ds, validation=ds.select(range(1))), DatasetDict())


# `--shape`: the synthetic cases' name prefix and their config (a function of qlora_nb.model)
SHAPES = {'8b': ('llama3-8b-shape', 'llama3_8b_config'), '3b': ('llama3.2-3b-shape', 'llama32_3b_config'),
          '1b': ('llama3.2-1b-shape', 'llama32_1b_config'), '7b': ('qwen2.5-7b-shape', 'qwen25_7b_config')}

SETTINGS = []  # `--set`: product settings for every case of this invocation
MEMORY_HISTORY = False  # `--memory-history`: where the memory is at the peak of each synthetic product case

def product_config(work, name, seq, batch, accum=1, steps=-1, dropout=0.05, model='default', extra=()):
    """The product's run config for a benchmark case: its defaults, with the case's shape and the shared LoRA. It logs
    as users' runs log (`train.logging_steps`' default): until 2026-11-24 every step, one more wait for the GPU per step
    than users have (the real-length and 8B cases; the default job's cases log as users' since 2026-11-23)."""
    from qlora_nb.core import load_config
    return load_config(overrides=[f'model.name={model}', f'output.output_dir={work}', f'output.run_name={name}',
        'output.report_to=[]', f'data.max_seq_length={seq}', f'train.per_device_train_batch_size={batch}',
        f'train.gradient_accumulation_steps={accum}', f'train.max_steps={steps}', 'train.num_train_epochs=1',
        'train.learning_rate=2e-4', 'train.eval_steps=1000000', 'train.save_steps=1000000',
        f'lora.lora_dropout={dropout}', f'lora.target_modules={TARGETS}', 'lora.r=16', 'lora.lora_alpha=32',
        'train.seed=0', *SETTINGS, *extra])


# The synthetic 8B cases time the first steps of a fine-tuning run of this many steps, and the product makes its
# choices (`train.compile: auto`) for that run; the real-data cases run their one short epoch, as planned
PLANNED_STEPS = 1000


class StepTimer(TrainerCallback):
    """Times the trainer's optimizer steps: it measures, it does not train. On a GPU it records a CUDA event at the end
    of each step and reads them all after the run, so the timing adds no wait for the GPU to the step (until
    2026-11-23 it synchronized at every step end, one wait more than `qlora_nb train` has); on a CPU, the clock."""
    def __init__(self): self.marks, self.captures, self.graphed = [], [], None
    def _mark(self):
        if not torch.cuda.is_available(): return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True); event.record(); return event
    def on_train_begin(self, args, state, control, **kw):
        # looked up once: walking the model's modules at every step end would add host time to the steps it times
        self.marks, self.captures, self.graphed = [self._mark()], [0], graphed_decoder(kw['model'])
    def on_step_end(self, args, state, control, **kw):
        self.marks.append(self._mark()); self.captures.append(self.graphed.captures if self.graphed else 0)
    def captured(self):
        "For each step, whether it captured a CUDA graph (its time is mostly the capture's)."
        return [b > a for a, b in zip(self.captures, self.captures[1:])]
    def seconds(self):
        "Each mark's time in seconds: the run's start, then every step's end."
        if not torch.cuda.is_available(): return list(self.marks)
        sync(); return [self.marks[0].elapsed_time(e) / 1e3 for e in self.marks]
    @property
    def start(self): return self.seconds()[0]
    @property
    def times(self): return self.seconds()[1:]
    def step_seconds(self):
        "Each step's own time in seconds, as the results record it."
        marks = self.seconds(); return [round(b - a, 4) for a, b in zip(marks, marks[1:])]


class StopAfter(TrainerCallback):
    "Ends a run planned for more steps after `steps` optimizer steps: the product plans for the run it is given."
    def __init__(self, steps): self.steps = steps
    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.steps: control.should_training_stop = True


def product_trainer(cfg, model, tok, data, callbacks=()):
    """The product's own path: `add_run_lora` + `build_trainer` (what `train()` runs), a step timer, and the case's
    notes; after training, `chosen(trainer)` adds what the product chose and how its graphs ran."""
    from qlora_nb.train import add_run_lora, build_trainer
    model = add_run_lora(cfg, model)
    timer = StepTimer(); torch._dynamo.utils.counters.clear()  # counts the graphs this case compiles
    trainer = build_trainer(cfg, data, model, tok, [timer, *callbacks], live=False)
    return trainer, timer, {'group_by_length': cfg.data.group_by_length, 'dropout': cfg.lora.lora_dropout}


def chosen(trainer):
    "What the product chose for a trained case, as its run summary records it, and the graphs Dynamo compiled."
    from qlora_nb.train import speed_choices
    return {**speed_choices(trainer), 'compiled_graphs': torch._dynamo.utils.counters['stats']['unique_graphs']}


def synthetic_case(config, recipe, seq, batch, steps, warmup, device, peak_tflops, tok, work, dropout=0.05, extra=()):
    "Tokens/s and peak memory of `recipe` on random tokens (every token trained)."
    reset_memory()
    model = random_4bit_model(config, device)
    gc.collect(); reset_memory()  # building the model in bf16 is not training
    if recipe == 'seed':
        model = seed_model(model, dropout); opt = seed_optimizer(model)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g).to(device)
        data = {'input_ids': ids, 'attention_mask': torch.ones_like(ids), 'labels': ids}
        for _ in range(warmup): seed_step(model, opt, data)
        sync(); t = time.perf_counter()
        losses = [seed_step(model, opt, data) for _ in range(steps)]
        sync(); dt, notes = time.perf_counter() - t, {'optim': 'paged_adamw_8bit'}
    else:
        name = f'{recipe}-{seq}x{batch}-{dropout}' + ''.join(f'-{o}' for o in extra)
        cfg = product_config(work, name, seq, batch, steps=PLANNED_STEPS, dropout=dropout, extra=extra)
        trainer, timer, notes = product_trainer(cfg, model, tok, synthetic_data(config.vocab_size, seq, batch * (warmup + steps)),
                                                [StopAfter(warmup + steps)])
        record = MEMORY_HISTORY and torch.cuda.is_available()
        if record: before = torch.cuda.memory_allocated(); torch.cuda.memory._record_memory_history(max_entries=500_000)
        trainer.train()
        if record:
            notes['memory_at_peak'] = peak_allocations(torch.cuda.memory._snapshot(), before)
            torch.cuda.memory._record_memory_history(enabled=None)
        dt = timer.times[-1] - timer.times[warmup - 1] if warmup else timer.times[-1] - timer.start
        notes |= chosen(trainer)
        notes['step_s'] = timer.step_seconds()
        losses, model = [h['loss'] for h in trainer.state.log_history if 'loss' in h], trainer.model
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tps = batch * seq * steps / dt
    res = {'recipe': recipe, 'dropout': dropout, 'seq': seq, 'batch': batch, 'steps': steps, 'tokens_per_s': tps,
           'peak_gib': peak_gib(), 'loss_last': losses[-1] if losses else None, 'lora_params': n_lora, **notes}
    if peak_tflops: res['mfu'] = tps * flops_per_token(config, n_lora, seq) / (peak_tflops * 1e12)
    del model; reset_memory()
    return res


def pad_batch(rows, width, pad_id):
    pad = lambda x, v: x + [v] * (width - len(x))
    return {'input_ids': torch.tensor([pad(r['input_ids'], pad_id) for r in rows]),
            'attention_mask': torch.tensor([pad(r['attention_mask'], 0) for r in rows]),
            'labels': torch.tensor([pad(r['labels'], -100) for r in rows])}


def seed_group(model, opt, sched, rows, max_len, pad_id, device):
    """One optimizer step of the seed recipe on a group of examples: batch 1 x accumulation 4, each example padded to
    max_len, gradients accumulated with token weights (the token mean of the group, as the product's batch of 4)."""
    n_group = sum(sum(l != -100 for l in r['labels'][1:]) for r in rows)
    total, cells = 0.0, 0
    for r in rows:
        b = {k: v.to(device) for k, v in pad_batch([r], max_len, pad_id).items()}
        n = int((b['labels'][:, 1:] != -100).sum())
        loss = model(**b).loss * n / n_group
        loss.backward(); total += loss.item(); cells += b['input_ids'].numel()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.3)
    opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
    return total, cells


def real_rows(model_path, max_len, max_examples):
    "HumanEval SFT examples of the default tokenizer: real lengths and real prompt masks."
    from qlora_nb.core import load_config
    from qlora_nb.data import prepare_data
    from qlora_nb.model import load_tokenizer
    tok = load_tokenizer(model_path)
    cfg = load_config(overrides=[f'model.name={model_path}', f'data.max_seq_length={max_len}']
                      + ([f'data.max_samples={max_examples}'] if max_examples else []))
    return tok, prepare_data(cfg, tok)


def seed_epoch(model, tok, data, max_len, device):
    """The seed recipe's epoch over the training split, in a shuffled order, with the seeds' schedule (lr 2e-4, cosine,
    3% warmup) and the QLoRA paper's clipping (0.3, as the product). Returns (wall s, padded cells, real tokens, losses),
    time and tokens counted from the second step on: the first one warms up kernels, in every recipe."""
    from transformers import get_cosine_schedule_with_warmup
    train = data.splits['train'].select_columns(['input_ids', 'attention_mask', 'labels'])
    order = list(range(len(train))); random.Random(0).shuffle(order)
    rows = [train[i] for i in order]
    groups = [rows[i:i + 4] for i in range(0, len(rows), 4)]
    opt = seed_optimizer(model); model.train()
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(0.03 * len(groups)), len(groups))
    padded = real = 0; losses = []
    for i, g in enumerate(groups):
        if i == 1: sync(); t = time.perf_counter()
        loss, cells = seed_group(model, opt, sched, g, max_len, tok.pad_token_id, device)
        losses.append(loss)
        if i: padded += cells; real += sum(len(r['input_ids']) for r in g)
    sync()
    return time.perf_counter() - t, padded, real, losses


class TokensPerBatch:
    """A data collator that counts each batch's real tokens (under the attention mask, as TRL counts them) as it makes
    it, on the host: the epoch's tokens without reading the GPU at any step."""
    def __init__(self, collate): self.collate, self.tokens = collate, []
    def __call__(self, rows):
        batch = self.collate(rows)
        self.tokens.append(int(batch['attention_mask'].sum()))
        return batch


def product_epoch(cfg, model, tok, data):
    """The product's epoch; wall time and real tokens from the second step on, as `seed_epoch` (one step a batch:
    the real cases train without accumulation). The losses are the logged ones; the notes add the steps and their mean."""
    trainer, timer, notes = product_trainer(cfg, model, tok, data)
    trainer.data_collator = counted = TokensPerBatch(trainer.data_collator)
    out = trainer.train(); notes |= chosen(trainer)
    steps = trainer.state.global_step  # the training batches come first; the evaluation at the end collates more
    assert len(timer.times) == steps <= len(counted.tokens), (steps, len(timer.times), len(counted.tokens))
    notes |= {'steps': steps, 'mean_train_loss': out.training_loss}
    losses = [h['loss'] for h in trainer.state.log_history if 'loss' in h]
    return trainer.model, timer.times[-1] - timer.times[0], sum(counted.tokens[1:steps]), losses, notes


def float32_eval(model_path, adapter, tok, ds):
    """Eval loss of the adapter saved at `adapter` on the 4-bit base at `model_path`, computed in float32: the
    training's result without the evaluation's rounding (the same 4-bit codes; a bf16 evaluation reads ~3% high)."""
    from qlora_nb.core import QuantSettings
    from qlora_nb.evaluate import response_perplexity
    from qlora_nb.infer import load_generator
    model = load_generator(model_path, adapter=str(adapter), quant=QuantSettings(compute_dtype='float32'))[0]
    loss = response_perplexity(model, tok, ds, batch_size=4)['loss']
    del model; reset_memory()
    return loss


def real_case(recipe, tok, data, device, max_len, work, shape=None, model_path=None):
    """One epoch over real-length examples, on a random model of `shape` or the real model at `model_path`;
    real tokens/s and, on the real model, the eval loss of the response tokens."""
    from qlora_nb.evaluate import response_perplexity
    reset_memory(); torch.manual_seed(0)
    model = random_4bit_model(shape, device) if shape else pretrained_4bit_model(model_path, device)
    reset_memory()
    if recipe == 'seed':
        model = seed_model(model)
        dt, padded, real, losses = seed_epoch(model, tok, data, max_len, device); notes = {'padding_fraction': 1 - real / padded}
    else:
        cfg = product_config(work, f'real-{"shape" if shape else "model"}', max_len, 4, model=model_path or 'default')
        model, dt, real, losses, notes = product_epoch(cfg, model, tok, data)
    res = {'recipe': recipe, 'examples': len(data.splits['train']), 'steps': len(losses), 'epoch_s': dt,
           'tokens_per_s_real': real / dt, 'peak_gib': peak_gib(),
           'first_train_loss': losses[0] if losses else None, 'final_train_loss': losses[-1] if losses else None, **notes}
    if not shape:
        model.eval(); ev = response_perplexity(model, tok, data.splits['validation'], batch_size=4)
        adapter = Path(work)/f'real-model-{recipe}-adapter'; model.save_pretrained(adapter)
        res |= {'eval_loss': ev['loss'], 'eval_tokens': ev['tokens']}
    del model; reset_memory()
    if not shape: res['eval_loss_float32'] = float32_eval(model_path, adapter, tok, data.splits['validation'])
    return res


def dtype_case(dtype, model_path, max_len, max_examples, work, adapters='auto'):
    """The product's `train()` on the default job's data with compute dtype `dtype` (and `lora.adapter_dtype`
    `adapters`): its eval loss and throughput."""
    from qlora_nb.core import TrainSettings
    from qlora_nb.train import train
    from qlora_nb.evaluate import response_perplexity
    # logged as the default job logs (until 2026-11-23 every step: one more wait for the GPU per step than users have)
    extra = [f'quant.compute_dtype={dtype}', f'lora.adapter_dtype={adapters}',
             f'train.logging_steps={TrainSettings.logging_steps}'] + (
        [f'data.max_samples={max_examples}'] if max_examples else [])
    cfg = product_config(work, f'dtype-{dtype}-{adapters}', max_len, 4, model=model_path, extra=extra)
    reset_memory(); res = train(cfg, live=False)
    tok, model, eval_ds = res.trainer.processing_class, res.trainer.model, res.trainer.eval_dataset
    model.eval(); ev = response_perplexity(model, tok, eval_ds, batch_size=4); peak = peak_gib()
    out = {'dtype': dtype, 'adapter_dtype': adapters, 'eval_loss': ev['loss'],
           'final_train_loss': res.summary['final_train_loss'],
           'tokens_per_s_real': res.summary['tokens_seen'] / res.summary['wall_time_s'], 'peak_gib': peak}
    del res, model; reset_memory()
    out['eval_loss_float32'] = float32_eval(model_path, cfg.run.adapter_dir, tok, eval_ds)
    return out


class Profiled(TrainerCallback):
    """Profiles optimizer steps `first` + 1 to `first` + `steps` of a trainer (it measures, it does not train). Step
    `first` is traced and thrown away (`torch.profiler.schedule`'s warm-up: the profiler's own start-up, which until
    2026-11-23 the window began with). `cpu` also traces the host's operators: that tracing slows a launch-bound step
    about 3x (the GPU's kernels do not slow), so the busy fraction is read from a window that traces the GPU alone."""
    def __init__(self, first=3, steps=5, cpu=True): self.first, self.steps, self.cpu, self.prof = first, steps, cpu, None
    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.first - 1:
            from torch.profiler import ProfilerActivity, profile, schedule
            acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if self.cpu else [ProfilerActivity.CUDA]
            if not torch.cuda.is_available(): acts = [ProfilerActivity.CPU]  # a CPU check of the code: no kernels
            self.prof = profile(activities=acts, schedule=schedule(wait=0, warmup=1, active=self.steps, repeat=1))
            self.prof.__enter__()
    def on_step_end(self, args, state, control, **kw):
        if self.prof is None or not self.first <= state.global_step <= self.first + self.steps: return
        if state.global_step == self.first:  # the warm-up ends: the window starts
            sync(); self.prof.step(); self.t, self.captures = time.perf_counter(), graph_captures(kw['model'])
            return
        if state.global_step == self.first + self.steps:
            sync(); self.wall = time.perf_counter() - self.t
            self.captures = graph_captures(kw['model']) - self.captures
        self.prof.step()
        if state.global_step == self.first + self.steps: self.prof.__exit__(None, None, None)

    def report(self):
        "GPU busy fraction (kernel time / wall) and the top kernels, per step (and the host's top operators)."
        # CUDA events, less the profiler's own ranges, which span kernels counted already ('Optimizer.step#AdamW.step';
        # 'ProfilerStep*', each step under a schedule where the host is traced: until 2026-11-23 it was counted too)
        kernels = [e for e in self.prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and '#' not in e.name
                   and not e.name.startswith('ProfilerStep')]
        busy, by_name = sum(e.device_time for e in kernels) / 1e6, {}
        for e in kernels: by_name[e.name] = by_name.get(e.name, 0) + e.device_time
        top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
        res = {'step_wall_s': self.wall / self.steps, 'gpu_busy_fraction': busy / self.wall,
               'graph_captures_in_window': self.captures,
               'gpu_busy_s_per_step': busy / self.steps, 'kernels_per_step': len(kernels) / self.steps,
               'top_kernels': [{'name': n[:100], 'ms_per_step': t / 1e3 / self.steps} for n, t in top]}
        if not self.cpu: return res
        # where the host's time goes while the GPU idles: operators by their own CPU time
        ops = sorted(self.prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
        return res | {'top_cpu_ops': [{'name': e.key[:100], 'calls_per_step': e.count / self.steps,
                                       'self_cpu_ms_per_step': e.self_cpu_time_total / 1e3 / self.steps} for e in ops]}


def default_job_config(work, name, model_path, max_len, extra=()):
    "The default job's batch, accumulation and logging, over four epochs: what the profiles run (`extra`: more)."
    from qlora_nb.core import TrainSettings
    return product_config(work, name, max_len, TrainSettings.per_device_train_batch_size,
                          TrainSettings.gradient_accumulation_steps, model=model_path,
                          extra=['train.num_train_epochs=4', f'train.logging_steps={TrainSettings.logging_steps}',
                                 *extra])


# The default job's profile (`profile_case`), by step: the second epoch untraced (its wall time, the captures of
# the first epoch behind it), a host trace in the third, the GPU trace in the fourth, each after a warm-up step
# (until 2026-11-23 the GPU trace took steps 21-30: it began with the profiler's start-up and ended on a capture)
PROFILE_WINDOW = dict(reference=(11, 20), host_first=21, first=31, steps=8)
TINY_PROFILE_WINDOW = dict(reference=(2, 2), host_first=3, first=7, steps=2)  # a CPU check of the code


def profile_case(model_path, max_len, work, extra=(), reference=PROFILE_WINDOW['reference'],
                 host_first=PROFILE_WINDOW['host_first'], first=PROFILE_WINDOW['first'], steps=PROFILE_WINDOW['steps']):
    """How busy the GPU is in the product's training step: the default model on real data, through `train()`, with the
    default job's batch, accumulation and logging (`extra`: other settings). Steps `first` + 1 to `first` + `steps`
    trace the GPU alone (the busy fraction), `host_first` + 1 to + 3 the host too (where its time goes); each trace
    throws its first step away. Tracing slows the host, so the report adds the traced GPU work over the wall time of
    the untraced `reference` steps (first to last), less any that captured a CUDA graph."""
    from qlora_nb.train import train
    gpu, host, timer = Profiled(first, steps, cpu=False), Profiled(host_first, 3), StepTimer()
    cfg = default_job_config(work, 'profile', model_path, max_len, extra)
    res = train(cfg, callbacks=[gpu, host, timer, StopAfter(first + steps)], live=False)
    step_s = [b - a for a, b in zip([timer.start, *timer.times], timer.times)]
    captured = timer.captured()
    untraced = [s for n, s in enumerate(step_s, 1) if reference[0] <= n <= reference[1] and not captured[n - 1]]
    traced = gpu.report()
    return {**traced, 'gpu_busy_fraction_untraced': traced['gpu_busy_s_per_step'] / (sum(untraced) / len(untraced)),
            'with_host_trace': host.report(), 'unprofiled_step_wall_s': untraced, 'reference_steps': list(reference),
            'step_s': step_s, 'captured': captured, 'first_profiled_step': first + 1, **res.summary['speed'],
            'overrides': list(extra), 'tokens_per_step': res.summary['tokens_seen'] / max(1, res.summary['global_step'])}


def profile_synthetic(config, seq, work, tok, device, dropout, steps=3, extra=()):
    """The same for the 8B shape at `seq` x 1 (where does the time of a step go, with and without LoRA dropout;
    `extra`: product settings, e.g. a memory budget)."""
    reset_memory(); model = random_4bit_model(config, device); reset_memory()
    cfg = product_config(work, f'profile-8b-{dropout}' + ''.join(f'-{o}' for o in extra), seq, 1, steps=PLANNED_STEPS,
                         dropout=dropout, extra=extra)
    trainer, timer, notes = product_trainer(cfg, model, tok, synthetic_data(config.vocab_size, seq, 2 + steps),
                                            [StopAfter(2 + steps)])
    cb = Profiled(2, steps); trainer.add_callback(cb); trainer.train(); notes |= chosen(trainer)
    del model, trainer; reset_memory()
    return {**cb.report(), **notes}


def profile_real(config, tok, data, device, max_len, work, first=3, steps=8):
    """The 8B shape's real-length epoch (`real_case`'s product run) with steps `first` + 1 to `first` + `steps`
    traced on the GPU alone: how busy the GPU is in an epoch of short, varied batches."""
    reset_memory(); torch.manual_seed(0); model = random_4bit_model(config, device); reset_memory()
    cfg = product_config(work, 'profile-real-shape', max_len, 4)
    trainer, timer, notes = product_trainer(cfg, model, tok, data)
    cb = Profiled(first, steps, cpu=False); trainer.add_callback(cb); trainer.train(); notes |= chosen(trainer)
    notes['step_s'] = timer.step_seconds()
    del model, trainer; reset_memory()
    return {**cb.report(), **notes}


def environment():
    "The library's record of the machine (commit included: `QLORA_NB_COMMIT` on a copy without git) + kernel versions."
    import importlib.metadata as md
    from qlora_nb.train import environment as run_environment
    env = run_environment()
    for p in ('liger-kernel', 'triton'):
        try: env['versions'][p] = md.version(p)
        except md.PackageNotFoundError: pass
    return {'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'), **env}


def unsloth_case(site, seq, batch, steps, warmup, dropout, work):
    """Unsloth on the same shape, LoRA and optimizer (the product's default, `TrainSettings.optim`), in its own process
    with its own packages first on the path."""
    from qlora_nb.core import TrainSettings
    import os, subprocess
    env = {**os.environ, 'PYTHONPATH': f"{site}:{os.environ.get('PYTHONPATH', '')}", 'HF_HUB_OFFLINE': '1',
           'UNSLOTH_DISABLE_STATISTICS': '1'}
    cmd = [sys.executable, str(ROOT/'benchmarks'/'unsloth_case.py'), '--seq', str(seq), '--batch', str(batch),
           '--steps', str(steps), '--warmup', str(warmup), '--dropout', str(dropout), '--work', str(work),
           '--optim', TrainSettings.optim]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode: return {'recipe': 'unsloth', 'dropout': dropout, 'error': r.stderr[-2000:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


S8 = 'llama3-8b-shape 2048x1'  # the case of the 8B keys


def ratio(a, b): return a / b if a is not None and b else None


def summary(results):
    "The issue's contract: exactly these keys (None where a case did not run)."
    def get(case, recipe, key):
        return results.get(case, {}).get(recipe, {}).get(key)
    # the two trainings compared in one evaluation precision (float32) where the rows have it: evaluated in its own
    # compute dtype, a bfloat16 model's loss reads ~3% high from the evaluation's rounding alone (04_training)
    t4_key = 'eval_loss_float32' if get('t4 mode', 'bfloat16', 'eval_loss_float32') is not None else 'eval_loss'
    fp16, bf16 = get('t4 mode', 'float16', t4_key), get('t4 mode', 'bfloat16', t4_key)
    real_key = 'eval_loss_float32' if get('default model real data', 'seed', 'eval_loss_float32') is not None else 'eval_loss'
    seed_loss = get('default model real data', 'seed', real_key)
    prod_loss = get('default model real data', 'qlora_nb', real_key)
    import math
    return {'product_vs_seed_8b_2048': ratio(get(S8, 'qlora_nb', 'tokens_per_s'), get(S8, 'seed', 'tokens_per_s')),
            'product_peak_gib_8b_2048': get(S8, 'qlora_nb', 'peak_gib'),
            'product_vs_unsloth_8b_2048': ratio(get(S8, 'qlora_nb', 'tokens_per_s'), get(S8, 'unsloth', 'tokens_per_s')),
            'product_vs_seed_real_lengths': ratio(get('llama3-8b-shape real lengths', 'qlora_nb', 'tokens_per_s_real'),
                                                  get('llama3-8b-shape real lengths', 'seed', 'tokens_per_s_real')),
            'eval_loss_rel_diff_real': ratio(None if prod_loss is None or seed_loss is None else prod_loss - seed_loss, seed_loss),
            # `train()` end to end where the T4-mode runs ran (a GPU), else the product's epoch on the same data
            'default_model_tokens_per_s': (get('t4 mode', 'bfloat16', 'tokens_per_s_real')
                                           or get('default model real data', 'qlora_nb', 'tokens_per_s_real')),
            'default_model_gpu_busy': get('profile', 'qlora_nb', 'gpu_busy_fraction'),
            't4_mode_loss_rel_diff': (abs(fp16 - bf16) / bf16 if fp16 is not None and bf16 and math.isfinite(fp16) else None)}


def memory_lean(results, variant='budget'):
    """The summary's three 8B keys for the case run with a memory budget (`--variant budget=train.memory_budget_gib=6.5`)
    against the same run's seed and Unsloth rows: the default spends a large GPU's memory on speed, this row does not."""
    lean, seed, unsloth = (results.get(c, {}).get(r, {}) for c, r in
                           ((f'{S8} {variant}', 'qlora_nb'), (S8, 'seed'), (S8, 'unsloth')))
    return {'case': f'{S8} {variant}', 'product_vs_seed_8b_2048': ratio(lean.get('tokens_per_s'), seed.get('tokens_per_s')),
            'product_peak_gib_8b_2048': lean.get('peak_gib'),
            'product_vs_unsloth_8b_2048': ratio(lean.get('tokens_per_s'), unsloth.get('tokens_per_s'))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--tiny', action='store_true', help='a tiny model and a few steps (CPU-friendly; checks the code, not the speed)')
    ap.add_argument('--model', default='default', help='model of the real-data case')
    ap.add_argument('--shape', default='8b', choices=sorted(SHAPES),
                    help="the random-weight shape of the synthetic cases (the issue's targets are the 8B shape's)")
    ap.add_argument('--steps', type=int, default=8); ap.add_argument('--warmup', type=int, default=2)
    ap.add_argument('--only', nargs='+', help='run only the cases whose names contain one of these words')
    ap.add_argument('--set', nargs='+', default=[], metavar='KEY=VALUE', help='product settings for every product case')
    ap.add_argument('--memory-history', action='store_true',
                    help="record CUDA memory history in the synthetic product cases: what is alive at the peak, by frame")
    ap.add_argument('--skip', nargs='+', default=[], help='skip the cases whose names contain one of these words')
    ap.add_argument('--recipes', nargs='+', help='run only these recipes (seed, qlora_nb, unsloth, ...) of each case')
    ap.add_argument('--variant', action='append', default=[], metavar='NAME=KEY=VALUE[,KEY=VALUE]',
                    help='also the 8B 2048x1 case with these product settings (e.g. ckpt=train.gradient_checkpointing=true)')
    ap.add_argument('--profile-variant', action='append', default=[], metavar='NAME=KEY=VALUE[,KEY=VALUE]',
                    help='also profile the default model with these product settings (e.g. fold=train.compile=true)')
    ap.add_argument('--profile-8b-variant', action='append', default=[], metavar='NAME=KEY=VALUE[,KEY=VALUE]',
                    help="also profile the 8B shape with these product settings ('profile 8b NAME', GPU only)")
    ap.add_argument('--unsloth-site', help='a folder with Unsloth and its pinned packages (GPU only)')
    ap.add_argument('--work', default=None, help='scratch folder for the product runs (default: a temporary one)')
    ap.add_argument('--out', help='results JSON (default: benchmarks/results/<gpu or cpu>-<date>.json)')
    args = ap.parse_args(argv)
    SETTINGS[:] = args.set
    global MEMORY_HISTORY; MEMORY_HISTORY = args.memory_history
    import tempfile
    from qlora_nb import model as qmodel
    from qlora_nb.model import load_tokenizer
    from qlora_nb.weights import resolve_model, tiny_model_dir
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    work = Path(args.work or tempfile.mkdtemp(prefix='qlora_nb_bench_'))
    if args.tiny:
        from transformers import LlamaConfig
        shape = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
        seq8, model_path, max_len, max_examples, steps, warmup = 128, str(tiny_model_dir()), 512, 8, 2, 1
    else:
        shape, seq8 = getattr(qmodel, SHAPES[args.shape][1])(), 2048
        model_path, max_len, max_examples, steps, warmup = str(resolve_model(args.model)), 2048, None, args.steps, args.warmup
    peak = matmul_peak_tflops(device)
    tok, data = real_rows(model_path, max_len, max_examples)
    gpu = torch.cuda.get_device_name(0).split()[-1].lower() if peak else 'cpu'
    dest = Path(args.out or ROOT/'benchmarks'/'results'/f"{'tiny-' if args.tiny else ''}{gpu}-{datetime.date.today()}.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    # cases already in `dest` (an earlier command on the same machine) are kept, not run again
    results = json.loads(dest.read_text())['results'] if dest.exists() else {}
    def save():  # after every case, so an interrupted run keeps what it measured
        out = {'summary': summary(results), 'memory_lean': memory_lean(results), 'environment': environment(),
               'matmul_peak_tflops': peak, 'tiny': args.tiny, 'results': results}
        dest.write_text(json.dumps(out, indent=2))
        return out
    synth = lambda r, d=0.05, o=(): synthetic_case(shape, r, seq8, 1, steps, warmup, device, peak, tok, work, d, o)
    named = SHAPES[args.shape][0]  # the cases of another shape are named for it, outside the summary's contract
    cases = {f'{named} 2048x1': {'seed': synth, 'qlora_nb': synth},
             f'{named} 2048x1 dropout 0': {'qlora_nb': lambda r: synth(r, 0.0)},
             f'{named} real lengths': {r: (lambda r: real_case(r, tok, data, device, max_len, work, shape=shape))
                                             for r in ('seed', 'qlora_nb')},
             'default model real data': {r: (lambda r: real_case(r, tok, data, device, max_len, work, model_path=model_path))
                                        for r in ('seed', 'qlora_nb')}}
    for v in args.variant:
        vname, overrides = v.split('=', 1)
        cases[f'{named} 2048x1 {vname}'] = {'qlora_nb': lambda r, o=tuple(overrides.split(',')): synth(r, 0.05, o)}
    if args.unsloth_site and torch.cuda.is_available() and args.shape == '8b':  # Unsloth's case builds the 8B shape
        for d, case in ((0.05, f'{named} 2048x1'), (0.0, f'{named} 2048x1 dropout 0')):
            cases[case]['unsloth'] = lambda r, d=d: unsloth_case(args.unsloth_site, seq8, 1, steps, warmup, d, work)
    # the profile runs in the tiny mode too (a CPU traces no kernels), so that its code is checked where CI runs
    profile_window = TINY_PROFILE_WINDOW if args.tiny else PROFILE_WINDOW
    if torch.cuda.is_available() or args.tiny:
        cases['profile'] = {'qlora_nb': lambda r: profile_case(model_path, max_len, work, **profile_window)}
    if torch.cuda.is_available():
        cases['t4 mode'] = {d: (lambda d: dtype_case(d, model_path, max_len, max_examples, work)) for d in ('bfloat16', 'float16')}
        # TRL's QLoRA cast of the adapters to bf16, the product's default before `lora.adapter_dtype`
        cases['t4 mode']['bfloat16 bf16 adapters'] = lambda r: dtype_case('bfloat16', model_path, max_len, max_examples,
                                                                            work, adapters='bfloat16')
        for v in args.profile_variant:
            vname, overrides = v.split('=', 1)
            cases[f'profile {vname}'] = {'qlora_nb': lambda r, o=tuple(overrides.split(',')):
                                         profile_case(model_path, max_len, work, extra=o)}
        cases['profile 8b'] = {f'qlora_nb dropout {d}': (lambda r, d=d: profile_synthetic(shape, seq8, work, tok, device, d))
                              for d in (0.05, 0.0)}
        cases[f'profile {named} real lengths'] = {'qlora_nb': lambda r: profile_real(shape, tok, data, device, max_len, work)}
        for v in args.profile_8b_variant:
            vname, overrides = v.split('=', 1)
            cases[f'profile 8b {vname}'] = {'qlora_nb dropout 0.05': lambda r, o=tuple(overrides.split(',')):
                                            profile_synthetic(shape, seq8, work, tok, device, 0.05, extra=o)}
    for name, recipes in cases.items():
        if args.only and not any(w in name for w in args.only): continue
        if any(w in name for w in args.skip): continue
        results.setdefault(name, {})
        for recipe, run in recipes.items():
            if recipe in results[name] or (args.recipes and recipe not in args.recipes): continue
            results[name][recipe] = run(recipe)
            print(name, recipe, json.dumps(results[name][recipe])[:400], flush=True)
            out = save()
    out = save()
    print(json.dumps(out['summary'], indent=2)); print(f'wrote {dest}')
    return out


if __name__ == '__main__':
    main()
