//! The one place that knows how to lay out an ESP and build a QEMU command line.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::arch::Arch;
use crate::guests::GuestImageFile;

/// QEMU's `virt` board maps each of its two flash banks as 64 MiB; images
/// must be exactly that size.
pub const VIRT_FLASH_SIZE: u64 = 64 * 1024 * 1024;

/// The firmware files for one architecture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Firmware {
    /// Read-only code image.
    pub code: PathBuf,
    /// Template of the variable store; every run boots on its own copy.
    pub vars_template: PathBuf,
}

impl Firmware {
    /// Debian's firmware paths for `arch`.
    pub fn debian(arch: Arch) -> Firmware {
        match arch {
            Arch::X86_64 => Firmware {
                code: PathBuf::from("/usr/share/OVMF/OVMF_CODE_4M.fd"),
                vars_template: PathBuf::from("/usr/share/OVMF/OVMF_VARS_4M.fd"),
            },
            Arch::Aarch64 => Firmware {
                code: PathBuf::from("/usr/share/AAVMF/AAVMF_CODE.fd"),
                vars_template: PathBuf::from("/usr/share/AAVMF/AAVMF_VARS.fd"),
            },
        }
    }

    /// The Debian package that ships [`Firmware::debian`].
    pub const fn debian_package(arch: Arch) -> &'static str {
        match arch {
            Arch::X86_64 => "ovmf",
            Arch::Aarch64 => "qemu-efi-aarch64",
        }
    }

    /// Debian's firmware for `arch`, or an error naming the missing file and
    /// the command that installs it.
    pub fn locate(arch: Arch) -> Result<Firmware, String> {
        let firmware = Firmware::debian(arch);
        for file in [&firmware.code, &firmware.vars_template] {
            if !file.is_file() {
                return Err(format!(
                    "{arch} firmware {} is missing; install it with: sudo apt-get install {}",
                    file.display(),
                    Firmware::debian_package(arch)
                ));
            }
        }
        Ok(firmware)
    }
}

/// Finds `program` in `PATH` (or checks it directly when it contains a `/`).
pub fn find_program(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let path = PathBuf::from(program);
        return path.is_file().then_some(path);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// The QEMU binary for `arch` on `PATH`, or an error naming the install command.
pub fn locate_qemu(arch: Arch) -> Result<PathBuf, String> {
    find_program(arch.qemu_program()).ok_or_else(|| {
        format!(
            "{} is not on PATH; install it with: sudo apt-get install {}",
            arch.qemu_program(),
            arch.qemu_package()
        )
    })
}

/// Everything that varies between two boots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuConfig {
    pub arch: Arch,
    /// The QEMU binary (normally [`Arch::qemu_program`]).
    pub program: PathBuf,
    pub smp: u32,
    pub mem: String,
    /// x86_64 only: `intel-iommu` properties, e.g. `aw-bits=48,caching-mode=on`.
    pub intel_iommu: String,
    /// Scenario devices and options, placed after the IOMMU.
    pub devices: Vec<String>,
    /// Firmware code image, used read-only.
    pub firmware_code: PathBuf,
    /// This run's own copy of the variable store.
    pub firmware_vars: PathBuf,
    /// The directory QEMU presents as a FAT disk.
    pub esp_dir: PathBuf,
    /// Anything the user passed after `--`, placed last.
    pub extra: Vec<String>,
}

