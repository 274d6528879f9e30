#!/usr/bin/env bash
# Boots Sluice's `acpi-dump` scenario on the QEMU boards the host tests
# mirror and writes each dumped table to drivers/iommu/tests/fixtures/qemu/.
# Usage: qemu-tests/dump-acpi.sh   (needs the UEFI builds: cargo xtask build)
set -euo pipefail
top=$(git rev-parse --show-toplevel)
out="$top/drivers/iommu/tests/fixtures/qemu"
work="$top/target/acpi-dump"
mkdir -p "$out" "$work"

boot() { # name arch qemu-args...
  local name=$1 arch=$2; shift 2
  local esp="$work/$name/esp"
  rm -rf "$work/$name"; mkdir -p "$esp/EFI/BOOT" "$esp/EFI/sluice"
  echo "test=acpi-dump loglevel=warn" > "$esp/EFI/sluice/cmdline.txt"
  if [ "$arch" = x86_64 ]; then
    cp "$top/target/x86_64-unknown-uefi/debug/sluice-boot.efi" "$esp/EFI/BOOT/BOOTX64.EFI"
    cp /usr/share/OVMF/OVMF_VARS_4M.fd "$work/$name/vars.fd"
    timeout 120 qemu-system-x86_64 -M q35 -cpu qemu64,+svm,+npt -m 1G -nodefaults -no-reboot \
      -display none -serial stdio "$@" -device isa-debug-exit,iobase=0xf4,iosize=4 \
      -drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
      -drive if=pflash,format=raw,file="$work/$name/vars.fd" \
      -drive format=raw,file=fat:rw:"$esp" > "$work/$name/log" 2>&1 || true
  else
    cp "$top/target/aarch64-unknown-uefi/debug/sluice-boot.efi" "$esp/EFI/BOOT/BOOTAA64.EFI"
    cp /usr/share/AAVMF/AAVMF_VARS.fd "$work/$name/vars.fd"
    timeout 120 qemu-system-aarch64 -M virt,virtualization=on,iommu=smmuv3,gic-version=3 -cpu max \
      -m 1G -nodefaults -no-reboot -display none -serial stdio \
      -semihosting-config enable=on,target=native "$@" \
      -drive if=pflash,format=raw,readonly=on,file=/usr/share/AAVMF/AAVMF_CODE.fd \
      -drive if=pflash,format=raw,file="$work/$name/vars.fd" \
      -drive if=none,id=esp,format=raw,file=fat:rw:"$esp" -device virtio-blk-pci,drive=esp \
      > "$work/$name/log" 2>&1 || true
  fi
  grep -q "SLUICE-TEST acpi-dump PASS" "$work/$name/log" || { echo "$name: dump failed, see $work/$name/log" >&2; exit 1; }
  tr -d '\r' < "$work/$name/log" | grep '^ACPI-DUMP ' | while read -r _ sig hex; do
    echo "$hex" | xxd -r -p > "$out/$name-$(echo "$sig" | tr A-Z a-z).bin"
    echo "wrote $out/$name-$(echo "$sig" | tr A-Z a-z).bin"
  done
}

boot q35-vtd x86_64 -device intel-iommu -device edu
boot q35-vtd-sm x86_64 -device intel-iommu,x-scalable-mode=on,caching-mode=on,aw-bits=48,intremap=on -M q35,kernel-irqchip=split -device edu
boot q35-bridges x86_64 -device intel-iommu -device edu \
  -device pcie-root-port,id=rp1,chassis=1,slot=1 -device edu,bus=rp1 \
  -device pcie-pci-bridge,id=br1,bus=pcie.0 -device edu,bus=br1,addr=1 -device edu,bus=br1,addr=2
boot virt-smmuv3 aarch64 -device edu
