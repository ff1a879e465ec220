"""CUDA graphs in training (`train.cuda_graphs`, 04_training) on a real GPU: the same losses and adapters as the plain
step, every shape captured once, evaluation run as before, the decoder given back at the end. Skipped without CUDA
(CI has none); 04's CPU cells test the switching with a stand-in for the capture."""
import math, tempfile
from dataclasses import replace

import pytest, torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA graphs need a CUDA GPU')


def tiny_run(graphs, dropout=0.0, steps=6, dtype='bfloat16', **train):
    from qlora_nb.core import DataSettings, LoraSettings, ModelSettings, OutputSettings, QuantSettings, RunConfig, TrainSettings
    from qlora_nb.data import prepare_data
    from qlora_nb.model import load_model
    from qlora_nb.train import add_run_lora, build_trainer
    from qlora_nb.weights import tiny_model_dir
    cfg = RunConfig(model=ModelSettings(name=str(tiny_model_dir())), quant=QuantSettings(compute_dtype=dtype),
                    lora=LoraSettings(lora_dropout=dropout), data=DataSettings(max_seq_length=512),
                    train=TrainSettings(max_steps=steps, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                                        learning_rate=1e-3, logging_steps=1, eval_steps=3, save_steps=3,
                                        cuda_graphs=graphs, compile=False, liger=False, **train),
                    output=OutputSettings(output_dir=tempfile.mkdtemp(), run_name='graphs', report_to=[]))
    torch.manual_seed(0)
    model, tok = load_model(cfg.model, cfg.quant)
    data = prepare_data(cfg, tok)
    trainer = build_trainer(cfg, data, add_run_lora(cfg, model), tok, live=False)
    decoder = trainer.model.get_base_model().base_model
    trainer.train()
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
