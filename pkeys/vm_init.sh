#!/bin/busybox sh
# PID 1 of the `pkeys vm` guest.  Runs from the initramfs: load the 9p
# modules, mount the host root read-only with a throwaway /tmp and a
# writable working directory, run the command, report its status, power off.
# The host side (pkeys/vm.py) reads the status from the control share.
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# Keep kernel messages off the console that carries the command's output.
echo 0 > /proc/sys/kernel/printk

fail() {
    echo "pkeys-vm: $*" > /dev/console
    echo 125 > /ctl/status 2>/dev/null
    poweroff -f
}

for module in $(cat /modules.order); do
    insmod "/lib/modules/$module.ko" 2>/dev/null
done

mkdir -p /ctl
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=none ctl /ctl \
    || fail "cannot mount the control share (9p modules missing from this kernel?)"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=loose,ro hostroot /newroot \
    || fail "cannot mount the host root filesystem"
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
mkdir -p /newroot/dev/shm /newroot/dev/pts
mount -t tmpfs -o mode=1777 shm /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts 2>/dev/null

# /tmp: the host's /tmp as a read-only lower layer, guest writes in memory.
mkdir -p /overlay
mount -t tmpfs -o mode=0755 overlay /overlay
mkdir -p /overlay/upper /overlay/work
chmod 1777 /overlay/upper
mount -t overlay -o lowerdir=/newroot/tmp,upperdir=/overlay/upper,workdir=/overlay/work tmp /newroot/tmp \
    || mount -t tmpfs -o mode=1777 tmp /newroot/tmp

workdir=$(cat /ctl/cwd)
if [ "$workdir" != "/" ]; then
    mkdir -p "/newroot$workdir" 2>/dev/null
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=none work "/newroot$workdir" \
        || fail "cannot mount the working directory $workdir"
fi
mkdir -p /newroot/tmp/.pkeys-vm-ctl
mount --bind /ctl /newroot/tmp/.pkeys-vm-ctl

stty -F /dev/console -onlcr 2>/dev/null
echo "@@pkeys-vm-start@@" > /dev/console
if [ -e /ctl/tty ]; then
    chroot /newroot /bin/sh /tmp/.pkeys-vm-ctl/run.sh < /dev/null > /dev/console 2>&1
    echo $? > /ctl/status
else
    # The host's output is not a terminal, so the command's must not be
    # one either (colours, progress bars): pipe it.
    set -o pipefail
    chroot /newroot /bin/sh /tmp/.pkeys-vm-ctl/run.sh < /dev/null 2>&1 | cat > /dev/console
    echo $? > /ctl/status
fi
sync
poweroff -f
