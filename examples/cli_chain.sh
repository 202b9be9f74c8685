#!/bin/sh
# A full backup and then an incremental one with the pyvirtbackup command, the way
# an operator would run them against a VM: here a throwaway QEMU started below,
# with two QMP sockets (one for "the orchestrator", one for pyvirtbackup).
#
#   examples/cli_chain.sh            (run from the repository, after scripts/bootstrap)
#
# At the end the incremental backup, opened as the chain it is
# (inc1 -> full), is compared with the disk.
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
pvb() { echo "\$ pyvirtbackup $*" | sed "s|$work|\$WORK|g"; "$PY" -m pyvirtbackup --state-dir "$work/state" "$@"; }

work=$(mktemp -d /tmp/pyvirtbackup-cli-XXXXXX)
cleanup() {
    if [ -f "$work/qemu.pid" ]; then kill "$(cat "$work/qemu.pid")" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

# a VM: one qcow2 disk with 64 MiB of data, QEMU paused (no guest OS needed)
qemu-img create -q -f qcow2 "$work/vda.qcow2" 256M
qemu-io -f qcow2 -c "write -P 0x11 0 64M" "$work/vda.qcow2" >/dev/null
qemu-system-x86_64 -nodefaults -display none -machine q35,accel=kvm:tcg -m 128 -S \
    -daemonize -pidfile "$work/qemu.pid" \
    -qmp "unix:$work/orchestrator.qmp,server=on,wait=off" \
    -qmp "unix:$work/backup.qmp,server=on,wait=off" \
    -blockdev "{\"driver\":\"file\",\"filename\":\"$work/vda.qcow2\",\"node-name\":\"vda-file\"}" \
    -blockdev '{"driver":"qcow2","file":"vda-file","node-name":"vda-fmt"}' \
    -device virtio-scsi-pci,id=scsi0 -device scsi-hd,drive=vda-fmt,id=vda \
    2>"$work/qemu.log"

guest_write() {  # what a guest would do: write through the disk's device
    "$PY" - "$work/orchestrator.qmp" "$@" <<'PYEOF'
import asyncio, sys
from pyvirtbackup.qemu.monitor import Monitor
async def main(sock, cmd):
    async with Monitor("guest") as mon:
        await mon.connect(sock)
        await mon.qemu_io("vda", cmd)
asyncio.run(main(sys.argv[1], sys.argv[2]))
PYEOF
}

cat > "$work/full.xml" <<XML
<domainbackup>
  <disks><disk name='vda'><target file='$work/vda.full.qcow2'/></disk></disks>
</domainbackup>
XML
cat > "$work/inc1.xml" <<XML
<domainbackup xmlns:pvb='urn:pyvirtbackup:backup:1.0'>
  <incremental>c1</incremental>
  <disks><disk name='vda'><target file='$work/vda.inc1.qcow2' pvb:backing='vda.full.qcow2'/></disk></disks>
</domainbackup>
XML

pvb attach vm1 --qmp "$work/backup.qmp"
"$PY" -m pyvirtbackup checkpoint-create-as vm1 --name c1 --print-xml > "$work/c1.xml"
pvb backup-begin vm1 --backupxml "$work/full.xml" --checkpointxml "$work/c1.xml" --wait
pvb checkpoint-list vm1

echo "# the guest writes 8 MiB"
guest_write "write -P 0x42 100M 8M"
pvb checkpoint-dumpxml vm1 c1 --size --no-domain

"$PY" -m pyvirtbackup checkpoint-create-as vm1 --name c2 --print-xml > "$work/c2.xml"
pvb backup-begin vm1 --backupxml "$work/inc1.xml" --checkpointxml "$work/c2.xml" --wait
pvb checkpoint-list vm1 --tree
pvb domjobinfo vm1 --completed

guest_write "flush"  # so that the image file, read from outside, is current
echo "\$ qemu-img compare -U \$WORK/vda.inc1.qcow2 \$WORK/vda.qcow2"
qemu-img compare -U "$work/vda.inc1.qcow2" "$work/vda.qcow2"
