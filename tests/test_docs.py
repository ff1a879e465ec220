"""The docs: nbdev's processing step runs on every notebook (as `nbdev_proc_nbs` does before Quarto), and the offline
site builds and passes a real headless-Chromium check (every page loads, every image decodes, no local link is broken)."""
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_nbdev_proc_nbs_processes_every_notebook(tmp_path, monkeypatch):
    "nbdev_proc_nbs minus its first step (installing Quarto, impossible offline): refresh the config, build the index, process."
    import nbdev.quarto as q
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(q, '_ensure_quarto', lambda: None)
    shutil.rmtree(ROOT/'_proc', ignore_errors=True)
    q._pre_docs(n_workers=0)
    done = {p.name for p in (ROOT/'_proc').glob('*.ipynb')}
    assert done >= {p.name for p in (ROOT/'nbs').glob('*.ipynb')}, done


def test_offline_site_in_headless_chromium(tmp_path):
    from qlora_nb.docs import build_site, check_site, site_pages
    from qlora_nb.report import chromium
    site = build_site(tmp_path/'site')
    assert len(list(site.glob('*.html'))) == len(site_pages())
    if not chromium(): pytest.skip('no Chromium installed (Debian: apt install chromium); the site was built but not opened')
    report = check_site(site, tmp_path/'shots')
    assert sum(r['images'] for r in report.values()) >= 5  # the committed plots of the chapters
    assert len(list((tmp_path/'shots').glob('*.png'))) == len(report)
