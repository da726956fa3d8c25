#!/usr/bin/env bash
# fedpriv deployment helper around Flower's own processes (flower-superlink,
# flower-supernode, flwr). Every process it starts is recorded in a pid file and
# stopped by that pid only.
#
#   fedpriv-deploy.sh certs DIR HOST [HOST...]      CA + SuperLink certificate (SANs = HOSTs)
#   fedpriv-deploy.sh node-key DIR NAME             SuperNode key pair DIR/NAME(.pub) (ECDSA P-384)
#   fedpriv-deploy.sh connection NAME ADDR [CA]     write [superlink.NAME] into $FLWR_HOME/config.toml
#                                                   (no CA: insecure, for loopback trials only)
#   fedpriv-deploy.sh register KEY.pub CONNECTION   register a SuperNode's public key with the SuperLink
#   fedpriv-deploy.sh superlink RUNDIR HOST PORT [CERTDIR]
#                                                   start a SuperLink (TLS + SuperNode auth with CERTDIR,
#                                                   insecure without); pid in RUNDIR/superlink.pid
#   fedpriv-deploy.sh simulation-link RUNDIR PORT   start a SuperLink that runs simulations itself
#                                                   (`flwr run` on simulated SuperNodes; 127.0.0.1
#                                                   only); pid in RUNDIR/superlink.pid
#   fedpriv-deploy.sh supernode RUNDIR NAME SUPERLINK_ADDR RUNTIME_PORT NODE_CONFIG [CA KEY]
#                                                   start a SuperNode; pid in RUNDIR/NAME.pid, and its
#                                                   ClientApp launcher fedpriv-superexec (messages start
#                                                   already imported) in RUNDIR/NAME-launcher.pid;
#                                                   FEDPRIV_LAUNCHER=flower: Flower's process per message
#   fedpriv-deploy.sh stop RUNDIR [NAME...]         stop the processes whose pid files are given
#                                                   (default: every *.pid in RUNDIR)
#
# Needs: openssl; ssh-keygen (Debian/Ubuntu: apt-get install -y openssh-client);
# flower-superlink / flower-supernode / flwr / fedpriv-superexec on PATH or in $FEDPRIV_BIN.
set -euo pipefail

BIN=${FEDPRIV_BIN:-}
# SuperLink and SuperNode start flower-superexec / flwr-serverapp / flwr-clientapp by name.
[[ -n "$BIN" ]] && export PATH="$BIN:$PATH"
tool() { if [[ -n "$BIN" ]]; then echo "$BIN/$1"; else command -v "$1" || { echo "fedpriv-deploy: $1 not found" >&2; exit 3; }; fi; }
# Flower must not re-install the project (torch ...) for every run.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

die() { echo "fedpriv-deploy: $*" >&2; exit 2; }

