#!/usr/bin/env bash
# plugca against the CAs a user would run instead, in one run on this box (issue 14):
# istiod's own CA (pilot-discovery, CA on, the same plugged cacerts) and cfssl 1.2,
# plus plugca's own load generator and its offline ceiling. Prints one table.
#
#   bench/compare.sh                 everything (installs what is missing first)
#   bench/compare.sh --duration 10s  seconds per row (default 15s)
#   bench/compare.sh --quick         the P-256 rows only (no RSA, no ring, no burst)
#   bench/compare.sh --no-ring       everything but the ring rows (saves that release build)
#   bench/compare.sh --no-install    fail instead of installing a missing tool
#   bench/compare.sh --keep DIR      keep the work folder (CA, tokens, logs, raw reports) in DIR
#   PLUGCA_BIN=... PLUGCA_RING_BIN=... bench/compare.sh   measure these binaries, build nothing of plugca
#
# Every server listens on 127.0.0.1 only and every load generator talks to it only; each row runs for a
# bounded time. What it installs when missing (the project's own steps, nothing fetched by hand):
#   - Debian golang-cfssl and wrk (apt-get), openssl;
#   - ghz (the gRPC load generator the project did not write) with `go install` from the Go module proxy
#     into ${PLUGCA_BENCH_DIR:-~/.cache/plugca-bench}/ghz-<version>-<go stamp>/ (GHZ_VERSION below);
#   - etcd, kube-apiserver, kubectl, pilot-discovery through interop/tools.sh (pinned in interop/versions.env);
#   - plugca itself: cargo build --release (aws-lc-rs, the default backend), and --no-default-features (ring)
#     copied to target/release/plugca-ring.
#
# Authentication is the same for both gRPC servers and both are loaded by the same ghz command:
#   mtls  client-certificate renewal with a workload certificate plugca issued (same root for both);
#   kube  a service-account token (audience istio-ca) that each server reviews with the lab's real
#         kube-apiserver (TokenReview); plugca's review cache stays on (its hit rate is printed) and one
#         row turns it off (--token-review-cache-ttl 0s) to compare review against review.
# Server CPU is utime+stime of the server process from /proc/<pid>/stat around the load; peak RSS is VmHWM,
# reset before each row (clear_refs 5). kube rows also give the kube-apiserver's CPU per certificate.
set -Eeuo pipefail

GHZ_VERSION=v0.121.0
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

duration=15s
quick=0
ring=1
install=1
keep=""
concurrency=64
connections=8
while (($#)); do
	case "$1" in
	--duration) duration=$2; shift 2 ;;
	--quick) quick=1; ring=0; shift ;;
	--no-ring) ring=0; shift ;;
	--no-install) install=0; shift ;;
	--keep) keep=$2; shift 2 ;;
	--concurrency) concurrency=$2; shift 2 ;;
	--connections) connections=$2; shift 2 ;;
	-h | --help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "${BASH_SOURCE[0]}"; exit 0 ;;
	*) echo "compare.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
	esac
done
secs=${duration%s}
[[ "$secs" =~ ^[0-9]+$ ]] || { echo "compare.sh: --duration wants whole seconds like 15s, got '$duration'" >&2; exit 2; }

