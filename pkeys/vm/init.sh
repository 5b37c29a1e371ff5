#!/bin/busybox sh
# PID 1 of the `pkeys vm` guest.  Runs from the initramfs: load the kernel
# modules, mount the host root read-only with a throwaway /tmp and a
# writable working directory, run the command, report its status, power off.
#
# The host side (pkeys/vm/runner.py) talks to it through the control share
# (/ctl): the command script, the stdin relay file, the status; and through
# the console: the command's stdout goes out on ttyS0 after a start marker,
# its stderr on ttyS1, and signal names ("INT", "TERM") come in on ttyS0.
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev

fail() {
    echo "pkeys-vm: $*" > /dev/console
    echo 125 > /ctl/status 2>/dev/null
    poweroff -f
}

for module in $(cat /modules.order); do
    insmod "/lib/modules/$module.ko" || echo "pkeys-vm: insmod $module failed" > /dev/console
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

# Keep kernel messages off the consoles that carry the command's output.
echo 0 > /proc/sys/kernel/printk
# Raw output (no CR added), and no echo of what the host sends in.
stty -F /dev/ttyS0 -onlcr -echo -isig 2>/dev/null
stty -F /dev/ttyS1 -onlcr -echo -isig 2>/dev/null

# stdout and stderr: the serial lines themselves when the host's are
# terminals, else through a pipe, so that the command sees no terminal.
out=/dev/ttyS0
err=/dev/ttyS1
copiers=""
if [ ! -e /ctl/stdout-tty ]; then
    mkfifo /out.fifo
    cat /out.fifo > /dev/ttyS0 &
    copiers="$copiers $!"
    out=/out.fifo
fi
if [ ! -e /ctl/stderr-tty ]; then
    mkfifo /err.fifo
    cat /err.fifo > /dev/ttyS1 &
    copiers="$copiers $!"
    err=/err.fifo
fi

# stdin: the host appends what it reads to /ctl/stdin and creates
# /ctl/stdin.done at the end; relay it into a pipe.
relay_stdin() {
    pos=0
    idle=0
    while :; do
        finished=0
        [ -e /ctl/stdin.done ] && finished=1
        size=$(stat -c %s /ctl/stdin)
        if [ "$size" -gt "$pos" ]; then
            tail -c +$((pos + 1)) /ctl/stdin | head -c $((size - pos)) || return
            pos=$size
            idle=0
        elif [ $finished = 1 ]; then
            return
        else
            # Poll quickly at first, then gently: an idle stdin must not
            # cost the command its CPU.
            idle=$((idle + 1))
            if [ $idle -lt 40 ]; then sleep 0.05; else sleep 0.5; fi
        fi
    done
}
in=/dev/null
relay=""
if [ -e /ctl/stdin ]; then
    mkfifo /in.fifo
    relay_stdin > /in.fifo &
    relay=$!
    in=/in.fifo
fi

# Signal names from the host go to the command's process group, as a
# shell's Ctrl-C goes to its foreground job.
(
    while read -r name; do
        case "$name" in
            INT|TERM|HUP) kill -s "$name" -- "-$(cat /command.pid)" 2>/dev/null ;;
        esac
    done
) < /dev/ttyS0 &
watcher=$!
# From here on the shell's own messages ("Terminated") must not reach the
# command's output.
exec 2>/dev/null
echo "@@pkeys-vm-start@@" > /dev/ttyS0
# In the foreground: a background job would start with SIGINT ignored, for
# good.  Its own session and process group, whose id goes to the watcher.
sh -c 'echo $$ > /command.pid; exec setsid chroot /newroot /bin/sh /tmp/.pkeys-vm-ctl/run.sh' \
    < $in > $out 2> $err
status=$?
kill $watcher $relay
# What the command left running in its group would hold the output pipes
# open: end it, as the power-off would.  Then let the pipes drain, for up
# to 2 s (a process that left the group may still hold them).
kill -KILL -- "-$(cat /command.pid)"
tries=0
while [ $tries -lt 20 ]; do
    alive=0
    for copier in $copiers; do kill -0 "$copier" && alive=1; done
    [ $alive = 0 ] && break
    tries=$((tries + 1))
    sleep 0.1
done
# Power-off does not wait for the serial lines: stty sets their attributes
# with TCSADRAIN, which waits until all the output has left.
stty -F /dev/ttyS0 -echo 2>/dev/null
stty -F /dev/ttyS1 -echo 2>/dev/null
echo $status > /ctl/status
sync
poweroff -f
