//! Domain shapes known before allocation, and accounting of every page a
//! unit holds (what the hypervisor's per-VM page budget relies on).

use sluice_hal::model::ModelMemory;

use super::*;
use crate::pagetable::{MapPerms, PageSize};
use crate::vtd::VtdError;
use crate::vtd::caps::CapBuilder;
use crate::vtd::unit::{DomainConfig, DomainKind, DomainShape, VtdUnit};

fn held_pages(unit: &VtdUnit<'_>, domains: &[crate::vtd::DomainId]) -> usize {
    let tables: usize = domains
        .iter()
        .map(|&d| unit.domain_info(d).expect("domain").table_pages)
        .sum();
    unit.structure_pages() + tables + unit.quarantined_pages()
}

#[test]
fn domain_shape_predicts_alloc_domain_without_allocating() {
    let mem = ModelMemory::new();
    let clock = clock();
    let server = model(&mem, CapBuilder::server());
    let mut unit = init(&server, &mem, &clock, ModeRequest::Scalable);
    let configs = [
        DomainConfig::second_level(),
        DomainConfig::second_level().snooped(),
        DomainConfig {
            address_width: Some(39),
            ..DomainConfig::second_level()
        },
        DomainConfig {
            address_width: Some(57),
            ..DomainConfig::first_level()
        },
        DomainConfig::first_level(),
    ];
    for config in configs {
        let allocations = mem.allocation_count();
        let shape = unit.domain_shape(config).expect("shape");
        assert_eq!(
            mem.allocation_count(),
            allocations,
            "shape allocates nothing"
        );
        let d = unit.alloc_domain(config).expect("domain");
        let info = unit.domain_info(d).expect("info");
        assert_eq!(shape.kind, info.kind);
        assert_eq!(shape.levels, info.levels, "{config:?}");
        assert_eq!(shape.iova_limit(), info.iova_limit, "{config:?}");
        assert_eq!(shape.page_sizes(), info.page_sizes, "{config:?}");
        assert_eq!(info.table_pages, 1, "an empty domain is its root table");
    }
    assert_eq!(
        unit.domain_shape(DomainConfig {
            address_width: Some(39),
            ..DomainConfig::second_level()
        }),
        Ok(DomainShape {
            kind: DomainKind::SecondLevel,
            levels: 3,
            iova_bits: 39,
            max_page: PageSize::Size1G,
        })
    );

    // The refusals of alloc_domain, before anything is allocated.
    let no_2m = CapBuilder {
        sllps: 0,
        ..CapBuilder::qemu_default()
    };
    let qemu = model(&mem, no_2m);
    let unit = init(&qemu, &mem, &clock, ModeRequest::Legacy);
    let allocations = mem.allocation_count();
    assert_eq!(
        unit.domain_shape(DomainConfig::second_level().snooped()),
        Err(VtdError::SnoopControlUnsupported)
    );
    assert!(matches!(
        unit.domain_shape(DomainConfig::first_level()),
        Err(VtdError::Unsupported(_))
    ));
    let shape = unit
        .domain_shape(DomainConfig::second_level())
        .expect("shape");
    assert_eq!((shape.levels, shape.iova_bits), (3, 39), "capped by MGAW");
    assert_eq!(shape.page_sizes(), 1 << 12, "no SLLPS: 4 KiB only");
    assert_eq!(mem.allocation_count(), allocations);
}

#[test]
fn structure_and_table_pages_account_for_every_page_the_unit_holds() {
    for (caps, mode) in [
        (CapBuilder::qemu_default(), ModeRequest::Legacy),
        (
            CapBuilder {
                qi: false,
                ..CapBuilder::qemu_default()
            },
            ModeRequest::Legacy,
        ),
        (CapBuilder::server(), ModeRequest::Scalable),
    ] {
        let mem = ModelMemory::new();
        let clock = clock();
        let m = model(&mem, caps);
        let mut unit = init(&m, &mem, &clock, mode);
        assert_eq!(mem.live_pages(), held_pages(&unit, &[]), "after init");
        let a = unit.alloc_domain(DomainConfig::second_level()).expect("a");
        let b = unit.alloc_domain(DomainConfig::second_level()).expect("b");
        unit.map(a, 0x1000, phys(0x10_0000), 0x3000, MapPerms::READ_WRITE)
            .expect("map");
        unit.map(b, 1 << 30, phys(0x20_0000), 0x40_0000, MapPerms::READ)
            .expect("map");
        if mode == ModeRequest::Scalable {
            unit.enable_interrupt_remapping(crate::vtd::intremap::IrConfig { x2apic: true })
                .expect("interrupt remapping");
            assert_eq!(mem.live_pages(), held_pages(&unit, &[a, b]), "IR table");
        }
        unit.attach_device(DEV_A, a).expect("attach");
        unit.attach_device(DEV_UPPER, b).expect("attach upper");
        if mode == ModeRequest::Scalable {
            unit.attach_pasid(DEV_A, 9, b).expect("pasid");
            unit.attach_pasid(DEV_A, 700, b)
                .expect("pasid in a second table");
        }
        assert_eq!(mem.live_pages(), held_pages(&unit, &[a, b]), "attached");
        unit.unmap(a, 0x1000, 0x3000).expect("unmap");
        assert_eq!(unit.domain_info(a).expect("a").table_pages, 1);
        assert_eq!(mem.live_pages(), held_pages(&unit, &[a, b]), "unmapped");
        unit.detach_device(DEV_A).expect("detach");
        unit.free_domain(a).expect("free");
        assert_eq!(mem.live_pages(), held_pages(&unit, &[b]), "freed");
    }
}
