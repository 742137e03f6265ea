#!/usr/bin/env bash
# Install the system packages the test suite needs and the base image lacks.
#
# Idempotent: safe to run on every CI start. Must run as root (CI machines are).
# PostgreSQL 15 is already in the image (/usr/lib/postgresql/15/bin); MariaDB and
# Slurm (slurm-wlm: slurmctld, slurmd, munge), and Chromium with its WebDriver, are
# installed here. No service is
# started: the test fixtures start throwaway servers and a one-node Slurm
# cluster themselves and stop them by PID.
set -euo pipefail

if [[ "$(id -u)" -ne 0 ]]; then
    echo "install_system_deps.sh: must run as root (it calls apt-get)" >&2
    exit 1
fi

packages=()
if ! command -v mariadbd >/dev/null 2>&1 && [[ ! -x /usr/sbin/mariadbd ]]; then
    packages+=(mariadb-server mariadb-client)
fi
if ! command -v slurmctld >/dev/null 2>&1 && [[ ! -x /usr/sbin/slurmctld ]]; then
    packages+=(slurm-wlm munge)
fi
if [[ ! -x /usr/lib/postgresql/15/bin/postgres ]]; then
    packages+=(postgresql-15 postgresql-client-15)
fi
# Headless Chromium and its WebDriver for the browser tests (report page, optuna-dashboard).
if ! command -v chromedriver >/dev/null 2>&1; then
    packages+=(chromium chromium-driver)
fi

if [[ ${#packages[@]} -eq 0 ]]; then
    echo "install_system_deps.sh: nothing to install"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
# policy-rc.d 101 keeps the packages' postinst from starting services (no systemd here).
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    created_policy=1
fi
trap 'if [[ $created_policy -eq 1 ]]; then rm -f "$policy"; fi' EXIT

apt-get update
apt-get install -y --no-install-recommends "${packages[@]}"
echo "install_system_deps.sh: installed ${packages[*]}"
