"""A probe, not the product: `bench.py`'s cases with the product's compiled decoder layers captured as CUDA graphs.

It changes nothing in the training step. `TORCHINDUCTOR_CUDAGRAPHS=1` (set by the caller) makes Inductor replay each
compiled layer as a CUDA graph (what `torch.compile(mode='reduce-overhead')` does); `PAD_MULTIPLE=N` pads every batch
to a multiple of N tokens (TRL's `pad_to_multiple_of`), so real lengths make fewer shapes to capture; `MARK_STEP=1`
tells the graph trees where each optimizer step begins; `FUNC_RNG=1` lets the partitioner recompute dropout;
`RECOMPUTE_ALL=1` checkpoints with a selective-checkpointing policy that recomputes every operation.
The rest of the command line is `bench.py`'s, or, after `cli`, `qlora_nb`'s (`cli train --set ...`). Results: `benchmarks/results/h200-2026-11-23-cudagraphs-probe.json`."""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qlora_nb.train as T

pad = int(os.environ.get('PAD_MULTIPLE', '0'))
if pad:
    _sft = T.sft_config
    T.sft_config = lambda cfg, compiled=False, **kw: _sft(cfg, compiled, **{'pad_to_multiple_of': pad, **kw})
if os.environ.get('MARK_STEP'):
    import torch
    from transformers import TrainerCallback
    class MarkStep(TrainerCallback):
        def on_step_begin(self, *a, **k): torch.compiler.cudagraph_mark_step_begin()
    _build = T.build_trainer
    def build_trainer(*a, **k):
        trainer = _build(*a, **k); trainer.add_callback(MarkStep()); return trainer
    T.build_trainer = build_trainer
if os.environ.get('FUNC_RNG'):
    import torch._functorch.config as functorch_config
    functorch_config.functionalize_rng_ops = True
if os.environ.get('RECOMPUTE_ALL'):  # the product's policy (`build_trainer` uses it on compiled layers), on every run
    import functools
    import qlora_nb.lora as L
    from torch.utils.checkpoint import create_selective_checkpoint_contexts
    _enable = L.enable_checkpointing
    policy = functools.partial(create_selective_checkpoint_contexts, T.recompute_everything)
    L.enable_checkpointing = lambda model: _enable(model, context_fn=policy)

import bench
if __name__ == '__main__':
    if sys.argv[1:2] == ['cli']:
        from qlora_nb.cli import main
        sys.exit(main(sys.argv[2:]))
    bench.main(sys.argv[1:])
