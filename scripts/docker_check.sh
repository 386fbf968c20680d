#!/usr/bin/env bash
# Builds docker/Dockerfile for real with podman and runs a short 2-rank training and an eval in the image.
# No docker daemon runs on the development machines; the recipe is docs' "Docker here"
# (shared/design/architecture.md): rootful podman with runc, a debootstrapped bookworm as the base
# (Docker Hub is unreachable), lowered ulimits and the host's network.
# Run as root from anywhere: scripts/docker_check.sh   (IMAGE=... KEEP_TMP=1 to override/keep output)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
IMAGE=${IMAGE:-localhost/dist-robust:check}
BASE=docker.io/library/debian:bookworm-slim
# Containers do not start with the default limits ("setrlimit: operation not permitted") and need the
# host's network (apt and pip reach their archives through it).
FLAGS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024 --network host)
T0=$(date +%s)

[ "$(id -u)" = 0 ] || { echo "run as root (rootful podman, debootstrap)" >&2; exit 1; }
command -v podman >/dev/null && command -v debootstrap >/dev/null && command -v runc >/dev/null ||
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman debootstrap runc

WORK=$(mktemp -d /tmp/docker_check.XXXXXX)
# the debootstrap tree is large and owned by root: always removed; the runs/ output only unless KEEP_TMP=1
cleanup() { rm -rf "$WORK/rootfs"; [ "${KEEP_TMP:-0}" = 1 ] || rm -rf "$WORK"; }
trap cleanup EXIT

# 1. The base image, once: Debian's own archive (from this machine's apt sources) instead of Docker Hub.
if ! podman image exists "$BASE"; then
  MIRROR=$(grep -rhoE 'https?://[^ ]*/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null |
           head -n1 | tr -d ' ' || true)  # grep fails on a missing sources.list: fall back below
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
  t=$(date +%s)
  debootstrap --variant=minbase bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
    { tail -20 "$WORK/debootstrap.log"; exit 1; }
  tar -C "$WORK/rootfs" -c . | podman import - "$BASE" >/dev/null
  rm -rf "$WORK/rootfs"
  echo "base image: debootstrap + import $(( $(date +%s) - t )) s (mirror $MIRROR)"
fi

# 2. The build. pip here reads its indexes from local disk (file:///opt/pypi/simple, file:///opt/pypi-more
# /simple, find-links /opt/wheels; torch==2.14.1 exists only there) plus PyPI over the network. The
# build sees the same: the mirror folders are bind-mounted read-only into every RUN at the same paths, and
# with them the host's pip configuration: /etc/pip.conf (the CA bundle), /etc/xdg/pip (the constraint
# file), root's user config (find-links and the file:// extra indexes; the build runs as root). PyPI is
# reached through a TLS-intercepting proxy (pip without the host's CA bundle fails with "self-signed
# certificate in certificate chain"), so the host's bundle is mounted too, at a path of its own (the
# image's apt could own /etc/ssl/certs), and the config's `cert =` points there. Nothing of this ends up
# in the image: build-time mounts are not layers.
CA=${PIP_CERT:-$(sed -n 's/^[[:space:]]*cert[[:space:]]*=[[:space:]]*//p' /etc/pip.conf | head -n1)}
CA=${CA:-/etc/ssl/certs/ca-certificates.crt}
# (one [global] section: pip's config parser rejects a duplicate one)
sed -e '/^[[:space:]]*cert[[:space:]]*=/d' -e '/^\[global\]/a cert = /etc/pip-host-ca.crt' /etc/pip.conf >"$WORK/pip.conf"
MOUNTS=(-v "$WORK/pip.conf:/etc/pip.conf:ro" -v "$CA:/etc/pip-host-ca.crt:ro")
[ -d /etc/xdg/pip ] && MOUNTS+=(-v /etc/xdg/pip:/etc/xdg/pip:ro)
for f in "$HOME/.config/pip/pip.conf" "$HOME/.pip/pip.conf"; do
  [ -f "$f" ] && MOUNTS+=(-v "$f:/root/${f#"$HOME"/}:ro")
done
for d in /opt/pypi /opt/pypi-more /opt/wheels; do [ -d "$d" ] && MOUNTS+=(-v "$d:$d:ro"); done
t=$(date +%s)
# the full log goes to build.log, the steps to the terminal; the build's own exit status via build.rc
{ podman --runtime runc build --pull=never "${FLAGS[@]}" "${MOUNTS[@]}" \
    -f "$ROOT/docker/Dockerfile" -t "$IMAGE" "$ROOT"; echo $? >"$WORK/build.rc"; } 2>&1 |
  tee "$WORK/build.log" | grep --line-buffered -E '^(STEP|COMMIT|Error)' || true
[ "$(cat "$WORK/build.rc")" = 0 ] || { tail -40 "$WORK/build.log"; exit 1; }
BUILD_S=$(( $(date +%s) - t ))
SIZE=$(podman image inspect --format '{{.Size}}' "$IMAGE")
echo "build: ${BUILD_S} s; image $IMAGE: $(( SIZE / 1000000 )) MB ($(podman images --format '{{.Size}}' "$IMAGE"))"

# 3. A short real run in the image: 2 gloo ranks on CPU (sklearn's bundled digits, so no download), then
# the eval CLI on the checkpoint; runs/ is a host folder so the results are checked from outside.
mkdir -p "$WORK/runs"
RUN=(podman --runtime runc run --rm "${FLAGS[@]}" --ipc=host -e OMP_NUM_THREADS=1
     -v "$WORK/runs:/opt/dist_robust/runs")
NAME=docker_check
t=$(date +%s)
"${RUN[@]}" --entrypoint torchrun "$IMAGE" --standalone --nproc_per_node=2 -m dist_robust train \
  configs/quickstart.yaml data.name=digits data.subset=null train.epochs=1 eval.limit=200 run.name=$NAME
"${RUN[@]}" "$IMAGE" eval --checkpoint runs/$NAME --dataset digits --limit 200
RUN_S=$(( $(date +%s) - t ))

# 4. On the host: the training's results.json and the eval's output exist and are valid JSON.
ls -la "$WORK/runs/$NAME"
test -f "$WORK/runs/$NAME/results.json"
# dist-robust eval writes eval-DATASET-SPLIT.json next to the checkpoint's sidecar (dist_robust/cli.py)
EVAL_JSON=$(find "$WORK/runs/$NAME" -name 'eval-digits-*.json' | head -n1)
[ -n "$EVAL_JSON" ] || { echo "no eval-digits-*.json under runs/$NAME" >&2; exit 1; }
for f in "$WORK/runs/$NAME/results.json" "$EVAL_JSON"; do
  python3 -c 'import json, sys; json.load(open(sys.argv[1])); print("ok", sys.argv[1])' "$f"
done
echo "build ${BUILD_S} s, run ${RUN_S} s, image $(( SIZE / 1000000 )) MB, total $(( $(date +%s) - T0 )) s"
