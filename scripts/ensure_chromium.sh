#!/usr/bin/env bash
# The serving tests drive the web page in headless Chromium through selenium, with
# Debian's chromedriver (nothing is downloaded by selenium). Install both with apt when
# we are root; otherwise say what to install. Never fails the setup: without them the
# browser test is skipped and says why.
set -uo pipefail
have() { command -v chromium >/dev/null 2>&1 && [ -x /usr/bin/chromedriver ]; }
if have; then
    exit 0
fi
echo "medcap: chromium / chromedriver not found; the web page test (tests/serve) needs them." >&2
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "medcap: installing chromium and chromium-driver with apt-get ..." >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null
    have && { echo "medcap: $(chromium --version 2>/dev/null | head -1)" >&2; exit 0; }
fi
echo "medcap: please install them (e.g. 'sudo apt-get install chromium chromium-driver');" >&2
echo "        until then the browser test is skipped." >&2
exit 0
