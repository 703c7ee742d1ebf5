#!/usr/bin/env bash
# A local single-node Apache Kafka (KRaft) broker from Maven Central jars.
#
#   deploy/kafka/kafka.sh start    fetch jars if missing, format once, start in the background, wait until ready
#   deploy/kafka/kafka.sh stop     stop the broker started from this state dir
#   deploy/kafka/kafka.sh status   exit 0 if a broker answers on the port
#   deploy/kafka/kafka.sh format   fetch jars if missing and format the state dir (start does this itself)
#
# Environment: KAFKA_PORT (9092), KAFKA_CONTROLLER_PORT (9093), KAFKA_STATE_DIR (deploy/kafka/state),
# KAFKA_MAJOR (4; 3 = the 3.9.x fallback), KAFKA_HEAP_OPTS, KAFKA_START_TIMEOUT (seconds, 90),
# KAFKA_CLUSTER_ID (a new random one when the state dir is first formatted), PYTHON.
# A broker already answering on the port is reused. Failures print the tail of the broker log and exit 1.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PORT="${KAFKA_PORT:-9092}"
CPORT="${KAFKA_CONTROLLER_PORT:-9093}"
STATE="${KAFKA_STATE_DIR:-$HERE/state}"
MAJOR="${KAFKA_MAJOR:-4}"
LIBS="$HERE/libs-kafka$MAJOR"
TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
PYTHON="${PYTHON:-python3}"
JAVA_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx1536m} -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true"
PIDFILE="$STATE/kafka.pid"
LOG="$STATE/logs/stdout.log"

say() { echo "kafka: $*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# An admin metadata round trip, not just an open port: the listener opens before the broker can serve.
ready() {
  "$PYTHON" - "$PORT" <<'PY' >/dev/null 2>&1
import asyncio, sys
from aiokafka.admin import AIOKafkaAdminClient
async def main() -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=f"127.0.0.1:{sys.argv[1]}", request_timeout_ms=3000)
    try:
        await asyncio.wait_for(admin.start(), 5)
        await asyncio.wait_for(admin.list_topics(), 5)
    finally:
        await admin.close()
asyncio.run(main())
PY
}

ensure_java() {
  if ! command -v java >/dev/null 2>&1 || ! command -v mvn >/dev/null 2>&1; then
    say "installing Java and Maven (Debian packages default-jre-headless, maven)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless maven) >&2
  fi
}

fetch_jars() {
  if [ -f "$LIBS/.complete" ]; then return; fi
  ensure_java
  say "fetching Apache Kafka jars (profile kafka$MAJOR) from Maven Central into $LIBS"
  rm -rf "$LIBS"
  (cd "$HERE" && mvn -q -B "-Pkafka$MAJOR" -Dlibs.dir="$LIBS" dependency:copy-dependencies) >&2
  touch "$LIBS/.complete"
}

tail_log() { [ -f "$LOG" ] && { say "last lines of $LOG:"; tail -n 40 "$LOG" >&2; }; return 0; }

log_option() {
  if [ "$MAJOR" = 4 ]; then echo "-Dlog4j2.configurationFile=$HERE/log4j2.properties"
  else echo "-Dlog4j.configuration=file:$HERE/log4j.properties"; fi
}

configure() {
  mkdir -p "$STATE/data" "$STATE/logs"
  sed -e "s#@DATA@#$STATE/data#" -e "s#@PORT@#$PORT#g" -e "s#@CPORT@#$CPORT#g" \
    "$HERE/server.properties.in" > "$STATE/server.properties"
}

# A cluster id as Kafka's own Uuid.randomUuid makes it: url-safe base64 of 16 random bytes, never starting with
# "-" (an id such as "-Xy..." would read as an option). It is passed as --cluster-id=ID all the same.
cluster_id() {
  if [ -n "${KAFKA_CLUSTER_ID:-}" ]; then echo "$KAFKA_CLUSTER_ID"; return; fi
  "$PYTHON" -c '
import base64, uuid
while (cid := base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")).startswith("-"):
    pass
print(cid)'
}

# Format the state dir once (a formatted one is kept as it is).
format_storage() {
  if [ -f "$STATE/data/meta.properties" ]; then return; fi
  local cid; cid="$(cluster_id)"
  # shellcheck disable=SC2086
  java $JAVA_OPTS "$(log_option)" -cp "$LIBS/*" kafka.tools.StorageTool format "--cluster-id=$cid" \
    -c "$STATE/server.properties" --ignore-formatted > "$STATE/logs/format.log" 2>&1 \
    || { say "formatting the storage failed"; tail -n 40 "$STATE/logs/format.log" >&2; exit 1; }
}

start() {
  if port_open "$PORT" && ready; then say "reusing the broker already up on 127.0.0.1:$PORT"; return 0; fi
  if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    say "a broker (pid $(cat "$PIDFILE")) is starting; waiting for it"
  else
    fetch_jars
    ensure_java
    configure
    format_storage
    # shellcheck disable=SC2086
    nohup java $JAVA_OPTS "$(log_option)" -Dkafka.logs.dir="$STATE/logs" -cp "$LIBS/*" kafka.Kafka \
      "$STATE/server.properties" > "$LOG" 2>&1 < /dev/null &
    echo $! > "$PIDFILE"
  fi
  local t0=$SECONDS
  while (( SECONDS - t0 < TIMEOUT )); do
    if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then say "the broker exited during startup"; tail_log; exit 1; fi
    if port_open "$PORT" && ready; then say "ready on 127.0.0.1:$PORT (pid $(cat "$PIDFILE"))"; return 0; fi
    sleep 0.3
  done
  say "not ready after ${TIMEOUT}s"; tail_log; exit 1
}

stop() {
  if [ ! -f "$PIDFILE" ]; then say "no pid file in $STATE"; return 0; fi
  local pid; pid="$(cat "$PIDFILE")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && { say "still up after 20 s; killing"; kill -9 "$pid"; }
  fi
  rm -f "$PIDFILE"; say "stopped"
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) port_open "$PORT" && ready ;;
  fetch) fetch_jars ;;
  format) fetch_jars; ensure_java; configure; format_storage ;;
  *) echo "usage: $0 start|stop|status|fetch|format" >&2; exit 2 ;;
esac
