# shellcheck shell=bash
# ensure_engine: set ENGINE to a container engine that works here, installing podman when it can (sourced).
#
# podman is preferred: it needs no daemon and it is what CI installs. A docker CLI alone is not enough (this
# kind of machine ships one without a daemon); docker counts only when `docker info` reaches its daemon.
# Installing needs root (or password-less sudo) and apt; without them the image test is skipped, loudly.

# What podman needs here: runc (containers.conf picks it), catatonit (`--init`, as compose's `init: true`),
# debootstrap (the base image, scripts/image/base.sh).
ENGINE_PACKAGES=(podman runc catatonit debootstrap)

_as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    else
        sudo -n "$@"
    fi
}

_can_be_root() {
    [ "$(id -u)" -eq 0 ] || sudo -n true 2>/dev/null
}

_missing_engine_packages() {
    local package
    for package in "${ENGINE_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || echo "$package"
    done
}

_install_engine_packages() {
    local missing
    mapfile -t missing < <(_missing_engine_packages)
    [ "${#missing[@]}" -eq 0 ] && return 0
    log "installing ${missing[*]} (apt)"
    export DEBIAN_FRONTEND=noninteractive
    retry 3 10 _as_root apt-get update -q -o Acquire::Retries=3 >/dev/null || return 1
    retry 3 10 _as_root apt-get install -y -q --no-install-recommends -o Acquire::Retries=3 "${missing[@]}" \
        >/dev/null
}

ensure_engine() {
    if command -v podman >/dev/null 2>&1 && [ -z "$(_missing_engine_packages 2>/dev/null)" ]; then
        ENGINE=podman
    elif command -v apt-get >/dev/null 2>&1 && _can_be_root; then
        if ! _install_engine_packages; then
            if ! reachable "$(debian_mirror)/dists/"; then
                skip_loudly "the Debian package mirror $(debian_mirror) cannot be reached: podman cannot be installed"
            fi
            log "installing podman failed although the mirror answers"
            return 1
        fi
        ENGINE=podman
    elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        ENGINE=docker
    else
        skip_loudly "no container engine: podman is not installed, docker has no daemon, and this user cannot" \
            "install podman (needs root or sudo, and apt)"
    fi
    log "engine: $($ENGINE --version)"
}
