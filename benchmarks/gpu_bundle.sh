#!/usr/bin/env bash
# Builds .whl/: what benchmarks/gpu.py needs on a GPU machine that has Python 3.12 and torch but no package index
# (this project's device tool). Run it here, in the repository root, with the project's venv; then carry .whl to the
# device (it is ignored by git through .git/info/exclude, which this script appends to) and there:
#
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl && tar xzf .whl/site.tgz -C /tmp/site
#   export PYTHONPATH=/tmp/site:src
#
# Wheels: cp312 manylinux builds of the versions this venv has (the tests' versions), no dependencies resolved: the
# device's torch, numpy and Triton stay. GPTQModel 7.7 and its small pure-Python dependencies have no cp312 wheels,
# so they travel as a tarball of this venv's copies, with a stand-in for pypcre (a C extension GPTQModel uses only for
# compile / escape / split / Pattern / Flag, mapped onto `re`). benchmarks/results/gpu.md, "Commands", has the history.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
OUT=.whl
WHEELS=(transformers peft optimum gguf accelerate tokenizers safetensors huggingface_hub hf-xet regex pyyaml
        threadpoolctl typer pytest pluggy iniconfig httpx2 httpcore2 truststore)
PURE=(gptqmodel gptqmodel_ext defuser logbar tokenicer device_smi)

version() { "$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

rm -rf "$OUT"
mkdir -p "$OUT"
pins=()
for name in "${WHEELS[@]}"; do pins+=("$name==$(version "$name")"); done
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$OUT" \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    "${pins[@]}"

site=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
for name in "${PURE[@]}"; do
    cp -r "$site/$name" "$stage/"
    dist=$(ls -d "$site/${name}"-*.dist-info 2>/dev/null || true)
    [ -n "$dist" ] && cp -r $dist "$stage/"
done
find "$stage" -name __pycache__ -type d -prune -exec rm -rf {} +
mkdir "$stage/pcre"
cat > "$stage/pcre/__init__.py" <<'EOF'
"""Stand-in for pypcre on machines without its C extension: the calls GPTQModel makes, on Python's `re`."""
import enum
import re

Pattern = re.Pattern
compile = re.compile  # noqa: A001
escape = re.escape
split = re.split


class Flag(enum.IntFlag):
    CASELESS = re.IGNORECASE
    DOTALL = re.DOTALL
    MULTILINE = re.MULTILINE
EOF
tar czf "$OUT/site.tgz" -C "$stage" .
grep -qxF "/$OUT/" .git/info/exclude 2>/dev/null || echo "/$OUT/" >> .git/info/exclude
du -sh "$OUT"
ls "$OUT"
