#!/usr/bin/env bash
# A team's MLflow tracking server on PostgreSQL, behind MLflow's basic auth
# (pip install 'seqexp[server]': the PostgreSQL drivers and mlflow[auth]). docs/team-server.md
# walks through it. No password ever goes on a command line (`ps` shows those to every user):
# they come from files or the environment.
#
#   scripts/tracking_server.sh serve
#       Runs `mlflow server --app-name basic-auth` in the foreground with
#         SEQEXP_BACKEND_URI    postgresql://USER:PASSWORD@HOST:5432/DB (required); mlflow gets it
#                               in its environment (MLFLOW_BACKEND_STORE_URI). Or leave the
#                               password out and let libpq read it (PGPASSFILE, PGPASSWORD)
#         SEQEXP_ARTIFACT_ROOT  where artifacts go: a folder, s3://..., gs://... (default ./mlartifacts)
#         SEQEXP_HOST           interface to listen on (default 127.0.0.1; 0.0.0.0 for the team)
#         SEQEXP_PORT           (default 5000)
#         SEQEXP_WORKERS        server worker processes (default 2)
#         SEQEXP_ALLOWED_HOSTS  Host headers the server accepts (MLflow's default: localhost and
#                               private IPs), e.g. mlflow.team.example,mlflow.team.example:5000
#       and authentication (MLflow's users, passwords and permissions, in their own database):
#         SEQEXP_AUTH           1 (default): every request needs a user name and password.
#                               0: no authentication, refused unless SEQEXP_HOST is a loopback
#                               address (127.x.x.x, ::1, localhost)
#         SEQEXP_ADMIN_PASSWORD_FILE  a file whose first line is the admin's password; or the
#                               password in MLFLOW_AUTH_ADMIN_PASSWORD. Required with auth: the
#                               first start creates the admin with it (later starts keep the
#                               stored password; change it through MLflow's update-password API)
#         SEQEXP_ADMIN_USER     the admin's user name (default admin)
#         SEQEXP_AUTH_DB_URI    the users' database (default sqlite:///$PWD/basic_auth.db, $PWD
#                               being where serve starts); a postgresql:// URI works too
#         SEQEXP_DEFAULT_PERMISSION  what a user may do in experiments others created (default
#                               EDIT: log runs into a shared experiment such as table2; READ:
#                               look only; NO_PERMISSIONS: not even that)
#         MLFLOW_FLASK_SERVER_SECRET_KEY  the web UI's CSRF key (default: a random one per start;
#                               set the same one on every server behind one address)
#       The server proxies artifacts (--artifacts-destination), so clients need no access to the
#       artifact store. Everyone then runs, with their own user name and password,
#         export MLFLOW_TRACKING_USERNAME=alice MLFLOW_TRACKING_PASSWORD=...
#         seqexp mlflow.tracking_uri=http://SERVER:5000 ...
#         seqexp-report --tracking-uri http://SERVER:5000 --experiment table2
#
#   scripts/tracking_server.sh add-user SERVER NAME < PASSWORD_FILE
#       Creates the user NAME on the server at SERVER (http://HOST:PORT) with the password on the
#       first line of standard input; the admin logs in with MLFLOW_TRACKING_USERNAME and
#       MLFLOW_TRACKING_PASSWORD.
#
#   scripts/tracking_server.sh grant SERVER EXPERIMENT NAME PERMISSION
#       Gives the user NAME the PERMISSION (READ, EDIT, MANAGE or NO_PERMISSIONS) on the
#       experiment named EXPERIMENT; the admin logs in as for add-user. MLflow keeps
#       SEQEXP_DEFAULT_PERMISSION as a floor: a grant raises a user above it, never below (for
#       read-only members, serve with SEQEXP_DEFAULT_PERMISSION=READ and grant EDIT where a
#       member logs runs).
#
#   scripts/tracking_server.sh local-postgres DIR PORT
#       Creates and starts a throwaway PostgreSQL cluster in DIR, listening on 127.0.0.1:PORT
#       and on a socket in DIR, with a database and role `mlflow`; prints its SEQEXP_BACKEND_URI.
#       Every connection, local ones included, needs a password (scram-sha-256); the superuser
#       `postgres` has a random one, in DIR/superuser.pw (readable by its owner only). For trying
#       the server on one machine and for CI; needs the Debian `postgresql` package (apt-get
#       install postgresql). As root, the cluster runs as the `postgres` user.
#
#   scripts/tracking_server.sh stop-postgres DIR
#       Stops that cluster (the folder stays; delete it yourself).
set -euo pipefail

die() {
    echo "tracking_server.sh: $*" >&2
    exit 2
}

pg_bin() {
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [[ -z "$dir" ]]; then
        dir=$(dirname "$(command -v initdb 2>/dev/null || echo /missing/initdb)")
    fi
    [[ -x "$dir/initdb" ]] || die "PostgreSQL's initdb not found; apt-get install postgresql"
    echo "$dir"
}

