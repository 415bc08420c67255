#!/usr/bin/env bash
# A real Kubernetes control plane on loopback for the interop tests: etcd + kube-apiserver, no kubelet,
# no controller-manager, no scheduler.
#
#   interop/kube-lab.sh up STATE_DIR [--remote] [--owner-pid PID]
#   interop/kube-lab.sh down STATE_DIR [--purge]
#   interop/kube-lab.sh stop-apiserver|start-apiserver STATE_DIR local|remote
#
# `up` generates a CA, the apiserver's serving cert, an admin client cert (O=system:masters) and kubeconfig,
# a service-account signing key and issuer; starts etcd and kube-apiserver (RBAC, free ports) and waits
# (bounded) for /readyz. `--remote` also starts a second apiserver, a "remote" cluster: its own etcd prefix
# (same etcd), its own CA, SA signing key and issuer. `--owner-pid` makes a watchdog tear the lab down
# when that process exits (tests use it so a crashed test binary leaves nothing running).
# Everything lands in STATE_DIR; STATE_DIR/env lists the kubeconfigs, URLs, pids and log paths.
# `down` stops everything `up` started (pids from STATE_DIR/env) and keeps the logs; with --purge it then
# deletes STATE_DIR unless a file STATE_DIR/keep exists (the tests create it when one fails).
# `stop-apiserver` stops one cluster's kube-apiserver (an outage: etcd stays up); `start-apiserver` starts it
# again with the same port, flags and keys and waits (bounded) for /readyz.
#
# Tools: $PLUGCA_INTEROP_BIN if set, else the folder `interop/tools.sh --bin-dir` prints
# (etcd, kube-apiserver, kubectl; build them with interop/tools.sh etcd kube-apiserver kubectl).
set -Eeuo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
READY_TIMEOUT=${KUBE_LAB_READY_TIMEOUT:-60}

log() { printf 'kube-lab: %s\n' "$*" >&2; }
die() {
	log "$*"
	exit 1
}

bin_dir() {
	if [[ -n "${PLUGCA_INTEROP_BIN:-}" ]]; then
		printf '%s' "$PLUGCA_INTEROP_BIN"
	else
		"$here/tools.sh" --bin-dir
	fi
}

# shellcheck source=interop/ports.sh
source "$(dirname "${BASH_SOURCE[0]}")/ports.sh"

# openssl req+x509 in one: KEY_OUT CERT_OUT SUBJECT EXTENSIONS [CA_CERT CA_KEY] (self-signed without a CA)
make_cert() {
	local key=$1 cert=$2 subj=$3 ext=$4 ca_cert=${5:-} ca_key=${6:-}
	openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$key" 2>/dev/null
	if [[ -z "$ca_cert" ]]; then
		openssl req -x509 -new -key "$key" -subj "$subj" -days 30 -out "$cert" \
			-addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
	else
		openssl req -new -key "$key" -subj "$subj" 2>/dev/null |
			openssl x509 -req -CA "$ca_cert" -CAkey "$ca_key" -CAcreateserial -days 30 -out "$cert" \
				-extfile <(printf '%s\n' "$ext") 2>/dev/null
	fi
}

# Waits until the command succeeds, at most SECONDS; on timeout prints the log's tail and fails.
wait_for() { # SECONDS LOG WHAT CMD...
	local seconds=$1 logf=$2 what=$3
	shift 3
	local deadline=$((SECONDS + seconds))
	until "$@" >/dev/null 2>&1; do
		if ((SECONDS >= deadline)); then
			log "$what not ready after ${seconds}s; last lines of $logf:"
			tail -n 40 "$logf" >&2 || true
			return 1
		fi
		sleep 0.3
	done
}

# Runs START_FN (which starts a server and waits for it) up to 3 times while its LOG says a port was taken.
with_port_retry() { # LOG START_FN ARGS...
	local logf=$1 attempt
	shift
	for attempt in 1 2 3; do
		if "$@"; then return 0; fi
		grep -q 'address already in use' "$logf" 2>/dev/null || return 1
		((attempt < 3)) && log "a port was taken meanwhile (attempt $attempt); retrying with new ports"
	done
	return 1
}

start_etcd() {
	local client_port peer_port
	rm -rf "$state/etcd" # a retry must not find a member bootstrapped with other ports
	client_port=$(free_port)
	peer_port=$(free_port)
	ETCD_URL=http://127.0.0.1:$client_port
	setsid "$bin/etcd" --name lab --data-dir "$state/etcd" \
		--listen-client-urls "$ETCD_URL" --advertise-client-urls "$ETCD_URL" \
		--listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
		--initial-cluster "lab=http://127.0.0.1:$peer_port" --unsafe-no-fsync --log-level warn \
		>"$state/etcd.log" 2>&1 </dev/null &
	ETCD_PID=$!
	record "ETCD_URL=$ETCD_URL" "ETCD_PID=$ETCD_PID" "ETCD_LOG=$state/etcd.log"
	if ! wait_for "${KUBE_LAB_ETCD_TIMEOUT:-60}" "$state/etcd.log" etcd curl -fsS "$ETCD_URL/health"; then
		kill "$ETCD_PID" 2>/dev/null || true
		return 1
	fi
}

