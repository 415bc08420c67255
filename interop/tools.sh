#!/usr/bin/env bash
# Builds the real peers of the interop tests from the Go module proxy:
#   etcd, kube-apiserver, kubectl, pilot-agent, pilot-discovery, helm, istio-agent-client.
#
#   interop/tools.sh            build every tool that is missing
#   interop/tools.sh NAME...    build only these (if missing)
#   interop/tools.sh --bin-dir  print the bin folder and build nothing
#   interop/tools.sh --list     print the tool names
#
# Versions come from interop/versions.env only. The tools land in
#   ${PLUGCA_INTEROP_DIR:-$HOME/.cache/plugca-interop}/<stamp>/bin
# where <stamp> hashes versions.env and `go version`, so a version change builds into a new folder.
# A tool is rebuilt only when its binary is missing (istio-agent-client also when its source changed).
# The Go module and build caches are Go's defaults, so they persist across runs on one machine.
#
# Every tool is built in the one module interop/go.mod, which pins the upstreams at the versions in
# versions.env; when versions.env changes, this script updates go.mod/go.sum (`go get` + `go mod tidy`) and
# says so: commit the result. Its `replace k8s.io/<staging> => ... v0.<minor>.<patch>` lines are generated
# from k8s.io/kubernetes' own go.mod, never written by hand.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/versions.env
source "$here/versions.env"

ALL_TOOLS=(etcd kube-apiserver kubectl pilot-agent istio-agent-client helm pilot-discovery)

stamp=$( (cat "$here/versions.env"; go version) | sha256sum | cut -c1-12)
bin_dir="${PLUGCA_INTEROP_DIR:-$HOME/.cache/plugca-interop}/$stamp/bin"

export CGO_ENABLED=0
# Never let go.mod lines of dependencies pull a different toolchain: the one on PATH builds everything.
export GOTOOLCHAIN=local

log() { printf 'tools.sh: %s\n' "$*" >&2; }

# go, at low priority: other engineers compile on the same cores.
run_go() { nice -n 10 go "$@"; }

# The version of MODULE that interop/go.mod requires ('' if none).
required_version() { # MODULE
	awk -v m="$1" '($1 == m || ($1 == "require" && $2 == m)) && $0 !~ /=>/ {print ($1 == "require" ? $3 : $2); exit}' "$here/go.mod"
}

# The pins of versions.env as MODULE@VERSION, and the upstream commands built from them (`tool` lines).
pins() {
	printf '%s\n' "k8s.io/kubernetes@$KUBERNETES_VERSION" "istio.io/istio@$ISTIO_VERSION" \
		"helm.sh/helm/v3@$HELM_VERSION" "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
}
tool_packages() {
	printf '%s\n' "k8s.io/kubernetes/cmd/kube-apiserver@$KUBERNETES_VERSION" "k8s.io/kubernetes/cmd/kubectl@$KUBERNETES_VERSION" \
		"istio.io/istio/pilot/cmd/pilot-agent@$ISTIO_VERSION" "istio.io/istio/pilot/cmd/pilot-discovery@$ISTIO_VERSION" \
		"helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
}

