#!/bin/sh
# make linux-debian: Debian's generic kernel (the second Linux target), downloaded with apt and
# unpacked outside the work tree. Usage: debian.sh CACHE_DIR (result: CACHE_DIR/vmlinuz)
set -eu
cache=${1:-/var/cache/apicv/debian}
mkdir -p "$cache"
cd "$cache"
pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
if [ -z "$pkg" ]; then
    apt-get update -q
    pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
fi
if [ ! -f "$cache/vmlinuz" ] || [ "$(cat "$cache/package" 2>/dev/null)" != "$pkg" ]; then
    rm -rf root ./*.deb
    apt-get download "$pkg"
    dpkg-deb -x ./*.deb root
    cp root/boot/vmlinuz-* "$cache/vmlinuz"
    echo "$pkg" > "$cache/package"
fi
echo "$pkg: $cache/vmlinuz"