# One cluster: NAME (local|remote) and its etcd prefix.
start_apiserver() {
	local name=$1 prefix=$2 dir=$state/$1 port issuer upper
	upper=$(tr '[:lower:]' '[:upper:]' <<<"$name")
	mkdir -p "$dir"
	port=$(free_port)
	issuer="https://kubernetes.default.svc.$name.lab"
	make_cert "$dir/ca.key" "$dir/ca.crt" "/CN=kube-lab-$name-ca" ""
	make_cert "$dir/apiserver.key" "$dir/apiserver.crt" "/CN=kube-apiserver" \
		"$(printf 'subjectAltName=DNS:localhost,DNS:kubernetes.default.svc,IP:127.0.0.1,IP:10.96.0.1\nextendedKeyUsage=serverAuth')" \
		"$dir/ca.crt" "$dir/ca.key"
	make_cert "$dir/admin.key" "$dir/admin.crt" "/O=system:masters/CN=kube-lab-admin" "extendedKeyUsage=clientAuth" \
		"$dir/ca.crt" "$dir/ca.key"
	openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$dir/sa.key" 2>/dev/null
	openssl pkey -in "$dir/sa.key" -pubout -out "$dir/sa.pub" 2>/dev/null

	: >"$dir/apiserver.log"
	launch_apiserver "$name" "$prefix" "$port"
	local pid=$APISERVER_PID
	local kc=$dir/admin.kubeconfig
	local k=("$bin/kubectl" "--kubeconfig=$kc")
	"${k[@]}" config set-cluster "$name" --server="https://127.0.0.1:$port" --certificate-authority="$dir/ca.crt" --embed-certs >/dev/null
	"${k[@]}" config set-credentials admin --client-certificate="$dir/admin.crt" --client-key="$dir/admin.key" --embed-certs >/dev/null
	"${k[@]}" config set-context "$name" --cluster="$name" --user=admin >/dev/null
	"${k[@]}" config use-context "$name" >/dev/null
	record "${upper}_KUBECONFIG=$kc" "${upper}_SERVER=https://127.0.0.1:$port" "${upper}_APISERVER_PID=$pid" \
		"${upper}_APISERVER_LOG=$dir/apiserver.log" "${upper}_ISSUER=$issuer" "${upper}_CA=$dir/ca.crt" \
		"${upper}_ETCD_PREFIX=$prefix"
	if ! wait_for "$READY_TIMEOUT" "$dir/apiserver.log" "kube-apiserver ($name)" "${k[@]}" get --raw /readyz; then
		kill "$pid" 2>/dev/null || true
		return 1
	fi
	log "$name apiserver ready at https://127.0.0.1:$port (kubeconfig $kc)"
}

# Starts the kube-apiserver of cluster NAME (its files already in STATE/NAME) on PORT; sets APISERVER_PID.
launch_apiserver() { # NAME PREFIX PORT
	local name=$1 prefix=$2 port=$3 dir=$state/$1
	# --endpoint-reconciler-type=none: no loopback endpoints for the kubernetes Service (nothing routes there).
	# --disable-admission-plugins=ServiceAccount is not needed: pods name a ServiceAccount that exists (tests create it).
	setsid "$bin/kube-apiserver" --etcd-servers="$ETCD_URL" --etcd-prefix="$prefix" \
		--bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$port" \
		--endpoint-reconciler-type=none \
		--tls-cert-file="$dir/apiserver.crt" --tls-private-key-file="$dir/apiserver.key" --client-ca-file="$dir/ca.crt" \
		--service-account-issuer="https://kubernetes.default.svc.$name.lab" \
		--service-account-key-file="$dir/sa.pub" --service-account-signing-key-file="$dir/sa.key" \
		--service-cluster-ip-range=10.96.0.0/16 --authorization-mode=Node,RBAC --allow-privileged=true \
		--profiling=false --v=1 \
		>>"$dir/apiserver.log" 2>&1 </dev/null &
	APISERVER_PID=$!
}

# The last value of VAR in STATE/env.
env_value() { sed -n "s/^$1=//p" "$state/env" | tail -n1; }

# Kills PID (TERM, then KILL after 5 s) and waits for it to exit.
stop_pid() {
	local pid=$1
	kill "$pid" 2>/dev/null || return 0
	for _ in $(seq 1 50); do
		kill -0 "$pid" 2>/dev/null || return 0
		sleep 0.1
	done
	kill -9 "$pid" 2>/dev/null || true
	for _ in $(seq 1 50); do
		kill -0 "$pid" 2>/dev/null || return 0
		sleep 0.1
	done
}

