#!/usr/bin/env bash
# tests/peer/k8s-manifests.sh: check the Kubernetes deployment of the snapfs CSI
# driver (deploy/kubernetes/) offline, without a cluster: every manifest (the
# driver's and examples/) against the Kubernetes API's JSON schemas, strictly (a
# misspelt or unknown field is an error), plus the kustomization, the objects'
# references to one another, and the Dockerfile. The checks themselves are in
# tests/peer/k8s-manifests.py.
#
# usage: tests/peer/k8s-manifests.sh [DIR]      (DIR: default deploy/kubernetes)
#
# The validator is kubernetes-validate (PyPI), which bundles the schemas of every
# Kubernetes release it knows, so nothing is fetched while validating. It is
# installed once, pinned, into a virtualenv (Debian's python3-venv is installed
# first when it is missing, as root, unless SKIP_APT=1). Kinds it has no schema
# for (VolumeSnapshot and VolumeSnapshotClass, CRDs of external-snapshotter;
# kustomize's Kustomization) are checked against the schemas in DIR/schemas/, and a
# kind with no schema at all fails.
#
# Environment:
#   K8S_VERSIONS          Kubernetes versions to validate against (default
#                         "1.30 1.37": the oldest this deployment supports and the
#                         newest the pinned validator knows)
#   K8S_VALIDATE_VERSION  kubernetes-validate version (default 1.37.0)
#   K8S_VALIDATE_VENV     its virtualenv (default $HOME/.cache/snapfs/k8s-validate)
#   SKIP_APT=1            do not install python3-venv
# Prints each failure and "k8s-manifests: N passed, N failed"; exits non-zero if
# any check failed.
set -euo pipefail

# shellcheck source=tests/peer/common.sh source-path=SCRIPTDIR
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PEER_NAME=k8s-manifests

peer_help_if_asked "$@"
[ $# -le 1 ] || peer_die "unexpected argument '$2'"

dir=${1:-$PEER_REPO_ROOT/deploy/kubernetes}
[ -d "$dir" ] || peer_die "$dir: no such directory"
versions=${K8S_VERSIONS:-1.30 1.37}
want=${K8S_VALIDATE_VERSION:-1.37.0}
venv=${K8S_VALIDATE_VENV:-$HOME/.cache/snapfs/k8s-validate}

# The validator, in its own virtualenv, installed when missing or not $want.
ensure_validator() {
    local have
    have=$("$venv/bin/kubernetes-validate" --version 2>/dev/null || true)
    [ "$have" != "$want" ] || return 0
    command -v python3 >/dev/null || peer_die "python3 is required"
    if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
        if [ "${SKIP_APT:-0}" != 1 ] && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
            peer_log "installing python3-venv"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv >&2 ||
                { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv >&2; } ||
                peer_die "apt-get install python3-venv failed"
        else
            peer_die "python3 cannot make a virtualenv (install python3-venv)"
        fi
    fi
    peer_log "installing kubernetes-validate $want into $venv (found: ${have:-none})"
    if ! "$venv/bin/python" -c '' 2>/dev/null; then
        mkdir -p "$(dirname "$venv")"
        python3 -m venv --clear "$venv" || peer_die "python3 -m venv $venv failed"
    fi
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "kubernetes-validate==$want" >&2 ||
        peer_die "pip install kubernetes-validate==$want failed"
    have=$("$venv/bin/kubernetes-validate" --version 2>/dev/null || true)
    [ "$have" = "$want" ] || peer_die "kubernetes-validate reports version '${have}' after installing $want"
}

ensure_validator
args=()
for v in $versions; do
    args+=(--k8s-version "$v")
done
start=$SECONDS
rc=0
"$venv/bin/python" "$PEER_REPO_ROOT/tests/peer/k8s-manifests.py" "${args[@]}" --src "$PEER_REPO_ROOT" "$dir" || rc=$?
peer_log "checked in $((SECONDS - start)) s"
exit "$rc"
