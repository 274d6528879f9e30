//! Binding a device without interrupt remapping in a VM configured with
//! `allow_unsafe_interrupts` succeeds and logs a warning naming the device.
//! (Own test binary: it installs the global logger.)

use std::sync::Mutex;

use sluice_abi as abi;
use sluice_hypervisor::iommufd::{VmConfig, VmId};
use sluice_hypervisor::testing::{DeviceSetup, Platform, VmSetup};

static LINES: Mutex<Vec<(log::Level, String)>> = Mutex::new(Vec::new());

struct Capture;
impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        LINES
            .lock()
            .unwrap()
            .push((record.level(), record.args().to_string()));
    }
    fn flush(&self) {}
}
static LOGGER: Capture = Capture;

#[test]
fn unsafe_interrupts_bind_warns_with_the_device_name() {
    log::set_logger(&LOGGER).unwrap();
    log::set_max_level(log::LevelFilter::Trace);
    let vm = VmId(3);
    let bdf = abi::bdf(0, 0, 6, 0);
    let mut p = Platform::builder()
        .vm(
            vm,
            VmSetup::new().ram(0, 16 << 20).config(VmConfig {
                allow_unsafe_interrupts: true,
                ..Default::default()
            }),
        )
        .device(DeviceSetup::new(vm, bdf).interrupt_remapping(false))
        .build();
    p.bind(vm, bdf).unwrap();
    let lines = LINES.lock().unwrap();
    assert!(
        lines.iter().any(|(level, text)| *level == log::Level::Warn
            && text.contains(&format!("{bdf:#x}"))
            && text.contains("NOT isolated")),
        "no warning naming the device: {lines:?}"
    );
}
