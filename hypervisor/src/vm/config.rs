//! VM descriptions from the Sluice command line, and their validation
//! against the platform.
//!
//! # Grammar
//!
//! Each VM is one command-line word (words are separated by white space):
//!
//! ```text
//! vm=NAME:mem=SIZE:image=IMAGE[:dev=ADDR[+ADDR...]][:cpus=N][:args=ARGS]
//!
//! NAME  = 1-32 of [A-Za-z0-9_-]
//! SIZE  = decimal digits with an optional binary suffix K, M, G or T
//!         (64M = 64 MiB); a multiple of 2 MiB, at least 2 MiB
//! IMAGE = 1-64 of [A-Za-z0-9_.-]: the ELF file \EFI\sluice\IMAGE on the ESP
//! ADDR  = SSSS:BB:DD.F (hex segment, bus, device, function; the segment
//!         may be left out: BB:DD.F means segment 0000)
//! N     = number of vCPUs, 1 or more (default 1)
//! ARGS  = 1-64 of [A-Za-z0-9_.,-]: a word handed to the guest in its
//!         start info (e.g. which test scenario to run)
//! ```
//!
//! Fields are separated by `:`, which also appears inside PCI addresses:
//! after `dev=`, every following piece without `=` belongs to the device
//! list. Example:
//!
//! ```text
//! vm=net0:mem=64M:image=guest0:dev=0000:00:03.0+0000:00:04.0
//! ```
//!
//! # Validation
//!
//! [`validate`] checks all VMs together against the platform's PCI
//! functions, each with its IOMMU group and whether an IOMMU translates it
//! ([`PlatformDevice`]), and refuses — naming the VM and the device —
//! an unknown device, a bridge, a device no IOMMU covers, a device
//! assigned twice, an IOMMU group split between VMs, a VM without memory
//! or with more than the platform can give, and duplicate VM names. Every
//! problem is reported, not only the first.
//!
//! Guest BDFs: the guest sees its devices on bus 0 of segment 0; each
//! distinct host device (segment, bus, device) gets the next device
//! number from 1, in the order of the `dev=` list; the functions of one
//! host device stay together in that slot, numbered from 0 in host
//! function order (a guest only scans functions 1-7 after finding 0).

use alloc::collections::BTreeMap;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use sluice_pci::{Bdf, PciAddress, Topology};

/// Guest memory granularity: the nested tables map guest RAM with 2 MiB
/// pages.
pub const MEMORY_GRANULE: u64 = 2 << 20;
/// Longest VM name.
pub const MAX_NAME_LEN: usize = 32;
/// Longest image name.
pub const MAX_IMAGE_LEN: usize = 64;
/// Longest guest argument word.
pub const MAX_ARGS_LEN: usize = 64;
/// Device numbers a guest bus offers after device 0 (kept free, where a
/// host bridge would sit).
pub const MAX_GUEST_DEVICES: usize = 31;

/// One VM as the command line describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub name: String,
    /// Bytes of guest RAM.
    pub memory: u64,
    pub image: String,
    /// Host functions to pass through, in command-line order.
    pub devices: Vec<PciAddress>,
    pub cpus: u32,
    /// The `args=` word for the guest (empty when not given); see
    /// [`valid_args`].
    pub args: String,
}

/// A problem in a VM description. The `vm` fields name the VM (its text
/// when the name itself is bad).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    NotAVmWord(String),
    BadName(String),
    DuplicateName(String),
    UnknownKey {
        vm: String,
        key: String,
    },
    DuplicateKey {
        vm: String,
        key: &'static str,
    },
    MissingKey {
        vm: String,
        key: &'static str,
    },
    BadSize {
        vm: String,
        text: String,
    },
    ZeroMemory {
        vm: String,
    },
    MemoryNotGranular {
        vm: String,
        memory: u64,
    },
    MemoryTooLarge {
        vm: String,
        memory: u64,
        max: u64,
    },
    BadImage {
        vm: String,
        text: String,
    },
    BadDevice {
        vm: String,
        text: String,
    },
    BadCpus {
        vm: String,
        text: String,
    },
    BadArgs {
        vm: String,
        text: String,
    },
    TooManyCpus {
        vm: String,
        cpus: u32,
        max: u32,
    },
    TooManyDevices {
        vm: String,
        count: usize,
    },
    UnknownDevice {
        vm: String,
        device: PciAddress,
    },
    NotAnEndpoint {
        vm: String,
        device: PciAddress,
    },
    NoIommu {
        vm: String,
        device: PciAddress,
    },
    AssignedTwice {
        device: PciAddress,
        first: String,
        second: String,
    },
    GroupSplit {
        group: u32,
        device: PciAddress,
        vm: String,
        other: PciAddress,
        other_vm: String,
    },
    /// The VMs together ask for more RAM than the platform has.
    TotalMemoryTooLarge {
        total: u64,
        max: u64,
    },
}

