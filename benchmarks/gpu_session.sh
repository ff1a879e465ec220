#!/usr/bin/env bash
# How the committed GPU results were made on a lent machine (see ../shared/GPU.md of the project's workspace):
# wheels of the packages that machine lacks are carried in .whl/, the default model's GGUF in parts (.m1 .m2 .m3),
# because one call may carry at most 64 MiB. Each call runs one or more phases of gpu_run.py in under 10 minutes.
#   bash benchmarks/gpu_session.sh slim       # here, once: drop bitsandbytes' libraries for other CUDA/ROCm versions
#                                             # from its wheel (43 -> 7 MB), so wheels and two model parts fit one call
#   bash benchmarks/gpu_session.sh setup      # first call: wheels + the first parts of the model
#   bash benchmarks/gpu_session.sh part       # copy the part carried in this call
#   bash benchmarks/gpu_session.sh PHASE...   # phases of gpu_run.py, results packed into $OUT
# The run of record (issue #21), one H200, each line one call of under 9 minutes (a phase cut off by the time limit
# is simply called again: finished arms, adapters and runs are skipped); set QLORA_NB_COMMIT=$(git rev-parse HEAD)
# here and pass it, since the copy on the lent machine has no git history:
#   main            the default job (bf16), its evaluation, and the judge (verdicts from token probabilities)
#   compare-base    the study's 4 base-model arms (164 problems; greedy and n=20)
#   compare-s0      the 4 adapters of training seed 0 (control/experiment x 2 folds) and their 8 arms
#   compare-s1      the same with seed 1, then compare-s2: 3 training seeds per arm (seeds may run side by side)
#   fp16            the default job with quant.compute_dtype=float16 (a Colab T4), beside the bf16 main run: fp16.json
# Every arm records generation_s, attention, generator and device; humaneval/generation_times.json gathers them.
set -euo pipefail
export PYTHONPATH=/tmp/site:$PWD QLORA_NB_GGUF=/tmp/model/SmolLM2-135M-Instruct.Q4_1.gguf QLORA_NB_CACHE=/tmp/qcache
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p /tmp/model
case "$1" in
  slim)  w=$(ls .whl/bitsandbytes-*.whl); d=$(mktemp -d); (cd "$d" && unzip -q "$OLDPWD/$w" \
           && rm -f bitsandbytes/libbitsandbytes_{cuda11,cuda12,rocm,xpu}*.so \
           && sed -i -E '/libbitsandbytes_(cuda1[12]|rocm|xpu)/d' ./*.dist-info/RECORD && rm "$OLDPWD/$w" && zip -q -r "$OLDPWD/$w" .)
         rm -rf "$d"; ls -la "$w" ;;
  setup) python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
         cp .m*/part.* /tmp/model/; ls -la /tmp/model; nvidia-smi --query-gpu=name,memory.total --format=csv ;;
  part)  cp .m*/part.* /tmp/model/; ls -la /tmp/model
         # results of an earlier machine (the lease ended mid-run): unpack them so the phases resume
         mkdir -p /tmp/gpu_work; for t in .prev/*.tgz; do [ -f "$t" ] && tar xzf "$t" -C /tmp/gpu_work; done; true ;;
  *)     [ -f "$QLORA_NB_GGUF" ] || cat /tmp/model/part.* > "$QLORA_NB_GGUF"
         mkdir -p /tmp/gpu_work
         QLORA_NB_COMMIT="${QLORA_NB_COMMIT:-}" timeout -s INT "${GPU_RUN_LIMIT:-540}" \
           python3 benchmarks/gpu_run.py "$@" --work /tmp/gpu_work --pack "$OUT" ;;
esac
