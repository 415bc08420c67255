#!/usr/bin/env bash
# Validates the Helm chart (deploy/charts/plugca) and the kustomize base
# (deploy/kubernetes) offline:
#   - helm lint --strict, with default values and with every feature on;
#   - helm template with default, every-feature, minimal and shared
#     self-signed root values, the kustomize base and its self-signed overlay
#     (deploy/kubernetes-self-signed), each through kubernetes-validate --strict;
#   - settings the chart must refuse (replicas without a shared root, both a
#     plugged CA and a self-signed Secret, a grace period shorter than the
#     drain, unknown values) fail to render;
#   - the chart's default render equals the kustomize base, the chart on a
#     self-signed Secret equals the overlay, and deploy/rbac/plugca-rbac.yaml
#     equals the chart's base RBAC;
#   - RBAC, flags and pod hardening per feature set (deploy/check-manifests.py).
#
# Needs helm ($HELM, else helm on PATH) and kubectl (kustomize). Installs
# kubernetes-validate into target/deploy-venv when missing. Without helm or
# kubernetes-validate it prints why and exits 0, except under CI=true.
#
#   HELM=$HOME/.cache/plugca-helm/helm deploy/check.sh
set -euo pipefail

cd "$(dirname "$0")/.."

# Pinned: kubernetes-validate 1.37.0 ships offline schemas up to v1.37.
# Render for Kubernetes 1.34 (helm's own default is 1.20) and validate
# against 1.34 and the newest schemas shipped.
KV_VERSION=1.37.0
KUBE_VERSION=1.34.0
read -r -a VALIDATE_VERSIONS <<<"${VALIDATE_VERSIONS:-1.34.0 1.37.0}"
VENV=target/deploy-venv
CHART=deploy/charts/plugca
RELEASE=plugca
NAMESPACE=istio-system

skip() {
  if [[ ${CI:-} == true ]]; then
    echo "deploy/check.sh: FAIL: $1 (CI=true: a missing tool is a failure)" >&2
    exit 1
  fi
  echo "deploy/check.sh: SKIP: $1"
  exit 0
}

HELM=${HELM:-$(command -v helm || true)}
[[ -n $HELM && -x $HELM ]] || skip "helm not found (set HELM=/path/to/helm; build: GOBIN=\$HOME/.cache/plugca-helm go install helm.sh/helm/v3/cmd/helm@v3.22.0)"
KUBECTL=${KUBECTL:-$(command -v kubectl || true)}
[[ -n $KUBECTL ]] || skip "kubectl not found (needed for kubectl kustomize)"

