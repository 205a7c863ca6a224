#!/usr/bin/env bash
# Make sure the Prometheus server and promtool are installed (Debian package `prometheus`).
#
# The deployment tests (tests/deploy/) start a real Prometheus on loopback and run `promtool check`, so
# `make test` runs this first. Idempotent: does nothing when both binaries are already on PATH.
# Installing never starts the packaged daemon: a temporary policy-rc.d refuses service starts when the
# machine has none of its own, and recommends (node exporter) are not installed.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "ensure-prometheus: prometheus is missing and this user cannot run apt-get (not root, no sudo)" >&2
        exit 1
    fi
fi

POLICY=/usr/sbin/policy-rc.d
CREATED_POLICY=0
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod 755 "$POLICY"
    CREATED_POLICY=1
fi
cleanup() {
    if [ "$CREATED_POLICY" -eq 1 ]; then
        $SUDO rm -f "$POLICY"
    fi
}
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
echo "ensure-prometheus: installing the Debian prometheus package" >&2
if ! $SUDO apt-get install -y -q --no-install-recommends prometheus >/dev/null; then
    # A fresh machine has no package lists yet.
    $SUDO apt-get update -q >/dev/null
    $SUDO apt-get install -y -q --no-install-recommends prometheus >/dev/null
fi

command -v prometheus >/dev/null && command -v promtool >/dev/null
prometheus --version 2>&1 | head -n 1 >&2
