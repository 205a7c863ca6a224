# shellcheck shell=bash
# build_image FLAVOUR TAG: build docker/Dockerfile's FLAVOUR (cpu | gpu) as TAG (sourced).
#
# The Dockerfile's defaults are the real-world ones and stay untouched; only what this build host needs is passed:
#   - BASE_IMAGE: the locally made Debian base (scripts/image/base.sh), as no image registry can be reached;
#   - PIP_CERT: the CA bundle of this machine's own pip settings (`pip config list`), mounted read-only into the
#     build so that pip in the build reaches the registry as pip on the host does;
#   - for the CPU flavour, where the CPU torch index (download.pytorch.org) cannot be reached: the same CPU wheel
#     from the machine's local wheel directory (pip's find-links, mounted read-only, PIP_FIND_LINKS), pinned as
#     TORCH_VERSION=<pin>+cpu and resolved against PyPI.
# Downloads in the build (apt, pip) retry on their own (Dockerfile); a build that still fails on the network is
# run again (the layers already built are reused), and skipped loudly when the registries are gone altogether.

CPU_TORCH_INDEX="https://download.pytorch.org/whl/cpu"
PIP_MOUNT_DIR="/mnt/host-pip"
NETWORK_ERRORS='Temporary failure resolving|Could not resolve|Failed to fetch|Connection timed out|Connection reset|Read timed out|ConnectTimeoutError|NewConnectionError|Max retries exceeded|IncompleteRead|Hash Sum mismatch|Unable to connect|Network is unreachable|No route to host'

# host_pip_setting KEY: the value of KEY (cert, find-links, index-url) in this machine's pip configuration.
host_pip_setting() {
    local key=$1 env_name
    env_name="PIP_$(echo "$key" | tr 'a-z-' 'A-Z_')"
    if [ -n "${!env_name:-}" ]; then
        echo "${!env_name}"
        return
    fi
    python3 -m pip config list 2>/dev/null | sed -n -E "s/^[^.]*\.${key}='([^']*)'$/\1/p" | head -n 1
}

pip_index_url() {
    local index
    index=$(host_pip_setting index-url)
    echo "${index:-https://pypi.org/simple}"
}

dockerfile_arg_default() {
    sed -n -E "s/^ARG $1=(.*)$/\1/p" docker/Dockerfile | head -n 1
}

# environment_build_args FLAVOUR: fill BUILD_ARGS with this host's needs (see the header).
environment_build_args() {
    local flavour=$1 cert links torch_version cpu_wheel
    BUILD_ARGS=(--build-arg "BASE_IMAGE=$BASE_IMAGE_REF")
    cert=$(host_pip_setting cert)
    links=$(host_pip_setting find-links)
    if [ "$ENGINE" = podman ]; then
        if [ -n "$cert" ] && [ -f "$cert" ]; then
            BUILD_ARGS+=(-v "$cert:$PIP_MOUNT_DIR/ca.crt:ro" --build-arg "PIP_CERT=$PIP_MOUNT_DIR/ca.crt")
        fi
    fi
    # The GPU flavour takes its torch from the index alone: a local CPU wheel of the same version would win.
    [ "$flavour" = cpu ] || return 0
    if reachable "$CPU_TORCH_INDEX/"; then
        BUILD_ARGS+=(--build-arg "TORCH_INDEX_URL=$CPU_TORCH_INDEX")
        return 0
    fi
    torch_version=$(dockerfile_arg_default TORCH_VERSION)
    cpu_wheel=$(find "${links:-/nonexistent}" -maxdepth 1 -name "torch-${torch_version}+cpu-*.whl" 2>/dev/null | head -n 1)
    if [ "$ENGINE" != podman ] || [ -z "$cpu_wheel" ]; then
        skip_loudly "the CPU torch index $CPU_TORCH_INDEX cannot be reached and no local torch ${torch_version}+cpu wheel" \
            "can be mounted into the build"
    fi
    log "CPU torch: $CPU_TORCH_INDEX unreachable; using the local wheel $(basename "$cpu_wheel")"
    BUILD_ARGS+=(-v "$links:$PIP_MOUNT_DIR/wheels:ro" --build-arg "PIP_FIND_LINKS=$PIP_MOUNT_DIR/wheels")
    BUILD_ARGS+=(--build-arg "TORCH_INDEX_URL=$(pip_index_url)" --build-arg "TORCH_VERSION=${torch_version}+cpu")
}

_build_once() {
    local tag=$1 log_file=$2
    local format=()  # engine-specific flags
    # podman writes OCI images by default, and the OCI image format has no HEALTHCHECK.
    if [ "$ENGINE" = podman ]; then
        format=(--format docker)
    fi
    # NUWA_IMAGE_NO_CACHE=1: every step built again (for measuring a cold build; CI reuses the layer cache).
    if [ "${NUWA_IMAGE_NO_CACHE:-0}" = 1 ]; then
        format+=(--no-cache)
    fi
    # Bounded, so that a hung download cannot eat CI's time (a cold GPU build took 686 s here).
    timeout 1800 "$ENGINE" build "${format[@]}" --network host -f docker/Dockerfile -t "$tag" "${BUILD_ARGS[@]}" . \
        >"$log_file" 2>&1
}

# build_image FLAVOUR TAG: sets BUILD_SECONDS and CACHED_STEPS (steps the layer cache answered).
# shellcheck disable=SC2034  # both are read by scripts/test-image.sh
build_image() {
    local flavour=$1 tag=$2 log_file attempt=1 started previous
    log_file=$(mktemp /tmp/nuwa-image-build.XXXXXX.log)
    environment_build_args "$flavour"
    previous=$($ENGINE image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
    log "building $tag ($flavour): $ENGINE build -f docker/Dockerfile ${BUILD_ARGS[*]} ."
    started=$(date +%s)
    until _build_once "$tag" "$log_file"; do
        if ! grep -q -E "$NETWORK_ERRORS" "$log_file"; then
            tail -n 40 "$log_file" >&2
            log "the build failed (not a network error); full log: $log_file"
            return 1
        fi
        if [ "$attempt" -ge 3 ]; then
            tail -n 20 "$log_file" >&2
            if ! reachable "$(pip_index_url)/pip/" || ! reachable "$(debian_mirror)/dists/"; then
                skip_loudly "the package registries cannot be reached from the build (log: $log_file)"
            fi
            log "the build kept failing on the network although the registries answer; full log: $log_file"
            return 1
        fi
        log "the build failed on the network (attempt $attempt of 3), building again"
        grep -E "$NETWORK_ERRORS" "$log_file" | tail -n 3 >&2
        attempt=$((attempt + 1))
        sleep $((attempt * 10))
    done
    BUILD_SECONDS=$(($(date +%s) - started))
    CACHED_STEPS=$(grep -c -E '^--> Using cache' "$log_file" || true)
    # A rebuild moves the tag: drop the image it left behind, not anything else in the store.
    if [ -n "$previous" ] && [ "$previous" != "$($ENGINE image inspect --format '{{.Id}}' "$tag")" ]; then
        $ENGINE rmi "$previous" >/dev/null 2>&1 || true
    fi
    rm -f "$log_file"
}
