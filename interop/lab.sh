#!/usr/bin/env bash
# Istio's control plane on one box with plugca as its CA (issue 11): etcd + kube-apiserver (kube-lab.sh),
# Istio's CRDs and istiod chart from the pinned istio.io/istio module, plugca (cargo-built) with its
# controllers, real istiod (pilot-discovery, ENABLE_CA_SERVER=false) on the istiod-tls plugca wrote, and
# N real pilot-agent sidecars of pods injected by that istiod, all on loopback. No kubelet, no Envoy.
#
#   interop/lab.sh up [--agents N] [STATE_DIR]    # default STATE_DIR: $PLUGCA_LAB_DIR or target/lab
#   interop/lab.sh status [STATE_DIR]
#   interop/lab.sh down [STATE_DIR]
#
# What stands in for the missing pieces:
# - the kubelet: a sync loop (every 2 s) projects Secret istiod-tls and ConfigMap istio-ca-root-cert into
#   the folders where the istiod chart and the injector mount them (the kubelet's atomic ..data symlink swap,
#   which Istio's file watchers are written for), so a CA rotation reaches istiod and the agents;
# - Envoy: each agent runs with DISABLE_ENVOY=true (certificates written to OUTPUT_CERTS) and
#   `istio-agent-client xds` holds an ADS stream on the agent's ./etc/istio/proxy/XDS socket, so the agent's
#   XDS proxy keeps a real stream to istiod (its TLS, its token);
# - cluster DNS: CA_ADDR and the discovery address are localhost:<port> (Istio's clients then check the name
#   istiod.istio-system.svc); the injection webhook is a url webhook https://localhost:<port>/inject.
# The agents' SECRET_TTL is $LAB_SECRET_TTL (default 5m: they renew every 2.5 min).
# Tools: $PLUGCA_INTEROP_BIN if set, else interop/tools.sh builds what is missing. Every wait is bounded
# (LAB_TIMEOUT seconds, default 90). All pids are in STATE_DIR/pids.
set -Eeuo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
TIMEOUT=${LAB_TIMEOUT:-90}
NS="istio-system"
CLUSTER_ID=Kubernetes
CA_ADDRESS=plugca.istio-system.svc:15012
APPS=lab-apps

log() { printf 'lab: %s\n' "$*" >&2; }
die() {
	log "$*"
	exit 1
}
usage() { die "usage: lab.sh up [--agents N] [STATE_DIR] | status [STATE_DIR] | down [STATE_DIR]"; }

# Waits until CMD succeeds, at most TIMEOUT seconds; on timeout prints LOG's tail and fails.
wait_for() { # WHAT LOG CMD...
	local what=$1 logf=$2 deadline=$((SECONDS + TIMEOUT))
	shift 2
	until "$@" >/dev/null 2>&1; do
		if ((SECONDS >= deadline)); then
			log "$what: not within ${TIMEOUT}s; last lines of $logf:"
			tail -n 30 "$logf" >&2 || true
			return 1
		fi
		sleep 0.5
	done
}

# shellcheck source=interop/ports.sh
source "$(dirname "${BASH_SOURCE[0]}")/ports.sh"

record() { printf '%s\n' "$@" >>"$state/env"; }

# Starts CMD... detached in folder DIR with its output in LOG, and records its pid as NAME in STATE/pids
# (exec: the recorded pid is the program itself, so `down` stops it).
spawn() { # NAME DIR LOG CMD...
	local name=$1 dir=$2 logf=$3
	shift 3
	(cd "$dir" && exec setsid "$@" >"$logf" 2>&1 </dev/null) &
	echo "$name=$!" >>"$state/pids"
}
pid_of() { sed -n "s/^$1=//p" "$state/pids" 2>/dev/null | tail -n1; }
k() { "$bin/kubectl" --kubeconfig="$kubeconfig" --request-timeout=30s "$@"; }

