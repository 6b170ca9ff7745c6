#!/usr/bin/env bash
# Builds the capsule guest image from Debian packages and the hangar-guest crate:
#   OUT_DIR/vmlinux            uncompressed kernel of linux-image-cloud-amd64 (boots by PVH)
#   OUT_DIR/initramfs.cpio.gz  busybox-static, the virtio modules, hangar-guest, /init
#   OUT_DIR/base.qcow2         an empty ext4 filesystem, mounted at /data in the guest
#   OUT_DIR/manifest.json      kernel version, input key, sha256 of each file
# Usage: ops/build-guest-image.sh [OUT_DIR]   (default ${HANGAR_IMAGE_DIR:-<repo>/.hangar/image})
# Cached: rebuilds only when the key (kernel package version, busybox version, rustc, the guest
# crate's sources, Cargo.lock, this script) changed; HANGAR_IMAGE_FORCE=1 rebuilds anyway.
# Builds in a staging dir next to OUT_DIR and swaps it into place. See /work/shared/VMM.md.
set -euo pipefail

say() { printf 'build-guest-image: %s\n' "$*"; }
die() {
    printf 'build-guest-image: error: %s\n' "$*" >&2
    exit 1
}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
script="$repo/ops/build-guest-image.sh"
out=${1:-${HANGAR_IMAGE_DIR:-$repo/.hangar/image}}
mkdir -p "$(dirname "$out")"
out="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"
cache=${HANGAR_IMAGE_CACHE:-$repo/.hangar/cache}
disk_size=${HANGAR_IMAGE_DISK_SIZE:-1G}
meta_pkg=linux-image-cloud-amd64
# VMM.md's order; each module's own dependencies are loaded before it anyway.
modules=(virtio_ring virtio virtio_mmio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
    virtio_blk virtio_console ext4)

for tool in apt-get apt-cache dpkg-deb lz4 cpio gzip modinfo mkfs.ext4 qemu-img cargo rustc \
    sha256sum grep flock; do
    command -v "$tool" >/dev/null || die "$tool is missing (run ops/install-deps.sh)"
done
dpkg-query -W busybox-static >/dev/null 2>&1 || die "busybox-static is missing (run ops/install-deps.sh)"
[ -x /bin/busybox ] || die "/bin/busybox is missing (reinstall busybox-static)"

# The kernel package the meta package points at, e.g. linux-image-6.1.0-56-cloud-amd64.
kernel_pkg() {
    apt-cache show --no-all-versions "$meta_pkg" 2>/dev/null | sed -n 's/^Depends: //p' |
        tr ',' '\n' | grep -o 'linux-image-[0-9][^ ]*-cloud-amd64' | head -n1 || true
}
kpkg=$(kernel_pkg)
if [ -z "$kpkg" ]; then
    say "apt knows no $meta_pkg: running apt-get update"
    apt-get update -q >/dev/null
    kpkg=$(kernel_pkg)
    [ -n "$kpkg" ] || die "apt has no $meta_pkg (is a Debian 12 main source configured?)"