# `stop-apiserver`/`start-apiserver`: an outage of one cluster's API server (etcd and the other cluster stay up).
apiserver_outage() { # stop|start NAME
	local what=$1 name=$2 upper pid port server
	[[ -f "$state/env" ]] || die "$state/env missing: no lab is running there"
	[[ "$name" == local || "$name" == remote ]] || die "cluster must be local or remote, not '$name'"
	upper=$(tr '[:lower:]' '[:upper:]' <<<"$name")
	pid=$(env_value "${upper}_APISERVER_PID")
	[[ -n "$pid" ]] || die "no $name apiserver in $state/env"
	if [[ "$what" == stop ]]; then
		stop_pid "$pid"
		log "$name apiserver (pid $pid) stopped"
		return
	fi
	kill -0 "$pid" 2>/dev/null && die "$name apiserver (pid $pid) is still running"
	bin=$(env_value BIN_DIR)
	ETCD_URL=$(env_value ETCD_URL)
	server=$(env_value "${upper}_SERVER")
	port=${server##*:}
	# Same port, flags, keys and etcd prefix: clients keep their kubeconfigs and tokens.
	launch_apiserver "$name" "$(env_value "${upper}_ETCD_PREFIX")" "$port"
	record "${upper}_APISERVER_PID=$APISERVER_PID"
	if ! wait_for "$READY_TIMEOUT" "$state/$name/apiserver.log" "kube-apiserver ($name, restarted)" \
		"$bin/kubectl" "--kubeconfig=$(env_value "${upper}_KUBECONFIG")" get --raw /readyz; then
		stop_pid "$APISERVER_PID"
		return 1
	fi
	log "$name apiserver restarted on port $port (pid $APISERVER_PID)"
}

record() { printf '%s\n' "$@" >>"$state/env"; }

# Kills the pids named *_PID in STATE/env (apiservers first, then etcd); waits (bounded) for them to exit.
down() {
	local env=$state/env pid var
	[[ -f "$env" ]] || return 0
	for var in WATCHDOG_PID REMOTE_APISERVER_PID LOCAL_APISERVER_PID ETCD_PID; do
		pid=$(sed -n "s/^$var=//p" "$env" | tail -n1)
		[[ -n "$pid" ]] || continue
		[[ "$var" == WATCHDOG_PID && "$pid" == "${KUBE_LAB_SELF:-}" ]] && continue
		stop_pid "$pid"
	done
	mv "$env" "$env.down"
}

cmd=${1:-}
[[ -n "${2:-}" ]] || die "usage: kube-lab.sh up|down STATE_DIR [--remote] [--owner-pid PID]"
mkdir -p "$2"
state=$(cd "$2" && pwd)
shift 2
case "$cmd" in
stop-apiserver | start-apiserver)
	apiserver_outage "${cmd%-apiserver}" "${1:-}"
	exit
	;;
esac
remote=false owner='' purge=false
while (($#)); do
	case "$1" in
	--remote) remote=true ;;
	--purge) purge=true ;;
	--owner-pid)
		owner=$2
		shift
		;;
	*) die "unknown argument $1" ;;
	esac
	shift
done

case "$cmd" in
up)
	[[ ! -f "$state/env" ]] || die "$state/env exists: a lab is running there (kube-lab.sh down $state first)"
	bin=$(bin_dir)
	for t in etcd kube-apiserver kubectl; do
		[[ -x "$bin/$t" ]] || die "$bin/$t missing: run interop/tools.sh etcd kube-apiserver kubectl"
	done
	: >"$state/env"
	: >"$state/.ports"
	trap 'log "up failed; stopping what started"; down' ERR
	start=$SECONDS
	with_port_retry "$state/etcd.log" start_etcd
	with_port_retry "$state/local/apiserver.log" start_apiserver local /registry
	if $remote; then with_port_retry "$state/remote/apiserver.log" start_apiserver remote /remote-cluster; fi
	record "KUBECONFIG=$state/local/admin.kubeconfig" "BIN_DIR=$bin"
	if [[ -n "$owner" ]]; then
		# Detached from the caller so it outlives this script; exits when the owner does (bounded 1 s polls).
		# shellcheck disable=SC2016 # expanded by the inner bash
		setsid bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 1; done; KUBE_LAB_SELF=$$ exec "$2" down "$3" --purge' \
			watchdog "$owner" "${BASH_SOURCE[0]}" "$state" >/dev/null 2>&1 </dev/null &
		record "WATCHDOG_PID=$!"
	fi
	trap - ERR
	log "lab up in $((SECONDS - start)) s; env in $state/env"
	;;
down)
	down
	if $purge && [[ ! -e "$state/keep" ]]; then rm -rf "$state"; fi
	;;
*)
	die "usage: kube-lab.sh up|down STATE_DIR [--remote] [--owner-pid PID]"
	;;
esac