fn mib(bytes: u64) -> u64 {
    bytes >> 20
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAVmWord(w) => write!(f, "`{w}` is not a vm= description"),
            Self::BadName(n) => write!(
                f,
                "VM name `{n}` must be 1-{MAX_NAME_LEN} letters, digits, `_` or `-`"
            ),
            Self::DuplicateName(n) => write!(f, "two VMs are named `{n}`"),
            Self::UnknownKey { vm, key } => write!(
                f,
                "VM `{vm}`: unknown field `{key}` (known: mem, image, dev, cpus, args)"
            ),
            Self::DuplicateKey { vm, key } => write!(f, "VM `{vm}`: `{key}=` given twice"),
            Self::MissingKey { vm, key } => write!(f, "VM `{vm}`: `{key}=` is missing"),
            Self::BadSize { vm, text } => write!(
                f,
                "VM `{vm}`: memory size `{text}` is not a number with an optional K/M/G/T suffix"
            ),
            Self::ZeroMemory { vm } => write!(f, "VM `{vm}`: memory size is zero"),
            Self::MemoryNotGranular { vm, memory } => write!(
                f,
                "VM `{vm}`: memory size {memory:#x} is not a multiple of 2 MiB"
            ),
            Self::MemoryTooLarge { vm, memory, max } => write!(
                f,
                "VM `{vm}`: {} MiB of memory asked, at most {} MiB available",
                mib(*memory),
                mib(*max)
            ),
            Self::BadImage { vm, text } => write!(
                f,
                "VM `{vm}`: image name `{text}` must be 1-{MAX_IMAGE_LEN} letters, digits, `_`, `.` or `-`"
            ),
            Self::BadDevice { vm, text } => {
                write!(f, "VM `{vm}`: `{text}` is not a PCI address SSSS:BB:DD.F")
            }
            Self::BadArgs { vm, text } => write!(
                f,
                "VM `{vm}`: guest arguments `{text}` must be 1-{MAX_ARGS_LEN} letters, digits, `_`, `.`, `,` or `-`"
            ),
            Self::BadCpus { vm, text } => {
                write!(f, "VM `{vm}`: vCPU count `{text}` is not a number >= 1")
            }
            Self::TooManyCpus { vm, cpus, max } => {
                write!(f, "VM `{vm}`: {cpus} vCPUs asked, at most {max}")
            }
            Self::TooManyDevices { vm, count } => write!(
                f,
                "VM `{vm}`: {count} devices need more than the {MAX_GUEST_DEVICES} guest device slots"
            ),
            Self::UnknownDevice { vm, device } => {
                write!(f, "VM `{vm}`: no PCI function {device} on this machine")
            }
            Self::NotAnEndpoint { vm, device } => {
                write!(
                    f,
                    "VM `{vm}`: {device} is a bridge; only endpoints can be assigned"
                )
            }
            Self::NoIommu { vm, device } => write!(
                f,
                "VM `{vm}`: no IOMMU translates {device} (or its group): its DMA could reach any memory, so it cannot be assigned"
            ),
            Self::AssignedTwice {
                device,
                first,
                second,
            } => {
                if first == second {
                    write!(f, "VM `{first}`: {device} is listed twice")
                } else {
                    write!(
                        f,
                        "{device} is assigned to both VM `{first}` and VM `{second}`"
                    )
                }
            }
            Self::GroupSplit {
                group,
                device,
                vm,
                other,
                other_vm,
            } => write!(
                f,
                "IOMMU group {group} is split: {device} goes to VM `{vm}` but {other} of the same group to VM `{other_vm}`; a group cannot be isolated in parts"
            ),
            Self::TotalMemoryTooLarge { total, max } => write!(
                f,
                "the VMs ask for {} MiB of memory together, at most {} MiB available",
                mib(*total),
                mib(*max)
            ),
        }
    }
}

fn valid_name(s: &str, max: usize, extra: &[u8]) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || extra.contains(&b))
}

/// Whether `text` is acceptable as `args=`: 1 to [`MAX_ARGS_LEN`] bytes of
/// `A-Z a-z 0-9 _ - . ,` (no `:` or `=`, which separate fields, and nothing
/// a guest could mistake for a control character).
pub fn valid_args(text: &str) -> bool {
    valid_name(text, MAX_ARGS_LEN, b".,")
}