impl QemuConfig {
    /// QEMU's arguments, in order.
    pub fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = Vec::new();
        fn push(args: &mut Vec<String>, items: &[&str]) {
            args.extend(items.iter().map(|s| (*s).to_owned()));
        }
        match self.arch {
            Arch::X86_64 => push(&mut args, &["-M", "q35", "-cpu", "qemu64,+svm,+npt"]),
            Arch::Aarch64 => push(
                &mut args,
                &[
                    "-M",
                    "virt,virtualization=on,iommu=smmuv3,gic-version=3",
                    "-cpu",
                    "max",
                ],
            ),
        }
        let smp = self.smp.to_string();
        push(&mut args, &["-smp", &smp, "-m", &self.mem]);
        push(
            &mut args,
            &[
                "-nodefaults",
                "-no-reboot",
                "-display",
                "none",
                "-serial",
                "stdio",
            ],
        );
        match self.arch {
            Arch::X86_64 => {
                // The IOMMU must be created before the PCI devices it translates for.
                let iommu = if self.intel_iommu.is_empty() {
                    String::from("intel-iommu")
                } else {
                    format!("intel-iommu,{}", self.intel_iommu)
                };
                push(&mut args, &["-device", &iommu]);
            }
            Arch::Aarch64 => push(
                &mut args,
                &["-semihosting-config", "enable=on,target=native"],
            ),
        }
        args.extend(self.devices.iter().cloned());
        if self.arch == Arch::X86_64 {
            push(
                &mut args,
                &["-device", "isa-debug-exit,iobase=0xf4,iosize=4"],
            );
        }
        let code = format!(
            "if=pflash,format=raw,readonly=on,file={}",
            option_value(&self.firmware_code)
        );
        let vars = format!(
            "if=pflash,format=raw,file={}",
            option_value(&self.firmware_vars)
        );
        // No `if=`: q35 attaches the disk to its built-in AHCI controller,
        // virt to a virtio-blk-pci device; both firmwares boot from either.
        let esp = format!("format=raw,file=fat:rw:{}", option_value(&self.esp_dir));
        push(
            &mut args,
            &["-drive", &code, "-drive", &vars, "-drive", &esp],
        );
        args.extend(self.extra.iter().cloned());
        args
    }

    /// A `Command` ready to spawn (stdio not yet configured).
    pub fn command(&self) -> Command {
        let mut command = Command::new(&self.program);
        command.args(self.args());
        command
    }

    /// The command line, shell-quoted so it can be pasted into a shell.
    pub fn shell_line(&self) -> String {
        let mut words = vec![shell_quote(&self.program.to_string_lossy())];
        words.extend(self.args().iter().map(|arg| shell_quote(arg)));
        words.join(" ")
    }
}

