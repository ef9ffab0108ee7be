#!/usr/bin/env bash
# The README's main command: installs what is missing, builds kl (optimised) and
# runs it. With no model given, kl uses the embedded tiny model (made on first use).
#   tools/kl.sh local --prompt "Once upon a time"     (router + workers, streamed through them)
#   tools/kl.sh generate --prompt "..."               (in process, no cluster)
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install_deps.sh
bazel build -c opt --noshow_progress --ui_event_filters=-info //tools/kl:kl //services/router:kl-router //services/prefill:kl-prefill //services/decode:kl-decode >&2
exec bazel-bin/tools/kl/kl "$@"
