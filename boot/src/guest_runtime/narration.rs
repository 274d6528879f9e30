//! What each test-guest step means, for the demo's narration. The step
//! names are the `GUEST-TEST <step>` words of `qemu-tests/guests/test-guest`.

/// A sentence for `step`, or `None` for steps that need no explanation.
pub fn describe(step: &str) -> Option<&'static str> {
    Some(match step {
        "start-info" => "reads the start-info block Sluice wrote into its RAM",
        "hypervisor" => {
            "detects Sluice (CPUID on x86, a hypercall on Arm) and checks the hypercall ABI version"
        }
        "find-edu" => "finds its edu device on its emulated PCI bus (ECAM accesses trap to Sluice)",
        "busmaster-before-bind" => {
            "tries to enable bus mastering before binding: Sluice keeps it off"
        }
        "device-list" => "lists its devices with DEVICE_LIST",
        "ioas-alloc" => "allocates an IO address space (IOAS_ALLOC)",
        "ioas-map" => "maps its DMA buffer into the IOAS (IOAS_MAP: one VM exit)",
        "victim-published" => "fills a 'victim' page with a pattern and maps it for its own edu",
        "map-outside-ram" => "tries to map memory that is not its RAM: EFAULT, nothing mapped",
        "bind-foreign-bdf" => "tries to bind a device it does not own: refused",
        "device-bind" => "binds its edu (DEVICE_BIND): the device's group is now blocking",
        "busmaster" => "enables bus mastering, now allowed because the device is bound",
        "fault-queue-alloc" => "allocates a fault queue for DMA faults",
        "hwpt-attach" => "attaches its edu to a page table (HWPT) built from the IOAS",
        "dma-both-ways" => "edu DMAs RAM -> device -> RAM through the IOMMU; bytes checked",
        "fault-unmapped-iova" => {
            "edu writes to an unmapped IOVA: the IOMMU blocks it, the fault arrives in the guest's queue"
        }
        "fault-unmapped-read" => "edu reads from an unmapped IOVA: blocked, fault recorded",
        "ioas-unmap" => "unmaps the buffer (IOAS_UNMAP): Sluice invalidates the IOTLB",
        "fault-after-unmap" => "DMA to the old IOVA now faults: no stale translation survived",
        "device-replace" => "moves the edu to a second IOAS in one step (DEVICE_REPLACE)",
        "dma-after-replace" => "DMA through the new IOVA works",
        "old-iova-after-replace" => "the old IOVA faults after the replace",
        "destroy-old" => "destroys the old HWPT and IOAS",
        "device-detach" => "detaches the edu: back to blocking",
        "dma-after-detach" => "DMA while detached is blocked; nothing written",
        "device-unbind" => "unbinds the edu: bus mastering revoked",
        "dma-after-unbind" => "DMA after unbind is blocked; nothing written",
        "victim-kept" => "the victim page still holds its pattern",
        "dma-own-buffer" => "DMA into its own buffer works",
        "write-victim-iova" => "edu writes to the victim's IOVA: the IOMMU blocks it",
        "write-victim-gpa" => "edu writes to the victim's guest-physical address: blocked",
        "read-victim-iova" => "edu reads the victim's IOVA: blocked",
        "read-victim-gpa" => "edu reads the victim's guest-physical address: blocked",
        _ => return None,
    })
}

/// One demo line for a guest step: `GUEST-TEST <step> PASS|FAIL ...`.
pub fn narrate(vm: &str, line: &str) {
    let mut words = line.split_whitespace();
    if words.next() != Some("GUEST-TEST") {
        return;
    }
    let Some(step) = words.next() else { return };
    let verdict = words.next().unwrap_or("?");
    if let Some(what) = describe(step) {
        sluice_kernel::println!("  [{vm}] {what}: {verdict}");
    }
}