/// Parses a size like `64M`, `1G`, `4096`.
pub fn parse_size(text: &str) -> Option<u64> {
    let (digits, shift) = match text.as_bytes().last()? {
        b'K' | b'k' => (&text[..text.len() - 1], 10),
        b'M' | b'm' => (&text[..text.len() - 1], 20),
        b'G' | b'g' => (&text[..text.len() - 1], 30),
        b'T' | b't' => (&text[..text.len() - 1], 40),
        _ => (text, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let value: u64 = digits.parse().ok()?;
    value.checked_mul(1u64 << shift)
}

fn hex<T: TryFrom<u32>>(text: &str, max_digits: usize) -> Option<T> {
    if text.is_empty() || text.len() > max_digits || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    T::try_from(u32::from_str_radix(text, 16).ok()?).ok()
}

/// Parses `SSSS:BB:DD.F` or `BB:DD.F`.
pub fn parse_pci_address(text: &str) -> Option<PciAddress> {
    let parts: Vec<&str> = text.split(':').collect();
    let (segment, bus, devfn) = match parts.as_slice() {
        [s, b, df] => (hex::<u16>(s, 4)?, *b, *df),
        [b, df] => (0, *b, *df),
        _ => return None,
    };
    let (dev, func) = devfn.split_once('.')?;
    let bus = hex::<u8>(bus, 2)?;
    let dev = hex::<u8>(dev, 2).filter(|&d| d < 32)?;
    let func = hex::<u8>(func, 1).filter(|&f| f < 8)?;
    Some(PciAddress::new(segment, bus, dev, func))
}

impl VmConfig {
    /// Parses one VM description: the text after `vm=`.
    pub fn parse(text: &str) -> Result<Self, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let mut pieces = text.split(':').peekable();
        let name = pieces.next().unwrap_or("");
        let vm = name.to_string();
        if !valid_name(name, MAX_NAME_LEN, &[]) {
            errors.push(ConfigError::BadName(name.to_string()));
        }
        let mut memory: Option<u64> = None;
        let mut image: Option<String> = None;
        let mut devices: Option<Vec<PciAddress>> = None;
        let mut cpus: Option<u32> = None;
        let mut args: Option<String> = None;
        while let Some(piece) = pieces.next() {
            let Some((key, value)) = piece.split_once('=') else {
                errors.push(ConfigError::UnknownKey {
                    vm: vm.clone(),
                    key: piece.to_string(),
                });
                continue;
            };
            let seen = match key {
                "mem" => memory.is_some(),
                "image" => image.is_some(),
                "dev" => devices.is_some(),
                "cpus" => cpus.is_some(),
                "args" => args.is_some(),
                _ => false,
            };
            let key_name: &'static str = match key {
                "mem" => "mem",
                "image" => "image",
                "dev" => "dev",
                "cpus" => "cpus",
                "args" => "args",
                other => {
                    errors.push(ConfigError::UnknownKey {
                        vm: vm.clone(),
                        key: other.to_string(),
                    });
                    continue;
                }
            };
            if seen {
                errors.push(ConfigError::DuplicateKey {
                    vm: vm.clone(),
                    key: key_name,
                });
            }
            match key_name {
                "mem" => match parse_size(value) {
                    Some(0) => errors.push(ConfigError::ZeroMemory { vm: vm.clone() }),
                    Some(m) if !m.is_multiple_of(MEMORY_GRANULE) => {
                        errors.push(ConfigError::MemoryNotGranular {
                            vm: vm.clone(),
                            memory: m,
                        })
                    }
                    Some(m) => memory = Some(m),
                    None => errors.push(ConfigError::BadSize {
                        vm: vm.clone(),
                        text: value.to_string(),
                    }),
                },
                "image" => {
                    if valid_name(value, MAX_IMAGE_LEN, b".") {
                        image = Some(value.to_string());
                    } else {
                        errors.push(ConfigError::BadImage {
                            vm: vm.clone(),
                            text: value.to_string(),
                        });
                    }
                }
                "args" => {
                    if valid_args(value) {
                        args = Some(value.to_string());
                    } else {
                        errors.push(ConfigError::BadArgs {
                            vm: vm.clone(),
                            text: value.to_string(),
                        });
                    }
                }
                "dev" => {
                    // PCI addresses contain ':': take pieces up to the
                    // next `key=`.
                    let mut list = value.to_string();
                    while let Some(next) = pieces.peek() {
                        if next.contains('=') {
                            break;
                        }
                        list.push(':');
                        list.push_str(next);
                        pieces.next();
                    }
                    let mut parsed = Vec::new();
                    for item in list.split('+') {
                        match parse_pci_address(item) {
                            Some(a) => parsed.push(a),
                            None => errors.push(ConfigError::BadDevice {
                                vm: vm.clone(),
                                text: item.to_string(),
                            }),
                        }
                    }
                    devices = Some(parsed);
                }
                _ => match value.parse::<u32>() {
                    Ok(n) if n >= 1 && value.bytes().all(|b| b.is_ascii_digit()) => cpus = Some(n),
                    _ => errors.push(ConfigError::BadCpus {
                        vm: vm.clone(),
                        text: value.to_string(),
                    }),
                },
            }
        }
        let had_memory_error = errors.iter().any(|e| {
            matches!(
                e,
                ConfigError::ZeroMemory { .. }
                    | ConfigError::BadSize { .. }
                    | ConfigError::MemoryNotGranular { .. }
            )
        });
        if memory.is_none() && !had_memory_error {
            errors.push(ConfigError::MissingKey {
                vm: vm.clone(),
                key: "mem",
            });
        }
        let had_image_error = errors
            .iter()
            .any(|e| matches!(e, ConfigError::BadImage { .. }));
        if image.is_none() && !had_image_error {
            errors.push(ConfigError::MissingKey {
                vm: vm.clone(),
                key: "image",
            });
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            name: vm,
            memory: memory.unwrap_or(0),
            image: image.unwrap_or_default(),
            devices: devices.unwrap_or_default(),
            cpus: cpus.unwrap_or(1),
            args: args.unwrap_or_default(),
        })
    }
}

