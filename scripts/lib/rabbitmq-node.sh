# shellcheck shell=bash
# Shared by scripts/rabbitmq-tls-node and scripts/rabbitmq-cluster (sourced, not run): starts,
# stops and finds extra local RabbitMQ nodes beside the default one, each under its own name
# and ports, with its data and logs in $FLAGSHED_RABBITMQ_BASE/<name>/ (default
# /var/tmp/flagshed-rabbitmq), owned by the rabbitmq user and sharing its Erlang cookie.
# Everything listens on 127.0.0.1 only. Needs root (to act as the rabbitmq user).
#
# Functions: node_start, node_wait, node_stop, node_kill, node_wipe, node_pids, node_up,
# node_ctl, node_fail, port_open, elapsed_since, require_root, log, die (each described below).

FLAGSHED_RABBITMQ_BASE=${FLAGSHED_RABBITMQ_BASE:-/var/tmp/flagshed-rabbitmq}
RABBITMQ_LIB_BIN=${RABBITMQ_LIB_BIN:-/usr/lib/rabbitmq/bin}
RABBITMQ_USER_HOME=/var/lib/rabbitmq
# How long a node may take to boot, and to stop before it is killed (seconds).
NODE_START_TIMEOUT=${NODE_START_TIMEOUT:-120}
NODE_STOP_TIMEOUT=${NODE_STOP_TIMEOUT:-15}
# The environment the nodes and rabbitmqctl run in: nothing else of the caller's.
NODE_ENV=(
  PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  HOME="$RABBITMQ_USER_HOME"
  LANG=C.UTF-8
  LC_ALL=C.UTF-8
  ERL_EPMD_ADDRESS=127.0.0.1
)

log() { printf '%s: %s\n' "${PROG:-rabbitmq}" "$*" >&2; }
die() { log "$*"; exit 1; }

require_root() {
  [ "$(id -u)" -eq 0 ] || die "must run as root (it runs the nodes as the rabbitmq user)"
  [ -x "$RABBITMQ_LIB_BIN/rabbitmq-server" ] ||
    die "RabbitMQ is not installed ($RABBITMQ_LIB_BIN/rabbitmq-server); see scripts/ensure-rabbitmq"
  id rabbitmq >/dev/null 2>&1 || die "there is no rabbitmq user"
  [ -r "$RABBITMQ_USER_HOME/.erlang.cookie" ] ||
    die "no Erlang cookie in $RABBITMQ_USER_HOME (has the default node ever started?)"
}

node_dir() { echo "$FLAGSHED_RABBITMQ_BASE/$1"; }
full_name() { echo "$1@localhost"; }

# elapsed_since START: seconds since START (from `date +%s.%N`), to a tenth.
elapsed_since() { awk -v s="$1" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }'; }

