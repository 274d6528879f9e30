#!/usr/bin/env bash
# Boots Sluice's `acpi-dump` scenario on the QEMU boards the host tests
# mirror and writes each dumped table to drivers/iommu/tests/fixtures/qemu/
# (or to $ACPI_DUMP_OUT). The boards come from `cargo xtask run`, the one
# place that builds QEMU command lines; only their extra devices are here.
# Usage: qemu-tests/dump-acpi.sh
set -euo pipefail
top=$(git rev-parse --show-toplevel)
out="${ACPI_DUMP_OUT:-$top/drivers/iommu/tests/fixtures/qemu}"
work="$top/target/acpi-dump"
mkdir -p "$out" "$work"

boot() { # name arch [--iommu PROPS] [-- extra QEMU args]   (the demo board has one edu)
  local name=$1 arch=$2; shift 2
  local log="$work/$name.log"
  (cd "$top" && timeout 300 cargo xtask run --arch "$arch" \
      --cmdline "test=acpi-dump loglevel=warn" "$@") < /dev/null > "$log" 2>&1 || true
  grep -q "SLUICE-TEST acpi-dump PASS" "$log" || { echo "$name: dump failed, see $log" >&2; exit 1; }
  tr -d '\r' < "$log" | grep '^ACPI-DUMP ' | while read -r _ sig hex; do
    local file
    file="$out/$name-$(echo "$sig" | tr '[:upper:]' '[:lower:]').bin"
    echo "$hex" | xxd -r -p > "$file"
    echo "wrote $file"
  done
}

boot q35-vtd x86_64
boot q35-vtd-sm x86_64 --iommu x-scalable-mode=on,caching-mode=on,aw-bits=48,intremap=on \
  -- -M q35,kernel-irqchip=split
boot q35-bridges x86_64 -- \
  -device pcie-root-port,id=rp1,chassis=1,slot=1 -device edu,bus=rp1 \
  -device pcie-pci-bridge,id=br1,bus=pcie.0 -device edu,bus=br1,addr=1 -device edu,bus=br1,addr=2
boot virt-smmuv3 aarch64
