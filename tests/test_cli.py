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