# k8s.io/kubernetes requires each staging repo at v0.0.0, which is not published: replace each one by the
# published v0.<minor>.<patch>. The list is read from k8s.io/kubernetes' own go.mod (its `=> ./staging/...` lines).
# In the one module these replaces also hold Istio's and Helm's k8s.io libraries at that version.
kubernetes_replaces() {
	local gomod minor_patch=${KUBERNETES_VERSION#v1.}
	gomod=$(GOFLAGS=-mod=mod go list -m -f '{{.GoMod}}' "k8s.io/kubernetes@$KUBERNETES_VERSION")
	awk -v v="v0.$minor_patch" '$2 == "=>" && $3 ~ /^\.\/staging\// {print "replace " $1 " => " $1 " " v}' "$gomod" | sort -u
	[[ -s "$gomod" ]]
}

# Every tool is built in one module (interop/go.mod), so Go's minimal version selection picks one version of
# each shared dependency (k8s.io libraries, grpc, protobuf, otel, prometheus) and a package compiled for one
# tool is reused by the next. Brings go.mod in line with versions.env: the staging replaces, then the pins.
sync_module() {
	local replaces current stale=false pin
	replaces=$(cd "$here" && kubernetes_replaces)
	if [[ -z "$replaces" ]]; then
		log "no staging replaces found in k8s.io/kubernetes@$KUBERNETES_VERSION's go.mod"
		exit 1
	fi
	current=$(grep '^replace k8s\.io/' "$here/go.mod" | sort -u || true)
	if [[ "$replaces" != "$current" ]]; then
		log "regenerating the $(wc -l <<<"$replaces") staging replaces in interop/go.mod from k8s.io/kubernetes@$KUBERNETES_VERSION"
		{
			grep -v '^replace k8s\.io/' "$here/go.mod"
			printf '%s\n' "$replaces"
		} >"$here/go.mod.new"
		mv "$here/go.mod.new" "$here/go.mod"
		stale=true
	fi
	for pin in $(pins); do
		[[ "$(required_version "${pin%@*}")" == "${pin#*@}" ]] || stale=true
	done
	$stale || return 0
	log "pinning $(pins | tr '\n' ' ')in interop/go.mod (commit go.mod and go.sum afterwards)"
	# shellcheck disable=SC2046
	(cd "$here" && GOFLAGS=-mod=mod run_go get -tool $(tool_packages) && GOFLAGS=-mod=mod run_go get $(pins) && run_go mod tidy)
	# A pin that another module's requirement lifted is not the pinned version any more: say so and stop.
	for pin in $(pins); do
		local selected
		selected=$(cd "$here" && go list -m -f '{{.Version}}' "${pin%@*}")
		if [[ "$selected" != "${pin#*@}" ]]; then
			log "interop/go.mod selects ${pin%@*} $selected, not the pinned ${pin#*@}: another tool requires a newer one; raise the pin in versions.env"
			exit 1
		fi
	done
}

# `/version` of kube-apiserver and `kubectl version` report these instead of v0.0.0-master.
kubernetes_ldflags() {
	local minor=${KUBERNETES_VERSION#v1.}
	minor=${minor%%.*}
	local commit tree=clean date
	# The proxy's .info records the upstream commit of a tagged version.
	commit=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" 2>/dev/null | awk -F'"' '$2 == "Hash" {print $4; exit}' || true)
	date=$(go list -m -f '{{.Time}}' "k8s.io/kubernetes@$KUBERNETES_VERSION" 2>/dev/null | sed 's/ .*//' || true)
	local flags="-s -w" p
	for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
		flags+=" -X $p.gitVersion=$KUBERNETES_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=$tree"
		[[ -n "$commit" ]] && flags+=" -X $p.gitCommit=$commit"
		[[ -n "$date" ]] && flags+=" -X $p.buildDate=${date}T00:00:00Z"
	done
	printf '%s' "$flags"
}

istio_ldflags() {
	local p=istio.io/istio/pkg/version
	printf '%s' "-s -w -X $p.buildVersion=$ISTIO_VERSION -X $p.buildGitRevision=${ISTIO_VERSION##*-} -X $p.buildStatus=Clean -X $p.buildTag=$ISTIO_VERSION"
}

# Hash of our own program's source: its binary is rebuilt when this changes.
client_source_hash() {
	cat "$here/go.mod" "$here/go.sum" "$here"/istio-agent-client/*.go | sha256sum | cut -c1-16
}

synced=false
build() { # NAME
	local name=$1 out="$bin_dir/$1" start
	if [[ "$name" == istio-agent-client ]]; then
		if [[ -x "$out" && "$(cat "$out.src" 2>/dev/null)" == "$(client_source_hash)" ]]; then
			return
		fi
	elif [[ -x "$out" ]]; then
		return
	fi
	if ! $synced; then
		sync_module
		synced=true
	fi
	mkdir -p "$bin_dir"
	log "building $name into $bin_dir"
	start=$(date +%s)
	case "$name" in
	etcd)
		(cd "$here" && run_go build -trimpath -ldflags "-s -w" -o "$out.tmp" ./etcd)
		;;
	kube-apiserver | kubectl)
		(cd "$here" && run_go build -trimpath -ldflags "$(kubernetes_ldflags)" -o "$out.tmp" "k8s.io/kubernetes/cmd/$name")
		;;
	pilot-agent)
		# The tags of Istio's own agent build (Makefile.core.mk AGENT_TAGS).
		(cd "$here" && run_go build -trimpath -tags agent,disable_pgv,grpcnotrace,retrynotrace -ldflags "$(istio_ldflags)" -o "$out.tmp" istio.io/istio/pilot/cmd/pilot-agent)
		;;
	pilot-discovery)
		# The tags of Istio's own istiod build (Makefile.core.mk STANDARD_TAGS).
		(cd "$here" && run_go build -trimpath -tags vtprotobuf,disable_pgv -ldflags "$(istio_ldflags)" -o "$out.tmp" istio.io/istio/pilot/cmd/pilot-discovery)
		;;
	istio-agent-client)
		# pilot-agent's tags: the client is built like the agent it stands for, and packages compiled for
		# pilot-agent are reused (grpcnotrace changes google.golang.org/grpc, so other tags recompile every
		# package above it; measured 16 s instead of 6 s after pilot-agent).
		(cd "$here" && run_go build -trimpath -tags agent,disable_pgv,grpcnotrace,retrynotrace -o "$out.tmp" ./istio-agent-client)
		client_source_hash >"$out.src"
		;;
	helm)
		(cd "$here" && run_go build -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" -o "$out.tmp" helm.sh/helm/v3/cmd/helm)
		;;
	*)
		log "unknown tool '$name' (known: ${ALL_TOOLS[*]})"
		exit 2
		;;
	esac
	mv "$out.tmp" "$out"
	log "built $name in $(($(date +%s) - start)) s ($(du -m "$out" | cut -f1) MB)"
}

case "${1:-}" in
--bin-dir)
	printf '%s\n' "$bin_dir"
	exit 0
	;;
--list)
	printf '%s\n' "${ALL_TOOLS[@]}"
	exit 0
	;;
-h | --help)
	sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
	exit 0
	;;
esac

tools=("$@")
((${#tools[@]})) || tools=("${ALL_TOOLS[@]}")
total_start=$(date +%s)
for tool in "${tools[@]}"; do
	build "$tool"
done
log "all requested tools present in $bin_dir ($(($(date +%s) - total_start)) s)"
