//! Random sequences of IOAS_MAP / IOAS_UNMAP / IOAS_COPY compared against a
//! deliberately simple page-by-page model: every call must return what the
//! model predicts, a failed call must leave the state untouched, and every
//! device DMA must reach exactly what the model says.

use std::collections::BTreeMap;

use sluice_abi::{self as abi, errno, map_flags};
use sluice_hypervisor::iommufd::{FaultReason, VmId};
use sluice_hypervisor::testing::{
    AnyPlatform, BackendKind, DeviceSetup, DmaOutcome, Platform, VmSetup, VtdFlavour,
};

const VM: VmId = VmId(1);
const PAGE: u64 = 4096;
/// IOVAs used by fixed maps, and checked after each step: 4 MiB.
const WINDOW_PAGES: u64 = 1024;
/// Guest RAM pages mapped from: two RAM ranges of 4 MiB each, adjacent in
/// the guest but not in host memory, so maps can span both.
const RAM_PAGES: u64 = 2048;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Page {
    gpa: u64,
    read: bool,
    write: bool,
}

/// The model of one IOAS: whole mappings (first page, pages) and per-page
/// contents.
#[derive(Default, Clone)]
struct Model {
    areas: BTreeMap<u64, u64>,
    pages: BTreeMap<u64, Page>,
}

impl Model {
    fn overlaps(&self, first: u64, n: u64) -> bool {
        self.areas
            .iter()
            .any(|(&s, &len)| s < first + n && first < s + len)
    }
    fn insert(&mut self, first: u64, pages: &[Page]) {
        self.areas.insert(first, pages.len() as u64);
        for (i, p) in pages.iter().enumerate() {
            self.pages.insert(first + i as u64, *p);
        }
    }
    /// iommufd unmap: ENOENT if nothing or any partially covered area.
    fn unmap(&mut self, first: u64, n: u64) -> Result<u64, i64> {
        let hit: Vec<(u64, u64)> = self
            .areas
            .iter()
            .filter(|&(&s, &len)| s < first + n && first < s + len)
            .map(|(&s, &l)| (s, l))
            .collect();
        if hit.is_empty() || hit.iter().any(|&(s, l)| s < first || s + l > first + n) {
            return Err(errno::ENOENT);
        }
        let mut total = 0;
        for (s, l) in hit {
            self.areas.remove(&s);
            for p in s..s + l {
                self.pages.remove(&p);
            }
            total += l * PAGE;
        }
        Ok(total)
    }
    /// Pages behind `[first, first + n)` if all mapped and contiguous in
    /// areas.
    fn source(&self, first: u64, n: u64) -> Option<Vec<Page>> {
        (first..first + n)
            .map(|p| self.pages.get(&p).copied())
            .collect()
    }
}

fn flags(rng: &mut Rng) -> u32 {
    match rng.below(4) {
        0 => map_flags::READABLE,
        1 => map_flags::WRITEABLE,
        _ => map_flags::READABLE | map_flags::WRITEABLE,
    }
}

fn check_dma(p: &mut AnyPlatform, bdf: u32, model: &Model) {
    for page in 0..WINDOW_PAGES + 64 {
        let iova = page * PAGE + 8;
        for write in [false, true] {
            let got = p.dma(VM, bdf, None, iova, write);
            let want = match model.pages.get(&page) {
                None => DmaOutcome::Fault(FaultReason::NotPresent),
                Some(pg) if (write && !pg.write) || (!write && !pg.read) => {
                    DmaOutcome::Fault(FaultReason::Permission)
                }
                Some(pg) => DmaOutcome::Ram {
                    vm: VM,
                    gpa: pg.gpa + 8,
                },
            };
            assert_eq!(got, want, "DMA at {iova:#x} (write {write})");
        }
    }
}

