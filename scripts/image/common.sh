# shellcheck shell=bash
# Shared helpers of the image scripts (sourced, not run): logging, the loud skip, retries, reachability.
#
# Exit codes the scripts agree on: 0 done, 1 failed, 3 skipped (no engine, or the package registries cannot be
# reached at all). scripts/test-image.sh turns 3 into a loud SKIP and exit 0; anything else non-zero fails it.

SKIP_CODE=3
IMAGE_SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# The project's podman settings; exported so every podman call (and the tests' calls) reads them.
export CONTAINERS_CONF="${CONTAINERS_CONF:-$IMAGE_SCRIPTS_DIR/containers.conf}"

log() {
    printf '[test-image] %s\n' "$*" >&2
}

skip_loudly() {
    printf '\n[test-image] ******** SKIPPED: %s ********\n\n' "$*" >&2
    exit "$SKIP_CODE"
}

# retry ATTEMPTS DELAY_S COMMAND...: run COMMAND until it succeeds, ATTEMPTS times at most, DELAY_S growing.
retry() {
    local attempts=$1 delay=$2 retry_attempt=1
    shift 2
    until "$@"; do
        if [ "$retry_attempt" -ge "$attempts" ]; then
            log "gave up after $retry_attempt attempts: $*"
            return 1
        fi
        log "attempt $retry_attempt of $attempts failed, retrying in ${delay}s: $*"
        sleep "$delay"
        retry_attempt=$((retry_attempt + 1))
        delay=$((delay * 2))
    done
}

# reachable URL: one HEAD-less GET of URL answered (any HTTP status) within 20 s.
reachable() {
    curl -sS -o /dev/null --max-time 20 "$1" 2>/dev/null
}
