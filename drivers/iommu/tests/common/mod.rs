//! Builders for hand-made ACPI tables (DMAR, IORT), shared by the
//! integration tests, and the generators of the `fixtures/*.bin` files.
//!
//! The fixtures mirror what QEMU emits for `-M q35 -device intel-iommu`
//! and `-M virt,iommu=smmuv3`, as described in DEVELOPERS.md; they are
//! produced by [`qemu_q35_dmar`] and [`qemu_virt_iort`]. Regenerate them
//! with `SLUICE_REGEN_FIXTURES=1 cargo test -p sluice-iommu --test fixtures`.
//! Real dumps from the boot code should replace or extend them.
#![allow(dead_code)]

use sluice_iommu::acpi::checksum_fixup;

/// A table with a standard header around `body`, length and checksum set.
pub fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(signature);
    t.extend_from_slice(&0u32.to_le_bytes());
    t.push(revision);
    t.push(0);
    t.extend_from_slice(b"BOCHS ");
    t.extend_from_slice(b"BXPC    ");
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(b"BXPC");
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(body);
    fix_length_and_checksum(&mut t);
    t
}

/// Rewrites the header length to the buffer's length and fixes the checksum.
pub fn fix_length_and_checksum(t: &mut [u8]) {
    let len = t.len() as u32;
    t[4..8].copy_from_slice(&len.to_le_bytes());
    t[9] = checksum_fixup(t);
}

/// Fixes only the checksum (for tables whose length field lies on purpose).
pub fn fix_checksum(t: &mut [u8]) {
    t[9] = checksum_fixup(t);
}

// ---------------------------------------------------------------- DMAR

pub fn dmar_table(host_address_width_field: u8, flags: u8, structures: &[Vec<u8>]) -> Vec<u8> {
    let mut body = vec![host_address_width_field, flags];
    body.extend_from_slice(&[0; 10]);
    for s in structures {
        body.extend_from_slice(s);
    }
    sdt(b"DMAR", 1, &body)
}

/// A device scope entry.
pub fn scope(kind: u8, enumeration_id: u8, start_bus: u8, path: &[(u8, u8)]) -> Vec<u8> {
    let mut s = vec![
        kind,
        (6 + 2 * path.len()) as u8,
        0,
        0,
        enumeration_id,
        start_bus,
    ];
    for &(d, f) in path {
        s.push(d);
        s.push(f);
    }
    s
}

fn structure(kind: u16, fixed: &[u8], scopes: &[Vec<u8>]) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&kind.to_le_bytes());
    s.extend_from_slice(&0u16.to_le_bytes());
    s.extend_from_slice(fixed);
    for sc in scopes {
        s.extend_from_slice(sc);
    }
    let len = s.len() as u16;
    s[2..4].copy_from_slice(&len.to_le_bytes());
    s
}

pub fn drhd(flags: u8, size: u8, segment: u16, base: u64, scopes: &[Vec<u8>]) -> Vec<u8> {
    let mut f = vec![flags, size];
    f.extend_from_slice(&segment.to_le_bytes());
    f.extend_from_slice(&base.to_le_bytes());
    structure(0, &f, scopes)
}

pub fn rmrr(segment: u16, base: u64, limit: u64, scopes: &[Vec<u8>]) -> Vec<u8> {
    let mut f = vec![0, 0];
    f.extend_from_slice(&segment.to_le_bytes());
    f.extend_from_slice(&base.to_le_bytes());
    f.extend_from_slice(&limit.to_le_bytes());
    structure(1, &f, scopes)
}

pub fn atsr(flags: u8, segment: u16, scopes: &[Vec<u8>]) -> Vec<u8> {
    let mut f = vec![flags, 0];
    f.extend_from_slice(&segment.to_le_bytes());
    structure(2, &f, scopes)
}

pub fn rhsa(base: u64, proximity_domain: u32) -> Vec<u8> {
    let mut f = vec![0; 4];
    f.extend_from_slice(&base.to_le_bytes());
    f.extend_from_slice(&proximity_domain.to_le_bytes());
    structure(3, &f, &[])
}

pub fn andd(device_number: u8, name: &str) -> Vec<u8> {
    let mut f = vec![0, 0, 0, device_number];
    f.extend_from_slice(name.as_bytes());
    f.push(0);
    structure(4, &f, &[])
}

pub fn satc(flags: u8, segment: u16, scopes: &[Vec<u8>]) -> Vec<u8> {
    let mut f = vec![flags, 0];
    f.extend_from_slice(&segment.to_le_bytes());
    structure(5, &f, scopes)
}

pub fn raw_structure(kind: u16, body: &[u8]) -> Vec<u8> {
    structure(kind, body, &[])
}

/// What QEMU 7.2 builds for `-M q35 -device intel-iommu,device-iotlb=on`
/// plus a root port (aw-bits=39, so Host Address Width field 38): one DRHD
/// at 0xfed90000 for segment 0 listing its devices in explicit scopes
/// (the I/O APIC at ff:00.0, the endpoints of bus 0, and the root port as
/// a sub-hierarchy), and an ATSR covering all root ports. The real dumps
/// in `fixtures/qemu/` (written by `qemu-tests/dump-acpi.sh`) agree on the
/// DRHD layout; this mirror adds the ATSR and the x2APIC opt-out flag they
/// lack.
pub fn qemu_q35_dmar() -> Vec<u8> {
    dmar_table(
        38,
        0b011,
        &[
            drhd(
                0,
                0,
                0,
                0xfed9_0000,
                &[
                    scope(3, 0, 0xff, &[(0, 0)]),
                    scope(1, 0, 0, &[(0, 0)]),
                    scope(1, 0, 0, &[(1, 0)]),
                    scope(1, 0, 0, &[(2, 0)]),
                    scope(2, 0, 0, &[(3, 0)]),
                    scope(1, 0, 0, &[(0x1f, 0)]),
                    scope(1, 0, 0, &[(0x1f, 2)]),
                    scope(1, 0, 0, &[(0x1f, 3)]),
                ],
            ),
            atsr(1, 0, &[]),
        ],
    )
}

