#!/usr/bin/env bash
# How issue #17's speed files are made on one lent GPU machine (see ../shared/GPU.md of the project's workspace), one
# call of the `device` tool per line, each under 10 minutes, all within one lease (the machine keeps /tmp between
# calls; $OUT is fresh in each). Carried: .whl/ (the wheels the machine lacks), .whlu/ (Unsloth's, installed apart
# because it pins older trl and datasets; with transformers 5.17, its pin), .tfw/ (the transformers that `pip install`
# gives users, 5.23 on 2026-11-24, ahead of the machine's 5.17 for the product alone), the default model's GGUF in
# parts (.m1, .m2: one call carries 64 MiB), and
# .commit (`git rev-parse HEAD > .commit` here: the copy there has no git history).
#   bash benchmarks/speed_session.sh setup     # carry .whl, then .whlu, then .tfw (fastcore among .whl's wheels)
#   bash benchmarks/speed_session.sh part      # carry .m1, then again with .m2
#   bash benchmarks/speed_session.sh waits [--arms ...]  # host_waits.py: what each wait for the GPU costs the default job
#   bash benchmarks/speed_session.sh bench 2048x1          # bench.py, the 8B shape at 2048 x 1 (Unsloth beside)
#   bash benchmarks/speed_session.sh bench real            # real lengths, the default model's epoch
#   bash benchmarks/speed_session.sh bench "t4 mode" profile   # the T4 mode and the profiles
#   bash benchmarks/speed_session.sh long     # the default model for 300 steps, CUDA graphs (auto) against compiled
#   bash benchmarks/speed_session.sh auto 600 [NAME KEY=VALUE...]  # the default job for 600 steps as `auto` chooses,
#                                             # or with these settings (its summary and history)
#   bash benchmarks/speed_session.sh shapes [1b 3b 7b 8b]  # shapes at 2048 x 1: auto, graphs, plain, compiled
#                                             # (SHAPES_FILE=name: another file, for a repeat)
#   bash benchmarks/speed_session.sh host     # host_profile.py: cProfile of the default job's step (where the host's time goes)
# Each bench call adds its cases to /tmp/bench.json (bench.py keeps the cases a file has) and copies it to $OUT.
set -uo pipefail
# Unsloth's process puts /tmp/site_u first (bench.py), so its transformers pin wins there and nowhere else
export QLORA_NB_COMMIT=$(cat .commit 2>/dev/null) PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site_tf:/tmp/site:$PWD
export QLORA_NB_GGUF=/tmp/model/SmolLM2-135M-Instruct.Q4_1.gguf QLORA_NB_CACHE=/tmp/qcache HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 UNSLOTH_DISABLE_STATISTICS=1
mkdir -p /tmp/model
[ "$1" = setup ] || [ "$1" = part ] || [ -f "$QLORA_NB_GGUF" ] || cat /tmp/model/part.* > "$QLORA_NB_GGUF"
case "$1" in
  setup) # .whl and .whlu together pass the 64 MiB a call carries: one call each, installing what it carried
         [ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
         [ -d .whlu ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_u .whlu/*.whl
         [ -d .tfw ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_tf .tfw/*.whl
         python3 -c 'import transformers; print("transformers", transformers.__version__)'
         nvidia-smi --query-gpu=name,memory.total --format=csv ;;
  part)  cp .m*/part.* /tmp/model/; ls -la /tmp/model ;;
  waits) shift; timeout -s INT 570 python3 benchmarks/host_waits.py --out "$OUT/host-waits.json" "$@" ;;
  bench) shift
         timeout -s INT 570 python3 benchmarks/bench.py --unsloth-site /tmp/site_u --work /tmp/bench_work \
           --out /tmp/bench.json --only "$@"
         cp /tmp/bench.json "$OUT/" ;;
  host)  shift
         timeout -s INT 570 python3 benchmarks/host_profile.py --out "$OUT/host-profile.json" "$@" 2>&1 | grep -iv warn | tail -60 ;;
  shapes) shift; for sh in ${@:-1b 3b 8b}; do
           timeout -s INT 240 python3 benchmarks/bench.py --shape $sh --work /tmp/bench_work --out /tmp/${SHAPES_FILE:-shapes}.json \
             --only 2048x1 --skip dropout --recipes qlora_nb --steps 12 --set train.logging_steps=10 \
             --variant graphs=train.cuda_graphs=true --variant plain=train.compile=false,train.cuda_graphs=false \
             --variant compiled=train.compile=true \
             | grep -v '^ '
         done
         cp /tmp/${SHAPES_FILE:-shapes}.json "$OUT/" ;;
  auto)  name=${3:-auto}-$2; s="--set output.output_dir=/tmp/auto --set output.run_name=$name --set output.report_to=[]"
         for kv in "${@:4}"; do s="$s --set $kv"; done
         timeout 500 python3 -m qlora_nb.cli train $s --set train.max_steps=$2 > /tmp/auto.log 2>&1; echo "rc $?"
         grep -i "^speed\|error" /tmp/auto.log | head -3 | cut -c1-300
         cp /tmp/auto/$name/run_summary.json /tmp/auto/$name/training_history.json "$OUT/" ;;
  long)  for r in graphs compiled; do
           s="--set output.output_dir=/tmp/long --set output.run_name=$r --set output.report_to=[] --set train.max_steps=300"
           [ $r = compiled ] && s="$s --set train.compile=true"
           timeout 280 python3 -m qlora_nb.cli train $s > /tmp/long-$r.log 2>&1; echo "$r rc $?"
           grep -i "^speed\|error" /tmp/long-$r.log | head -3 | cut -c1-300
         done
         python3 - <<'PY'
import json, glob, os
out = {p.split('/')[-2]: {'summary': json.load(open(p)),
                          'history': json.load(open(p.replace('run_summary.json', 'training_history.json')))}
       for p in glob.glob('/tmp/long/*/run_summary.json')}
json.dump(out, open(os.environ['OUT'] + '/long.json', 'w'), indent=1)
print({k: (round(v['summary']['wall_time_s'], 1), v['summary'].get('final_eval_loss')) for k, v in out.items()})
PY
         ;;
esac
