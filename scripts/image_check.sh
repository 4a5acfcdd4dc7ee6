#!/usr/bin/env bash
# Build deploy/Dockerfile for real and restore a region through the image:
#
#   1. an offline base image made from Debian packages (mmdebstrap rootfs, imported with
#      buildah; this machine's CA bundle is added so pip reaches PyPI through its proxy),
#   2. `buildah bud --isolation chroot` of deploy/Dockerfile with that base as PYTHON_IMAGE,
#   3. the agent started from the image (`buildah run --isolation chroot`) with the
#      DaemonSet's arguments and environment (read from deploy/kubernetes/daemonset.yaml; the
#      downward-API values NODE_NAME and POD_IP become this host's name and 127.0.0.1) and
#      its volumes as directories under the work dir, TLS and token included,
#   4. an agent from the checkout as the source (mTLS with the same CA), a session on the
#      image's agent, a workload process that attaches and verifies every byte.
#
# Needs root, buildah and mmdebstrap (installed with apt-get when missing), and the
# project's virtualenv (.venv, or PYTHON=...). Exit 0 only if the restore verified.
# PAGEWIRE_IMAGE_WORK (default /var/tmp/pagewire-image) keeps the base rootfs between runs.
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${PAGEWIRE_IMAGE_WORK:-/var/tmp/pagewire-image}
PYTHON=${PYTHON:-.venv/bin/python}
BASE=localhost/pagewire-base:bookworm
IMAGE=localhost/pagewire:check
SIZE_MIB=${PAGEWIRE_IMAGE_CHECK_MIB:-32}
step() { echo "image_check: $(date +%H:%M:%S) $*" >&2; }

[ "$(id -u)" = 0 ] || { echo "image_check: needs root" >&2; exit 2; }
if ! command -v buildah >/dev/null || ! command -v mmdebstrap >/dev/null; then
    step "installing buildah and mmdebstrap (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends buildah mmdebstrap >/dev/null
fi
mkdir -p "$WORK"

# -- 1. the offline base
if [ ! -s "$WORK/base.tar" ]; then
    step "making the base rootfs from Debian packages (mmdebstrap, a few minutes)"
    mmdebstrap --quiet --variant=apt \
        --include=python3,python3-pip,python3-venv,python3-dev,python-is-python3,gcc,libc6-dev,linux-libc-dev,libxxhash-dev,libssl-dev,ca-certificates,passwd \
        bookworm "$WORK/base.tar.part"
    mv "$WORK/base.tar.part" "$WORK/base.tar"
fi
if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
    step "importing the rootfs as $BASE"
    ctr=$(buildah from scratch)
    buildah add --quiet "$ctr" "$WORK/base.tar" / >/dev/null
    buildah copy --quiet "$ctr" /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
    buildah commit --quiet "$ctr" "$BASE" >/dev/null
    buildah rm "$ctr" >/dev/null
fi

# -- 2. the image
step "building deploy/Dockerfile (buildah bud --isolation chroot, base $BASE)"
# No --layers: a cached RUN step that bind-mounts the builder's wheels is reused even when
# the wheels changed, so a stale agent would be tested.
buildah bud --quiet --isolation chroot --format docker \
    -f deploy/Dockerfile --build-arg PYTHON_IMAGE="$BASE" -t "$IMAGE" . >/dev/null

# -- 3. the agent from the image, as the DaemonSet runs it
RUN="$WORK/run"
rm -rf "$RUN"
mkdir -p "$RUN"/{sessions,state,snapshots,tls,token,tmp,src-state,src-sock,src-root}
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
    -subj /CN=pagewire-ca -keyout "$RUN/tls/ca.key" -out "$RUN/tls/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=agent \
    -keyout "$RUN/tls/tls.key" -out "$RUN/tls/tls.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n' \
    >"$RUN/tls/ext"
openssl x509 -req -in "$RUN/tls/tls.csr" -CA "$RUN/tls/ca.crt" -CAkey "$RUN/tls/ca.key" \
    -CAcreateserial -days 1 -extfile "$RUN/tls/ext" -out "$RUN/tls/tls.crt" 2>/dev/null
TOKEN=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
echo "$TOKEN" >"$RUN/token/token"

# the DaemonSet's args and env, as `buildah run` options, one a line
"$PYTHON" - "$RUN/daemonset.env" <<'EOF'
import socket, sys, yaml
docs = [d for d in yaml.safe_load_all(open("deploy/kubernetes/daemonset.yaml")) if d]
(ds,) = [d for d in docs if d.get("kind") == "DaemonSet"]
(agent,) = [c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "agent"]
downward = {"NODE_NAME": socket.gethostname(), "POD_IP": "127.0.0.1"}
values = {}
with open(sys.argv[1], "w") as out:
    for item in agent["env"]:
        value = downward[item["name"]] if "valueFrom" in item else str(item["value"])
        for name, known in values.items():
            value = value.replace(f"$({name})", known)
        values[item["name"]] = value
        if item["name"].startswith("PAGEWIRE_"):
            out.write(f"{item['name']}={value}\n")
    out.write("ARGS=" + " ".join(agent.get("args", [])) + "\n")
EOF
env_opts=()
while IFS= read -r line; do
    case "$line" in
        ARGS=*) agent_args=${line#ARGS=} ;;
        *) env_opts+=(--env "$line") ;;
    esac
