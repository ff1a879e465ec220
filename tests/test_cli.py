"""The installed `qlora_nb` command, driven as a user would from a shell."""
import subprocess, yaml


def qlora_nb(*args):
    return subprocess.run(['qlora_nb', *args], capture_output=True, text=True)


def test_help_lists_subcommands():
    r = qlora_nb('--help')
    assert r.returncode == 0
    for cmd in ('run', 'config', 'prepare-model'): assert cmd in r.stdout


def test_config_typo_is_a_clear_error():
    r = qlora_nb('config', '--set', 'lora.rank=8')
    assert r.returncode == 2
    assert "unknown key 'lora.rank' (did you mean 'lora.r'?)" in r.stderr
    assert 'Traceback' not in r.stderr


def test_config_preset_and_override(tmp_path):
    r = qlora_nb('config', '--preset', 'stage1', '--set', 'train.learning_rate=5e-5')
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert cfg['data']['max_samples'] == 5 and cfg['train']['learning_rate'] == 5e-5


def test_bad_config_file_names_file_and_line(tmp_path):
    f = tmp_path/'run.json'
    f.write_text('{\n  "lora": {"r": 16,}\n}\n')
    r = qlora_nb('config', '--config', str(f))
    assert r.returncode == 2 and f'{f}, line 2: not valid JSON' in r.stderr


def test_prepare_model_prints_the_default_folder():
    r = qlora_nb('prepare-model')
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith('SmolLM2-135M-Instruct')


def test_chat_driven_through_stdin(tmp_path):
    "The chat answers, shows and changes settings, and quits, all from standard input."
    script = 'What is the capital of France?\nsettings max_new_tokens=8 temperature=0.5\nsettings temprature=1\nquit\nnever read\n'
    r = subprocess.run(['qlora_nb', 'chat', '--gen', 'max_new_tokens=24'], input=script, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'assistant: ' in r.stdout and 'Paris' in r.stdout
    assert 'max_new_tokens=8' in r.stdout and 'temperature=0.5' in r.stdout
    assert "unknown generation setting 'temprature'" in r.stdout


def test_generate_file(tmp_path):
    (tmp_path/'p.json').write_text('["What is the capital of France?"]')
    r = subprocess.run(['qlora_nb', 'generate', '--input', str(tmp_path/'p.json'), '--output', str(tmp_path/'o.json'),
                        '--gen', 'max_new_tokens=16'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = yaml.safe_load((tmp_path/'o.json').read_text())
    assert 'Paris' in out['results'][0]['output']


def test_humaneval_command_writes_results(tmp_path):
    from qlora_nb.weights import tiny_model_dir
    r = subprocess.run(['qlora_nb', 'humaneval', '--model', str(tiny_model_dir()), '--fold', '0', '--max-new-tokens', '4',
                        '--output-dir', str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    import json
    res = json.loads((tmp_path/'humaneval'/'results.json').read_text())
    assert res['n_problems'] == 82 and res['spec']['fold'] == 0 and res['pass@1'] == 0.0
    assert len((tmp_path/'humaneval'/'samples.jsonl').read_text().splitlines()) == 82


def test_package_verify_and_report_of_a_tiny_run(tmp_path):
    from test_train_cli import tiny_args
    r = qlora_nb('train', *tiny_args(tmp_path, 'tiny', steps=2))
    assert r.returncode == 0, r.stderr[-2000:]
    run = tmp_path/'tiny'
    r = qlora_nb('package', str(run), '--merged', '--version', '1.2.3')
    assert r.returncode == 0, r.stderr[-2000:]
    archive = run/'package'/'tiny-1.2.3.tar.gz'
    assert archive.exists()
    r = qlora_nb('package', 'verify', str(archive))
    assert r.returncode == 0, r.stderr[-2000:]
    import json
    rep = json.loads(r.stdout)
    assert rep['files_checked'] > 5 and rep['adapter'].startswith('loaded PeftModel') and 'merged' in rep
    r = qlora_nb('report', str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run/'report'/'report.html').read_text().count('data:image/png;base64,') == 1  # training curves


SUBCOMMANDS = ('run', 'train', 'config', 'generate', 'chat', 'humaneval', 'package', 'report', 'prepare-model', 'upload')


def test_help_imports_no_torch():
    "`--help` of the command and of every subcommand answers without importing torch (what made it take ~8 s)."
    import sys
    probe = ("import sys\nfrom qlora_nb.cli import main\nfor argv in [['--help']] + [[c, '--help'] for c in {cmds!r}]:\n"
             "    try: main(argv)\n    except SystemExit as e: assert e.code == 0, argv\n"
             "print('LOADED', [m for m in ('torch', 'bitsandbytes', 'transformers', 'datasets', 'peft') if m in sys.modules])")
    r = subprocess.run([sys.executable, '-c', probe.format(cmds=SUBCOMMANDS)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[-1] == 'LOADED []'
    assert 'prepare-model' in r.stdout and '--preset-gen' in r.stdout  # the helps were printed


def test_data_file_not_utf8_names_file_and_line(tmp_path):
    from test_train_cli import tiny_args
    bad = tmp_path/'latin1.jsonl'
    bad.write_bytes('{"instruction": "a", "response": "b"}\n{"instruction": "caf\u00e9", "response": "b"}\n'.encode('latin-1'))
    r = qlora_nb('train', *tiny_args(tmp_path, 'latin1', steps=1), '--set', f'data.source={bad}')
    assert r.returncode == 2, r.stderr[-2000:]
    assert f'{bad}, line 2: not UTF-8 text (byte 0xe9 at column 21)' in r.stderr
    assert 'Traceback' not in r.stderr and 'UnicodeDecodeError' not in r.stderr
    # train imported bitsandbytes, whose hint about a Hub kernel it cannot fetch offline is dropped (see 00_core)
    assert 'gemm_4bit_forward' not in r.stderr, r.stderr


def test_package_gguf_of_a_tiny_run(tmp_path):
    "package --gguf: merged, converted by llama.cpp's converter, an Ollama Modelfile, checked in llama.cpp."
    import json
    from test_train_cli import tiny_args
    r = qlora_nb('train', *tiny_args(tmp_path, 'tiny', steps=2))
    assert r.returncode == 0, r.stderr[-2000:]
    run = tmp_path/'tiny'
    r = qlora_nb('package', str(run), '--gguf')
    assert r.returncode == 0, r.stderr[-3000:]
    out = run/'package'/'gguf-f16'
    assert sorted(p.name for p in out.iterdir()) == ['Modelfile', 'gguf_check.json', 'tiny-f16.gguf']
    check = json.loads((out/'gguf_check.json').read_text())
    assert check['all_identical'] and check['tokenizer_identical'] and check['type'] == 'f16'
    modelfile = (out/'Modelfile').read_text()
    assert modelfile.startswith('FROM ./tiny-f16.gguf\nTEMPLATE """') and 'PARAMETER stop' in modelfile
    assert 'checked in llama.cpp: 3/3 greedy replies identical' in r.stdout