cmd_certs() {
    local dir=$1; shift
    [[ $# -ge 1 ]] || die "certs DIR HOST [HOST...]"
    command -v openssl >/dev/null || die "openssl is missing (apt-get install -y openssl)"
    mkdir -p "$dir"; chmod 700 "$dir"
    local san="" i=0 h
    for h in "$@"; do
        i=$((i + 1))
        if [[ $h =~ ^[0-9.]+$ || $h == *:* ]]; then san+="${san:+,}IP:$h"; else san+="${san:+,}DNS:$h"; fi
    done
    openssl genrsa -out "$dir/ca.key" 4096 2>/dev/null
    openssl req -x509 -new -key "$dir/ca.key" -sha256 -days 365 -subj "/CN=fedpriv CA" -out "$dir/ca.crt"
    openssl genrsa -out "$dir/server.key" 4096 2>/dev/null
    openssl req -new -key "$dir/server.key" -subj "/CN=$1" -out "$dir/server.csr"
    printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
        "$san" >"$dir/server.ext"
    openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
        -days 365 -sha256 -extfile "$dir/server.ext" -out "$dir/server.crt" 2>/dev/null
    chmod 600 "$dir"/*.key
    echo "fedpriv-deploy: CA $dir/ca.crt; SuperLink certificate $dir/server.crt for $san"
}

cmd_node_key() {
    local dir=$1 name=$2
    command -v ssh-keygen >/dev/null || die "ssh-keygen is missing (apt-get install -y openssh-client)"
    mkdir -p "$dir"; chmod 700 "$dir"
    rm -f "$dir/$name" "$dir/$name.pub"
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedpriv-$name" -f "$dir/$name"
    echo "fedpriv-deploy: SuperNode key $dir/$name (register $dir/$name.pub)"
}

cmd_connection() {
    local name=$1 addr=$2 ca=${3:-}
    local home=${FLWR_HOME:-$HOME/.flwr}
    mkdir -p "$home"
    local file=$home/config.toml
    touch "$file"
    # Drop an old [superlink.NAME] table, then append the new one.
    python3 - "$file" "$name" <<'EOF'
import re, sys
path, name = sys.argv[1], sys.argv[2]
text = open(path).read()
text = re.sub(r"(?ms)^\[superlink\.%s\]\n.*?(?=^\[|\Z)" % re.escape(name), "", text)
open(path, "w").write(text)
EOF
    grep -q '^\[superlink\]' "$file" || printf '[superlink]\ndefault = "%s"\n\n' "$name" >>"$file"
    {
        printf '[superlink.%s]\naddress = "%s"\n' "$name" "$addr"
        if [[ -n $ca ]]; then printf 'root-certificates = "%s"\n\n' "$(realpath "$ca")"; else printf 'insecure = true\n\n'; fi
    } >>"$file"
    echo "fedpriv-deploy: connection $name -> $addr in $file"
}

cmd_register() {
    "$(tool flwr)" supernode register "$1" "$2"
}

start_bg() {  # start_bg PIDFILE LOG CMD... : background, own session, pid recorded
    local pidfile=$1 log=$2; shift 2
    setsid "$@" >"$log" 2>&1 < /dev/null &
    echo $! >"$pidfile"
}

cmd_superlink() {
    local rundir=$1 host=$2 port=$3 certs=${4:-}
    mkdir -p "$rundir"
    local args=(--host "$host" --port "$port" --database "$rundir/superlink.db"
                --disable-runtime-dependency-installation)
    if [[ -n $certs ]]; then
        args+=(--ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.crt" --ssl-keyfile "$certs/server.key"
               --enable-supernode-auth)
    else
        args+=(--insecure)
    fi
    (cd "$rundir" && start_bg "$rundir/superlink.pid" "$rundir/superlink.log" "$(tool flower-superlink)" "${args[@]}")
    echo "fedpriv-deploy: SuperLink pid $(cat "$rundir/superlink.pid") on $host:$port (log $rundir/superlink.log)"
}

cmd_simulation_link() {
    local rundir=$1 port=$2
    mkdir -p "$rundir"
    # Its Control API takes runs from anyone who reaches it, without TLS: loopback only.
    local args=(--simulation --insecure --host 127.0.0.1 --port "$port" --database "$rundir/superlink.db"
                --disable-runtime-dependency-installation)
    # Its simulated clients take their state dir from the run config (FEDPRIV_SIMULATION:
    # client/privacy/node_config.py); a SuperNode's device never does.
    (cd "$rundir" && export FEDPRIV_SIMULATION=1 && start_bg "$rundir/superlink.pid" "$rundir/superlink.log" "$(tool flower-superlink)" "${args[@]}")
    echo "fedpriv-deploy: simulation SuperLink pid $(cat "$rundir/superlink.pid") on 127.0.0.1:$port (log $rundir/superlink.log)"
}

cmd_supernode() {
    local rundir=$1 name=$2 link=$3 port=$4 nodecfg=$5 ca=${6:-} key=${7:-}
    mkdir -p "$rundir"
    local args=(--superlink "$link" --host 127.0.0.1 --port "$port" --node-config "$nodecfg")
    if [[ -n $ca ]]; then args+=(--root-certificates "$ca"); else args+=(--insecure); fi
    [[ -n $key ]] && args+=(--auth-supernode-private-key "$key")
    local launcher=${FEDPRIV_LAUNCHER:-warm}
    case $launcher in
        warm) args+=(--isolation process) ;;  # fedpriv-superexec launches its ClientApps (client/launcher.py)
        flower) ;;                            # Flower's flower-superexec: a fresh flwr-clientapp per message
        *) die "FEDPRIV_LAUNCHER must be warm or flower" ;;
    esac
    start_bg "$rundir/$name.pid" "$rundir/$name.log" "$(tool flower-supernode)" "${args[@]}"
    echo "fedpriv-deploy: SuperNode $name pid $(cat "$rundir/$name.pid") (log $rundir/$name.log)"
    if [[ $launcher == warm ]]; then
        # Its Runtime API is the SuperNode's own --host/--port, loopback HTTP as in Flower's subprocess mode.
        start_bg "$rundir/$name-launcher.pid" "$rundir/$name-launcher.log" "$(tool fedpriv-superexec)" \
            --runtime-api-address "127.0.0.1:$port" --insecure --parent-pid "$(cat "$rundir/$name.pid")"
        echo "fedpriv-deploy: launcher of $name pid $(cat "$rundir/$name-launcher.pid") (log $rundir/$name-launcher.log)"
    fi
}

stop_pid() {  # TERM the pid (and its session: the flwr-clientapp/serverapp children), then KILL
    local pid=$1 i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
}

cmd_stop() {
    local rundir=$1; shift
    local files=() f
    if [[ $# -gt 0 ]]; then for f in "$@"; do files+=("$rundir/$f.pid" "$rundir/$f-launcher.pid"); done
    else shopt -s nullglob; files=("$rundir"/*.pid); fi
    for f in "${files[@]}"; do
        [[ -f $f ]] || continue
        stop_pid "$(cat "$f")"
        echo "fedpriv-deploy: stopped $(basename "$f" .pid) (pid $(cat "$f"))"
        rm -f "$f"
    done
}

[[ $# -ge 1 ]] || { sed -n '2,26p' "$0"; exit 2; }
sub=$1; shift
case $sub in
    certs) cmd_certs "$@" ;;
    node-key) cmd_node_key "$@" ;;
    connection) cmd_connection "$@" ;;
    register) cmd_register "$@" ;;
    superlink) cmd_superlink "$@" ;;
    simulation-link) cmd_simulation_link "$@" ;;
    supernode) cmd_supernode "$@" ;;
    stop) cmd_stop "$@" ;;
    *) die "unknown command $sub" ;;
esac