fi
kver=${kpkg#linux-image-}
kpkg_version=$(apt-cache show --no-all-versions "$kpkg" | sed -n 's/^Version: //p' | head -n1)
busybox_version=$(dpkg-query -W -f='${Version}' busybox-static)
# The base disk depends only on these; an unchanged recipe keeps the old file (see below).
base_recipe="mkfs.ext4 -q -F -L hangar-data -m 0 -E lazy_itable_init=0,lazy_journal_init=0 size=$disk_size"
base_key=$(printf '%s\n' "$base_recipe" | sha256sum | cut -c1-16)

key=$(
    cd "$repo"
    {
        echo "kernel $kpkg $kpkg_version"
        echo "busybox $busybox_version"
        rustc -V
        echo "base $base_key"
        sha256sum ops/build-guest-image.sh Cargo.lock Cargo.toml guest/Cargo.toml
        find guest/src -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
    } | sha256sum | cut -c1-16
)

# A field of an existing manifest, or nothing.
manifest_field() {
    [ -f "$1" ] || return 0
    sed -n "s/^  \"$2\": \"\\([^\"]*\\)\".*/\\1/p" "$1" | head -n1
}

# One build at a time per OUT_DIR; a second one waits, then finds the image up to date.
exec 9>"$(dirname "$out")/.$(basename "$out").lock"
flock 9

reason=""
old_key=$(manifest_field "$out/manifest.json" key)
if [ "${HANGAR_IMAGE_FORCE:-0}" = 1 ]; then
    reason="HANGAR_IMAGE_FORCE=1"
elif [ ! -f "$out/manifest.json" ]; then
    reason="no image at $out"
elif [ "$old_key" != "$key" ]; then
    reason="inputs changed (key ${old_key:-none} -> $key)"
else
    for f in vmlinux initramfs.cpio.gz base.qcow2; do
        [ -s "$out/$f" ] || reason="$out/$f is missing"
    done
fi
if [ -z "$reason" ]; then
    say "guest image up to date (key $key) in $out"
    exit 0
fi
say "building guest image: $reason"
say "kernel $kpkg $kpkg_version, busybox-static $busybox_version, key $key"

stage=$(mktemp -d "$(dirname "$out")/.$(basename "$out").staging.XXXXXX")
cleanup() { [ -z "$stage" ] || rm -rf "$stage"; }
trap cleanup EXIT
work="$stage/work"
root="$work/root"
mkdir -p "$work" "$cache/debs"

# 1. The kernel: the .deb, then the LZ4 legacy frame inside vmlinuz, uncompressed.
deb=$(ls "$cache/debs/${kpkg}_"*"$kpkg_version"*_amd64.deb 2>/dev/null | head -n1 || true)
if [ -z "$deb" ]; then
    say "downloading $kpkg=$kpkg_version into $cache/debs"
    # As root apt warns that it cannot drop privileges to _apt for the download; harmless.
    (cd "$cache/debs" && apt-get download -q "$kpkg=$kpkg_version" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
    deb=$(ls "$cache/debs/${kpkg}_"*"$kpkg_version"*_amd64.deb 2>/dev/null | head -n1 || true)
    [ -n "$deb" ] || die "apt-get download $kpkg=$kpkg_version produced no .deb"
fi
say "unpacking $(basename "$deb")"
dpkg-deb -x "$deb" "$work/k"
vmlinuz="$work/k/boot/vmlinuz-$kver"
[ -f "$vmlinuz" ] || die "$vmlinuz not in the package"
found=""
for offset in $(LC_ALL=C grep -obUaP '\x02\x21\x4c\x18' "$vmlinuz" | cut -d: -f1 | head -n5); do
    # lz4 complains about the bytes after the frame (exit status 1); the output is whole.
    tail -c +$((offset + 1)) "$vmlinuz" | lz4 -dc >"$stage/vmlinux" 2>/dev/null || true
    if [ "$(head -c4 "$stage/vmlinux" | od -An -tx1 | tr -d ' ')" = 7f454c46 ]; then
        found=$offset
        break
    fi
done
[ -n "$found" ] || die "no LZ4 frame holding an ELF kernel in $vmlinuz"
say "vmlinux: $(stat -c %s "$stage/vmlinux") bytes (LZ4 frame at offset $found)"

# 2. The modules, each after its dependencies (the package has no modules.dep: modinfo).
mdir="$work/k/lib/modules/$kver"
declare -A module_file=() loaded=()
while IFS= read -r -d '' f; do
    name=$(basename "$f")
    name=${name%%.ko*}
    module_file[${name//-/_}]=$f
done < <(find "$mdir/kernel" -name '*.ko*' -print0)
load_order=()
add_module() {
    local name=${1//-/_} file dep
    [ -z "${loaded[$name]:-}" ] || return 0
    loaded[$name]=1
    file=${module_file[$name]:-}
    if [ -z "$file" ]; then
        # No pipe into grep -q here: with pipefail, its early exit can fail the pipeline.
        if grep -qE "/${name//_/[-_]}\.ko$" "$mdir/modules.builtin"; then
            say "module $name: built into the kernel"
            return 0
        fi
        die "module $name: neither a module nor built in"
    fi
    for dep in $(modinfo -F depends "$file" | tr ',' ' '); do
        add_module "$dep"
    done
    load_order+=("$name")
}
for m in "${modules[@]}"; do add_module "$m"; done
mkdir -p "$root/lib/modules" "$root/etc/hangar"
for name in "${load_order[@]}"; do
    file=${module_file[$name]}
    case $file in
    *.ko) cp "$file" "$root/lib/modules/$name.ko" ;;
    *.ko.xz) xz -dc "$file" >"$root/lib/modules/$name.ko" ;;
    *.ko.zst) zstd -qdc "$file" >"$root/lib/modules/$name.ko" ;;
    *) die "module $name: unsupported file $file" ;;
    esac
done
printf '%s\n' "${load_order[@]}" >"$root/etc/hangar/modules"
say "modules (load order): ${load_order[*]}"

# 3. busybox and its applets as symlinks.
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,data,root}
cp /bin/busybox "$root/bin/busybox"
/bin/busybox --list-full | while read -r applet; do
    [ "$applet" != bin/busybox ] || continue
    mkdir -p "$root/$(dirname "$applet")"
    ln -sf /bin/busybox "$root/$applet"
done

