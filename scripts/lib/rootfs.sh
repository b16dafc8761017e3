# Helpers for assembling image root filesystems from this machine's files (sourced).

# rootfs_install ROOT DEST SRC...: each SRC binary installed as ROOT/DEST/<name>, with every
# library it loads at the path the loader looks for it.
rootfs_install() {
  local root=$1 dest=$2
  shift 2
  mkdir -p "$root$dest"
  local b
  for b in "$@"; do
    install -m 0755 "$b" "$root$dest/"
    ldd "$b" 2>/dev/null | awk '/=> \// {print $3} /^\t\/[^ ]+ \(/ {print $1}'
  done | sort -u | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
}

# rootfs_busybox ROOT APPLET...: busybox-static as /bin/busybox, each applet a link to it.
rootfs_busybox() {
  local root=$1
  shift
  mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/run"
  install -m 0755 /bin/busybox "$root/bin/busybox"
  local a
  for a in "$@"; do [ "$a" = busybox ] || ln -sf busybox "$root/bin/$a"; done
  [ -e "$root/etc/passwd" ] || printf 'root:x:0:0:root:/:/bin/sh\n' >"$root/etc/passwd"
  [ -e "$root/etc/group" ] || printf 'root:x:0:\n' >"$root/etc/group"
}