# port_open PORT: whether something accepts TCP connections on 127.0.0.1:PORT.
port_open() { timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# node_ctl NAME ARGS...: rabbitmqctl against node NAME, as the rabbitmq user, bounded in time.
node_ctl() {
  local name=$1
  shift
  (cd "$RABBITMQ_USER_HOME" &&
    timeout "${CTL_TIMEOUT:-90}" runuser -u rabbitmq -- env -i "${NODE_ENV[@]}" \
      RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
      "$RABBITMQ_LIB_BIN/rabbitmqctl" -n "$(full_name "$name")" "$@")
}

# node_up NAME: whether node NAME is running with the rabbit application started.
node_up() { CTL_TIMEOUT=30 node_ctl "$1" -q await_startup --timeout 5 >/dev/null 2>&1; }

# is_node_pid PID NAME: whether PID is the Erlang VM of node NAME.
is_node_pid() {
  [ -r "/proc/$1/environ" ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = beam.smp ] &&
    { tr '\0' '\n' <"/proc/$1/environ"; } 2>/dev/null | grep -qxF "RABBITMQ_NODENAME=$(full_name "$2")"
}

# node_pids NAME: the OS pids of node NAME's Erlang VM (beam.smp), from its pid file or, for a
# node whose pid file is gone (a crashed run's leftover), from the environment of every VM.
node_pids() {
  local name=$1 pidfile pid
  pidfile="$(node_dir "$name")/pid"
  if [ -r "$pidfile" ] && pid=$(tr -dc 0-9 <"$pidfile") && [ -n "$pid" ] &&
    is_node_pid "$pid" "$name"; then
    echo "$pid"
    return
  fi
  for pid in $(pgrep -u rabbitmq -x beam.smp || true); do
    if is_node_pid "$pid" "$name"; then echo "$pid"; fi
  done
}

# epmd_has NAME: whether epmd still lists node NAME.
epmd_has() { epmd -names 2>/dev/null | grep -q "^name $1 at port "; }

# node_gone NAME: waits (up to 15 s) until node NAME's VM is gone and epmd has forgotten it.
node_gone() {
  local name=$1 deadline=$((SECONDS + 15))
  while { [ -n "$(node_pids "$name")" ] || epmd_has "$name"; } && [ "$SECONDS" -lt "$deadline" ]; do
    sleep 0.1
  done
  [ -z "$(node_pids "$name")" ] || die "$(full_name "$name") (pid $(node_pids "$name")) is still running"
  if epmd_has "$name"; then
    die "epmd still lists $name although no VM of that name runs; check \`epmd -names\`"
  fi
}

# node_kill NAME: SIGKILL to node NAME's VM; waits until it is gone. Keeps its data.
node_kill() {
  local pids
  pids=$(node_pids "$1")
  # shellcheck disable=SC2086 # one pid a word
  if [ -n "$pids" ]; then kill -KILL $pids 2>/dev/null || true; fi
  node_gone "$1"
}

# node_stop NAME: stops node NAME (politely, then with SIGKILL after NODE_STOP_TIMEOUT s), and
# waits until its VM is gone and epmd has forgotten it. Keeps its data.
node_stop() {
  local name=$1 deadline
  if [ -n "$(node_pids "$name")" ]; then
    CTL_TIMEOUT=$NODE_STOP_TIMEOUT node_ctl "$name" -q shutdown --timeout "$NODE_STOP_TIMEOUT" \
      >/dev/null 2>&1 || true
    deadline=$((SECONDS + NODE_STOP_TIMEOUT))
    while [ -n "$(node_pids "$name")" ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
    if [ -n "$(node_pids "$name")" ]; then
      log "$(full_name "$name") did not stop within ${NODE_STOP_TIMEOUT}s: killing it"
    fi
  fi
  node_kill "$name"
}

# node_wipe NAME: removes node NAME's data and logs (after node_stop).
node_wipe() { rm -rf "$(node_dir "$1")"; }

# node_start NAME AMQP_PORT DIST_PORT CONF: starts node NAME with a plain AMQP
# listener on 127.0.0.1:AMQP_PORT, the distribution on 127.0.0.1:DIST_PORT, CONF added to its
# rabbitmq.conf, and its data where a previous run of the node left it (node_wipe first for a
# fresh node). Does not wait: node_wait does.
node_start() {
  local name=$1 amqp_port=$2 dist_port=$3 conf=$4 dir port
  dir=$(node_dir "$name")
  for port in "$amqp_port" "$dist_port"; do
    if port_open "$port"; then
      die "port $port is taken (by: $(ss -Hltnp "sport = :$port" 2>/dev/null | sed 's/.*users://'))"
    fi
  done
  mkdir -p "$dir/log" "$dir/mnesia"
  # The node's own rabbitmq-env.conf (empty) keeps the default node's one out.
  printf '# Environment of %s: passed by the scripts that start it.\n' "$(full_name "$name")" \
    >"$dir/rabbitmq-env.conf"
  printf '[].\n' >"$dir/enabled_plugins"
  {
    printf 'listeners.tcp.local = 127.0.0.1:%s\n' "$amqp_port"
    [ -z "$conf" ] || printf '%s\n' "$conf"
    cat <<'END'
# Small, and no alarms on a shared machine: 1 GB of memory, 50 MB of free disk.
vm_memory_high_watermark.absolute = 1GB
disk_free_limit.absolute = 50MB
loopback_users.guest = true
log.file.level = info
log.console = false
END
  } >"$dir/rabbitmq.conf"
  : >>"$dir/log/console.log"
  chown -R rabbitmq:rabbitmq "$dir"
  chmod 755 "$FLAGSHED_RABBITMQ_BASE"
  rm -f "$dir/pid"
  (
    cd "$RABBITMQ_USER_HOME" || exit 1
    exec setsid --wait runuser -u rabbitmq -- env -i "${NODE_ENV[@]}" \
      RABBITMQ_NODENAME="$(full_name "$name")" \
      RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
      RABBITMQ_NODE_PORT="$amqp_port" \
      RABBITMQ_DIST_PORT="$dist_port" \
      RABBITMQ_MNESIA_BASE="$dir/mnesia" \
      RABBITMQ_LOG_BASE="$dir/log" \
      RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
      RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" \
      RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
      RABBITMQ_PID_FILE="$dir/pid" \
      RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
      "$RABBITMQ_LIB_BIN/rabbitmq-server" >>"$dir/log/console.log" 2>&1 </dev/null
  ) &
  echo "$!" >"$dir/launcher.pid"
}

# node_fail NAME MESSAGE: reports a node that did not come up, with the end of its logs.
node_fail() {
  local dir
  dir=$(node_dir "$1")
  log "$2; the end of its logs:"
  tail -n 15 "$dir/log/console.log" "$dir/log/$(full_name "$1").log" >&2 2>/dev/null || true
  exit 1
}

# node_wait NAME [AMQP_PORT]: waits until node NAME has booted (rabbitmqctl await_startup) and
# AMQP_PORT, if given, accepts connections; fails when its VM dies or after NODE_START_TIMEOUT s.
# Until the node is registered with epmd, it polls epmd, which costs far less CPU than
# rabbitmqctl (the nodes boot faster without CLI runs competing with them for the cores).
node_wait() {
  local name=$1 amqp_port=${2:-} dir deadline launcher
  dir=$(node_dir "$name")
  launcher=$(cat "$dir/launcher.pid" 2>/dev/null || true)
  deadline=$((SECONDS + NODE_START_TIMEOUT))
  check() {
    if [ -n "$launcher" ] && ! kill -0 "$launcher" 2>/dev/null && [ -z "$(node_pids "$name")" ]; then
      node_fail "$name" "$(full_name "$name") exited while starting"
    fi
    [ "$SECONDS" -lt "$deadline" ] ||
      node_fail "$name" "$(full_name "$name") did not start within ${NODE_START_TIMEOUT}s"
  }
  until epmd_has "$name"; do
    check
    sleep 0.2
  done
  until node_ctl "$name" -q await_startup --timeout $((deadline - SECONDS + 1)) >/dev/null 2>&1; do
    check
    sleep 0.5
  done
  until [ -z "$amqp_port" ] || port_open "$amqp_port"; do
    check
    sleep 0.2
  done
}
