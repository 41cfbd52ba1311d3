#!/bin/bash
# Issue 29: one round of `poslab bench --sections attention,step` on this CPU, both builds, one thread,
# any training on the machine paused for the duration, each a fresh process.
# Usage: run.sh LABEL [tuned|untuned]. LABEL names the round and the machine (before: the commit checked
# out in /work/wt/before; anything else: this checkout, e.g. `run.sh intel tuned` on an Intel CPU);
# the files land in $OUT (default /work/runs/bench29): copy LABEL-*.json and the .time files here, then
# python table.py > table.md.
# Pausing: SIGTSTP first, which a training run takes by stopping itself and leaving the pause out of
# its recorded wall time; SIGSTOP for whatever has not stopped after a while (a grid's parent, an
# older run); on exit SIGCONT, repeated for 30 s in case a run took its SIGTSTP late and stopped again.
set -u
which=$1  # the round's label
tuning=${2:-tuned}
envx=""; [ $tuning = untuned ] && envx="POSLAB_NO_MALLOC_TUNING=1"
repo=$(cd "$(dirname "$0")/../../../.." && pwd)
out=${OUT:-/work/runs/bench29}
mkdir -p "$out"
pids=""
for p in $(pgrep -f "poslab (study|train)"); do pids="$pids $p $(pgrep -P $p | tr '\n' ' ')"; done
stopped() { [ "$(awk '{print $3}' /proc/$1/stat 2>/dev/null)" = T ]; }
resume() { for i in $(seq 30); do for p in $pids; do stopped $p && kill -CONT $p 2>/dev/null; done; sleep 1; done; }
trap resume EXIT
kill -TSTP $pids 2>/dev/null
sleep 20
for p in $pids; do stopped $p || kill -STOP $p 2>/dev/null; done
sleep 2
lscpu | grep -E "Model name|Flags" | cut -c1-200 > $out/cpu-$which.txt
src=$repo/src; [ $which = before ] && src=/work/wt/before/src
for arch in native x86-64-v3; do
  echo "== $which $arch $(date +%T)"
  ( cd /tmp && env $envx OMP_NUM_THREADS=1 POSLAB_NATIVE_ARCH=$arch PYTHONPATH=$src /usr/bin/time -v \
    $repo/.venv/bin/python -m poslab bench --sections attention,step --out $out/$which-$arch-$tuning.json ) \
    > $out/$which-$arch-$tuning.md 2> $out/$which-$arch-$tuning.time
  grep -E "Elapsed|System time|User time|Maximum resident|page faults" $out/$which-$arch-$tuning.time
done
if [ $which = after ] && [ $tuning = tuned ] && [ ! -s $out/compile.json ]; then
  echo "== compile $(date +%T)"
  ( cd /tmp && OMP_NUM_THREADS=1 PYTHONPATH=$src $repo/.venv/bin/python -m poslab bench --sections compile --out $out/compile.json ) > $out/compile.md 2>&1
fi
echo "done $(date +%T)"