# PostgreSQL refuses to run as root: run its programs as the postgres user then (runuser keeps
# the environment, PGPASSWORD included).
as_pg() {
    if [[ "$(id -u)" == 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

new_secret() {
    "${PYTHON:-python}" -c 'import secrets; print(secrets.token_hex(16))'
}

local_postgres() {
    local dir=${1:?usage: local-postgres DIR PORT} port=${2:?usage: local-postgres DIR PORT}
    local bin password superuser_password
    bin=$(pg_bin)
    password=$(new_secret)
    superuser_password=$(new_secret)
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if [[ "$(id -u)" == 0 ]]; then
        chown postgres:postgres "$dir"
    fi
    as_pg test -w "$dir" \
        || die "the postgres user cannot write $dir (or enter a folder above it)"
    # printf is a shell builtin: the password reaches the file without a command line
    (umask 077 && printf '%s\n' "$superuser_password" > "$dir/superuser.pw")
    if [[ "$(id -u)" == 0 ]]; then
        chown postgres:postgres "$dir/superuser.pw"
    fi
    as_pg "$bin/initdb" -D "$dir/data" -U postgres --pwfile="$dir/superuser.pw" \
        --auth-local=scram-sha-256 --auth-host=scram-sha-256 \
        -E UTF8 --no-instructions > "$dir/initdb.log"
    as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir" start > /dev/null
    # the SQL, with the new role's password, on psql's standard input
    printf '%s\n' "CREATE ROLE mlflow LOGIN PASSWORD '$password';" \
        "CREATE DATABASE mlflow OWNER mlflow;" \
        | PGPASSWORD=$superuser_password as_pg "$bin/psql" -h "$dir" -p "$port" -U postgres \
            -d postgres -v ON_ERROR_STOP=1 -q -f - > /dev/null
    echo "postgresql://mlflow:$password@127.0.0.1:$port/mlflow"
}

stop_postgres() {
    local dir=${1:?usage: stop-postgres DIR}
    as_pg "$(pg_bin)/pg_ctl" -D "$dir/data" -m fast -w stop > /dev/null
}

is_loopback() {
    case "$1" in
        127.*|::1|'[::1]'|localhost) return 0 ;;
        *) return 1 ;;
    esac
}

# configparser reads % as the start of an interpolation: %% is a literal one.
ini_value() {
    printf '%s' "${1//%/%%}"
}

# Runs mlflow as a child, not with exec, so that the auth config (it holds the admin password)
# is deleted when the server stops; INT and TERM are passed on to it.
run_mlflow() {
    local config_dir=$1 status=0
    shift
    "${PYTHON:-python}" -m mlflow server "$@" &
    MLFLOW_PID=$!
    trap 'kill -TERM "$MLFLOW_PID" 2> /dev/null || true' INT TERM
    wait "$MLFLOW_PID" || status=$?
    # a trapped signal ends the first wait early: wait for mlflow itself
    while kill -0 "$MLFLOW_PID" 2> /dev/null; do
        wait "$MLFLOW_PID" || status=$?
    done
    rm -rf "$config_dir"
    return "$status"
}

serve() {
    : "${SEQEXP_BACKEND_URI:?set SEQEXP_BACKEND_URI=postgresql://USER:PASSWORD@HOST:5432/DB}"
    local host=${SEQEXP_HOST:-127.0.0.1}
    local args=(
        --artifacts-destination "${SEQEXP_ARTIFACT_ROOT:-./mlartifacts}"
        --serve-artifacts
        --host "$host"
        --port "${SEQEXP_PORT:-5000}"
        --workers "${SEQEXP_WORKERS:-2}"
    )
    if [[ -n "${SEQEXP_ALLOWED_HOSTS:-}" ]]; then
        args+=(--allowed-hosts "$SEQEXP_ALLOWED_HOSTS")
    fi
    # mlflow server reads --backend-store-uri from here: the password stays off `ps`
    export MLFLOW_BACKEND_STORE_URI=$SEQEXP_BACKEND_URI
    case "${SEQEXP_AUTH:-1}" in
        1) ;;
        0)
            is_loopback "$host" || die "SEQEXP_HOST=$host is not a loopback address: the" \
                "server needs authentication there (SEQEXP_AUTH=1, the default)"
            # The interpreter that has seqexp's mlflow and the PostgreSQL drivers (PYTHON=...).
            exec "${PYTHON:-python}" -m mlflow server "${args[@]}"
            ;;
        *) die "SEQEXP_AUTH=${SEQEXP_AUTH}: use 1 (authentication, the default) or 0" ;;
    esac

    local admin_password
    if [[ -n "${SEQEXP_ADMIN_PASSWORD_FILE:-}" ]]; then
        [[ -r "$SEQEXP_ADMIN_PASSWORD_FILE" ]] \
            || die "SEQEXP_ADMIN_PASSWORD_FILE=$SEQEXP_ADMIN_PASSWORD_FILE: cannot read it"
        IFS= read -r admin_password < "$SEQEXP_ADMIN_PASSWORD_FILE" || true
    else
        admin_password=${MLFLOW_AUTH_ADMIN_PASSWORD:-}
    fi
    [[ -n "$admin_password" ]] || die "authentication needs the admin's password:" \
        "SEQEXP_ADMIN_PASSWORD_FILE=FILE (its first line) or MLFLOW_AUTH_ADMIN_PASSWORD" \
        "(SEQEXP_AUTH=0 turns authentication off, on a loopback SEQEXP_HOST only)"
    local permission=${SEQEXP_DEFAULT_PERMISSION:-EDIT}
    case "$permission" in
        READ|EDIT|MANAGE|NO_PERMISSIONS) ;;
        *) die "SEQEXP_DEFAULT_PERMISSION=$permission: one of READ EDIT MANAGE NO_PERMISSIONS" ;;
    esac

    local config_dir
    config_dir=$(mktemp -d)  # mode 700
    (umask 077 && {
        echo "[mlflow]"
        echo "default_permission = $permission"
        echo "database_uri = $(ini_value "${SEQEXP_AUTH_DB_URI:-sqlite:///$PWD/basic_auth.db}")"
        echo "admin_username = $(ini_value "${SEQEXP_ADMIN_USER:-admin}")"
        echo "admin_password = $(ini_value "$admin_password")"
        echo "authorization_function = mlflow.server.auth:authenticate_request_basic_auth"
    } > "$config_dir/basic_auth.ini")
    export MLFLOW_AUTH_CONFIG_PATH=$config_dir/basic_auth.ini
    # newer MLflow versions read these before the file (and older ones the file)
    export MLFLOW_AUTH_ADMIN_USERNAME=${SEQEXP_ADMIN_USER:-admin}
    export MLFLOW_AUTH_ADMIN_PASSWORD=$admin_password
    if [[ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]]; then
        MLFLOW_FLASK_SERVER_SECRET_KEY=$(new_secret)
        export MLFLOW_FLASK_SERVER_SECRET_KEY
    fi
    run_mlflow "$config_dir" --app-name basic-auth "${args[@]}"
}

