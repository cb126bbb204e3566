#!/usr/bin/env bash
# A team's MLflow tracking server on PostgreSQL (pip install 'seqexp[server]': the drivers).
#
#   scripts/tracking_server.sh serve
#       Runs `mlflow server` in the foreground with
#         SEQEXP_BACKEND_URI    postgresql://USER:PASSWORD@HOST:5432/DB   (required)
#         SEQEXP_ARTIFACT_ROOT  where artifacts go: a folder, s3://..., gs://... (default ./mlartifacts)
#         SEQEXP_HOST           interface to listen on (default 127.0.0.1; 0.0.0.0 for the team)
#         SEQEXP_PORT           (default 5000)
#         SEQEXP_WORKERS        server worker processes (default 2)
#         SEQEXP_ALLOWED_HOSTS  Host headers the server accepts (MLflow's default: localhost and
#                               private IPs), e.g. mlflow.team.example,mlflow.team.example:5000
#       The server proxies artifacts (--artifacts-destination), so clients need no access to the
#       artifact store. Everyone then runs
#         seqexp mlflow.tracking_uri=http://SERVER:5000 ...
#         seqexp-report --tracking-uri http://SERVER:5000 --experiment table2
#
#   scripts/tracking_server.sh local-postgres DIR PORT
#       Creates and starts a throwaway PostgreSQL cluster in DIR, listening on 127.0.0.1:PORT,
#       with a database and role `mlflow`; prints its SEQEXP_BACKEND_URI. For trying the server
#       on one machine and for CI; needs the Debian `postgresql` package (apt-get install
#       postgresql). As root, the cluster runs as the `postgres` user.
#
#   scripts/tracking_server.sh stop-postgres DIR
#       Stops that cluster (the folder stays; delete it yourself).
set -euo pipefail

pg_bin() {
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [[ -z "$dir" ]]; then
        dir=$(dirname "$(command -v initdb 2>/dev/null || echo /missing/initdb)")
    fi
    if [[ ! -x "$dir/initdb" ]]; then
        echo "tracking_server.sh: PostgreSQL's initdb not found; apt-get install postgresql" >&2
        exit 2
    fi
    echo "$dir"
}

# PostgreSQL refuses to run as root: run its programs as the postgres user then.
as_pg() {
    if [[ "$(id -u)" == 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

local_postgres() {
    local dir=${1:?usage: local-postgres DIR PORT} port=${2:?usage: local-postgres DIR PORT}
    local bin password
    bin=$(pg_bin)
    password=$(python -c 'import secrets; print(secrets.token_hex(16))')
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if [[ "$(id -u)" == 0 ]]; then
        chown postgres:postgres "$dir"
    fi
    if ! as_pg test -w "$dir"; then
        echo "tracking_server.sh: the postgres user cannot write $dir (or enter a folder above it)" >&2
        exit 2
    fi
    as_pg "$bin/initdb" -D "$dir/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
        -E UTF8 --no-instructions > "$dir/initdb.log"
    as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir" start > /dev/null
    as_pg "$bin/psql" -h "$dir" -p "$port" -U postgres -v ON_ERROR_STOP=1 -q \
        -c "CREATE ROLE mlflow LOGIN PASSWORD '$password'" \
        -c "CREATE DATABASE mlflow OWNER mlflow" > /dev/null
    echo "postgresql://mlflow:$password@127.0.0.1:$port/mlflow"
}

stop_postgres() {
    local dir=${1:?usage: stop-postgres DIR}
    as_pg "$(pg_bin)/pg_ctl" -D "$dir/data" -m fast -w stop > /dev/null
}

serve() {
    : "${SEQEXP_BACKEND_URI:?set SEQEXP_BACKEND_URI=postgresql://USER:PASSWORD@HOST:5432/DB}"
    local extra=()
    if [[ -n "${SEQEXP_ALLOWED_HOSTS:-}" ]]; then
        extra=(--allowed-hosts "$SEQEXP_ALLOWED_HOSTS")
    fi
    # The interpreter that has seqexp's mlflow and the PostgreSQL drivers (PYTHON=...).
    exec "${PYTHON:-python}" -m mlflow server "${extra[@]}" \
        --backend-store-uri "$SEQEXP_BACKEND_URI" \
        --artifacts-destination "${SEQEXP_ARTIFACT_ROOT:-./mlartifacts}" \
        --serve-artifacts \
        --host "${SEQEXP_HOST:-127.0.0.1}" \
        --port "${SEQEXP_PORT:-5000}" \
        --workers "${SEQEXP_WORKERS:-2}"
}

case "${1:-}" in
    serve) serve ;;
    local-postgres) shift; local_postgres "$@" ;;
    stop-postgres) shift; stop_postgres "$@" ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
esac
