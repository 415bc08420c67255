# shellcheck shell=bash
# Sourced by kube-lab.sh and lab.sh (not run): the one free-port picker of the loopback labs.
# Needs the caller's $state directory and die().

# A loopback TCP port nobody listens on: a random pick below the kernel's ephemeral range (so port-0
# listeners and outgoing connections of concurrent tests cannot take it), checked with ss and against
# the ports this lab already handed out ($state/.ports). A race left is caught by the callers, which
# retry on "address already in use".
# shellcheck disable=SC2154 # $state is the sourcing script's
free_port() {
	local p low
	low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
	for _ in $(seq 1 200); do
		p=$((10000 + RANDOM % (low - 10000)))
		if [[ -z "$(ss -Htln "sport = :$p")" ]] && ! grep -qx "$p" "$state/.ports" 2>/dev/null; then
			echo "$p" >>"$state/.ports"
			echo "$p"
			return
		fi
	done
	die "no free port found"
}
