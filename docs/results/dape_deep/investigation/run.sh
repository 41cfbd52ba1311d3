#!/bin/bash
# Where the deep models look and whether they copy (issue 30's reasons), from the repository root,
# once `poslab study dape_deep --out docs/results/dape_deep` has trained the runs (their checkpoints
# are not committed: run it where they are). One thread, one process at a time.
set -eu
here=docs/results/dape_deep/investigation
mkdir -p $here/repeated_text
for run in docs/results/dape_deep/stdlib/*/seed*; do
  name=$(basename "$(dirname "$run")")_$(basename "$run")
  [ -s $here/repeated_text/$name.json ] && continue
  OMP_NUM_THREADS=1 poslab eval "$run" --task repeated_text task.options.eval_lengths=128,1024,4096 \
    eval.splits=by_length eval.batches=4 eval.batch_size=4 --json $here/repeated_text/$name.json
done
# The control: a model known to copy (the benchmark's RoPE, trained on the probe, seed 0) scored the
# same way, to show what the copy gain reads when a model copies.
bench=docs/results/length_generalisation/repeated_text/rope/seed0
[ -s $here/control/benchmark_rope_seed0.json ] || OMP_NUM_THREADS=1 poslab eval $bench eval.splits=by_length \
  --json $here/control/benchmark_rope_seed0.json
OMP_NUM_THREADS=1 poslab head-stats docs/results/dape_deep/stdlib --lengths 128,1024,8192 --windows 4 --out $here/heads
python $here/table.py > $here/summary.md
