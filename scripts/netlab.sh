#!/usr/bin/env bash
# The test suite's LAN, for trying things by hand: network namespaces for host A,
# host B, a client and a LAN bridge (see tests/netlab.py for the picture).
#
#   bash scripts/netlab.sh up [PREFIX]      build it (removes a leftover one first)
#   bash scripts/netlab.sh status [PREFIX]
#   bash scripts/netlab.sh down [PREFIX]    remove it (stop what you started inside first)
#
# Run ferryd inside a host's namespace on its LAN address, e.g.
#   ip netns exec fylab-a .venv/bin/ferryd --config a.toml   (address = "10.77.0.1")
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
exec .venv/bin/python tests/netlab.py "${@:-status}"
