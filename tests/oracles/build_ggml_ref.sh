#!/usr/bin/env bash
# Builds ggml's own quantizers (ggml-quants.c, MIT) as a shared library, without FMA contraction,
# for tests/test_quant.py::test_byte_identical_to_ggml_reference_build (K-quants compared with
# ggml itself; ../shared/reference/quantized-formats.md §9.7). ggml's sources come from PyPI:
# the llama-cpp-python sdist vendors llama.cpp's ggml. Nothing of it is kept in the repository.
# Usage: build_ggml_ref.sh OUT_DIR  -> prints the path of the library on success.
set -euo pipefail
out="$(mkdir -p "$1" && cd "$1" && pwd)"
version=0.3.36  # llama-cpp-python; its vendored ggml is the one the test was checked against
here="$(cd "$(dirname "$0")" && pwd)"
python -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$out" >&2
src="llama_cpp_python-$version/vendor/llama.cpp/ggml"
tar xzf "$out/llama_cpp_python-$version.tar.gz" -C "$out" "$src/include" "$src/src/ggml-quants.c" \
    --wildcards "$src/src/*.h"
gcc -O2 -ffp-contract=off -fPIC -shared -I"$out/$src/include" -I"$out/$src/src" \
    "$out/$src/src/ggml-quants.c" "$here/ggml_stubs.c" -lm -o "$out/libggml-quants-ref.so"
rm -rf "$out/llama_cpp_python-$version" "$out/llama_cpp_python-$version.tar.gz"
echo "$out/libggml-quants-ref.so"