# The kubelet's atomic volume update: DIR gets NAME files from the given sources (NAME=SRC_FILE ...).
project() {
	local dir=$1 version name src
	shift
	mkdir -p "$dir"
	version="..$(date +%s%N)"
	mkdir "$dir/$version"
	for spec in "$@"; do
		name=${spec%%=*} src=${spec#*=}
		cp "$src" "$dir/$version/$name"
	done
	ln -sfn "$version" "$dir/..data_tmp"
	mv -T "$dir/..data_tmp" "$dir/..data"
	for spec in "$@"; do
		name=${spec%%=*}
		[[ -L "$dir/$name" ]] || ln -s "..data/$name" "$dir/$name"
	done
	find "$dir" -maxdepth 1 -name '..*' ! -name '..data' ! -name "$version" -type d -exec rm -rf {} +
}

# One pass of the kubelet stand-in: istiod's two mounts and each agent's root mount, when they changed.
sync_once() {
	local tmp=$state/.sync
	mkdir -p "$tmp"
	if k -n "$NS" get secret istiod-tls -o json >"$tmp/secret.json" 2>/dev/null; then
		for key in tls.crt tls.key ca.crt; do
			jq -r --arg k "$key" '.data[$k] // empty' "$tmp/secret.json" | base64 -d >"$tmp/$key"
		done
		if [[ -s "$tmp/tls.crt" ]] && ! cmp -s "$tmp/tls.crt" "$state/istiod/var/run/secrets/istiod/tls/tls.crt"; then
			project "$state/istiod/var/run/secrets/istiod/tls" "tls.crt=$tmp/tls.crt" "tls.key=$tmp/tls.key" "ca.crt=$tmp/ca.crt"
		fi
	fi
	for target in "$state/istiod/var/run/secrets/istiod/ca=$NS" $(cat "$state/agents" 2>/dev/null); do
		local dir=${target%%=*} ns=${target#*=}
		if k -n "$ns" get configmap istio-ca-root-cert -o jsonpath='{.data.root-cert\.pem}' >"$tmp/roots" 2>/dev/null &&
			[[ -s "$tmp/roots" ]] && ! cmp -s "$tmp/roots" "$dir/root-cert.pem"; then
			project "$dir" "root-cert.pem=$tmp/roots"
		fi
	done
}

cmd_up() {
	local agents=3
	while (($#)); do
		case "$1" in
		--agents)
			agents=$2
			shift
			;;
		-*) usage ;;
		*) state_arg=$1 ;;
		esac
		shift
	done
	state_dir
	[[ ! -f "$state/pids" ]] || die "$state/pids exists: a lab is running there (interop/lab.sh down $state first)"
	local started=$SECONDS t
	command -v jq >/dev/null || die "jq is needed (apt-get install jq)"

	t=$SECONDS
	local tool
	if [[ -n "${PLUGCA_INTEROP_BIN:-}" ]]; then
		bin=$PLUGCA_INTEROP_BIN
	else
		"$here/tools.sh" etcd kube-apiserver kubectl pilot-agent pilot-discovery istio-agent-client helm >&2
		bin=$("$here/tools.sh" --bin-dir)
	fi
	for tool in etcd kube-apiserver kubectl pilot-agent pilot-discovery istio-agent-client helm; do
		[[ -x "$bin/$tool" ]] || die "$bin/$tool missing (interop/tools.sh $tool)"
	done
	(cd "$repo" && cargo build --quiet --bin plugca)
	local plugca=$repo/target/debug/plugca
	log "tools and plugca ready in $((SECONDS - t)) s"
	local istio
	istio=$(GOFLAGS=-mod=mod go env GOMODCACHE)/istio.io/istio@$(sed -n 's/^ISTIO_VERSION=//p' "$here/versions.env")
	[[ -f "$istio/manifests/charts/base/files/crd-all.gen.yaml" ]] || die "Istio's source is not at $istio"

	# A fresh lab: nothing of an earlier one (stale certificates would satisfy the waits).
	rm -rf "$state/kube" "$state/istiod" "$state/agents.d" "$state/cacerts" "$state/root" "$state/.sync" "$state/pids.down"
	mkdir -p "$state"
	: >"$state/env"
	: >"$state/pids"
	: >"$state/.ports"
	: >"$state/agents"
	trap 'log "up failed; stopping what started (logs kept in $state)"; cmd_down_inner' ERR

	t=$SECONDS
	PLUGCA_INTEROP_BIN=$bin "$here/kube-lab.sh" up "$state/kube"
	kubeconfig=$state/kube/local/admin.kubeconfig
	record "KUBECONFIG=$kubeconfig" "BIN_DIR=$bin"
	k apply --server-side --force-conflicts -f "$istio/manifests/charts/base/files/crd-all.gen.yaml" >/dev/null
	k create namespace "$NS" >/dev/null
	# The istiod chart with the values docs/istio-with-plugca.md recommends; its mesh and injector ConfigMaps.
	"$bin/helm" template istiod "$istio/manifests/charts/istio-control/istio-discovery" -n "$NS" \
		--set global.caAddress=$CA_ADDRESS --set env.ENABLE_CA_SERVER=false >"$state/istiod-chart.yaml"
	k create --dry-run=client -o json -f "$state/istiod-chart.yaml" | jq -s '.' >"$state/istiod-chart.json"
	jq '{apiVersion: "v1", kind: "List", items: [.[] | select(.kind == "ConfigMap" and (.metadata.name == "istio" or .metadata.name == "istio-sidecar-injector"))]}' \
		"$state/istiod-chart.json" | k apply --server-side --force-conflicts -f - >/dev/null
	log "kube-apiserver, CRDs and the istiod chart's ConfigMaps in $((SECONDS - t)) s"

	# plugca on a plugged intermediate made by its own toolkit.
	t=$SECONDS
	"$plugca" certs root --out "$state/root" >/dev/null
	"$plugca" certs intermediate --root "$state/root" --name lab --out "$state/cacerts" >/dev/null
	local grpc mon
	grpc=$(free_port) mon=$(free_port)
	spawn PLUGCA "$state" "$state/plugca.log" "$plugca" serve --cacerts-dir "$state/cacerts" \
		--grpc-addr "127.0.0.1:$grpc" --monitoring-addr "127.0.0.1:$mon" \
		--kubeconfig "$kubeconfig" --cluster-id "$CLUSTER_ID" --root-configmap --istiod-tls-secret \
		--istiod-namespace "$NS" --istiod-extra-dns-names localhost --leader-election-namespace "$NS" \
		--pod-name plugca-lab-0 --reload-interval 2s
	record "PLUGCA_GRPC=127.0.0.1:$grpc" "PLUGCA_MONITORING=127.0.0.1:$mon" "PLUGCA_LOG=$state/plugca.log"
	wait_for "plugca /ready" "$state/plugca.log" curl -fsS "http://127.0.0.1:$mon/ready"
	mkdir -p "$state/istiod"
	wait_for "istiod-tls and istio-system's istio-ca-root-cert" "$state/plugca.log" \
		bash -c "k() { \"$bin/kubectl\" --kubeconfig=\"$kubeconfig\" \"\$@\"; }; k -n $NS get secret istiod-tls && k -n $NS get configmap istio-ca-root-cert"
	sync_once
	[[ -f "$state/istiod/var/run/secrets/istiod/tls/tls.crt" ]] || die "istiod-tls was not projected"
	log "plugca ready, istiod-tls written, in $((SECONDS - t)) s"

	# The kubelet stand-in.
	# shellcheck disable=SC2016 # expanded by the inner bash
	setsid bash -c 'while :; do "$1" _sync "$2" 2>>"$2/sync.log"; sleep 2; done' sync "${BASH_SOURCE[0]}" "$state" \
		>/dev/null 2>&1 </dev/null &
	echo "SYNC=$!" >>"$state/pids"

	# istiod: the chart's env (plain values), ports off plugca's and each other's.
	t=$SECONDS
	local http xds grpc_plain https imon ctrlz
	http=$(free_port) xds=$(free_port) grpc_plain=$(free_port) https=$(free_port) imon=$(free_port) ctrlz=$(free_port)
	local -a ienv=()
	mapfile -d '' -t ienv < <(jq -j '.[] | select(.kind == "Deployment" and .metadata.name == "istiod") |
		.spec.template.spec.containers[0].env[] | select(.value != null and .name != "KUBECONFIG") | "\(.name)=\(.value)\u0000"' \
		"$state/istiod-chart.json")
	spawn ISTIOD "$state/istiod" "$state/istiod.log" env -i PATH="$PATH" HOME="$state/istiod" "${ienv[@]}" \
		POD_NAME=istiod-lab-0 POD_NAMESPACE=$NS SERVICE_ACCOUNT=istiod \
		"$bin/pilot-discovery" discovery --kubeconfig="$kubeconfig" --domain cluster.local \
		--httpAddr="127.0.0.1:$http" --grpcAddr="127.0.0.1:$grpc_plain" --secureGRPCAddr="127.0.0.1:$xds" \
		--httpsAddr="127.0.0.1:$https" --monitoringAddr="127.0.0.1:$imon" --ctrlz_port="$ctrlz"
	record "ISTIOD_XDS=127.0.0.1:$xds" "ISTIOD_HTTP=127.0.0.1:$http" "ISTIOD_WEBHOOK=127.0.0.1:$https" \
		"ISTIOD_MONITORING=127.0.0.1:$imon" "ISTIOD_LOG=$state/istiod.log"
	wait_for "istiod /ready" "$state/istiod.log" curl -fsS "http://127.0.0.1:$http/ready"
	wait_for "istiod's secure XDS port" "$state/istiod.log" grep -q "starting secure gRPC discovery service" "$state/istiod.log"
	log "istiod ready in $((SECONDS - t)) s"

	# The injection webhook (url: no Services route here), then N injected pods and their agents.
	t=$SECONDS
	jq -n --arg url "https://localhost:$https/inject" --arg ca "$(base64 -w0 <"$state/cacerts/root-cert.pem")" '{
		apiVersion: "admissionregistration.k8s.io/v1", kind: "MutatingWebhookConfiguration",
		metadata: {name: "istio-sidecar-injector-lab"},
		webhooks: [{name: "sidecar-injector.istio.io", clientConfig: {url: $url, caBundle: $ca},
			rules: [{operations: ["CREATE"], apiGroups: [""], apiVersions: ["v1"], resources: ["pods"]}],
			namespaceSelector: {matchLabels: {"istio-injection": "enabled"}},
			sideEffects: "None", admissionReviewVersions: ["v1"], failurePolicy: "Fail", timeoutSeconds: 10}]}' |
		k apply --server-side -f - >/dev/null
	k create namespace "$APPS" >/dev/null
	k label namespace "$APPS" istio-injection=enabled >/dev/null
	k -n "$APPS" create serviceaccount sleep >/dev/null
	local i pod dir status_port proxy_config
	for i in $(seq 1 "$agents"); do
		pod=sleep-$i dir=$state/agents.d/$pod
		mkdir -p "$dir/var/run/secrets/tokens" "$dir/var/run/secrets/istio" "$dir/etc/istio/proxy" "$dir/out"
		local podjson="{\"apiVersion\":\"v1\",\"kind\":\"Pod\",\"metadata\":{\"name\":\"$pod\",\"namespace\":\"$APPS\",\"labels\":{\"app\":\"sleep\"}},\"spec\":{\"nodeName\":\"lab-node\",\"serviceAccountName\":\"sleep\",\"containers\":[{\"name\":\"sleep\",\"image\":\"none.invalid/none\"}]}}"
		wait_for "pod $pod through istiod's webhook" "$state/istiod.log" bash -c "echo '$podjson' | \"$bin/kubectl\" --kubeconfig=\"$kubeconfig\" create -f -"
		echo "$dir/var/run/secrets/istio=$APPS" >>"$state/agents"
	done
	wait_for "istio-ca-root-cert in $APPS" "$state/plugca.log" k -n "$APPS" get configmap istio-ca-root-cert
	sync_once
	for i in $(seq 1 "$agents"); do
		pod=sleep-$i dir=$state/agents.d/$pod
		k -n "$APPS" create token sleep --audience istio-ca --bound-object-kind Pod --bound-object-name "$pod" \
			--duration 12h >"$state/.sync/token"
		project "$dir/var/run/secrets/tokens" "istio-token=$state/.sync/token"
		rm -f "$state/.sync/token"
		# The injected istio-proxy env (plain values), then what one box needs instead of DNS, Envoy and 15020.
		local -a aenv=()
		# NUL-separated: some values (ISTIO_META_POD_PORTS) span lines.
		mapfile -d '' -t aenv < <(k -n "$APPS" get pod "$pod" -o json | jq -j '[.spec.initContainers[]?, .spec.containers[]] |
			map(select(.name == "istio-proxy"))[0].env[] | select(.value != null and .name != "PROXY_CONFIG") | "\(.name)=\(.value)\u0000"')
		status_port=$(free_port)
		proxy_config=$(k -n "$APPS" get pod "$pod" -o json | jq -c --arg d "localhost:$xds" --argjson p "$status_port" \
			'[.spec.initContainers[]?, .spec.containers[]] | map(select(.name == "istio-proxy"))[0].env[] |
			select(.name == "PROXY_CONFIG") | .value | fromjson | .discoveryAddress = $d | .statusPort = $p')
		spawn "AGENT_$i" "$dir" "$dir/agent.log" env -i PATH="$PATH" HOME="$dir" "${aenv[@]}" \
			POD_NAME="$pod" POD_NAMESPACE="$APPS" SERVICE_ACCOUNT=sleep INSTANCE_IP=127.0.0.1 HOST_IP=127.0.0.1 \
			ISTIO_META_NODE_NAME=lab-node CA_ADDR="localhost:$grpc" PROXY_CONFIG="$proxy_config" \
			DISABLE_ENVOY=true OUTPUT_CERTS="$dir/out" SECRET_TTL="${LAB_SECRET_TTL:-5m}" \
			"$bin/pilot-agent" proxy sidecar
		wait_for "$pod's XDS socket" "$dir/agent.log" test -S "$dir/etc/istio/proxy/XDS"
		spawn "XDS_$i" "$dir" "$dir/xds.log" "$bin/istio-agent-client" xds -uds etc/istio/proxy/XDS \
			-pod-namespace "$APPS" -pod-name "$pod" -service-account sleep -cluster-id "$CLUSTER_ID"
		record "AGENT_${i}_DIR=$dir"
	done
	for i in $(seq 1 "$agents"); do
		dir=$state/agents.d/sleep-$i
		wait_for "sleep-$i's certificate from plugca" "$dir/agent.log" test -s "$dir/out/cert-chain.pem"
	done
	wait_for "istiod lists $agents XDS clients" "$state/istiod.log" \
		bash -c "curl -fsS http://127.0.0.1:$http/debug/connections | jq -e '.totalClients == $agents'"
	log "$agents agents certified and connected in $((SECONDS - t)) s"
	trap - ERR
	log "lab up in $((SECONDS - started)) s"
	cmd_status
}

cmd_status() {
	[[ -f "$state/env" && -f "$state/pids" ]] || die "no lab running in $state (interop/lab.sh up)"
	# shellcheck disable=SC1091,SC2153 # written by up: KUBECONFIG, PLUGCA_*, ISTIOD_*
	. "$state/env"
	local name pid
	echo "lab in $state"
	while IFS='=' read -r name pid; do
		if kill -0 "$pid" 2>/dev/null; then echo "  $name pid $pid running"; else echo "  $name pid $pid NOT RUNNING"; fi
	done <"$state/pids"
	# shellcheck disable=SC2153 # KUBECONFIG comes from STATE/env
	cat <<EOF
kube-apiserver   $(sed -n 's/^LOCAL_SERVER=//p' "$state/kube/env" 2>/dev/null)   export KUBECONFIG=$KUBECONFIG
plugca           gRPC $PLUGCA_GRPC  monitoring http://$PLUGCA_MONITORING/metrics  log $PLUGCA_LOG
                 bundle $state/cacerts (hot-reloaded: rotate with $repo/target/debug/plugca certs intermediate --root $state/root --name lab --out $state/cacerts --force)
istiod           secure XDS $ISTIOD_XDS  http $ISTIOD_HTTP  webhooks $ISTIOD_WEBHOOK  monitoring $ISTIOD_MONITORING  log $ISTIOD_LOG
EOF
	local dir
	for dir in "$state"/agents.d/*; do
		[[ -d "$dir" ]] || continue
		printf 'agent %-10s %s\n' "$(basename "$dir")" "$(openssl x509 -in "$dir/out/cert-chain.pem" -noout -serial -enddate -ext subjectAltName 2>/dev/null | tr '\n' ' ')"
	done
	echo "istiod's XDS clients: $(curl -fsS --max-time 5 "http://$ISTIOD_HTTP/debug/connections" 2>/dev/null || echo unreachable)"
	cat <<EOF
Look at it:
  openssl s_client -connect $ISTIOD_XDS -CAfile $state/cacerts/root-cert.pem -verify_hostname istiod.istio-system.svc </dev/null | grep 'Verify return'
  openssl verify -CAfile $state/cacerts/root-cert.pem -untrusted $state/agents.d/sleep-1/out/cert-chain.pem $state/agents.d/sleep-1/out/cert-chain.pem
  curl -s http://$ISTIOD_HTTP/debug/connections      # XDS streams istiod holds (one per agent)
  curl -s http://$PLUGCA_MONITORING/metrics | grep -E '^plugca_(request_duration_seconds_count|ca_reloads)'
  kubectl get configmap -A | grep istio-ca-root-cert; kubectl -n $NS get secret istiod-tls
  cat $state/agents.d/sleep-1/xds.log                 # the ADS responses that reached the stand-in for Envoy
EOF
}

# Stops every process in STATE/pids (agents first, istiod, plugca, then the apiserver and etcd); keeps the logs.
cmd_down_inner() {
	local name pid
	if [[ -f "$state/pids" ]]; then
		for pfx in XDS_ AGENT_ SYNC ISTIOD PLUGCA; do
			while IFS='=' read -r name pid; do
				[[ "$name" == "$pfx"* && -n "$pid" ]] || continue
				kill "$pid" 2>/dev/null || continue
				for _ in $(seq 1 50); do
					kill -0 "$pid" 2>/dev/null || break
					sleep 0.1
				done
				kill -9 "$pid" 2>/dev/null || true
			done <"$state/pids"
		done
		mv "$state/pids" "$state/pids.down"
	fi
	if [[ -f "$state/kube/env" ]]; then "$here/kube-lab.sh" down "$state/kube"; fi
}

state_dir() {
	local d=${state_arg:-${PLUGCA_LAB_DIR:-$repo/target/lab}}
	mkdir -p "$d"
	state=$(cd "$d" && pwd)
}

state_arg=''
cmd=${1:-}
(($#)) && shift
case "$cmd" in
up) cmd_up "$@" ;;
status)
	state_arg=${1:-}
	state_dir
	cmd_status
	;;
down)
	state_arg=${1:-}
	state_dir
	cmd_down_inner
	log "lab in $state stopped (logs kept there)"
	;;
_sync)
	state_arg=$1
	state_dir
	# shellcheck disable=SC1091 # written by up
	. "$state/env"
	kubeconfig=$KUBECONFIG bin=$BIN_DIR
	sync_once
	;;
*) usage ;;
esac