log() { printf 'compare: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

# ---------------------------------------------------------------- tools
need_apt() { # PACKAGE COMMAND
	command -v "$2" >/dev/null && return
	((install)) || die "$2 is missing (apt-get install $1)"
	log "installing Debian $1"
	if ! apt-get install -y -q "$1" >/dev/null 2>&1; then
		apt-get update -q >/dev/null && apt-get install -y -q "$1" >/dev/null
	fi
	command -v "$2" >/dev/null || die "apt-get install $1 gave no $2"
}
need_apt golang-cfssl cfssl
need_apt wrk wrk
need_apt openssl openssl
need_apt python3 python3
need_apt curl curl
command -v go >/dev/null || die "go is missing (needed for ghz and the interop tools)"

ghz_dir="${PLUGCA_BENCH_DIR:-$HOME/.cache/plugca-bench}/ghz-$GHZ_VERSION-$(go version | sha256sum | cut -c1-8)"
GHZ=$ghz_dir/ghz
if [[ ! -x "$GHZ" ]]; then
	((install)) || die "ghz is missing ($GHZ)"
	log "building ghz $GHZ_VERSION into $ghz_dir"
	mkdir -p "$ghz_dir"
	GOBIN=$ghz_dir GOTOOLCHAIN=local CGO_ENABLED=0 nice -n 10 go install "github.com/bojand/ghz/cmd/ghz@$GHZ_VERSION"
fi

"$repo/interop/tools.sh" etcd kube-apiserver kubectl pilot-discovery
BIN_DIR=$("$repo/interop/tools.sh" --bin-dir)

# PLUGCA_BIN / PLUGCA_RING_BIN: measure these binaries instead of building (e.g. a before/after pair).
PLUGCA=${PLUGCA_BIN:-$repo/target/release/plugca}
PLUGCA_RING=${PLUGCA_RING_BIN:-$repo/target/release/plugca-ring}
if [[ -z "${PLUGCA_BIN:-}" ]]; then
	log "building plugca (release)"
	(cd "$repo" && cargo build --release -q)
fi
if ((ring)) && [[ -z "${PLUGCA_RING_BIN:-}" ]]; then
	log "building plugca --no-default-features (ring, release)"
	# Same target dir: cargo keeps both feature sets' artifacts side by side; the binary is copied away.
	(cd "$repo" && cargo build --release -q --no-default-features && cp target/release/plugca "$PLUGCA_RING" && cargo build --release -q)
fi
[[ -x "$PLUGCA" ]] || die "no plugca binary at $PLUGCA"

# ---------------------------------------------------------------- work folder, CA, lab
if [[ -n "$keep" ]]; then
	mkdir -p "$keep"
	W=$(cd "$keep" && pwd)
else
	W=$(mktemp -d /tmp/plugca-compare.XXXXXX)
fi
pids=()
cleanup() {
	local p
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
	if [[ -f "$W/lab/env" ]]; then "$repo/interop/kube-lab.sh" down "$W/lab" >/dev/null 2>&1 || true; fi
	[[ -z "$keep" ]] && rm -rf "$W"
	return 0
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { # URL SECONDS WHAT
	local i
	for ((i = 0; i < $2 * 10; i++)); do
		curl -fsk -o /dev/null "$1" 2>/dev/null && return
		sleep 0.1
	done
	die "$3 did not answer $1 within $2 s"
}
wait_tcp() { # PORT SECONDS WHAT
	local i
	for ((i = 0; i < $2 * 10; i++)); do
		(exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return
		sleep 0.1
	done
	die "$3 did not listen on 127.0.0.1:$1 within $2 s"
}

make_ca() { # KEY DIR
	"$PLUGCA" certs root --key "$1" --out "$2/root" >/dev/null
	"$PLUGCA" certs intermediate --root "$2/root" --key "$1" --name bench --out "$2/cacerts" >/dev/null
}
log "work folder $W"
make_ca p256 "$W/p256"
((quick)) || make_ca rsa2048 "$W/rsa2048"

log "starting the Kubernetes lab (etcd + kube-apiserver)"
PLUGCA_INTEROP_BIN=$BIN_DIR "$repo/interop/kube-lab.sh" up "$W/lab" --owner-pid $$ >"$W/lab.log" 2>&1 || { cat "$W/lab.log" >&2; die "kube-lab did not start"; }
# shellcheck disable=SC1091
. "$W/lab/env"
export KUBECONFIG
kubectl() { "$BIN_DIR/kubectl" "$@"; }
kubectl create namespace istio-system >/dev/null
kubectl create namespace bench >/dev/null
kubectl -n bench create serviceaccount w0 >/dev/null
kubectl -n bench create token w0 --audience istio-ca --duration 2h >"$W/token"

# One P-256 CSR for the ghz rows (the servers put the caller's identity in the leaf, not the CSR's).
openssl ecparam -name prime256v1 -genkey -noout -out "$W/w0.key" 2>/dev/null
openssl req -new -key "$W/w0.key" -subj "/" -addext "subjectAltName=URI:spiffe://cluster.local/ns/bench/sa/w0" -out "$W/w0.csr" 2>/dev/null
python3 -c 'import json,sys; print(json.dumps({"csr": open(sys.argv[1]).read(), "validityDuration": 3600}))' "$W/w0.csr" >"$W/csr.json"

# ---------------------------------------------------------------- servers
proc_cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
proc_hwm_kb() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
reset_hwm() { echo 5 >"/proc/$1/clear_refs" 2>/dev/null || true; }
CLK=$(getconf CLK_TCK)

start_plugca() { # NAME CACERTS_DIR EXTRA_ARGS... ; sets PLUGCA_PORT PLUGCA_MON PLUGCA_PID
	local name=$1 dir=$2
	shift 2
	PLUGCA_PORT=$(free_port)
	PLUGCA_MON=$(free_port)
	"$PLUGCA" serve --grpc-addr "127.0.0.1:$PLUGCA_PORT" --monitoring-addr "127.0.0.1:$PLUGCA_MON" \
		--cacerts-dir "$dir" --kubeconfig "$KUBECONFIG" --log-format json "$@" >"$W/$name.log" 2>&1 &
	PLUGCA_PID=$!
	pids+=("$PLUGCA_PID")
	wait_http "http://127.0.0.1:$PLUGCA_MON/ready" 60 "plugca ($name)"
}

start_istiod() { # CACERTS_DIR ; sets ISTIOD_PORT ISTIOD_PID
	local d=$W/istiod
	mkdir -p "$d/etc"
	cp -r "$1" "$d/etc/cacerts"
	ISTIOD_PORT=$(free_port)
	# istiod reads the plugged CA from ./etc/cacerts (ROOT_CA_DIR's default) in its working directory.
	(cd "$d" && exec env POD_NAMESPACE=istio-system POD_NAME=istiod-bench PILOT_ENABLE_ANALYSIS=false \
		"$BIN_DIR/pilot-discovery" discovery --kubeconfig "$KUBECONFIG" --meshConfig /dev/null \
		--httpAddr "127.0.0.1:$(free_port)" --grpcAddr "127.0.0.1:$(free_port)" \
		--secureGRPCAddr "127.0.0.1:$ISTIOD_PORT" --monitoringAddr "127.0.0.1:$(free_port)" \
		--httpsAddr "127.0.0.1:$(free_port)" --ctrlz_port "$(free_port)") >"$W/istiod.log" 2>&1 &
	ISTIOD_PID=$!
	pids+=("$ISTIOD_PID")
	wait_tcp "$ISTIOD_PORT" 120 istiod
	grep -q "Use local CA certificate" "$W/istiod.log" || die "istiod's log does not say it uses the plugged cacerts (see $W/istiod.log)"
}

# ---------------------------------------------------------------- rows
rows="$W/rows.tsv"
: >"$rows"
# row NAME LOADGEN AUTH ISSUED_PER_S CPU_US P50_MS P99_MS ERRORS PEAK_RSS_MB APISERVER_US NOTE
row() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$rows"; }

before_load() { # SERVER_PID
	reset_hwm "$1"
	T0=$(proc_cpu_ticks "$1")
	A0=$(proc_cpu_ticks "$LOCAL_APISERVER_PID")
}
after_load() { # SERVER_PID -> CPU_S APISERVER_S PEAK_MB
	CPU_S=$(awk -v a="$T0" -v b="$(proc_cpu_ticks "$1")" -v c="$CLK" 'BEGIN {printf "%.3f", (b - a) / c}')
	API_S=$(awk -v a="$A0" -v b="$(proc_cpu_ticks "$LOCAL_APISERVER_PID")" -v c="$CLK" 'BEGIN {printf "%.3f", (b - a) / c}')
	PEAK_MB=$(awk -v k="$(proc_hwm_kb "$1")" 'BEGIN {printf "%.1f", k / 1024}')
}

# ghz NAME SERVER_PID PORT AUTH
run_ghz() {
	local name=$1 pid=$2 port=$3 auth=$4 args=()
	case "$auth" in
	mtls) args=(--cert "$W/client/cert-chain.pem" --key "$W/client/key.pem") ;;
	kube) args=(--metadata "{\"authorization\":\"Bearer $(cat "$W/token")\"}") ;;
	esac
	log "row: $name (ghz, $auth, $concurrency concurrent over $connections connections, $duration)"
	before_load "$pid"
	"$GHZ" --proto "$repo/proto/istio/v1/auth/ca.proto" --import-paths "$repo/proto" \
		--call istio.v1.auth.IstioCertificateService.CreateCertificate \
		--cacert "$W/p256/cacerts/root-cert.pem" --cname istiod.istio-system.svc \
		-D "$W/csr.json" -c "$concurrency" --connections "$connections" -z "$duration" --timeout 10s \
		"${args[@]}" -O json "127.0.0.1:$port" >"$W/$name.ghz.json" 2>"$W/$name.ghz.err" || true
	after_load "$pid"
	python3 - "$W/$name.ghz.json" "$CPU_S" "$API_S" "$PEAK_MB" "$name" "$auth" "$rows" "$5" "$concurrency" <<'EOF'
import json, sys
path, cpu, api, peak, name, auth, rows, note, conc = sys.argv[1:10]
try:
    r = json.load(open(path))
except Exception as e:
    r = {}
ok = r.get("statusCodeDistribution", {}).get("OK", 0)
total = r.get("count", 0)
secs = r.get("total", 0) / 1e9 or 1
lat = {int(d["percentage"]): d["latency"] / 1e6 for d in r.get("latencyDistribution") or []}
# ghz cancels the requests still in flight when -z runs out (its connections close under them):
# at most one per concurrent request, and not server errors.
cut = sum(v for k, v in (r.get("errorDistribution") or {}).items()
          if "error reading from server" in k or "client connection is closing" in k)
if cut > int(conc):
    cut = 0
errs = total - ok - cut
codes = {k: v for k, v in r.get("statusCodeDistribution", {}).items() if k != "OK"}
if cut:
    codes["Unavailable"] = codes.get("Unavailable", 0) - cut
    codes = {k: v for k, v in codes.items() if v}
cpu_us = float(cpu) * 1e6 / ok if ok else 0
api_us = float(api) * 1e6 / ok if ok and auth == "kube" else 0
with open(rows, "a") as f:
    f.write("\t".join([name, "ghz", auth, f"{ok/secs:.0f}", f"{cpu_us:.0f}", f"{lat.get(50,0):.1f}",
                       f"{lat.get(99,0):.1f}", f"{errs}" + (f" {codes}" if codes else ""), peak,
                       f"{api_us:.0f}" if api_us else "-", note]) + "\n")
EOF
}

# plugca bench NAME AUTH [bench args...] against the running plugca
run_plugca_bench_remote() {
	local name=$1 auth=$2 args=()
	shift 2
	case "$auth" in
	mtls) args=(--auth mtls --client-cert "$W/client/cert-chain.pem" --client-key "$W/client/key.pem") ;;
	kube) args=(--auth jwt --token-file "$W/token") ;;
	esac
	log "row: $name (plugca bench, $auth, $duration)"
	before_load "$PLUGCA_PID"
	"$PLUGCA" bench --addr "127.0.0.1:$PLUGCA_PORT" --root-cert "$W/p256/cacerts/root-cert.pem" \
		--server-name istiod.istio-system.svc --cacerts-dir "$W/p256/cacerts" --no-ceiling --csr-mix p256 \
		--concurrency "$concurrency" --connections "$connections" --duration "$duration" --requests 10000000 \
		"${args[@]}" "$@" --json >"$W/$name.bench.json" 2>"$W/$name.bench.err" || true
	after_load "$PLUGCA_PID"
	bench_row "$W/$name.bench.json" "$name" "plugca bench" "$auth" "$CPU_S" "$API_S" "$PEAK_MB" ""
}

