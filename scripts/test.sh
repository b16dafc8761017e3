#!/usr/bin/env bash
# The whole test suite: pure tests, store conformance on SQLite and on real etcd (started by
# the tests on loopback), etcd fault tests, and the CLI. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo test --workspace --locked "$@"