/// Parses every `vm=` word of a command line; other words are ignored
/// (they belong to other options). All problems are returned together.
pub fn parse_command_line(text: &str) -> Result<Vec<VmConfig>, Vec<ConfigError>> {
    let mut vms = Vec::new();
    let mut errors = Vec::new();
    for word in text.split_whitespace() {
        if let Some(value) = word.strip_prefix("vm=") {
            match VmConfig::parse(value) {
                Ok(vm) => vms.push(vm),
                Err(e) => errors.extend(e),
            }
        }
    }
    if errors.is_empty() {
        Ok(vms)
    } else {
        Err(errors)
    }
}

/// The image names the `vm=` words of `text` refer to, each once, in
/// command-line order: the files the UEFI entry must read from the ESP
/// before leaving boot services. Words that do not parse are skipped (they
/// are reported when the VMs are validated, and such a VM never boots).
pub fn image_names(text: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for word in text.split_whitespace() {
        if let Some(Ok(vm)) = word.strip_prefix("vm=").map(VmConfig::parse)
            && !names.contains(&vm.image)
        {
            names.push(vm.image);
        }
    }
    names
}

/// A PCI function of the platform, as validation needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlatformDevice {
    pub address: PciAddress,
    /// IOMMU group ([`sluice_pci::iommu_groups`]).
    pub group: u32,
    /// An IOMMU translates the function and its whole group (the
    /// association's `assignable`).
    pub iommu: bool,
    pub bridge: bool,
}

/// The platform's functions from enumeration and the IOMMU association.
pub fn platform_devices(
    topology: &Topology,
    association: &sluice_iommu::association::Association,
) -> Vec<PlatformDevice> {
    topology
        .functions
        .iter()
        .map(|f| {
            let a = association.get(f.addr);
            PlatformDevice {
                address: f.addr,
                group: a.map_or(u32::MAX, |a| a.group),
                iommu: a.is_some_and(|a| a.assignable),
                bridge: f.is_bridge(),
            }
        })
        .collect()
}

/// What the platform can give VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlatformLimits {
    /// Bytes of RAM available for all guests together.
    pub memory: u64,
    /// vCPUs per VM.
    pub max_cpus: u32,
}

/// A device of a validated VM: the host function and where the guest
/// sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AssignedPci {
    pub host: PciAddress,
    /// On guest segment 0.
    pub guest: Bdf,
    pub group: u32,
}

impl AssignedPci {
    /// The guest BDF in the hypercall ABI's packing ([`sluice_abi::bdf`]),
    /// as `DEVICE_LIST` and the start info show it.
    pub const fn guest_abi_bdf(&self) -> u32 {
        sluice_abi::bdf(
            0,
            self.guest.bus(),
            self.guest.device(),
            self.guest.function(),
        )
    }
}

