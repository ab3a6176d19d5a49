#!/usr/bin/env bash
# The locked dependency set (requirements.lock), installed and refreshed with uv.
#   tools/deps.sh setup [pip]   install requirements.lock + scalelab (editable) into $VENV
#   tools/deps.sh lock          re-resolve pyproject.toml into requirements.lock (keeps existing pins)
#   tools/deps.sh lock-check    fail if requirements.lock no longer matches pyproject.toml
#   tools/deps.sh bytecode-list re-record which site-packages directories setup byte-compiles
# The lock is for CPython 3.11 on Linux x86_64, every pin with its sha256 hashes. torch is pinned to
# the CPU build (2.13.0+cpu), which lies on this machine's disk (pip's find-links); PyPI's torch
# 2.13.0 is a CUDA build with other hashes, so the lock refuses it rather than pull several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=$VENV/bin/python
LOCK=requirements.lock
TARGET=(--python-version 3.11 --python-platform x86_64-manylinux_2_28)

# uv reads no pip configuration: hand it pip's index and find-links (`pip config list`, which also
# shows PIP_* variables); find-links is where the CPU torch wheel lies on this machine. pip's extra
# indexes are left out: here they are partial local copies of PyPI files (the same bytes: the lock's
# hashes match), and a lock resolved against them would record only the copies' hashes.
uv_sources() {
  local key value flag seen=" "
  while IFS='=' read -r key value; do
    value=${value#\'}; value=${value%\'}
    case "${key##*.}" in
      find-links) flag=--find-links ;;
      index-url) flag=--index-url ;;
      *) continue ;;
    esac
    for v in $value; do
      [[ $seen == *" $flag=$v "* ]] && continue
      seen+="$flag=$v "
      printf '%s\n%s\n' "$flag" "$v"
    done
  done < <(python3 -m pip config list 2>/dev/null)
}

# pip -q, without this machine's notes on its local mirrors (`Location ... is ignored: it is
# neither a file nor a directory`, one for each package they lack)
pip_install() {
  "$PY" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

# uv itself comes from the lock, pinned and hashed, so a machine without uv needs only python3 -m venv.
bootstrap_uv() {
  test -x "$PY" || python3 -m venv "$VENV"
  local want
  want=$(grep -m1 '^uv==' "$LOCK" | sed 's/^uv==\([^ ]*\).*/\1/')
  if [[ $("$VENV/bin/uv" --version 2>/dev/null) != "uv $want" ]]; then
    pip_install --no-deps --require-hashes -r <(awk '/^uv==/ {p = 1} p {print} p && !/\\$/ {exit}' "$LOCK")
  fi
}

compile_lock() {  # $1: output file; existing pins in it are kept where pyproject.toml allows them
  mapfile -t sources < <(uv_sources)
  "$VENV/bin/uv" pip compile -q pyproject.toml --extra dev --generate-hashes "${TARGET[@]}" \
    "${sources[@]}" --custom-compile-command "make lock" -o "$1"
}

case "${1:-}" in
  setup)
    if [[ ${2:-uv} == pip ]]; then  # the fallback: pip alone, same lock, same hashes
      test -x "$PY" || python3 -m venv "$VENV"
      pip_install --require-hashes -r "$LOCK"
      # scalelab itself, editable, built with the locked setuptools (no unpinned build environment)
      pip_install --no-deps --no-build-isolation -e .
    else
      bootstrap_uv
      mapfile -t sources < <(uv_sources)
      "$VENV/bin/uv" pip install -q --python "$PY" --require-hashes "${sources[@]}" -r "$LOCK"
      # The .pyc files pip writes at install, which uv leaves out: without them every import of
      # torch/ray/mlflow compiles from source (about 40 s here, at every start where
      # PYTHONDONTWRITEBYTECODE is set, as on this machine). Only the directories scalelab's
      # processes import from (tools/bytecode-dirs.txt, `make bytecode-list`): a third of the CPU
      # time of compiling all of site-packages. Without the list: all of it, less test suites.
      if [[ -s tools/bytecode-dirs.txt ]]; then
        "$PY" tools/bytecode.py compile tools/bytecode-dirs.txt
      else
        site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        "$PY" -m compileall -qq -j 0 -x '/site-packages/(.+/)?tests?/' "$site" || true
      fi
      "$VENV/bin/uv" pip install -q --python "$PY" --no-deps --no-build-isolation -e .
    fi
    ;;
  lock)
    bootstrap_uv
    compile_lock "$LOCK"
    echo "wrote $LOCK ($(grep -c '^[a-zA-Z0-9].*==' "$LOCK") pins); commit it with pyproject.toml"
    ;;
  lock-check)
    bootstrap_uv
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    cp "$LOCK" "$tmp/requirements.lock"
    compile_lock "$tmp/requirements.lock"
    if ! diff -u "$LOCK" "$tmp/requirements.lock" >"$tmp/diff"; then
      cat "$tmp/diff" >&2
      echo "$LOCK does not match pyproject.toml: run 'make lock' and commit the result" >&2
      exit 1
    fi
    echo "$LOCK matches pyproject.toml"
    ;;
  bytecode-list)
    "$PY" tools/bytecode.py list tools/bytecode-dirs.txt
    ;;
  *)
    echo "usage: tools/deps.sh setup [pip] | lock | lock-check | bytecode-list" >&2
    exit 2
    ;;
esac