if ! "$VENV/bin/kubernetes-validate" --version 2>/dev/null | grep -qF "$KV_VERSION"; then
  echo "installing kubernetes-validate==$KV_VERSION into $VENV"
  { python3 -m venv "$VENV" &&
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$KV_VERSION"; } ||
    skip "could not install kubernetes-validate==$KV_VERSION into $VENV"
fi
PY=$VENV/bin/python
export PYTHONDONTWRITEBYTECODE=1
KV=$VENV/bin/kubernetes-validate

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

passed=0
failed=0
pass() { passed=$((passed + 1)); echo "PASS: $1"; }
fail() { failed=$((failed + 1)); echo "FAIL: $1"; }

# run NAME CMD...: one check, its output shown only on failure.
run() {
  local name=$1 log
  shift
  log=$OUT/log
  if "$@" >"$log" 2>&1; then
    pass "$name"
  else
    fail "$name"
    sed 's/^/    /' "$log"
  fi
}

# Like run, but keeps the output on success too (e.g. the check lines).
run_verbose() {
  local name=$1
  shift
  if "$@" 2>&1 | sed 's/^/    /'; then pass "$name"; else fail "$name"; fi
}

render() { # render OUTFILE [helm args...]
  local out=$1
  shift
  "$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" --kube-version "$KUBE_VERSION" "$@" >"$out"
}

kustomize() { "$KUBECTL" kustomize "${2:-deploy/kubernetes}" >"$1"; }

validate() { # validate VERSION FILE: kubernetes-validate --strict (an empty file is a failure)
  grep -q '^kind:' "$2" || { echo "$2: no objects"; return 1; }
  "$KV" --strict --quiet -k "$1" "$2"
}

# must_fail NAME PATTERN helm-args...: rendering fails with PATTERN in the error.
must_fail() {
  local name=$1 pattern=$2
  shift 2
  if render "$OUT/refused.yaml" "$@" >"$OUT/log" 2>&1; then
    fail "$name (rendered instead of failing)"
  elif grep -qF -- "$pattern" "$OUT/log"; then
    pass "$name"
  else
    fail "$name (failed without \"$pattern\")"
    sed 's/^/    /' "$OUT/log"
  fi
}

echo "helm $("$HELM" version --short), kubernetes-validate $KV_VERSION, render for $KUBE_VERSION, schemas ${VALIDATE_VERSIONS[*]}"

ALL=$CHART/ci/all-features-values.yaml
# What deploy/kubernetes-self-signed says: the default values on a shared
# self-signed root instead of the cacerts Secret.
SELF_SIGNED=(--set app.tls.cacerts.secretName= --set app.tls.selfSigned.secretName=plugca-root)
MINIMAL=(--set replicaCount=1 --set app.tls.cacerts.secretName=
  --set-json app.server.caTrustedNodeAccounts=[] --set app.tls.istiodCertificateEnable=false
  --set app.controller.rootConfigMap.enabled=false --set podDisruptionBudget.enabled=false)

LINT=("$HELM" lint --strict "$CHART" --namespace "$NAMESPACE" --kube-version "$KUBE_VERSION")
run "helm lint --strict (default values)" "${LINT[@]}"
run "helm lint --strict (every feature on)" "${LINT[@]}" -f "$ALL"

run "helm template (default values)" render "$OUT/default.yaml"
run "helm template (every feature on)" render "$OUT/all.yaml" -f "$ALL"
run "helm template (minimal: 1 replica, no cacerts, no controllers)" render "$OUT/minimal.yaml" "${MINIMAL[@]}"
run "helm template (self-signed root in a Secret)" render "$OUT/self-signed.yaml" "${SELF_SIGNED[@]}"
run "kubectl kustomize deploy/kubernetes" kustomize "$OUT/kustomize.yaml"
run "kubectl kustomize deploy/kubernetes-self-signed" kustomize "$OUT/kustomize-self-signed.yaml" deploy/kubernetes-self-signed

for v in "${VALIDATE_VERSIONS[@]}"; do
  for f in default all minimal self-signed kustomize kustomize-self-signed; do
    run "kubernetes-validate --strict -k $v ($f)" validate "$v" "$OUT/$f.yaml"
  done
  run "kubernetes-validate --strict -k $v (deploy/rbac/plugca-rbac.yaml)" validate "$v" deploy/rbac/plugca-rbac.yaml
done

must_fail "refuses 2 replicas without cacerts or a self-signed Secret" \
  "every replica would generate its own root" --set app.tls.cacerts.secretName=
must_fail "refuses a plugged CA and a self-signed Secret together" \
  "are both set: a plugged-in CA always wins" --set app.tls.selfSigned.secretName=plugca-root
must_fail "values schema refuses a malformed self-signed Secret name" \
  "secretName" --set app.tls.cacerts.secretName= --set app.tls.selfSigned.secretName=Bad_Name
must_fail "refuses a grace period not longer than the drain timeout" \
  "terminationGracePeriodSeconds (30) must be at least" --set terminationGracePeriodSeconds=30
must_fail "values schema refuses an unknown value" \
  "additional properties 'replicas' not allowed" --set replicas=3
must_fail "values schema refuses a malformed trusted node account" \
  "caTrustedNodeAccounts" --set 'app.server.caTrustedNodeAccounts[0]=ztunnel'

run_verbose "chart (default values) == kustomize base" "$PY" deploy/check-manifests.py compare "$OUT/default.yaml" "$OUT/kustomize.yaml"
run_verbose "chart (self-signed Secret) == deploy/kubernetes-self-signed" "$PY" deploy/check-manifests.py compare "$OUT/self-signed.yaml" "$OUT/kustomize-self-signed.yaml"
run_verbose "deploy/rbac/plugca-rbac.yaml == chart's base RBAC" "$PY" deploy/check-manifests.py rbac-file deploy/rbac/plugca-rbac.yaml "$OUT/default.yaml"
for f in default all minimal; do
  run_verbose "features: $f" "$PY" deploy/check-manifests.py features "$f" "$OUT/$f.yaml"
done
for f in all self-signed; do
  run_verbose "flags passed ($f) are flags of plugca serve in src/" "$PY" deploy/check-manifests.py flags "$OUT/$f.yaml" src
done

# Optional: Istio's own charts with the values docs/istio-with-plugca.md gives.
# Only from an Istio module already in the Go module cache (or ISTIO_CHARTS);
# nothing is downloaded for it.
CA_ADDRESS=plugca.$NAMESPACE.svc:15012
if [[ -z ${ISTIO_CHARTS:-} ]] && command -v go >/dev/null; then
  for d in "$(go env GOMODCACHE)"/istio.io/istio@*/manifests/charts; do
    [[ -d $d ]] && ISTIO_CHARTS=$d
  done
fi
if [[ -n ${ISTIO_CHARTS:-} && -d $ISTIO_CHARTS/ztunnel ]]; then
  run "Istio's istiod chart with the documented values" \
    "$HELM" template istiod "$ISTIO_CHARTS/istio-control/istio-discovery" --namespace "$NAMESPACE" \
    --set "global.caAddress=$CA_ADDRESS" --set env.ENABLE_CA_SERVER=false --output-dir "$OUT/istiod"
  run "Istio's ztunnel chart with the documented values" \
    "$HELM" template ztunnel "$ISTIO_CHARTS/ztunnel" --namespace "$NAMESPACE" \
    --set "caAddress=$CA_ADDRESS" --output-dir "$OUT/ztunnel"
  cat "$OUT"/istiod/*/templates/*.yaml >"$OUT/istio-istiod.yaml" 2>/dev/null || true
  cat "$OUT"/ztunnel/*/templates/*.yaml >"$OUT/istio-ztunnel.yaml" 2>/dev/null || true
  run_verbose "Istio points at plugca with the documented values ($ISTIO_CHARTS)" \
    "$PY" deploy/check-manifests.py istio "$OUT/istio-istiod.yaml" "$OUT/istio-ztunnel.yaml" "$CA_ADDRESS"
else
  echo "note: Istio's charts not found (no istio.io/istio in the Go module cache, ISTIO_CHARTS unset): documented Istio values not rendered"
fi

echo "deploy/check.sh: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
