"""CUDA graphs in training (`train.cuda_graphs`, 04_training) on a real GPU: the same losses and adapters as the plain
step, every shape captured once, evaluation run as before, the decoder given back at the end; accumulated steps and
DDP (two processes sharing the one GPU over gloo) with the gradients of the plain step. Skipped without CUDA (CI has
none); 04's CPU cells test the switching with a stand-in for the capture."""
import json, math, os, socket, subprocess, sys, tempfile
from dataclasses import replace
from pathlib import Path

import pytest, torch
from transformers import TrainerCallback

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA graphs need a CUDA GPU')


class FirstStepGrads(TrainerCallback):
    "The adapters' gradients of the first optimizer step, as the optimizer gets them (accumulated, averaged over ranks)."
    grads = None
    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if self.grads is None:
            self.grads = {n: p.grad.detach().float().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}


def rel_diff(a:dict, b:dict) -> float:
    "How far gradients `a` are from `b`, relative to `b`'s size, over all tensors together."
    assert a.keys() == b.keys() and a
    return (sum((a[n] - b[n]).pow(2).sum() for n in a) / sum(b[n].pow(2).sum() for n in b)).sqrt().item()


def tiny_run(graphs, dropout=0.0, steps=6, dtype='bfloat16', **train):
    from qlora_nb.core import DataSettings, LoraSettings, ModelSettings, OutputSettings, QuantSettings, RunConfig, TrainSettings
    from qlora_nb.data import prepare_data
    from qlora_nb.model import load_model
    from qlora_nb.train import add_run_lora, build_trainer
    from qlora_nb.weights import tiny_model_dir
    settings = dict(max_steps=steps, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-3,
                    logging_steps=1, eval_steps=3, save_steps=3, cuda_graphs=graphs, compile=False, liger=False) | train
    cfg = RunConfig(model=ModelSettings(name=str(tiny_model_dir())), quant=QuantSettings(compute_dtype=dtype),
                    lora=LoraSettings(lora_dropout=dropout), data=DataSettings(max_seq_length=512),
                    train=TrainSettings(**settings),
                    output=OutputSettings(output_dir=tempfile.mkdtemp(), run_name='graphs', report_to=[]))
    torch.manual_seed(0)
    model, tok = load_model(cfg.model, cfg.quant)
    data = prepare_data(cfg, tok)
    first = FirstStepGrads()
    trainer = build_trainer(cfg, data, add_run_lora(cfg, model), tok, callbacks=[first], live=False)
    decoder = trainer.model.get_base_model().base_model
    trainer.train()
    trainer.first_step_grads = first.grads
    losses = [h['loss'] for h in trainer.state.log_history if 'loss' in h]
    evals = [h['eval_loss'] for h in trainer.state.log_history if 'eval_loss' in h]
    adapters = {n: p.detach().float().cpu() for n, p in trainer.model.named_parameters() if 'lora_' in n}
    return trainer, decoder, losses, evals, adapters


def test_graphs_train_what_the_plain_step_trains():
    _, _, plain_losses, plain_evals, plain_w = tiny_run(False)
    tr, decoder, losses, evals, w = tiny_run(True)
    g = tr.graphed
    assert g is not None and g.captures >= 2 and g.replays == len(losses) == 6  # every training pass replayed
    assert g.eager_calls > 0 and len(evals) == 2  # evaluation ran the decoder itself
    assert 'forward' not in vars(decoder)  # given back at the end of training
    # the graphed run pads batches to multiples of 128: other matmul shapes, the same math within bf16 rounding
    for a, b in zip(losses, plain_losses): assert abs(a - b) <= 2e-2 * abs(b), (losses, plain_losses)
    for a, b in zip(evals, plain_evals): assert abs(a - b) <= 2e-2 * abs(b), (evals, plain_evals)
    for n in w: assert torch.allclose(w[n], plain_w[n], atol=5e-3, rtol=5e-2), n


def test_graphs_in_t4_mode():
    "float16 with its gradient scaler (a Colab T4's case): the scaler's checks run outside the graphs"
    _, _, plain_losses, _, _ = tiny_run(False, dtype='float16')
    tr, _, losses, _, _ = tiny_run(True, dtype='float16')
    assert tr.args.fp16 and tr.graphed.replays == 6 and all(math.isfinite(l) for l in losses)
    for a, b in zip(losses, plain_losses): assert abs(a - b) <= 2e-2 * abs(b), (losses, plain_losses)


def test_graphs_by_default_where_they_pay():
    tr, _, _, _, _ = tiny_run('auto', steps=40)
    assert tr.graphed is not None and tr.graphed.replays == 40