/// The host functions of `devices` with their guest BDFs, as
/// [`crate::passthrough::GuestPciBus::new`] takes them; devices missing
/// from `topologies` (one per segment) are left out.
pub fn passthrough_functions<'t>(
    devices: &[AssignedPci],
    topologies: &'t [Topology],
) -> Vec<(&'t sluice_pci::Function, Bdf)> {
    devices
        .iter()
        .filter_map(|d| {
            topologies
                .iter()
                .find_map(|t| t.get(d.host))
                .map(|f| (f, d.guest))
        })
        .collect()
}

/// A VM that passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidVm {
    pub config: VmConfig,
    pub devices: Vec<AssignedPci>,
}

/// Guest BDFs for `devices` (see the module documentation), and how many
/// device slots they use. Only meaningful with at most
/// [`MAX_GUEST_DEVICES`] slots.
fn guest_bdfs(devices: &[PciAddress]) -> (Vec<Bdf>, usize) {
    let mut slots: Vec<(u16, u8, u8)> = Vec::new();
    let bdfs = devices
        .iter()
        .map(|d| {
            let key = (d.segment.0, d.bdf.bus(), d.bdf.device());
            let slot = match slots.iter().position(|&k| k == key) {
                Some(i) => i,
                None => {
                    slots.push(key);
                    slots.len() - 1
                }
            };
            // Functions are renumbered from 0 in host order, so that the
            // guest always finds function 0 of a slot.
            let function = devices
                .iter()
                .filter(|o| {
                    (o.segment.0, o.bdf.bus(), o.bdf.device()) == key
                        && o.bdf.function() < d.bdf.function()
                })
                .count();
            Bdf::new(0, (slot + 1).min(31) as u8, function as u8)
        })
        .collect();
    (bdfs, slots.len())
}