# 4. hangar-guest, static (glibc, crt-static: no musl target here). A separate target dir,
# so these RUSTFLAGS do not invalidate the workspace's normal build.
say "building hangar-guest (static, release)"
(
    cd "$repo"
    RUSTFLAGS='-C target-feature=+crt-static' CARGO_TARGET_DIR="$repo/target/guest" \
        cargo build -q --release --locked -p hangar-guest --target x86_64-unknown-linux-gnu
)
guest_bin="$repo/target/guest/x86_64-unknown-linux-gnu/release/hangar-guest"
ldd_out=$(ldd "$guest_bin" 2>&1 || true)
grep -qE 'not a dynamic executable|statically linked' <<<"$ldd_out" ||
    die "$guest_bin is dynamically linked: $ldd_out"
install -m 0755 "$guest_bin" "$root/bin/hangar-guest"

# 5. /init (busybox sh as PID 1).
cat >"$root/init" <<'EOF'
#!/bin/sh
# Capsule init: devices, modules, /data, then hangar-guest forever.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=0755 tmpfs /run
while read -r m; do
    insmod "/lib/modules/$m.ko" || echo "init: insmod $m failed"
done </etc/hangar/modules
# The virtio-blk probe may finish just after insmod returns.
i=0
while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
mount -t ext4 -o noatime /dev/vda /data || echo "init: no /data (mounting /dev/vda failed)"
hostname capsule
# A crash must not end PID 1 (that panics the kernel): respawn, a second apart.
while true; do
    /bin/hangar-guest
    echo "init: hangar-guest exited with status $?; restarting in 1 s"
    sleep 1
done
EOF
chmod 0755 "$root/init"

say "packing initramfs.cpio.gz"
# Fixed timestamps: the same inputs give the same initramfs bytes.
find "$root" -exec touch -h -d @0 {} +
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --reproducible --quiet) |
    gzip -9 -n >"$stage/initramfs.cpio.gz"

# 6. The base disk. Overlays of running capsules name this file as their backing file, so an
# unchanged recipe reuses the old file (a hard link, same bytes) instead of a new filesystem.
old_base_key=$(manifest_field "$out/manifest.json" base_key)
if [ -f "$out/base.qcow2" ] && [ "$old_base_key" = "$base_key" ]; then
    say "base.qcow2: recipe unchanged, keeping the existing file"
    ln "$out/base.qcow2" "$stage/base.qcow2" 2>/dev/null || cp --sparse=always "$out/base.qcow2" "$stage/base.qcow2"
else
    say "base.qcow2: empty ext4, $disk_size"
    truncate -s "$disk_size" "$work/base.raw"
    # Inode tables and journal zeroed now, not by ext4lazyinit in every booted guest (TCG).
    mkfs.ext4 -q -F -L hangar-data -m 0 -E lazy_itable_init=0,lazy_journal_init=0 "$work/base.raw"
    qemu-img convert -q -f raw -O qcow2 "$work/base.raw" "$stage/base.qcow2"
fi

# 7. The manifest, one field per line (read back with sed above, no jq needed).
sum() { sha256sum "$stage/$1" | cut -d' ' -f1; }
{
    printf '{\n'
    printf '  "key": "%s",\n' "$key"
    printf '  "base_key": "%s",\n' "$base_key"
    printf '  "kernel_package": "%s",\n' "$kpkg"
    printf '  "kernel_package_version": "%s",\n' "$kpkg_version"
    printf '  "kernel_version": "%s",\n' "$kver"
    printf '  "busybox_version": "%s",\n' "$busybox_version"
    printf '  "modules": "%s",\n' "${load_order[*]}"
    printf '  "built_at": "%s",\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    printf '  "files": {\n'
    printf '    "vmlinux": {"sha256": "%s", "bytes": %s},\n' "$(sum vmlinux)" "$(stat -c %s "$stage/vmlinux")"
    printf '    "initramfs.cpio.gz": {"sha256": "%s", "bytes": %s},\n' "$(sum initramfs.cpio.gz)" "$(stat -c %s "$stage/initramfs.cpio.gz")"
    printf '    "base.qcow2": {"sha256": "%s", "bytes": %s}\n' "$(sum base.qcow2)" "$(stat -c %s "$stage/base.qcow2")"
    printf '  }\n}\n'
} >"$stage/manifest.json"
rm -rf "$work"

# 8. Into place: two renames (a directory cannot replace a non-empty one in one step).
if [ -e "$out" ]; then
    old="$(dirname "$out")/.$(basename "$out").old.$$"
    mv "$out" "$old"
    mv "$stage" "$out"
    rm -rf "$old"
else
    mv "$stage" "$out"
fi
stage=""
say "guest image built in $out (key $key):"
ls -l "$out" | sed 's/^/  /'