def test_graphs_with_dropout_draw_new_masks_each_replay():
    tr, _, losses, _, _ = tiny_run(True, dropout=0.3, steps=4)
    assert all(math.isfinite(l) for l in losses) and tr.graphed.replays == 4
    # the same batch twice, replayed: different dropout masks give different losses
    model = tr.model; model.train()
    from qlora_nb.train import GraphedDecoder
    g = GraphedDecoder(model.get_base_model().base_model)
    batch = next(iter(tr.get_train_dataloader()))
    batch = {k: v.cuda() for k, v in batch.items()}
    with torch.autocast('cuda', dtype=torch.bfloat16):
        a, b = (model(**batch).loss.item() for _ in range(2))
    g.remove()
    assert g.replays == 2 and g.captures == 1 and a != b


def test_graphs_refused_when_compiled():
    from qlora_nb.core import RunConfig, TrainSettings
    from qlora_nb.train import use_cuda_graphs
    cfg = RunConfig(train=TrainSettings(cuda_graphs=True, gradient_accumulation_steps=1))
    with pytest.raises(ValueError, match='train.cuda_graphs=true: the layers are compiled'):
        use_cuda_graphs(cfg, compiled=True)


def test_graphs_accumulate_what_the_plain_step_accumulates():
    "Two micro-batches a step, each replayed: the step's gradient is their sum, as in the plain step"
    acc = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, fold_accumulation=False)
    plain, _, plain_losses, _, _ = tiny_run(False, **acc)
    tr, _, losses, _, _ = tiny_run(True, **acc)
    assert tr.args.gradient_accumulation_steps == 2 and tr.graphed.replays == 12 and tr.graphed.hooks == []
    assert rel_diff(tr.first_step_grads, plain.first_step_grads) < 0.05
    for a, b in zip(losses, plain_losses): assert abs(a - b) <= 2e-2 * abs(b), (losses, plain_losses)
    # the check can fail: without the hooks the first micro-batch's gradient is lost and the second's counted twice
    from unittest.mock import patch
    with patch('qlora_nb.train.grads_of_their_own', lambda params: []):
        broken, _, _, _, _ = tiny_run(True, steps=1, **acc)
    assert rel_diff(broken.first_step_grads, plain.first_step_grads) > 0.2


RANK = """
import json, os, sys, torch, torch.distributed as dist
sys.path.insert(0, os.environ['TESTS'])
dist.init_process_group('gloo')  # accelerate joins this group; NCCL refuses two ranks on one GPU
from test_cuda_graphs import tiny_run
graphs = os.environ['GRAPHS'] == '1'
tr, _, losses, _, _ = tiny_run(graphs, **json.loads(os.environ['SETTINGS']))
out = {'losses': losses, 'accumulation': tr.args.gradient_accumulation_steps, 'wrapped': type(tr.model_wrapped).__name__,
       'replays': tr.graphed.replays if tr.graphed else 0}
if dist.get_rank() == 0: torch.save(tr.first_step_grads, os.environ['OUT'] + '.grads')
json.dump(out, open(f"{os.environ['OUT']}.{dist.get_rank()}.json", 'w'))
"""


# 8 examples a step: per device 2 x accumulation 4 in one process, 2 x 2 in each of two (not folded into one pass)
DDP_SETTINGS = dict(per_device_train_batch_size=2, gradient_accumulation_steps=4, fold_accumulation=False, save_steps=99)


def ddp_on_one_gpu(graphs, out):
    "A two-process DDP run of `tiny_run` (per device 2 x accumulation 2 each), both processes on GPU 0, over gloo."
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    env = lambda r: {**os.environ, 'RANK': str(r), 'LOCAL_RANK': '0', 'WORLD_SIZE': '2', 'LOCAL_WORLD_SIZE': '2',
                     'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port), 'TESTS': str(Path(__file__).parent),
                     'GRAPHS': '1' if graphs else '0', 'OUT': str(out),
                     'SETTINGS': json.dumps(DDP_SETTINGS)}
    procs = [subprocess.Popen([sys.executable, '-c', RANK], env=env(r), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), '\n'.join(l[-4000:] for l in logs)
    return [json.loads(Path(f'{out}.{r}.json').read_text()) for r in (0, 1)], torch.load(f'{out}.grads')


def test_graphs_under_ddp(tmp_path):
    "DDP averages the replayed passes' gradients from its hooks, outside the graphs: the one-process step's gradients"
    from qlora_nb.weights import tiny_model_dir
    tiny_model_dir()  # built once, before two processes want it
    one, _, one_losses, _, _ = tiny_run(False, **DDP_SETTINGS)
    ranks, grads = ddp_on_one_gpu(True, tmp_path/'graphed')
    assert [r['wrapped'] for r in ranks] == ['DistributedDataParallel'] * 2
    assert [r['accumulation'] for r in ranks] == [2, 2] and all(r['replays'] == 12 for r in ranks)
    assert rel_diff(grads, one.first_step_grads) < 0.05
    for a, b in zip(ranks[0]['losses'], one_losses): assert abs(a - b) <= 2e-2 * abs(b), (ranks[0]['losses'], one_losses)