add_user() {
    local usage="usage: add-user SERVER NAME < PASSWORD_FILE"
    local server=${1:?$usage} name=${2:?$usage} password
    [[ -n "${MLFLOW_TRACKING_USERNAME:-}" && -n "${MLFLOW_TRACKING_PASSWORD:-}" ]] \
        || die "add-user: the admin logs in with MLFLOW_TRACKING_USERNAME and" \
            "MLFLOW_TRACKING_PASSWORD"
    IFS= read -r password || true
    [[ -n "$password" ]] || die "add-user: the new user's password goes on standard input"
    SEQEXP_NEW_USER_PASSWORD=$password "${PYTHON:-python}" -W ignore - "$server" "$name" <<'PY'
import os
import sys

from mlflow.server.auth.client import AuthServiceClient

server, name = sys.argv[1], sys.argv[2]
try:
    AuthServiceClient(server).create_user(name, os.environ["SEQEXP_NEW_USER_PASSWORD"])
except Exception as exc:  # one line, not a traceback
    sys.exit(f"tracking_server.sh: add-user {name} on {server}: {str(exc).splitlines()[0]}")
print(f"user {name} created on {server}")
PY
}

grant() {
    local usage="usage: grant SERVER EXPERIMENT NAME READ|EDIT|MANAGE|NO_PERMISSIONS"
    local server=${1:?$usage} experiment=${2:?$usage} name=${3:?$usage} permission=${4:?$usage}
    case "$permission" in
        READ|EDIT|MANAGE|NO_PERMISSIONS) ;;
        *) die "grant: PERMISSION=$permission: one of READ EDIT MANAGE NO_PERMISSIONS" ;;
    esac
    [[ -n "${MLFLOW_TRACKING_USERNAME:-}" && -n "${MLFLOW_TRACKING_PASSWORD:-}" ]] \
        || die "grant: the admin logs in with MLFLOW_TRACKING_USERNAME and" \
            "MLFLOW_TRACKING_PASSWORD"
    "${PYTHON:-python}" -W ignore - "$server" "$experiment" "$name" "$permission" <<'PY'
import sys

from mlflow.server.auth.client import AuthServiceClient
from mlflow.tracking import MlflowClient

server, experiment, name, permission = sys.argv[1:5]
try:
    found = MlflowClient(server).get_experiment_by_name(experiment)
    if found is None:
        print(f"tracking_server.sh: grant: no experiment named {experiment!r} on {server}",
              file=sys.stderr)
        sys.exit(2)
    AuthServiceClient(server).grant_user_permission(name, "experiment", found.experiment_id,
                                                    permission)
except Exception as exc:  # one line, not a traceback
    sys.exit(f"tracking_server.sh: grant {permission} on {experiment} to {name} on {server}: "
             f"{str(exc).splitlines()[0]}")
print(f"user {name} has {permission} on experiment {experiment} on {server}")
PY
}

case "${1:-}" in
    serve) serve ;;
    add-user) shift; add_user "$@" ;;
    grant) shift; grant "$@" ;;
    local-postgres) shift; local_postgres "$@" ;;
    stop-postgres) shift; stop_postgres "$@" ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
esac