/// A path as a QEMU option value: commas are doubled so they stay in the value.
fn option_value(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

/// Quotes `word` for a POSIX shell when it needs quoting.
pub fn shell_quote(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=,+@%".contains(&b));
    if safe {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Checks a Sluice command line: ASCII words; returns it normalised to single spaces.
pub fn normalise_cmdline(cmdline: &str) -> Result<String, String> {
    if !cmdline.is_ascii() {
        return Err(format!(
            "the Sluice command line must be ASCII: {cmdline:?}"
        ));
    }
    if let Some(c) = cmdline
        .chars()
        .find(|c| c.is_ascii_control() && *c != ' ' && *c != '\t')
    {
        return Err(format!(
            "the Sluice command line contains control character {c:?}"
        ));
    }
    Ok(cmdline
        .split_ascii_whitespace()
        .collect::<Vec<_>>()
        .join(" "))
}

/// The files that make a boot: `<target>/esp/<arch>-<name>/` and its
/// variable store `<target>/qemu-vars/<arch>-<name>.fd`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootDisk {
    pub esp_dir: PathBuf,
    pub firmware_vars: PathBuf,
    pub firmware_code: PathBuf,
}

/// What the UEFI shell runs when the firmware falls back to it, i.e. when
/// BOOT*.EFI did not load or returned: say so and power off, so the run
/// ends at once with "no status" instead of waiting for the time limit.
const STARTUP_NSH: &str = "echo \"sluice: the firmware fell back to the UEFI shell: the boot file did not load or returned\"\r\nreset -s\r\n";

/// Exclusive use of one ESP directory and variable store while QEMU runs:
/// several people (or terminals) share one checkout, and two runs of the
/// same `<arch>-<name>` would otherwise rewrite each other's disk.
#[derive(Debug)]
pub struct BootLock {
    // Held for its open file description: the flock goes with it.
    _file: fs::File,
}

impl BootLock {
    /// Takes the lock of `<target>/esp/<arch>-<run_name>.lock`, waiting (and
    /// saying so on stderr) while another run holds it.
    pub fn acquire(target_dir: &Path, arch: Arch, run_name: &str) -> io::Result<BootLock> {
        use std::os::fd::AsRawFd;
        let dir = target_dir.join("esp");
        fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{}-{run_name}.lock", arch.name()));
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        let fd = file.as_raw_fd();
        // SAFETY: flock only takes an advisory lock on a descriptor we own
        // for as long as `file` lives.
        if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(BootLock { _file: file });
        }
        eprintln!(
            "waiting for another run of {}-{run_name} to finish ({})",
            arch.name(),
            path.display()
        );
        loop {
            // SAFETY: as above.
            if unsafe { libc::flock(fd, libc::LOCK_EX) } == 0 {
                return Ok(BootLock { _file: file });
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

/// Lays out the ESP for one run (from scratch) and copies the firmware's
/// variable store. `run_name` is the scenario name or `demo`; each guest
/// image goes to `EFI/sluice/<name>`, where Sluice reads `image=<name>`.
pub fn prepare_boot_disk(
    arch: Arch,
    target_dir: &Path,
    run_name: &str,
    boot_efi: &Path,
    cmdline: &str,
    firmware: &Firmware,
    guest_images: &[GuestImageFile],
) -> io::Result<BootDisk> {
    let id = format!("{}-{run_name}", arch.name());
    let esp_dir = target_dir.join("esp").join(&id);
    if esp_dir.exists() {
        fs::remove_dir_all(&esp_dir)?;
    }
    let boot_dir = esp_dir.join("EFI").join("BOOT");
    let sluice_dir = esp_dir.join("EFI").join("sluice");
    fs::create_dir_all(&boot_dir)?;
    fs::create_dir_all(&sluice_dir)?;
    fs::copy(boot_efi, boot_dir.join(arch.boot_file_name())).map_err(|err| {
        io::Error::new(
            err.kind(),
            format!("cannot copy {}: {err}", boot_efi.display()),
        )
    })?;
    let mut file = fs::File::create(sluice_dir.join("cmdline.txt"))?;
    file.write_all(cmdline.as_bytes())?;
    for image in guest_images {
        fs::copy(&image.path, sluice_dir.join(&image.name)).map_err(|err| {
            io::Error::new(
                err.kind(),
                format!(
                    "cannot copy guest image {} ({}): {err}",
                    image.name,
                    image.path.display()
                ),
            )
        })?;
    }
    fs::write(esp_dir.join("startup.nsh"), STARTUP_NSH)?;

    let vars_dir = target_dir.join("qemu-vars");
    fs::create_dir_all(&vars_dir)?;
    let firmware_vars = vars_dir.join(format!("{id}.fd"));
    let firmware_code = match arch {
        Arch::X86_64 => {
            fs::copy(&firmware.vars_template, &firmware_vars)?;
            firmware.code.clone()
        }
        Arch::Aarch64 => {
            copy_padded(&firmware.vars_template, &firmware_vars, VIRT_FLASH_SIZE)?;
            padded_code(&firmware.code, &target_dir.join("qemu-firmware"))?
        }
    };
    Ok(BootDisk {
        esp_dir,
        firmware_vars,
        firmware_code,
    })
}

/// The code image itself when it already fills the flash bank, else a
/// zero-padded copy (older AAVMF packages ship 2 MiB images).
fn padded_code(code: &Path, cache_dir: &Path) -> io::Result<PathBuf> {
    let len = fs::metadata(code)?.len();
    if len == VIRT_FLASH_SIZE {
        return Ok(code.to_path_buf());
    }
    fs::create_dir_all(cache_dir)?;
    let name = code
        .file_name()
        .map(OsString::from)
        .unwrap_or_else(|| OsString::from("code.fd"));
    let padded = cache_dir.join(name);
    copy_padded(code, &padded, VIRT_FLASH_SIZE)?;
    Ok(padded)
}

/// Copies `src` to `dst` and zero-extends it to `size` bytes.
pub fn copy_padded(src: &Path, dst: &Path, size: u64) -> io::Result<()> {
    let len = fs::metadata(src)?.len();
    if len > size {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is {len} bytes, larger than the {size}-byte flash bank",
                src.display()
            ),
        ));
    }
    fs::copy(src, dst)?;
    fs::OpenOptions::new().write(true).open(dst)?.set_len(size)
}

/// The demo's `vm=` words on both architectures: the guests scenarios' VMs
/// without `test=` (Sluice runs `vm=` words without `test=` as its demo).
pub const DEMO_VMS: &str = crate::scenarios::GUEST_VMS;

/// One boot to prepare: a scenario's or the demo's, possibly with the
/// user's overrides from `cargo xtask run`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootRequest {
    pub arch: Arch,
    /// Scenario name or `demo`; names the ESP directory and the log.
    pub run_name: String,
    pub cmdline: String,
    pub smp: u32,
    pub mem: String,
    pub intel_iommu: String,
    pub devices: Vec<String>,
    pub extra: Vec<String>,
    /// Guest images for `EFI/sluice/` (the test guest built for the boot's
    /// architecture).
    pub guest_images: Vec<GuestImageFile>,
}

impl BootRequest {
    /// The boot a scenario table entry describes.
    pub fn for_scenario(arch: Arch, scenario: &crate::scenarios::Scenario) -> BootRequest {
        BootRequest {
            arch,
            run_name: scenario.name.to_owned(),
            cmdline: scenario.cmdline.to_owned(),
            smp: scenario.smp,
            mem: scenario.mem.to_owned(),
            intel_iommu: scenario.intel_iommu.to_owned(),
            devices: scenario.qemu_args.iter().map(|s| (*s).to_owned()).collect(),
            extra: Vec::new(),
            guest_images: Vec::new(),
        }
    }

    /// The demo (`cargo xtask run` without `--scenario`): the two VMs of
    /// [`DEMO_VMS`], one CPU and one edu each, on the board of the
    /// architecture's two-VM guests scenario
    /// ([`crate::scenarios::guests_scenario`]), narrated instead of judged
    /// by a `test=` word. The boards differ where the architectures do:
    /// x86_64 turns interrupt remapping on (binding needs isolated MSIs)
    /// and keeps edu's default 28-bit DMA mask (the guests' addresses sit
    /// below 256 MiB); aarch64's SMMUv3 has no properties (MSI isolation
    /// comes from the GIC ITS Sluice takes over), and its edus get a 64-bit DMA mask
    /// because virt's RAM, and with it the victim's GPAs the attacker aims
    /// at, starts at 1 GiB.
    pub fn demo(arch: Arch) -> BootRequest {
        BootRequest {
            run_name: String::from("demo"),
            cmdline: DEMO_VMS.to_owned(),
            ..BootRequest::for_scenario(arch, crate::scenarios::guests_scenario(arch))
        }
    }

    /// Lays out the ESP and variable store under `target_dir` and returns the
    /// QEMU configuration that boots them with `program`.
    pub fn prepare(
        &self,
        target_dir: &Path,
        boot_efi: &Path,
        firmware: &Firmware,
        program: &Path,
    ) -> Result<QemuConfig, String> {
        if self.arch == Arch::Aarch64 && !self.intel_iommu.is_empty() {
            return Err(String::from(SMMU_HAS_NO_PROPERTIES));
        }
        let cmdline = normalise_cmdline(&self.cmdline)?;
        let disk = prepare_boot_disk(
            self.arch,
            target_dir,
            &self.run_name,
            boot_efi,
            &cmdline,
            firmware,
            &self.guest_images,
        )
        .map_err(|err| format!("cannot lay out the ESP for {}: {err}", self.run_name))?;
        Ok(QemuConfig {
            arch: self.arch,
            program: program.to_path_buf(),
            smp: self.smp,
            mem: self.mem.clone(),
            intel_iommu: self.intel_iommu.clone(),
            devices: self.devices.clone(),
            firmware_code: disk.firmware_code,
            firmware_vars: disk.firmware_vars,
            esp_dir: disk.esp_dir,
            extra: self.extra.clone(),
        })
    }
}

/// Why IOMMU properties cannot be given on aarch64.
pub const SMMU_HAS_NO_PROPERTIES: &str = "IOMMU properties are not applicable on aarch64: \
     QEMU 7.2's SMMUv3 is created by `virt,iommu=smmuv3` and has no user-settable properties";

#[cfg(test)]
mod tests {
    use super::*;

    fn config(arch: Arch) -> QemuConfig {
        QemuConfig {
            arch,
            program: PathBuf::from(arch.qemu_program()),
            smp: 2,
            mem: "1G".into(),
            intel_iommu: String::new(),
            devices: vec!["-device".into(), "edu".into()],
            firmware_code: PathBuf::from("/fw/CODE.fd"),
            firmware_vars: PathBuf::from("/t/vars,1.fd"),
            esp_dir: PathBuf::from("/t/esp/x"),
            extra: vec!["-d".into(), "int".into()],
        }
    }

    #[test]
    fn x86_command_line_follows_the_contract() {
        let mut x86 = config(Arch::X86_64);
        x86.intel_iommu = "aw-bits=48,caching-mode=on".into();
        assert_eq!(
            x86.shell_line(),
            "qemu-system-x86_64 -M q35 -cpu qemu64,+svm,+npt -smp 2 -m 1G -nodefaults \
             -no-reboot -display none -serial stdio \
             -device intel-iommu,aw-bits=48,caching-mode=on -device edu \
             -device isa-debug-exit,iobase=0xf4,iosize=4 \
             -drive if=pflash,format=raw,readonly=on,file=/fw/CODE.fd \
             -drive if=pflash,format=raw,file=/t/vars,,1.fd \
             -drive format=raw,file=fat:rw:/t/esp/x -d int"
        );
        let args = x86.args();
        let iommu = args.iter().position(|a| a.starts_with("intel-iommu"));
        let edu = args.iter().position(|a| a == "edu");
        assert!(iommu < edu, "the IOMMU must precede PCI devices");
    }

    #[test]
    fn aarch64_command_line_follows_the_contract() {
        assert_eq!(
            config(Arch::Aarch64).shell_line(),
            "qemu-system-aarch64 -M virt,virtualization=on,iommu=smmuv3,gic-version=3 \
             -cpu max -smp 2 -m 1G -nodefaults -no-reboot -display none -serial stdio \
             -semihosting-config enable=on,target=native -device edu \
             -drive if=pflash,format=raw,readonly=on,file=/fw/CODE.fd \
             -drive if=pflash,format=raw,file=/t/vars,,1.fd \
             -drive format=raw,file=fat:rw:/t/esp/x -d int"
        );
    }

    /// The two `vm=` words both demos run, checked word by word.
    fn assert_demo_vms(request: &BootRequest) {
        let words: Vec<&str> = request.cmdline.split_ascii_whitespace().collect();
        assert_eq!(
            words,
            [
                "vm=victim:mem=16M:image=test-guest:dev=00:01.0:args=dma",
                "vm=attacker:mem=16M:image=test-guest:dev=00:02.0:args=attacker",
            ],
            "{:?}: the demo runs victim and attacker, and no test= word",
            request.arch
        );
        assert_eq!(request.run_name, "demo");
        assert_eq!(request.mem, "1G");
        assert!(request.extra.is_empty() && request.guest_images.is_empty());
    }

    #[test]
    fn x86_demo_boots_two_vms_with_interrupt_remapping() {
        let demo = BootRequest::demo(Arch::X86_64);
        assert_eq!(demo.arch, Arch::X86_64);
        assert_demo_vms(&demo);
        assert_eq!(demo.smp, 2, "one CPU per VM");
        assert_eq!(demo.intel_iommu, "intremap=on");
        assert_eq!(demo.devices, ["-device", "edu", "-device", "edu"]);
        // The guests-legacy scenario's board, its command line minus `test=`.
        let guests = crate::scenarios::find("guests-legacy").unwrap();
        assert_eq!(guests.cmdline, format!("test=guests {}", demo.cmdline));
        assert_eq!(
            (guests.smp, guests.intel_iommu),
            (demo.smp, demo.intel_iommu.as_str())
        );
        assert_eq!(guests.qemu_args, demo.devices);
    }

    #[test]
    fn aarch64_demo_boots_two_vms_with_wide_edus() {
        let demo = BootRequest::demo(Arch::Aarch64);
        assert_eq!(demo.arch, Arch::Aarch64);
        assert_demo_vms(&demo);
        assert_eq!(demo.smp, 2, "one CPU per VM");
        assert_eq!(demo.intel_iommu, "", "the SMMUv3 takes no properties");
        assert_eq!(
            demo.devices,
            [
                "-device",
                "edu,dma_mask=0xffffffffffffffff",
                "-device",
                "edu,dma_mask=0xffffffffffffffff"
            ]
        );
        // The el2-guests scenario's board, its command line minus `test=`.
        let guests = crate::scenarios::find("el2-guests").unwrap();
        assert_eq!(guests.cmdline, format!("test=guests {}", demo.cmdline));
        assert_eq!(guests.smp, demo.smp);
        assert_eq!(guests.qemu_args, demo.devices);
        // Same VMs on both architectures.
        assert_eq!(demo.cmdline, BootRequest::demo(Arch::X86_64).cmdline);
    }

    /// A fresh directory named after `name` with a fake Sluice binary and
    /// fake firmware images in it.
    fn fake_boot_files(name: &str) -> (std::path::PathBuf, std::path::PathBuf, Firmware) {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let efi = dir.join("sluice-boot.efi");
        fs::write(&efi, b"MZ fake").unwrap();
        let firmware = Firmware {
            code: dir.join("CODE.fd"),
            vars_template: dir.join("VARS.fd"),
        };
        fs::write(&firmware.code, vec![0xaa; 4096]).unwrap();
        fs::write(&firmware.vars_template, vec![0x55; 4096]).unwrap();
        (dir, efi, firmware)
    }

    #[test]
    fn aarch64_demo_prepares_its_disk_and_command_line() {
        let (dir, efi, firmware) = fake_boot_files("sluice-demo-test");
        let guest = dir.join("built-guest");
        fs::write(&guest, b"\x7fELF aarch64 guest").unwrap();
        let mut demo = BootRequest::demo(Arch::Aarch64);
        demo.guest_images = vec![GuestImageFile {
            name: crate::guests::TEST_GUEST.into(),
            path: guest,
        }];
        let target = dir.join("target");
        let config = demo
            .prepare(&target, &efi, &firmware, Path::new("qemu-system-aarch64"))
            .unwrap();
        let sluice = target.join("esp/aarch64-demo/EFI/sluice");
        assert_eq!(
            fs::read_to_string(sluice.join("cmdline.txt")).unwrap(),
            DEMO_VMS
        );
        assert_eq!(
            fs::read(sluice.join("test-guest")).unwrap(),
            b"\x7fELF aarch64 guest",
            "the vm= words' image=test-guest is on the ESP"
        );
        let line = config.shell_line();
        assert!(
            line.contains(
                "-smp 2 -m 1G -nodefaults -no-reboot -display none -serial stdio \
                 -semihosting-config enable=on,target=native \
                 -device edu,dma_mask=0xffffffffffffffff \
                 -device edu,dma_mask=0xffffffffffffffff -drive"
            ),
            "{line}"
        );
        assert!(!line.contains("intel-iommu"), "{line}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn quotes_for_the_shell() {
        assert_eq!(shell_quote("plain-word_1.fd"), "plain-word_1.fd");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("two words"), "'two words'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
    }

    #[test]
    fn checks_the_sluice_command_line() {
        assert_eq!(
            normalise_cmdline("  test=boot\tloglevel=debug ").as_deref(),
            Ok("test=boot loglevel=debug")
        );
        assert!(normalise_cmdline("test=bööt").is_err());
        assert!(normalise_cmdline("a\nb").is_err());
        assert_eq!(normalise_cmdline("").as_deref(), Ok(""));
    }

    #[test]
    fn boot_lock_is_exclusive_per_run() {
        use std::sync::mpsc;
        use std::time::Duration;
        let dir = std::env::temp_dir().join(format!("sluice-lock-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let held = BootLock::acquire(&dir, Arch::X86_64, "boot").unwrap();
        // Another run name is independent.
        drop(BootLock::acquire(&dir, Arch::X86_64, "fault").unwrap());
        let (tx, rx) = mpsc::channel();
        let waiter_dir = dir.clone();
        let waiter = std::thread::spawn(move || {
            let lock = BootLock::acquire(&waiter_dir, Arch::X86_64, "boot").unwrap();
            tx.send(()).unwrap();
            drop(lock);
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "the second run must wait"
        );
        drop(held);
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the second run proceeds once the first is done");
        waiter.join().unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn lays_out_the_esp_and_pads_flash() {
        let (dir, efi, firmware) = fake_boot_files("sluice-esp-test");
        let target = dir.join("target");

        let disk = prepare_boot_disk(
            Arch::Aarch64,
            &target,
            "boot",
            &efi,
            "test=boot",
            &firmware,
            &[],
        )
        .unwrap();
        assert_eq!(disk.esp_dir, target.join("esp/aarch64-boot"));
        assert_eq!(
            fs::read(disk.esp_dir.join("EFI/BOOT/BOOTAA64.EFI")).unwrap(),
            b"MZ fake"
        );
        assert_eq!(
            fs::read_to_string(disk.esp_dir.join("EFI/sluice/cmdline.txt")).unwrap(),
            "test=boot"
        );
        assert_eq!(
            fs::metadata(&disk.firmware_vars).unwrap().len(),
            VIRT_FLASH_SIZE
        );
        let code = fs::read(&disk.firmware_code).unwrap();
        assert_eq!(code.len() as u64, VIRT_FLASH_SIZE);
        assert_eq!(code[4095], 0xaa);
        assert_eq!(code[4096], 0);

        // A second layout starts from scratch and x86 keeps the code image as is.
        fs::write(disk.esp_dir.join("stale"), b"x").unwrap();
        let guest = dir.join("built-guest");
        fs::write(&guest, b"\x7fELF guest").unwrap();
        let images = [GuestImageFile {
            name: "test-guest".into(),
            path: guest,
        }];
        let disk =
            prepare_boot_disk(Arch::X86_64, &target, "demo", &efi, "", &firmware, &images).unwrap();
        assert!(disk.esp_dir.join("EFI/BOOT/BOOTX64.EFI").is_file());
        assert_eq!(
            fs::read(disk.esp_dir.join("EFI/sluice/test-guest")).unwrap(),
            b"\x7fELF guest"
        );
        // A missing image is an error naming it.
        let missing = [GuestImageFile {
            name: "gone".into(),
            path: dir.join("no-such-file"),
        }];
        let err = prepare_boot_disk(Arch::X86_64, &target, "demo", &efi, "", &firmware, &missing)
            .unwrap_err();
        assert!(
            err.to_string().contains("cannot copy guest image gone"),
            "{err}"
        );
        assert_eq!(disk.firmware_code, firmware.code);
        assert_eq!(fs::metadata(&disk.firmware_vars).unwrap().len(), 4096);
        let again = prepare_boot_disk(
            Arch::Aarch64,
            &target,
            "boot",
            &efi,
            "test=boot",
            &firmware,
            &[],
        )
        .unwrap();
        assert!(!again.esp_dir.join("stale").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
