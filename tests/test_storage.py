"""Cloud storage against a real S3 server on 127.0.0.1 (moto's server mode, with credential checks on): a run reads
its data from S3 and uploads its adapter and package there; wrong credentials give a clear error and leave the run
intact; an interrupted upload resumes and sends only what is missing."""
import hashlib, json, os, subprocess
from pathlib import Path

import boto3, pytest
from qlora_nb.storage import MANIFEST, StorageError, local_s3, upload_run
from test_train_cli import tiny_args

BUCKET = 'qlora-nb'
ROWS = [{'instruction': f'What is {i} plus {i}?', 'context': '', 'response': f'{2*i}.'} for i in range(20)]


@pytest.fixture(scope='module')
def s3():
    with local_s3(BUCKET) as server: yield server


def aws_env(s3, secret=None):
    "The standard AWS variables, as a user sets them; no AWS config file is read."
    return dict(AWS_ENDPOINT_URL_S3=s3['endpoint'], AWS_ACCESS_KEY_ID=s3['key'], AWS_DEFAULT_REGION='us-east-1',
                AWS_SECRET_ACCESS_KEY=secret or s3['secret'], AWS_CONFIG_FILE='/nonexistent',
                AWS_SHARED_CREDENTIALS_FILE='/nonexistent')


def client(s3):
    return boto3.client('s3', endpoint_url=s3['endpoint'], region_name='us-east-1',
                        aws_access_key_id=s3['key'], aws_secret_access_key=s3['secret'])


def qlora_nb(env, *args):
    return subprocess.run(['qlora_nb', *args], capture_output=True, text=True, env=os.environ | env)


def digests(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def cloud_run(s3, tmp_path_factory):
    "A tiny training run whose data comes from S3 and whose adapter goes there."
    out = tmp_path_factory.mktemp('runs')
    client(s3).put_object(Bucket=BUCKET, Key='data/train.jsonl', Body='\n'.join(json.dumps(r) for r in ROWS).encode())
    r = qlora_nb(aws_env(s3), 'train', *tiny_args(out, 'cloud', steps=2), '--set', f'data.source=s3://{BUCKET}/data/train.jsonl',
                 '--set', f'output.upload_to=s3://{BUCKET}/runs')
    return out/'cloud', r


def test_run_reads_data_from_s3_and_uploads_its_adapter(s3, cloud_run):
    run, r = cloud_run
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'uploaded: s3://{BUCKET}/runs/cloud' in r.stdout
    local = {f'final_adapter/{k}': v for k, v in digests(run/'final_adapter').items()}
    assert 'final_adapter/adapter_model.safetensors' in local
    c = client(s3)
    remote = {k: hashlib.sha256(c.get_object(Bucket=BUCKET, Key=f'runs/cloud/{k}')['Body'].read()).hexdigest() for k in local}
    assert remote == local
    assert json.loads(c.get_object(Bucket=BUCKET, Key=f'runs/cloud/{MANIFEST}')['Body'].read()) == local
    # the credentials are nowhere in the run's files or its output
    for p in run.rglob('*'):
        if p.is_file(): assert s3['secret'].encode() not in p.read_bytes(), p
    assert s3['secret'] not in r.stdout + r.stderr


def test_wrong_credentials_clear_error_and_run_intact(s3, cloud_run, tmp_path):
    run, _ = cloud_run
    before = digests(run)
    r = qlora_nb(aws_env(s3, secret='not-the-secret'), 'upload', str(run), '--to', f's3://{BUCKET}/elsewhere')
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert 'access denied; check the credentials in the environment' in r.stderr
    assert f'The run in {run} is intact' in r.stderr and 'not-the-secret' not in r.stderr
    assert digests(run) == before
    r = qlora_nb(aws_env(s3, secret='not-the-secret'), 'train', *tiny_args(tmp_path, 'denied', steps=1),
                 '--set', f'data.source=s3://{BUCKET}/data/train.jsonl')
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert f'qlora_nb train: error: s3://{BUCKET}/data/train.jsonl: access denied' in r.stderr


def test_interrupted_upload_resumes(s3, cloud_run, monkeypatch):
    "The connection drops during the second file; the next call skips what arrived and sends the rest."
    import s3fs
    run, _ = cloud_run
    for k, v in aws_env(s3).items(): monkeypatch.setenv(k, v)
    put, sent = s3fs.S3FileSystem._put_file, []
    async def dropping(self, lpath, rpath, *a, **kw):
        sent.append(rpath)
        if len(sent) == 2: raise ConnectionResetError('connection reset by peer')
        return await put(self, lpath, rpath, *a, **kw)
    monkeypatch.setattr(s3fs.S3FileSystem, '_put_file', dropping)
    with pytest.raises(StorageError, match='ConnectionResetError'): upload_run(run, f's3://{BUCKET}/resumed')
    c = client(s3)
    manifest = json.loads(c.get_object(Bucket=BUCKET, Key=f'resumed/cloud/{MANIFEST}')['Body'].read())
    assert len(manifest) == 1  # only the first file counts as sent
    monkeypatch.setattr(s3fs.S3FileSystem, '_put_file', put)
    res = upload_run(run, f's3://{BUCKET}/resumed')
    files = {f'final_adapter/{k}': v for k, v in digests(run/'final_adapter').items()}
    assert res['skipped'] == list(manifest) and sorted(res['uploaded'] + res['skipped']) == sorted(files)
    remote = {k: hashlib.sha256(c.get_object(Bucket=BUCKET, Key=f'resumed/cloud/{k}')['Body'].read()).hexdigest() for k in files}
    assert remote == files
