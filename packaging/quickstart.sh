#!/usr/bin/env bash
# Install what is missing, build moat, and run it on its defaults: the site from ./Moatfile
# or /etc/moat/Moatfile, else `localhost 127.0.0.1:8080`, on ports 80 and 443.
# Extra arguments go to `moat run` (for example: chat.example.com 127.0.0.1:3000).
set -euo pipefail
cd "$(dirname "$0")/.."
packaging/deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)"
exec ./build/moat run "$@"
