"""Prose that states what `QUICK` (the main job's short configuration) trains states what it sets."""
import json, re
from pathlib import Path

from qlora_nb.core import load_config
from qlora_nb.train import QUICK

ROOT = Path(__file__).resolve().parents[1]
NUMBERS = {'one': 1, 'two': 2, 'three': 3, 'four': 4, 'five': 5}


def test_quick_epochs_in_prose():
    epochs = load_config(overrides=QUICK).train.num_train_epochs
    said = []
    for nb in sorted((ROOT/'nbs').glob('*.ipynb')):
        for cell in json.loads(nb.read_text())['cells']:
            text = ''.join(cell['source'])
            if cell['cell_type'] != 'markdown' or '`QUICK`' not in text: continue
            said += [(nb.name, m[0], NUMBERS.get(m[1], m[1])) for m in re.finditer(r'\b(\d+|[a-z]+) epochs?\b', text)]
    assert said, 'no prose says how many epochs QUICK trains'
    assert [s for s in said if str(s[2]) != str(int(epochs))] == [], f'QUICK sets {epochs} epochs'
