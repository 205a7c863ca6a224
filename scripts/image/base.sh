# shellcheck shell=bash
# ensure_base_image: make the Debian base image the test builds on, when the engine does not have it (sourced).
#
# No image registry is reachable from this kind of machine, so the base cannot be pulled. Debian's package
# mirror is reachable, so debootstrap builds a minimal bookworm root file system from the very mirror this
# machine's apt uses and the engine imports it as a one-layer image. The engine's image store is the cache:
# later runs on the same machine find the image and skip all of this.

BASE_IMAGE_REF="${BASE_IMAGE_REF:-localhost/debian:bookworm}"
BASE_SUITE="${BASE_SUITE:-bookworm}"

# debian_mirror: the first Debian archive URI of this machine's apt sources (deb822 or one-line format), or
# deb.debian.org when there is none (then it only has to be reachable).
debian_mirror() {
    local uri
    uri=$(
        {
            cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '$1 == "URIs:" {print $2}' || true
            cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
                awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) {print $i; break}}' || true
        } | awk '/\/debian\/?$/ {print; exit}'
    )
    echo "${uri:-http://deb.debian.org/debian}"
}

_bootstrap_once() {
    local root=$1 mirror=$2
    rm -rf "$root" && mkdir -p "$root"
    timeout 900 debootstrap --variant=minbase "$BASE_SUITE" "$root" "$mirror" >"$root.log" 2>&1 || {
        tail -n 20 "$root.log" >&2
        return 1
    }
}

ensure_base_image() {
    if $ENGINE image exists "$BASE_IMAGE_REF" 2>/dev/null \
        || $ENGINE image inspect "$BASE_IMAGE_REF" >/dev/null 2>&1; then
        log "base image $BASE_IMAGE_REF: cached"
        return 0
    fi
    local mirror work started
    mirror=$(debian_mirror)
    if ! reachable "$mirror/dists/$BASE_SUITE/Release"; then
        skip_loudly "the Debian mirror $mirror cannot be reached: no base image can be made"
    fi
    work=$(mktemp -d /var/tmp/nuwa-base.XXXXXX)
    started=$(date +%s)
    log "base image $BASE_IMAGE_REF: debootstrap --variant=minbase $BASE_SUITE from $mirror"
    if ! retry 3 15 _bootstrap_once "$work/rootfs" "$mirror"; then
        rm -rf "$work"
        return 1
    fi
    # apt inside the image build keeps no package cache, and the base needs no docs.
    rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
    tar -C "$work/rootfs" -c . | $ENGINE import - "$BASE_IMAGE_REF" >/dev/null
    rm -rf "$work"
    log "base image $BASE_IMAGE_REF: made in $(($(date +%s) - started)) s"
}