# bench_row JSON NAME LOADGEN AUTH CPU_S APISERVER_S PEAK_MB NOTE (CPU_S empty: the report's own server figures)
bench_row() {
	python3 - "$@" "$rows" <<'EOF'
import json, sys
path, name, loadgen, auth, cpu, api, peak, note, rows = sys.argv[1:10]
try:
    r = json.loads(open(path).read().strip().splitlines()[-1])
except Exception:
    r = {}
ok = r.get("issued", 0)
srv = r.get("server") or {}
if cpu:
    cpu_us = float(cpu) * 1e6 / ok if ok else 0
else:
    cpu_us = srv.get("cpu_us_per_issued", 0)
    peak = f'{srv.get("peak_rss_mb", 0):.1f}'
lat = r.get("latency_ms") or {}
api_us = float(api) * 1e6 / ok if ok and api and auth == "kube" else 0
errs = r.get("error_total", 0)
codes = r.get("errors") or {}
if r.get("ratio_to_ceiling"):
    note = (note + " " if note else "") + f'{r["ratio_to_ceiling"]:.2f} of ceiling {r["ceiling_per_s"]:.0f}/s'
if r.get("mode") == "offline":
    cpu_us = r.get("threads", 1) * 1e6 / r["issued_per_s"] if r.get("issued_per_s") else 0
    peak = "-"
    lat = {}
with open(rows, "a") as f:
    f.write("\t".join([name, loadgen, auth, f'{r.get("issued_per_s", 0):.0f}', f"{cpu_us:.0f}",
                       f'{lat.get("p50", 0):.1f}' if lat else "-", f'{lat.get("p99", 0):.1f}' if lat else "-",
                       f"{errs}" + (f" {codes}" if codes else ""), peak, f"{api_us:.0f}" if api_us else "-", note]) + "\n")
EOF
}