fn run(kind: BackendKind, seed: u64, steps: usize, stats: &mut BTreeMap<String, u32>) {
    let dev_a = abi::bdf(0, 0, 4, 0);
    let dev_b = abi::bdf(0, 0, 5, 0);
    // C sits behind another IOMMU unit, so attaching it makes a new domain
    // that must be filled with everything the IOAS already maps.
    let dev_c = abi::bdf(0, 0, 6, 0);
    let mut p = Platform::builder()
        .vm(
            VM,
            VmSetup::new()
                .ram(0, RAM_PAGES / 2 * PAGE)
                .ram(RAM_PAGES / 2 * PAGE, RAM_PAGES / 2 * PAGE)
                .ram(0x1000_0000, 1 << 20),
        )
        .device(DeviceSetup::new(VM, dev_a))
        .device(DeviceSetup::new(VM, dev_b))
        .device(DeviceSetup::new(VM, dev_c).unit(1))
        .build_any(kind);
    let ioas = [p.ioas_alloc(VM).unwrap(), p.ioas_alloc(VM).unwrap()];
    let a = p.bind(VM, dev_a).unwrap().dev_id;
    let b = p.bind(VM, dev_b).unwrap().dev_id;
    p.attach(VM, a, ioas[0]).unwrap();
    p.attach(VM, b, ioas[1]).unwrap();
    let c = p.bind(VM, dev_c).unwrap().dev_id;
    let mut c_on: Option<usize> = None;
    let mut models = [Model::default(), Model::default()];
    let mut rng = Rng(seed | 1);

    for step in 0..steps {
        let which = rng.below(2) as usize;
        let before = p.iommufd.snapshot(VM);
        let op = rng.below(11);
        let (result, ok): (String, bool) = match op {
            // Fixed map.
            0..=3 => {
                let n = 1 + rng.below(16);
                let first = rng.below(WINDOW_PAGES - n);
                let gpa_page = rng.below(RAM_PAGES - n);
                let f = flags(&mut rng);
                let got = p.map(
                    VM,
                    ioas[which],
                    gpa_page * PAGE,
                    n * PAGE,
                    Some(first * PAGE),
                    f | map_flags::FIXED_IOVA,
                );
                let want = if models[which].overlaps(first, n) {
                    Err(errno::EEXIST)
                } else {
                    Ok(first * PAGE)
                };
                assert_eq!(got, want, "seed {seed} step {step}: fixed map");
                if got.is_ok() {
                    let pages: Vec<Page> = (0..n)
                        .map(|i| Page {
                            gpa: (gpa_page + i) * PAGE,
                            read: f & map_flags::READABLE != 0,
                            write: f & map_flags::WRITEABLE != 0,
                        })
                        .collect();
                    models[which].insert(first, &pages);
                }
                (format!("{got:?}"), got.is_ok())
            }
            // Allocated map: the IOVA is the hypervisor's choice, but it
            // must be free, aligned, and then behave like the model says.
            4 => {
                let n = 1 + rng.below(8);
                let gpa_page = rng.below(RAM_PAGES - n);
                let got = p
                    .map(
                        VM,
                        ioas[which],
                        gpa_page * PAGE,
                        n * PAGE,
                        None,
                        map_flags::READABLE,
                    )
                    .expect("allocation in a 48-bit space succeeds");
                assert_eq!(got % PAGE, 0);
                let first = got / PAGE;
                assert!(
                    !models[which].overlaps(first, n),
                    "allocated over a mapping"
                );
                let pages: Vec<Page> = (0..n)
                    .map(|i| Page {
                        gpa: (gpa_page + i) * PAGE,
                        read: true,
                        write: false,
                    })
                    .collect();
                models[which].insert(first, &pages);
                (format!("{got:#x}"), true)
            }
            // Unmap a random range (often covering whole areas).
            5..=7 => {
                let (first, n) = if rng.below(2) == 0 && !models[which].areas.is_empty() {
                    let keys: Vec<(u64, u64)> =
                        models[which].areas.iter().map(|(&s, &l)| (s, l)).collect();
                    let (s, l) = keys[rng.below(keys.len() as u64) as usize];
                    let extra = rng.below(3);
                    (s.saturating_sub(extra), l + extra + rng.below(3))
                } else {
                    (rng.below(WINDOW_PAGES), 1 + rng.below(32))
                };
                let got = p.unmap(VM, ioas[which], first * PAGE, n * PAGE);
                let want = models[which].unmap(first, n);
                assert_eq!(got, want, "seed {seed} step {step}: unmap {first:#x}+{n}");
                (format!("{got:?}"), got.is_ok())
            }
            // Copy between (or within) IOASes.
            8 => {
                let src = rng.below(2) as usize;
                let n = 1 + rng.below(8);
                let src_first = if rng.below(3) > 0 && !models[src].areas.is_empty() {
                    let keys: Vec<u64> = models[src].areas.keys().copied().collect();
                    keys[rng.below(keys.len() as u64) as usize]
                } else {
                    rng.below(WINDOW_PAGES)
                };
                let dst_first = rng.below(WINDOW_PAGES - n);
                let f = flags(&mut rng);
                let got = p.copy(
                    VM,
                    ioas[which],
                    ioas[src],
                    src_first * PAGE,
                    n * PAGE,
                    Some(dst_first * PAGE),
                    f | map_flags::FIXED_IOVA,
                );
                let want = match models[src].source(src_first, n) {
                    None => Err(errno::ENOENT),
                    Some(pages) => {
                        if f & map_flags::WRITEABLE != 0 && pages.iter().any(|p| !p.write) {
                            Err(errno::EPERM)
                        } else if models[which].overlaps(dst_first, n) {
                            Err(errno::EEXIST)
                        } else {
                            let pages: Vec<Page> = pages
                                .iter()
                                .map(|pg| Page {
                                    gpa: pg.gpa,
                                    read: f & map_flags::READABLE != 0,
                                    write: f & map_flags::WRITEABLE != 0,
                                })
                                .collect();
                            models[which].insert(dst_first, &pages);
                            Ok(dst_first * PAGE)
                        }
                    }
                };
                assert_eq!(got, want, "seed {seed} step {step}: copy");
                (format!("{got:?}"), got.is_ok())
            }
            // Move device C between the IOASes (new domain each time).
            10 => {
                let r = match c_on {
                    Some(_) if rng.below(3) == 0 => p.detach(VM, c, None).map(|()| None),
                    Some(_) => p.replace(VM, c, ioas[which]).map(|_| Some(which)),
                    None => p.attach(VM, c, ioas[which]).map(|_| Some(which)),
                };
                c_on = r.expect("moving C between IOASes succeeds");
                if let Some(on) = c_on {
                    check_dma(&mut p, dev_c, &models[on]);
                }
                (format!("{c_on:?}"), true)
            }
            // Unmap everything (rarely).
            _ => {
                if rng.below(4) == 0 {
                    let total: u64 = models[which].areas.values().sum::<u64>() * PAGE;
                    let got = p.unmap(VM, ioas[which], 0, u64::MAX);
                    assert_eq!(got, Ok(total));
                    models[which] = Model::default();
                    (format!("{got:?}"), true)
                } else {
                    // A map of something that is not RAM: EFAULT.
                    let got = p.map(
                        VM,
                        ioas[which],
                        0x2000_0000,
                        PAGE,
                        None,
                        map_flags::READABLE,
                    );
                    assert_eq!(got, Err(errno::EFAULT));
                    (format!("{got:?}"), false)
                }
            }
        };
        let kind = match op {
            0..=3 => "fixed map",
            4 => "allocated map",
            5..=7 => "unmap",
            8 => "copy",
            10 => "move C",
            _ => "other",
        };
        let outcome = if ok { "Ok".to_string() } else { result.clone() };
        *stats.entry(format!("{kind}: {outcome}")).or_default() += 1;
        if !ok {
            assert_eq!(
                p.iommufd.snapshot(VM),
                before,
                "seed {seed} step {step}: failed call ({result}) changed state"
            );
        }
        if step % 16 == 15 {
            check_dma(&mut p, dev_a, &models[0]);
            check_dma(&mut p, dev_b, &models[1]);
            if let Some(on) = c_on {
                check_dma(&mut p, dev_c, &models[on]);
            }
        }
    }
    check_dma(&mut p, dev_a, &models[0]);
    check_dma(&mut p, dev_b, &models[1]);
    // Tear everything down: no page-table page may leak.
    p.iommufd.destroy_vm(VM).unwrap();
    assert_eq!(p.live_table_pages(), 0, "seed {seed}: page tables leaked");
    assert_eq!(p.iommufd.backend().domain_count(), 0);
}

