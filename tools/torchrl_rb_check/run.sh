#!/usr/bin/env bash
# TorchRL's replay-buffer tests, as shipped (baseline) and with LaBERSampler (laber); docs/results/torchrl-rb.md.
#   tools/torchrl_rb_check/run.sh PATH/TO/pytorch-rl/test/rb OUT_DIR [baseline|laber]
# One pytest process per file (a file's failure does not stop the others), junit XML per file in OUT_DIR.
set -u
src=$1; out=$2; mode=${3:-laber}
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-$here/../../.venv/bin/python}
work=$(mktemp -d)
mkdir "$work/rb" && cp "$src"/*.py "$work/rb/" && cp "$here/conftest.py" "$work/conftest.py"  # test/rb's own kept
mkdir -p "$out"
[ "$mode" = laber ] && export RBCHECK_LABER=1 RBCHECK_USAGE_DIR="$out/usage"
export OMP_NUM_THREADS=1
for f in "$work"/rb/test_*.py; do
  name=$(basename "$f" .py)
  (cd "$work" && "$py" -m pytest -p no:cacheprovider --rootdir "$work" -q -k "not ray and not Ray" --junitxml="$out/$name.xml" "$f" \
    > "$out/$name.log" 2>&1)
  echo "$name: $(tail -1 "$out/$name.log")"
done
rm -rf "$work"
