#!/bin/sh
# make linux: build apicv's minimal Linux guest from Debian's own packages, outside the work
# tree. Installs linux-source-6.1 and busybox-static with apt (root), builds vmlinux from
# `make tinyconfig` + guests/linux/apicv.config, and an initramfs (busybox + guests/linux/init).
# Usage: build.sh CACHE_DIR   (results: CACHE_DIR/vmlinux, CACHE_DIR/initramfs.cpio)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
cache=${1:-/var/cache/apicv/linux}
src=$cache/linux-source-6.1
need=""
for p in linux-source-6.1 busybox-static flex bison bc libelf-dev xz-utils make gcc; do
    dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"
done
if [ -n "$need" ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $need
fi
mkdir -p "$cache"
if [ ! -f "$src/Makefile" ]; then
    echo "extracting /usr/src/linux-source-6.1.tar.xz into $cache"
    tar -C "$cache" -xf /usr/src/linux-source-6.1.tar.xz
fi
cd "$src"
if [ ! -f .config ] || ! cmp -s "$here/apicv.config" .apicv.config; then
    make -s tinyconfig >/dev/null
    ./scripts/kconfig/merge_config.sh -m .config "$here/apicv.config" >/dev/null
    make -s olddefconfig
    cp "$here/apicv.config" .apicv.config
fi
make -s -j"$(nproc)" vmlinux
cp vmlinux "$cache/vmlinux"
make -s usr/gen_init_cpio >/dev/null 2>&1 || gcc -O2 -o usr/gen_init_cpio usr/gen_init_cpio.c
list=$cache/initramfs.list
{
    echo "dir /dev 0755 0 0"
    echo "nod /dev/console 0600 0 0 c 5 1"
    echo "dir /bin 0755 0 0"
    echo "dir /proc 0755 0 0"
    echo "dir /sys 0755 0 0"
    echo "dir /tmp 01777 0 0"
    echo "file /bin/busybox /bin/busybox 0755 0 0"
    echo "slink /bin/sh busybox 0777 0 0"
    echo "file /init $here/init 0755 0 0"
    # the applet links made here, not by `busybox --install` at boot: on a host where the
    # guest kernel is emulated every system call counts
    for d in /sbin /usr /usr/bin /usr/sbin; do echo "dir $d 0755 0 0"; done
    for a in $(/bin/busybox --list-full | grep -v -e '^bin/sh$' -e '^bin/busybox$' -e '^linuxrc$'); do
        echo "slink /$a /bin/busybox 0777 0 0"
    done
} > "$list"
usr/gen_init_cpio "$list" > "$cache/initramfs.cpio"
echo "built $cache/vmlinux ($(stat -c %s "$cache/vmlinux") bytes) and $cache/initramfs.cpio"