fn random_map_unmap_copy_matches_model(kind: BackendKind, seeds: &[u64]) {
    let mut stats = BTreeMap::new();
    for &seed in seeds {
        run(kind, seed, 400, &mut stats);
    }
    // The sequences must exercise both success and every error path.
    for key in [
        "fixed map: Ok",
        "fixed map: Err(17)",
        "unmap: Ok",
        "unmap: Err(2)",
        "copy: Ok",
        "copy: Err(2)",
        "copy: Err(1)",
        "copy: Err(17)",
    ] {
        assert!(
            stats.get(key).copied().unwrap_or(0) > 3,
            "{key} too rare: {stats:?}"
        );
    }
}

const SEEDS: [u64; 8] = [1, 2, 3, 0xdead_beef, 0x5151_5eed, 42, 7, 1234567];

#[test]
fn random_map_unmap_copy_matches_model_on_the_mock() {
    random_map_unmap_copy_matches_model(BackendKind::Mock, &SEEDS);
}

// On VT-d every DMA goes through the model's IOTLB and paging-structure
// caches, so a missing or too narrow invalidation after an unmap or a
// re-attach makes a DMA reach a stale page.

#[test]
fn random_map_unmap_copy_matches_model_on_vtd_legacy() {
    random_map_unmap_copy_matches_model(BackendKind::Vtd(VtdFlavour::legacy()), &SEEDS[..4]);
}

#[test]
fn random_map_unmap_copy_matches_model_on_vtd_scalable() {
    random_map_unmap_copy_matches_model(BackendKind::Vtd(VtdFlavour::scalable()), &SEEDS[4..]);
}

#[test]
fn random_map_unmap_copy_matches_model_on_vtd_caching_mode() {
    random_map_unmap_copy_matches_model(BackendKind::Vtd(VtdFlavour::caching_mode()), &SEEDS[2..6]);
}