# cfssl NAME CA_DIR CA_KEY(p256|rsa2048): P-256 CSRs signed by that CA, like plugca's rows
run_cfssl() {
	local name=$1 ca=$2 d=$W/cfssl-$3 port
	mkdir -p "$d"
	echo '{"signing":{"default":{"expiry":"24h","usages":["digital signature","key encipherment","server auth","client auth"]}}}' >"$d/config.json"
	# 200 distinct P-256 CSRs as cfssl sign request bodies, one per line.
	python3 - "$d" <<'EOF'
import json, subprocess, sys
d = sys.argv[1]
with open(f"{d}/bodies.txt", "w") as out:
    for i in range(200):
        key = subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout"], capture_output=True, check=True).stdout
        csr = subprocess.run(["openssl", "req", "-new", "-key", "/dev/stdin", "-subj", f"/CN=w{i}"], input=key, capture_output=True, check=True).stdout.decode()
        out.write(json.dumps({"certificate_request": csr, "hosts": [f"w{i}.bench.svc.cluster.local"]}) + "\n")
EOF
	cat >"$d/sign.lua" <<EOF
local bodies = {}
for line in io.lines("$d/bodies.txt") do bodies[#bodies + 1] = line end
local i = 0
request = function()
  i = i % #bodies + 1
  return wrk.format("POST", "/api/v1/cfssl/sign", {["Content-Type"] = "application/json"}, bodies[i])
end
local non200 = 0
response = function(status, headers, body)
  if status ~= 200 then non200 = non200 + 1 end
end
EOF
	port=$(free_port)
	cfssl serve -address 127.0.0.1 -port "$port" -ca "$ca/ca-cert.pem" -ca-key "$ca/ca-key.pem" -config "$d/config.json" -loglevel 4 >"$W/$name.log" 2>&1 &
	local pid=$!
	pids+=("$pid")
	wait_tcp "$port" 30 cfssl
	log "row: $name (wrk, no authentication, plain HTTP, $concurrency connections, $duration)"
	before_load "$pid"
	wrk -t2 -c"$concurrency" -d"$duration" --latency -s "$d/sign.lua" "http://127.0.0.1:$port" >"$W/$name.wrk.txt" 2>&1 || true
	after_load "$pid"
	kill "$pid" 2>/dev/null || true
	python3 - "$W/$name.wrk.txt" "$CPU_S" "$PEAK_MB" "$name" "$rows" <<'EOF'
import re, sys
path, cpu, peak, name, rows = sys.argv[1:6]
t = open(path).read()
def lat(p):
    m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\b", t, re.M)
    if not m: return 0
    return float(m.group(1)) * {"us": 1e-3, "ms": 1, "s": 1e3}[m.group(2)]
reqs = int(re.search(r"(\d+) requests in", t).group(1)) if "requests in" in t else 0
secs = re.search(r"requests in ([\d.]+)(s|m)", t)
secs = float(secs.group(1)) * (60 if secs.group(2) == "m" else 1) if secs else 1
bad = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
bad = int(bad.group(1)) if bad else 0
sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", t)
sockerr = sum(int(x) for x in sock.groups()) if sock else 0
ok = reqs - bad
with open(rows, "a") as f:
    f.write("\t".join([name, "wrk", "none", f"{ok/secs:.0f}", f"{float(cpu)*1e6/ok if ok else 0:.0f}",
                       f"{lat(50):.1f}", f"{lat(99):.1f}", f"{bad + sockerr}", peak, "-", "plain HTTP"]) + "\n")
EOF
}

# plugca bench with its own child server (JWKS-verified JWT, no kube-apiserver).
run_plugca_bench_own() { # NAME BINARY NOTE ARGS...
	local name=$1 bin=$2 note=$3
	shift 3
	local load=(--concurrency "$concurrency" --connections "$connections" --duration "$duration")
	[[ " $* " == *" --concurrency "* ]] && load=()
	log "row: $name (plugca bench, own server, $*)"
	"$bin" bench "${load[@]}" "$@" --json \
		>"$W/$name.bench.json" 2>"$W/$name.bench.err" || true
	bench_row "$W/$name.bench.json" "$name" "plugca bench" "jwt" "" "" "" "$note"
}
run_offline() { # NAME BINARY ARGS...
	local name=$1 bin=$2
	shift 2
	log "row: $name (offline ceiling, $*)"
	"$bin" bench --offline --duration 5s --requests 200000 "$@" --json >"$W/$name.bench.json" 2>"$W/$name.bench.err" || true
	bench_row "$W/$name.bench.json" "$name" "in-process" "-" "" "" "" "issuance cycle, all cores, no gRPC/TLS"
}

load_now() { cut -d' ' -f1-3 /proc/loadavg; }
LOADS=()

# ---------------------------------------------------------------- the run
log "starting plugca and istiod on the same P-256 cacerts"
start_plugca plugca "$W/p256/cacerts"
start_istiod "$W/p256/cacerts"
# The client certificate of the mtls rows: a workload certificate plugca issues for bench/w0.
"$PLUGCA" request --ca-addr "127.0.0.1:$PLUGCA_PORT" --root-cert "$W/p256/cacerts/root-cert.pem" \
	--server-name istiod.istio-system.svc --token-file "$W/token" --ttl 2h --out "$W/client" >/dev/null
LOADS+=("start $(load_now)")
sleep 2
rss_mb() { awk '/^VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
IDLE="plugca $(rss_mb "$PLUGCA_PID") MB (after one issuance), istiod $(rss_mb "$ISTIOD_PID") MB"

run_offline "offline ceiling P-256 aws-lc" "$PLUGCA" --ca-key p256 --csr-mix p256
# Interleaved: the same load against each server in turn.
for auth in mtls kube; do
	run_ghz "plugca $auth" "$PLUGCA_PID" "$PLUGCA_PORT" "$auth" ""
	run_ghz "istiod $auth" "$ISTIOD_PID" "$ISTIOD_PORT" "$auth" ""
	run_plugca_bench_remote "plugca $auth" "$auth"
	LOADS+=("$auth $(load_now)")
done
hits=$(curl -fs "http://127.0.0.1:$PLUGCA_MON/metrics" | awk '/^plugca_token_reviews_total\{result="cached"\}/ {c=$2} /^plugca_token_reviews_total\{result="reviewed"\}/ {r=$2} END {if (c + r > 0) printf "%.4f %d %d", c / (c + r), c, r}')
log "plugca review cache: hit rate, cached, reviewed = $hits"
kill "$PLUGCA_PID"
wait "$PLUGCA_PID" 2>/dev/null || true
start_plugca plugca-nocache "$W/p256/cacerts" --token-review-cache-ttl 0s
run_ghz "plugca kube, cache off" "$PLUGCA_PID" "$PLUGCA_PORT" kube "every request a TokenReview"
kill "$PLUGCA_PID" "$ISTIOD_PID"
run_cfssl "cfssl 1.2 P-256" "$W/p256/cacerts" p256
run_plugca_bench_own "plugca own JWT P-256 aws-lc" "$PLUGCA" "RS256 JWKS, aws-lc-rs" --ca-key p256 --csr-mix p256 --requests 10000000 --pool 1024
LOADS+=("p256 $(load_now)")

if ((!quick)); then
	run_offline "offline ceiling RSA-2048 aws-lc" "$PLUGCA" --ca-key rsa2048 --csr-mix p256
	run_plugca_bench_own "plugca own JWT RSA-2048 aws-lc" "$PLUGCA" "aws-lc-rs" --ca-key rsa2048 --csr-mix p256 --requests 10000000 --pool 1024
	if ((ring)); then
		run_offline "offline ceiling RSA-2048 ring" "$PLUGCA_RING" --ca-key rsa2048 --csr-mix p256
		run_offline "offline ceiling P-256 ring" "$PLUGCA_RING" --ca-key p256 --csr-mix p256
		run_plugca_bench_own "plugca own JWT RSA-2048 ring" "$PLUGCA_RING" "ring" --ca-key rsa2048 --csr-mix p256 --requests 10000000 --pool 1024
		run_plugca_bench_own "plugca own JWT P-256 ring" "$PLUGCA_RING" "ring" --ca-key p256 --csr-mix p256 --requests 10000000 --pool 1024
	fi
	run_cfssl "cfssl 1.2 RSA-2048" "$W/rsa2048/cacerts" rsa2048
	run_plugca_bench_own "plugca burst 10k, 256 conc" "$PLUGCA" "distinct CSRs, identities, tokens" --ca-key p256 --csr-mix p256 --burst 10000 --concurrency 256 --connections 8 --duration 60s
	LOADS+=("rsa $(load_now)")
fi

# ---------------------------------------------------------------- the table
echo
echo "plugca compare: $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ), $concurrency concurrent over $connections connections, $duration per row"
echo "load average (1/5/15 min) at each stage: ${LOADS[*]}"
[[ -n "$hits" ]] && echo "plugca TokenReview cache during the kube rows: hit rate ${hits%% *} (cached, reviewed: ${hits#* })"
echo "idle RSS: $IDLE"
python3 - "$rows" <<'EOF'
import sys
head = ["server / row", "load generator", "auth", "issued/s", "server CPU us/cert", "p50 ms", "p99 ms", "errors", "peak RSS MB", "apiserver CPU us/cert", "note"]
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
print("| " + " | ".join(head) + " |")
print("|" + "|".join("---" for _ in head) + "|")
for r in rows:
    print("| " + " | ".join(r) + " |")
EOF
[[ -n "$keep" ]] && log "raw reports and logs in $W"
