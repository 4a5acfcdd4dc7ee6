# Shell functions the doc tests' setup and stand-in directives call (sourced, not run).
# The doc runs in its own network, mount and PID namespaces (tests/docs/test_readme_commands.py):
# /etc/hosts names node-a and src 127.0.0.2, node-b and dst 127.0.0.3; /srv, /run/pagewire,
# /var/lib/pagewire and /etc/pagewire are empty tmpfs; every process ends with the doc.

PAGEWIRE_BIN=${PAGEWIRE_BIN:-pagewire}

make_image() {  # PATH MIB: a reproducible memory image (data and zero pages)
    mkdir -p "$(dirname "$1")"
    "$DOCTEST_PYTHON" -c 'import sys; from pathlib import Path; from pagewire.tools.images import make_image; make_image(Path(sys.argv[1]), int(sys.argv[2]) << 20, seed=5)' "$1" "$2"
}

world_pki() {  # the CA and one certificate every world agent uses (mTLS between peers)
    local d=/etc/pagewire/tls
    [ -e "$d/tls.crt" ] && return 0
    mkdir -p "$d"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
        -subj /CN=doc-ca -keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=agent \
        -keyout "$d/tls.key" -out "$d/tls.csr" 2>/dev/null
    printf 'subjectAltName=DNS:node-a,DNS:node-b,DNS:src,DNS:dst,DNS:localhost,IP:127.0.0.1,IP:127.0.0.2,IP:127.0.0.3\nextendedKeyUsage=serverAuth,clientAuth\n' >"$d/ext"
    openssl x509 -req -in "$d/tls.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
        -days 1 -extfile "$d/ext" -out "$d/tls.crt" 2>/dev/null
    mkdir -p /etc/pagewire/token
    head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >/etc/pagewire/token/token
}

wait_ready() {  # URL: poll /readyz for up to 60 s
    local i
    for i in $(seq 1 240); do
        /usr/bin/curl -fsS -o /dev/null "$1/readyz" 2>/dev/null && return 0
        sleep 0.25
    done
    echo "world: $1 never became ready" >&2
    return 1
}

node_agent() {  # NAME IP [SOCKET_DIR]: an agent configured as the DaemonSet configures one
    local name=$1 ip=$2 sockets=${3:-/run/pagewire/$1/sessions}
    world_pki
    mkdir -p /srv/pagewire/snapshots "/var/lib/pagewire/$name"
    PAGEWIRE_NODE_NAME=$name PAGEWIRE_HTTP=$ip:7070 PAGEWIRE_GRPC=$ip:7071 \
    PAGEWIRE_ADVERTISE_GRPC=$ip:7071 PAGEWIRE_PEER_DNS_PATTERN='{node}:7071' \
    PAGEWIRE_SOCKET_DIR=$sockets PAGEWIRE_STATE_DIR=/var/lib/pagewire/$name \
    PAGEWIRE_EXPORT_ROOTS=/srv/pagewire/snapshots \
    PAGEWIRE_TOKEN_FILE=/etc/pagewire/token/token \
    PAGEWIRE_TLS_CERT=/etc/pagewire/tls/tls.crt PAGEWIRE_TLS_KEY=/etc/pagewire/tls/tls.key \
    PAGEWIRE_TLS_CA=/etc/pagewire/tls/ca.crt \
        "$PAGEWIRE_BIN" agent >"$DOCTEST/agent-$name.log" 2>&1 &
    wait_ready "http://$ip:7070"
}

plain_agent() {  # NAME IP EXPORT_ROOT: a bare agent (no token, no TLS: hosts on a trusted
    # network, --insecure-peers) on IP:7070/7071
    mkdir -p "$3" "/var/lib/pagewire/$1"
    "$PAGEWIRE_BIN" agent --http "$2:7070" --grpc "$2:7071" --node-name "$1" \
        --socket-dir "/run/pagewire/$1/sessions" --state-dir "/var/lib/pagewire/$1" \
        --export-root "$3" --insecure-peers >"$DOCTEST/agent-$1.log" 2>&1 &
    wait_ready "http://$2:7070"
}

workload() {  # SOCKET MIB IMAGE: a process that attaches, touches every page, verifies
    "$DOCTEST_PYTHON" -m pagewire.tools.workload --socket "$1" --size $(($2 << 20)) \
        --order random --threads 2 --verify "$3" >"$DOCTEST/workload.json" 2>&1
}
