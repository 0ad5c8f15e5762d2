#!/usr/bin/env bash
# Runs the whole test suite on a Debian or Ubuntu machine that has Rust.
#
# First installs what the tests need and the machine lacks:
#   - system packages through apt-get (sudo when not root): redis-server,
#     openssl, curl, faketime, PostgreSQL (started, trust auth for 127.0.0.1),
#     chromium, python3 with venv;
#   - Python packages from tests/requirements.txt into the project's own
#     virtual environment, .venv (never into the system Python; set
#     ANTEROOM_TEST_VENV to keep it elsewhere), and the Python client
#     (clients/python), whose own tests then run with pytest;
#   - Node's eventsource package into tests/apps/sse, and the Node client's
#     dependencies into clients/node (npm ci), whose own tests then run;
#   - Ruby with Rack, redis-rb, Sinatra and Rails from Debian's packages
#     (the gem registry is not needed), for the Ruby client (clients/ruby),
#     whose own tests then run (rake test: minitest).
# Then runs `cargo test` with any arguments given here, e.g.
#   bash scripts/test.sh round_trip
# A test whose prerequisite is still missing fails and names it; none is
# skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "test.sh: $*"; }
as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    echo "test.sh: installing needs root and there is no sudo: run as root, or install: $*" >&2
    return 1
  fi
}
apt_install() {
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

# System packages, by the command (or check) that shows each is present.
packages=()
command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
command -v openssl >/dev/null 2>&1 || packages+=(openssl)
command -v curl >/dev/null 2>&1 || packages+=(curl)
# MariaDB's server and client: the MySQL role-swap test starts two servers
# of its own (never the machine's), with their own data directories.
{ command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ]; } || packages+=(mariadb-server)
command -v mariadb >/dev/null 2>&1 || packages+=(mariadb-client)
# libfaketime: runs proxies and dispatchers with their host clock off.
command -v faketime >/dev/null 2>&1 || packages+=(faketime)
browser=false
for name in chromium chromium-browser google-chrome; do
  command -v "$name" >/dev/null 2>&1 && browser=true
done
command -v python3 >/dev/null 2>&1 || packages+=(python3)
# Debian splits venv and ensurepip out of python3.
if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  packages+=(python3-venv)
fi
pg_ready() { command -v pg_isready >/dev/null 2>&1 && pg_isready -q -h 127.0.0.1 -p 5432; }
pg_fresh=false
if [ -z "${ANTEROOM_TEST_PG:-}" ] && ! pg_ready && ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
  packages+=(postgresql)
  pg_fresh=true
fi
updated=false
if [ ${#packages[@]} -gt 0 ]; then
  say "installing ${packages[*]} (apt-get)"
  as_root apt-get update -q
  updated=true
  apt_install "${packages[@]}"
fi
# Debian packages the browser as chromium; Ubuntu as chromium-browser (a
# snap wrapper). Without one, only the status page tests fail, naming it.
if [ "$browser" = false ]; then
  say "installing a headless browser for the status page tests (apt-get)"
  [ "$updated" = true ] || as_root apt-get update -q || true
  apt_install chromium || apt_install chromium-browser \
    || say "no chromium could be installed; the status page tests will fail saying so"
fi

# The failover playbook test needs PostgreSQL on 127.0.0.1:5432 with trust
# auth for local TCP (or a DSN prefix in ANTEROOM_TEST_PG). A cluster this
# script installed gets that rule, whether or not the package started it.
if [ -z "${ANTEROOM_TEST_PG:-}" ] && { [ "$pg_fresh" = true ] || ! pg_ready; }; then
  version=$(ls /etc/postgresql | sort -V | tail -1)
  if [ "$pg_fresh" = true ]; then
    as_root sed -i '1i host all all 127.0.0.1/32 trust' "/etc/postgresql/$version/main/pg_hba.conf"
  fi
  say "starting PostgreSQL $version"
  if pg_ready; then
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload || true
  else
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  fi
  for _ in $(seq 1 50); do
    pg_ready && break
    sleep 0.2
  done
fi

# The project's virtual environment, rebuilt when the requirements change.
venv=${ANTEROOM_TEST_VENV:-$PWD/.venv}
stamp="$venv/.requirements.sha256"
want=$(sha256sum tests/requirements.txt | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing tests/requirements.txt into $venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r tests/requirements.txt
  echo "$want" > "$stamp"
fi
export ANTEROOM_TEST_VENV="$venv"

# The Python client (clients/python) goes into the same environment at
# every run (it changes with the code, not with the requirements; the
# environment's own setuptools builds it, no download), and its own tests
# run with pytest; the integration tests then use its anteroom-wsgi.
say "installing clients/python into $venv; its tests (pytest)"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation ./clients/python
rm -rf clients/python/build
"$venv/bin/python" -m pytest -q -p no:cacheprovider clients/python/tests

# A real EventSource client (Node's eventsource package, pinned by
# tests/apps/sse/package-lock.json) for the streaming tests; Node from the
# distribution when missing.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  say "installing nodejs and npm (apt-get)"
  [ "$updated" = true ] || as_root apt-get update -q || true
  apt_install nodejs npm
fi
if [ ! -d tests/apps/sse/node_modules/eventsource ]; then
  say "installing the EventSource client (npm ci in tests/apps/sse)"
  npm ci --prefix tests/apps/sse --no-audit --no-fund --silent
fi

# The Node client (clients/node): its dependencies, pinned by its
# package-lock.json, then its own tests (node --test).
if [ ! -d clients/node/node_modules/light-my-request ] || [ clients/node/package-lock.json -nt clients/node/node_modules/.package-lock.json ]; then
  say "installing the Node client's dependencies (npm ci in clients/node)"
  npm ci --prefix clients/node --no-audit --no-fund --silent
fi
say "the Node client's tests (node --test)"
(cd clients/node && node --test test/)

# The Ruby client (clients/ruby): Ruby and the libraries it and its test
# apps load, from the distribution's packages; then its own tests.
ruby_libs='require "rack"; require "redis"; require "redis/connection/hiredis"; require "sinatra/base"; require "action_controller/railtie"; require "minitest"; require "rake"'
if ! command -v ruby >/dev/null 2>&1 || ! ruby -e "$ruby_libs" >/dev/null 2>&1; then
  say "installing ruby, rack, redis-rb (with hiredis), sinatra, rails (railties, actionpack), minitest, rake (apt-get)"
  [ "$updated" = true ] || as_root apt-get update -q || true
  apt_install ruby rake ruby-rack ruby-redis ruby-hiredis ruby-sinatra ruby-railties ruby-actionpack ruby-minitest
fi
say "the Ruby client's tests (rake test)"
(cd clients/ruby && rake test)

if ! command -v cargo >/dev/null 2>&1; then
  echo "test.sh: cargo is missing; install Rust (https://rustup.rs) first" >&2
  exit 1
fi
say "$(cargo --version); $(redis-server --version | cut -d' ' -f1-3); $("$venv/bin/python" --version); $(ruby --version | cut -d' ' -f1-2)"
exec cargo test "$@"
