#!/usr/bin/env bash
# pycocoevalcap's PTB tokenizer and METEOR run Java. Make sure `java` is on PATH:
# install a headless JRE with apt when we are root, otherwise say what to install.
set -euo pipefail
if command -v java >/dev/null 2>&1; then
    exit 0
fi
echo "medcap: Java not found; pycocoevalcap (METEOR, PTB tokenizer) needs it." >&2
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "medcap: installing a headless JRE with apt-get ..." >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq default-jre-headless >/dev/null
    command -v java >/dev/null 2>&1 && { echo "medcap: $(java -version 2>&1 | head -1)" >&2; exit 0; }
fi
echo "medcap: please install a Java runtime (e.g. 'sudo apt-get install default-jre-headless'" >&2
echo "        or 'conda install -c conda-forge openjdk') and run again." >&2
exit 1