done <"$RUN/daemonset.env"
http=$(grep '^PAGEWIRE_HTTP=' "$RUN/daemonset.env" | cut -d= -f2)
port=${http##*:}
DST="http://127.0.0.1:$port"
if curl -s -o /dev/null "$DST/healthz"; then
    echo "image_check: something already listens on port $port" >&2
    exit 1
fi

# The agent checks at start that its fd limits fit RLIMIT_NOFILE (about 1,900 fds with the
# defaults); buildah's containers get 1024 unless told (Kubernetes pods get 1048576), so
# the container gets this shell's hard limit.
nofile=$(ulimit -Hn)
ctr=$(buildah from --quiet --ulimit "nofile=$nofile:$nofile" "$IMAGE")
src_pid=""
cleanup() {
    [ -n "${agent_pid:-}" ] && kill -TERM -- "-$agent_pid" 2>/dev/null || true
    [ -n "$src_pid" ] && kill -TERM "$src_pid" 2>/dev/null || true
    sleep 1
    [ -n "${agent_pid:-}" ] && kill -KILL -- "-$agent_pid" 2>/dev/null || true
    buildah rm "$ctr" >/dev/null 2>&1 || true
}
trap cleanup EXIT
step "starting the image's agent: pagewire $agent_args (DaemonSet env: ${#env_opts[@]} options)"
# shellcheck disable=SC2086  # agent_args is the DaemonSet's args list, split on purpose
setsid buildah run --isolation chroot --user 0:0 \
    --cap-drop all --cap-add CAP_CHOWN --cap-add CAP_SYS_PTRACE --cap-add CAP_SYS_NICE \
    -v "$RUN/sessions:/run/pagewire/sessions" \
    -v "$RUN/state:/var/lib/pagewire" \
    -v "$RUN/snapshots:/srv/pagewire/snapshots:ro" \
    -v "$RUN/tls:/etc/pagewire/tls:ro" \
    -v "$RUN/token:/etc/pagewire/token:ro" \
    -v "$RUN/tmp:/tmp" \
    "${env_opts[@]}" "$ctr" -- pagewire $agent_args >"$RUN/agent.log" 2>&1 &
agent_pid=$!

# -- 4. a source agent from the checkout, then a restore through the image's agent (the
# image's agent holds the DaemonSet's data port on this host, so the source takes any)
src_http=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
src_grpc=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
SRC="http://127.0.0.1:$src_http"
"$PYTHON" -m pagewire.tools.cli agent --http "127.0.0.1:$src_http" --grpc "127.0.0.1:$src_grpc" \
    --state-dir "$RUN/src-state" --socket-dir "$RUN/src-sock" --export-root "$RUN/src-root" \
    --tls-cert "$RUN/tls/tls.crt" --tls-key "$RUN/tls/tls.key" --tls-ca "$RUN/tls/ca.crt" \
    --token-file "$RUN/token/token" --data-port 0 >"$RUN/source.log" 2>&1 &
src_pid=$!

wait_ready() {  # URL NAME LOG
    for _ in $(seq 1 120); do
        curl -fsS -o /dev/null "$1/readyz" 2>/dev/null && return 0
        sleep 0.5
    done
    echo "image_check: $2 never became ready; its log:" >&2
    cat "$3" >&2
    exit 1
}
wait_ready "$DST" "the image's agent" "$RUN/agent.log"
wait_ready "$SRC" "the source agent" "$RUN/source.log"
step "both agents ready; restoring $SIZE_MIB MiB"

AUTH="Authorization: Bearer $TOKEN"
"$PYTHON" -c "import sys; from pathlib import Path; from pagewire.tools.images import make_image; make_image(Path(sys.argv[1]), $SIZE_MIB << 20, seed=7)" \
    "$RUN/src-root/image.mem"
curl -fsS -X POST "$SRC/v1/exports" -H "$AUTH" -H 'content-type: application/json' \
    -d "{\"name\": \"image-check\", \"path\": \"$RUN/src-root/image.mem\"}" >/dev/null
session=$(curl -fsS -X POST "$DST/v1/sessions" -H "$AUTH" -H 'content-type: application/json' \
    -d "{\"source\": {\"peer\": \"127.0.0.1:$src_grpc\", \"export\": \"image-check\"}}")
id=$(echo "$session" | jq -r .id)
sock=$(echo "$session" | jq -r .socket)
# the socket path is the container's; the DaemonSet mounts the host's directory at the same
# path, this script mounts $RUN/sessions there
"$PYTHON" -m pagewire.tools.workload --socket "$RUN/sessions/$(basename "$sock")" \
    --size $((SIZE_MIB << 20)) --order random --threads 2 --verify "$RUN/src-root/image.mem" \
    >"$RUN/workload.json"
for _ in $(seq 1 240); do
    status=$(curl -fsS "$DST/v1/sessions/$id" -H "$AUTH")
    state=$(echo "$status" | jq -r .state)
    case "$state" in awaiting_attach | running | paused) sleep 0.5 ;; *) break ;; esac
done
verified=$(tail -n1 "$RUN/workload.json" | jq -r .verified)
echo "$status" | jq -c '{id, state, transport, pages_total, faults, bytes_received, error}'
if [ "$state" != completed ] || [ "$verified" != true ]; then
    echo "image_check: FAILED: session $state, workload verified=$verified" >&2
    cat "$RUN/agent.log" >&2
    exit 1
fi
step "passed: the image's agent restored $SIZE_MIB MiB post-copy, every byte verified"
