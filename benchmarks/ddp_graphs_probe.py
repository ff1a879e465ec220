#!/usr/bin/env python
"""When can the product's CUDA graphs (`GraphedDecoder`, 04_training) be captured under DDP? One process on one GPU,
the tiny model with adapters, wrapped in torch's DDP (world size 1, so nothing else differs), two or three plain
forward-backward steps of one batch; the decoder in strict mode, so a failed capture raises.

    python benchmarks/ddp_graphs_probe.py nccl plain-graphs ddp-then-capture ...   # one variant per process is safest

Each variant prints `name OK [losses] captures replays` or `name FAIL error`. Variants:
plain-graphs (no DDP), ddp-then-capture (captured inside DDP's forward), ddp-nobcast-then-capture (the same with
broadcast_buffers=False), capture-then-ddp (captured before DDP wraps), ddp-nosync-capture (inside no_sync),
ddp-built-capture-direct (DDP built, captured by calling the decoder outside DDP's forward),
ddp-eager-step-then-capture-direct (one eager DDP step first), accumulators-on-side-stream (the gradient-storing
nodes made on a side stream first, then DDP, captured inside its forward; at `5130c15`, which made the
results file, the same three lines written out here), ddp-built-on-side-stream (DDP built on a
side stream), product (what build_trainer does under DDP: `GraphedDecoder(..., distributed=True)` before DDP wraps).
"""
import os, sys, traceback, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='29555', RANK='0', WORLD_SIZE='1', LOCAL_RANK='0')
backend = sys.argv[1]
dist.init_process_group(backend)
from qlora_nb.core import ModelSettings, QuantSettings, LoraSettings, RunConfig, TrainSettings
from qlora_nb.model import load_model
from qlora_nb.train import add_run_lora, GraphedDecoder, grad_accumulators_off_the_default_stream
from qlora_nb.weights import tiny_model_dir
cfg = RunConfig(model=ModelSettings(name=str(tiny_model_dir())), quant=QuantSettings(compute_dtype='bfloat16'),
                lora=LoraSettings(lora_dropout=0.0), train=TrainSettings(liger=False, compile=False))
def fresh():
    torch.manual_seed(0)
    m = add_run_lora(cfg, load_model(cfg.model, cfg.quant)[0]); m.train()
    return m
ids = torch.randint(0, 1000, (2, 128), device='cuda')
batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
def step(model):
    with torch.autocast('cuda', dtype=torch.bfloat16): loss = model(**batch).loss
    loss.backward(); return loss.item()
for variant in sys.argv[2:]:
    try:
        m = fresh(); dec = m.get_base_model().model
        if variant == 'plain-graphs':
            g = GraphedDecoder(dec, strict=True); r = [step(m), step(m)]
        elif variant == 'ddp-then-capture':
            g = GraphedDecoder(dec, strict=True); d = DDP(m, device_ids=[0]); r = [step(d), step(d)]
        elif variant == 'ddp-nobcast-then-capture':
            g = GraphedDecoder(dec, strict=True); d = DDP(m, device_ids=[0], broadcast_buffers=False); r = [step(d), step(d)]
        elif variant == 'capture-then-ddp':
            g = GraphedDecoder(dec, strict=True); step(m); m.zero_grad(); d = DDP(m, device_ids=[0]); r = [step(d), step(d)]
        elif variant == 'ddp-nosync-capture':
            g = GraphedDecoder(dec, strict=True); d = DDP(m, device_ids=[0])
            with d.no_sync(): r = [step(d)]
            r.append(step(d))
        elif variant == 'ddp-built-capture-direct':
            g = GraphedDecoder(dec, strict=True); d = DDP(m, device_ids=[0])
            with torch.autocast('cuda', dtype=torch.bfloat16): dec(input_ids=ids, attention_mask=batch['attention_mask'])
            r = [step(d), step(d)]
        elif variant == 'ddp-eager-step-then-capture-direct':
            d = DDP(m, device_ids=[0]); r = [step(d)]; m.zero_grad()
            g = GraphedDecoder(dec, strict=True)
            with torch.autocast('cuda', dtype=torch.bfloat16): dec(input_ids=ids, attention_mask=batch['attention_mask'])
            r += [step(d), step(d)]
        elif variant == 'accumulators-on-side-stream':
            keep = grad_accumulators_off_the_default_stream([q for q in m.parameters() if q.requires_grad])
            g = GraphedDecoder(dec, strict=True); d = DDP(m, device_ids=[0]); r = [step(d), step(d), step(d)]
        elif variant == 'product':
            g = GraphedDecoder(dec, strict=True, distributed=True); d = DDP(m, device_ids=[0]); r = [step(d), step(d), step(d)]
        elif variant == 'ddp-built-on-side-stream':
            side = torch.cuda.Stream()
            with torch.cuda.stream(side): d = DDP(m, device_ids=[0])
            torch.cuda.current_stream().wait_stream(side)
            g = GraphedDecoder(dec, strict=True); r = [step(d), step(d), step(d)]
        print(variant, 'OK', r, g.captures, g.replays, flush=True)
    except Exception as e:
        print(variant, 'FAIL', repr(e)[:300], flush=True)
        traceback.print_exc(limit=-6)
        torch.cuda.synchronize()