// ---------------------------------------------------------------- IORT

/// One ID mapping: (input base, number of IDs minus one, output base,
/// output reference, flags).
pub type IdMap = (u32, u32, u32, u32, u32);

fn id_mapping_bytes(m: &IdMap) -> Vec<u8> {
    let mut b = Vec::new();
    for v in [m.0, m.1, m.2, m.3, m.4] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

/// An IORT node: the 16-byte header, `data`, then the ID mappings.
pub fn iort_node(
    kind: u8,
    revision: u8,
    identifier: u32,
    data: &[u8],
    mappings: &[IdMap],
) -> Vec<u8> {
    let mut n = vec![kind, 0, 0, revision];
    n.extend_from_slice(&identifier.to_le_bytes());
    n.extend_from_slice(&(mappings.len() as u32).to_le_bytes());
    let mapping_offset = if mappings.is_empty() {
        0
    } else {
        16 + data.len() as u32
    };
    n.extend_from_slice(&mapping_offset.to_le_bytes());
    n.extend_from_slice(data);
    for m in mappings {
        n.extend_from_slice(&id_mapping_bytes(m));
    }
    let len = n.len() as u16;
    n[1..3].copy_from_slice(&len.to_le_bytes());
    n
}

/// The offset the first node gets in [`iort_table`].
pub const IORT_FIRST_NODE: u32 = 48;

pub fn iort_table(revision: u8, nodes: &[Vec<u8>]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(nodes.len() as u32).to_le_bytes());
    body.extend_from_slice(&IORT_FIRST_NODE.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    for n in nodes {
        body.extend_from_slice(n);
    }
    sdt(b"IORT", revision, &body)
}

/// Offsets the nodes will have in [`iort_table`].
pub fn node_offsets(lengths: &[usize]) -> Vec<u32> {
    let mut at = IORT_FIRST_NODE;
    lengths
        .iter()
        .map(|&l| {
            let o = at;
            at += l as u32;
            o
        })
        .collect()
}

pub fn its_group(identifier: u32, its_ids: &[u32]) -> Vec<u8> {
    let mut d = (its_ids.len() as u32).to_le_bytes().to_vec();
    for id in its_ids {
        d.extend_from_slice(&id.to_le_bytes());
    }
    iort_node(0, 1, identifier, &d, &[])
}

#[allow(clippy::too_many_arguments)]
pub fn smmuv3(
    identifier: u32,
    base: u64,
    flags: u32,
    model: u32,
    gsivs: [u32; 4],
    proximity_domain: u32,
    device_id_mapping_index: u32,
    mappings: &[IdMap],
) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&base.to_le_bytes());
    d.extend_from_slice(&flags.to_le_bytes());
    d.extend_from_slice(&0u32.to_le_bytes());
    d.extend_from_slice(&0u64.to_le_bytes()); // VATOS
    d.extend_from_slice(&model.to_le_bytes());
    for g in gsivs {
        d.extend_from_slice(&g.to_le_bytes());
    }
    d.extend_from_slice(&proximity_domain.to_le_bytes());
    d.extend_from_slice(&device_id_mapping_index.to_le_bytes());
    iort_node(4, 4, identifier, &d, mappings)
}

pub fn root_complex(identifier: u32, segment: u32, ats: u32, mappings: &[IdMap]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&1u32.to_le_bytes()); // cache coherent
    d.extend_from_slice(&[0, 0, 0, 0]); // hints, reserved, memory access flags
    d.extend_from_slice(&ats.to_le_bytes());
    d.extend_from_slice(&segment.to_le_bytes());
    d.push(48); // memory address size limit
    d.extend_from_slice(&[0, 0, 0]);
    iort_node(2, 3, identifier, &d, mappings)
}

/// What QEMU 7.2 builds for `-M virt,iommu=smmuv3,gic-version=3`: an ITS
/// group (one ITS), one SMMUv3 at 0x9050000 whose own MSIs map to the ITS,
/// and a root complex for segment 0 whose RIDs go to the SMMU. The root
/// complex has two mappings that overlap at RID 0x100 (the first covers
/// 0..=0x100 with output base 0, the second 0x100..=0xffff with output
/// base 0x100), as happens when a range is split with an inclusive count.
pub fn qemu_virt_iort() -> Vec<u8> {
    let its = its_group(0, &[0]);
    let smmu_len = smmuv3(1, 0, 0, 0, [0; 4], 0, 0, &[(0, 0xffff, 0, 0, 0)]).len();
    let offsets = node_offsets(&[its.len(), smmu_len]);
    let (its_off, smmu_off) = (offsets[0], offsets[1]);
    let smmu = smmuv3(
        1,
        0x0905_0000,
        1, // COHACC override
        0,
        [0x6a, 0x6b, 0x6d, 0x6c],
        0,
        0,
        &[(0, 0xffff, 0, its_off, 0)],
    );
    let rc = root_complex(
        2,
        0,
        1,
        &[
            (0, 0x100, 0, smmu_off, 0),
            (0x100, 0xfeff, 0x100, smmu_off, 0),
        ],
    );
    iort_table(3, &[its, smmu, rc])
}