/// Checks `vms` against the platform; see the module documentation.
pub fn validate(
    vms: &[VmConfig],
    platform: &[PlatformDevice],
    limits: PlatformLimits,
) -> Result<Vec<ValidVm>, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let mut names: BTreeMap<&str, ()> = BTreeMap::new();
    // Device → VM that has it; group → (a device, its VM).
    let mut owner: BTreeMap<PciAddress, &str> = BTreeMap::new();
    let mut groups: BTreeMap<u32, (PciAddress, &str)> = BTreeMap::new();
    let mut total: u64 = 0;
    let mut out = Vec::new();

    for vm in vms {
        if names.insert(&vm.name, ()).is_some() {
            errors.push(ConfigError::DuplicateName(vm.name.clone()));
        }
        if vm.memory == 0 {
            errors.push(ConfigError::ZeroMemory {
                vm: vm.name.clone(),
            });
        } else if vm.memory > limits.memory {
            errors.push(ConfigError::MemoryTooLarge {
                vm: vm.name.clone(),
                memory: vm.memory,
                max: limits.memory,
            });
        }
        total = total.saturating_add(vm.memory);
        if vm.cpus == 0 || vm.cpus > limits.max_cpus {
            errors.push(ConfigError::TooManyCpus {
                vm: vm.name.clone(),
                cpus: vm.cpus,
                max: limits.max_cpus,
            });
        }
        let (guest, slots) = guest_bdfs(&vm.devices);
        if slots > MAX_GUEST_DEVICES {
            errors.push(ConfigError::TooManyDevices {
                vm: vm.name.clone(),
                count: vm.devices.len(),
            });
            continue;
        }
        let mut assigned = Vec::new();
        for (&device, &guest_bdf) in vm.devices.iter().zip(&guest) {
            if let Some(first) = owner.insert(device, &vm.name) {
                errors.push(ConfigError::AssignedTwice {
                    device,
                    first: first.to_string(),
                    second: vm.name.clone(),
                });
                continue;
            }
            let Some(p) = platform.iter().find(|p| p.address == device) else {
                errors.push(ConfigError::UnknownDevice {
                    vm: vm.name.clone(),
                    device,
                });
                continue;
            };
            if p.bridge {
                errors.push(ConfigError::NotAnEndpoint {
                    vm: vm.name.clone(),
                    device,
                });
                continue;
            }
            if !p.iommu {
                errors.push(ConfigError::NoIommu {
                    vm: vm.name.clone(),
                    device,
                });
                continue;
            }
            match groups.get(&p.group) {
                Some(&(other, other_vm)) if other_vm != vm.name => {
                    errors.push(ConfigError::GroupSplit {
                        group: p.group,
                        device,
                        vm: vm.name.clone(),
                        other,
                        other_vm: other_vm.to_string(),
                    });
                    continue;
                }
                Some(_) => {}
                None => {
                    groups.insert(p.group, (device, &vm.name));
                }
            }
            assigned.push(AssignedPci {
                host: device,
                guest: guest_bdf,
                group: p.group,
            });
        }
        out.push(ValidVm {
            config: vm.clone(),
            devices: assigned,
        });
    }
    if total > limits.memory && vms.len() > 1 {
        errors.push(ConfigError::TotalMemoryTooLarge {
            total,
            max: limits.memory,
        });
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;
    use alloc::vec;

    fn addr(bus: u8, dev: u8, func: u8) -> PciAddress {
        PciAddress::new(0, bus, dev, func)
    }

    #[test]
    fn parses_the_issue_example() {
        let vm =
            VmConfig::parse("net0:mem=64M:image=guest0:dev=0000:00:03.0+0000:00:04.0").unwrap();
        assert_eq!(
            vm,
            VmConfig {
                name: "net0".into(),
                memory: 64 << 20,
                image: "guest0".into(),
                devices: vec![addr(0, 3, 0), addr(0, 4, 0)],
                cpus: 1,
                args: String::new(),
            }
        );
        // Fields in any order, dev in the middle, short addresses, cpus.
        let vm = VmConfig::parse("a-1:dev=01:00.1+0002:3a:1f.7:cpus=2:image=g.elf:mem=1G").unwrap();
        assert_eq!(
            vm.devices,
            vec![addr(1, 0, 1), PciAddress::new(2, 0x3a, 0x1f, 7)]
        );
        assert_eq!(
            (vm.cpus, vm.memory, vm.image.as_str()),
            (2, 1 << 30, "g.elf")
        );
    }

    #[test]
    fn guest_arguments() {
        let vm = VmConfig::parse("g:mem=16M:image=test-guest:args=dma").unwrap();
        assert_eq!(vm.args, "dma");
        // Any position, also right after a device list.
        let vm = VmConfig::parse("g:image=t:dev=00:03.0:args=a.b,C-d_9:mem=2M").unwrap();
        assert_eq!((vm.args.as_str(), vm.devices.len()), ("a.b,C-d_9", 1));
        assert_eq!(VmConfig::parse("g:mem=2M:image=t").unwrap().args, "");
        let longest = "x".repeat(MAX_ARGS_LEN);
        assert_eq!(
            VmConfig::parse(&format!("g:mem=2M:image=t:args={longest}"))
                .unwrap()
                .args,
            longest
        );
        for bad in ["", "a b", "a=b", "a/b", "ä", "a;b", "a\u{7}"] {
            assert_eq!(
                errors(&format!("g:mem=2M:image=t:args={bad}")),
                [format!(
                    "VM `g`: guest arguments `{bad}` must be 1-64 letters, digits, `_`, `.`, `,` or `-`"
                )],
                "{bad:?}"
            );
        }
        let too_long = "x".repeat(MAX_ARGS_LEN + 1);
        assert_eq!(
            VmConfig::parse(&format!("g:mem=2M:image=t:args={too_long}")).unwrap_err(),
            [ConfigError::BadArgs {
                vm: "g".into(),
                text: too_long
            }]
        );
        // A `:` ends the word: what follows is another (here unknown) field.
        assert_eq!(
            errors("g:mem=2M:image=t:args=a:b"),
            ["VM `g`: unknown field `b` (known: mem, image, dev, cpus, args)"]
        );
        assert_eq!(
            errors("g:mem=2M:image=t:args=a:args=b"),
            ["VM `g`: `args=` given twice"]
        );
    }

    #[test]
    fn image_names_to_load() {
        assert_eq!(
            image_names(
                "loglevel=debug vm=a:mem=16M:image=test-guest:args=dma \
                 vm=b:mem=16M:image=other.elf vm=c:mem=16M:image=test-guest:args=attacker \
                 vm=bad:mem=3M:image=skipped image=not-a-vm"
            ),
            ["test-guest", "other.elf"]
        );
        assert!(image_names("test=boot").is_empty());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("1T"), Some(1 << 40));
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("-1M"), None);
        assert_eq!(parse_size("1.5G"), None);
        assert_eq!(parse_size("99999999999999999999"), None);
        assert_eq!(parse_size("17179869184G"), None, "overflow");
    }

    #[test]
    fn pci_addresses() {
        assert_eq!(parse_pci_address("0000:00:03.0"), Some(addr(0, 3, 0)));
        assert_eq!(parse_pci_address("ff:1f.7"), Some(addr(0xff, 0x1f, 7)));
        for bad in [
            "00:20.0",
            "00:03.8",
            "00:03",
            "0:0:0:0.0",
            "00000:00:03.0",
            "zz:00.0",
            "",
            "00:03.0.1",
        ] {
            assert_eq!(parse_pci_address(bad), None, "{bad}");
        }
    }

    fn errors(text: &str) -> Vec<String> {
        VmConfig::parse(text)
            .unwrap_err()
            .iter()
            .map(|e| format!("{e}"))
            .collect()
    }

    #[test]
    fn parse_errors_name_the_problem() {
        assert_eq!(
            errors("net0:mem=0:image=g"),
            ["VM `net0`: memory size is zero"]
        );
        assert_eq!(
            errors("net0:mem=3M:image=g"),
            ["VM `net0`: memory size 0x300000 is not a multiple of 2 MiB"]
        );
        assert_eq!(
            errors("net0:mem=lots:image=g"),
            ["VM `net0`: memory size `lots` is not a number with an optional K/M/G/T suffix"]
        );
        assert_eq!(errors("net0:image=g"), ["VM `net0`: `mem=` is missing"]);
        assert_eq!(errors("net0:mem=2M"), ["VM `net0`: `image=` is missing"]);
        assert_eq!(
            errors("net0:mem=2M:image=g:colour=blue"),
            ["VM `net0`: unknown field `colour` (known: mem, image, dev, cpus, args)"]
        );
        assert_eq!(
            errors("net0:mem=2M:mem=4M:image=g"),
            ["VM `net0`: `mem=` given twice"]
        );
        assert_eq!(
            errors("net0:mem=2M:image=g:dev=00:03.0+junk"),
            ["VM `net0`: `junk` is not a PCI address SSSS:BB:DD.F"]
        );
        assert_eq!(
            errors("net0:mem=2M:image=g:cpus=0"),
            ["VM `net0`: vCPU count `0` is not a number >= 1"]
        );
        assert_eq!(
            errors("bad name!:mem=2M:image=g"),
            ["VM name `bad name!` must be 1-32 letters, digits, `_` or `-`"]
        );
        assert_eq!(
            errors(":mem=2M:image=../x"),
            [
                "VM name `` must be 1-32 letters, digits, `_` or `-`",
                "VM ``: image name `../x` must be 1-64 letters, digits, `_`, `.` or `-`"
            ]
        );
    }

    #[test]
    fn command_line_collects_every_vm_and_every_error() {
        let vms =
            parse_command_line("loglevel=debug vm=a:mem=2M:image=x test=boot vm=b:mem=4M:image=y")
                .unwrap();
        assert_eq!(
            vms.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        let errs = parse_command_line("vm=a:mem=0:image=x vm=b:image=y").unwrap_err();
        assert_eq!(errs.len(), 2);
        assert_eq!(parse_command_line("loglevel=info").unwrap(), vec![]);
    }

    fn platform() -> Vec<PlatformDevice> {
        vec![
            PlatformDevice {
                address: addr(0, 3, 0),
                group: 1,
                iommu: true,
                bridge: false,
            },
            PlatformDevice {
                address: addr(0, 4, 0),
                group: 2,
                iommu: true,
                bridge: false,
            },
            // A multi-function device whose functions share group 3.
            PlatformDevice {
                address: addr(0, 5, 0),
                group: 3,
                iommu: true,
                bridge: false,
            },
            PlatformDevice {
                address: addr(0, 5, 1),
                group: 3,
                iommu: true,
                bridge: false,
            },
            PlatformDevice {
                address: addr(0, 6, 0),
                group: 4,
                iommu: false,
                bridge: false,
            },
            PlatformDevice {
                address: addr(0, 1, 0),
                group: 5,
                iommu: true,
                bridge: true,
            },
        ]
    }

    const LIMITS: PlatformLimits = PlatformLimits {
        memory: 1 << 30,
        max_cpus: 4,
    };

    fn vm(name: &str, memory: u64, devices: &[PciAddress]) -> VmConfig {
        VmConfig {
            name: name.into(),
            memory,
            image: "g".into(),
            devices: devices.to_vec(),
            cpus: 1,
            args: String::new(),
        }
    }

    fn validation_errors(vms: &[VmConfig]) -> Vec<String> {
        validate(vms, &platform(), LIMITS)
            .unwrap_err()
            .iter()
            .map(|e| format!("{e}"))
            .collect()
    }

    #[test]
    fn valid_vms_get_guest_bdfs() {
        let vms = [
            vm(
                "a",
                64 << 20,
                &[addr(0, 5, 1), addr(0, 3, 0), addr(0, 5, 0)],
            ),
            vm("b", 64 << 20, &[addr(0, 4, 0)]),
        ];
        let valid = validate(&vms, &platform(), LIMITS).unwrap();
        assert_eq!(
            valid[0].devices,
            vec![
                AssignedPci {
                    host: addr(0, 5, 1),
                    guest: Bdf::new(0, 1, 1),
                    group: 3
                },
                AssignedPci {
                    host: addr(0, 3, 0),
                    guest: Bdf::new(0, 2, 0),
                    group: 1
                },
                AssignedPci {
                    host: addr(0, 5, 0),
                    guest: Bdf::new(0, 1, 0),
                    group: 3
                },
            ]
        );
        assert_eq!(valid[1].devices[0].guest, Bdf::new(0, 1, 0));
        // Function 1 alone becomes guest function 0.
        let valid = validate(&[vm("c", 2 << 20, &[addr(0, 5, 1)])], &platform(), LIMITS).unwrap();
        assert_eq!(valid[0].devices[0].guest, Bdf::new(0, 1, 0));
    }

    #[test]
    fn validation_refusals_name_vm_and_device() {
        assert_eq!(
            validation_errors(&[
                vm("a", 2 << 20, &[addr(0, 3, 0)]),
                vm("b", 2 << 20, &[addr(0, 3, 0)])
            ]),
            ["0000:00:03.0 is assigned to both VM `a` and VM `b`"]
        );
        assert_eq!(
            validation_errors(&[vm("a", 2 << 20, &[addr(0, 3, 0), addr(0, 3, 0)])]),
            ["VM `a`: 0000:00:03.0 is listed twice"]
        );
        assert_eq!(
            validation_errors(&[
                vm("a", 2 << 20, &[addr(0, 5, 0)]),
                vm("b", 2 << 20, &[addr(0, 5, 1)])
            ]),
            [
                "IOMMU group 3 is split: 0000:00:05.1 goes to VM `b` but 0000:00:05.0 of the same group to VM `a`; a group cannot be isolated in parts"
            ]
        );
        assert_eq!(
            validation_errors(&[vm("a", 2 << 20, &[addr(0, 6, 0)])]),
            [
                "VM `a`: no IOMMU translates 0000:00:06.0 (or its group): its DMA could reach any memory, so it cannot be assigned"
            ]
        );
        assert_eq!(
            validation_errors(&[vm("a", 2 << 20, &[addr(0, 9, 0)])]),
            ["VM `a`: no PCI function 0000:00:09.0 on this machine"]
        );
        assert_eq!(
            validation_errors(&[vm("a", 2 << 20, &[addr(0, 1, 0)])]),
            ["VM `a`: 0000:00:01.0 is a bridge; only endpoints can be assigned"]
        );
        assert_eq!(
            validation_errors(&[vm("a", 0, &[])]),
            ["VM `a`: memory size is zero"]
        );
        assert_eq!(
            validation_errors(&[vm("a", 2 << 30, &[])]),
            ["VM `a`: 2048 MiB of memory asked, at most 1024 MiB available"]
        );
        assert_eq!(
            validation_errors(&[vm("a", 768 << 20, &[]), vm("b", 512 << 20, &[])]),
            ["the VMs ask for 1280 MiB of memory together, at most 1024 MiB available"]
        );
        assert_eq!(
            validation_errors(&[vm("a", 2 << 20, &[]), vm("a", 2 << 20, &[])]),
            ["two VMs are named `a`"]
        );
        let mut many = vm("a", 2 << 20, &[]);
        many.cpus = 9;
        assert_eq!(
            validation_errors(&[many]),
            ["VM `a`: 9 vCPUs asked, at most 4"]
        );
        // Every problem at once.
        assert_eq!(
            validate(
                &[vm("a", 0, &[addr(0, 6, 0), addr(0, 9, 0)])],
                &platform(),
                LIMITS
            )
            .unwrap_err()
            .len(),
            3
        );
    }

    #[test]
    fn too_many_devices_for_the_guest_bus() {
        let platform: Vec<PlatformDevice> = (0u8..40)
            .map(|d| PlatformDevice {
                address: addr(1 + d / 32, d % 32, 0),
                group: d as u32,
                iommu: true,
                bridge: false,
            })
            .collect();
        let devices: Vec<PciAddress> = platform.iter().map(|p| p.address).collect();
        let errs = validate(&[vm("a", 2 << 20, &devices)], &platform, LIMITS).unwrap_err();
        assert_eq!(
            errs,
            vec![ConfigError::TooManyDevices {
                vm: "a".into(),
                count: 40
            }]
        );
    }
}
