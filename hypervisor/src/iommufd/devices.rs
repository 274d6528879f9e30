//! Devices: binding, group rules, attach / replace / detach of the RID and
//! of PASIDs, the vPASID table, hardware info, faults and the WBINVD policy.

use alloc::vec::Vec;

use sluice_abi::{fault_flags, fault_reason, hw_caps, wbinvd};
use sluice_hal::PAGE_SIZE;

use super::ioas::{ReserveOwner, Span};
use super::{
    AreaSnapshot, DeviceSnapshot, FaultSnapshot, GroupSnapshot, HwptSnapshot, IoasSnapshot,
};
use super::{
    AttachTarget, BindResult, BoundDevice, DeviceId, DomainConfig, Error, FAULT_QUEUE_CAPACITY,
    FaultReason, GroupState, IommuBackend, IommuCaps, Iommufd, MsiWindow, Object, Prot, Target, Vm,
    VmId, VmSnapshot, destroy_hwpt, effective_pasid_log2,
};

/// One entry of `DEVICE_LIST`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListedDevice {
    pub guest_bdf: u32,
    pub group: u32,
    pub dev_id: u32,
    pub max_pasid_log2: u8,
    pub capabilities: u64,
}

/// `GET_HW_INFO` result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HwInfo {
    pub max_pasid_log2: u8,
    pub capabilities: u64,
}

fn capability_bits(caps: &IommuCaps, info: &super::AssignedDevice) -> u64 {
    let mut bits = 0;
    if caps.snoop_control {
        bits |= hw_caps::ENFORCE_SNOOP;
    }
    if caps.interrupt_remapping {
        bits |= hw_caps::INTERRUPT_REMAPPING;
    }
    if info.no_snoop {
        bits |= hw_caps::NO_SNOOP_DMA;
    }
    if caps.scalable_mode {
        bits |= hw_caps::SCALABLE_MODE;
    }
    if info.flr {
        bits |= hw_caps::FLR;
    }
    bits
}

/// Can a device with `caps` (and PASIDs attached or not) use HWPT `h`?
fn check_compatible(v: &Vm, caps: &IommuCaps, has_pasids: bool, h: u32) -> Result<(), Error> {
    let hwpt = v.hwpt(h)?;
    if hwpt.unit != caps.unit {
        return Err(Error::Invalid("HWPT belongs to another IOMMU"));
    }
    if hwpt.config.enforce_coherency && !caps.snoop_control {
        return Err(Error::Invalid(
            "HWPT enforces coherency but the device's IOMMU cannot force snooping",
        ));
    }
    if has_pasids && !hwpt.config.pasid_compatible {
        return Err(Error::Invalid(
            "device has PASIDs attached: its RID HWPT must be PASID-compatible",
        ));
    }
    Ok(())
}

impl<B: IommuBackend> Iommufd<B> {
    fn reserved_for(&self, device: DeviceId) -> Vec<Span> {
        let mut spans: Vec<Span> = self.msi_window.map(MsiWindow::span).into_iter().collect();
        if let Some(a) = self.assignments.get(&device) {
            spans.extend(a.info.rmrrs.iter().copied());
        }
        spans
    }

    /// Under a software-managed MSI window, makes `device`'s doorbell page
    /// reachable through HWPT `h` before the device's RID is attached to it
    /// (an MSI is then a DMA write the IOMMU translates). Each distinct
    /// doorbell gets the next page of the window; the window stays reserved
    /// in the IOAS as long as the HWPT maps any. Returns the IOVA mapped
    /// now, for [`Self::remove_msi_page`] to undo a failed attach.
    fn install_msi_doorbell(
        &mut self,
        vm: VmId,
        h: u32,
        device: DeviceId,
    ) -> Result<Option<u64>, Error> {
        let Some(MsiWindow::SoftwareManaged(window)) = self.msi_window else {
            return Ok(None);
        };
        let Some(doorbell) = self.assignment(device)?.msi_doorbell else {
            return Ok(None);
        };
        let Iommufd { backend, vms, .. } = self;
        let v = vms.get_mut(&vm).ok_or(Error::Invalid("no such VM"))?;
        let hwpt = v.hwpt(h)?;
        if hwpt.msi_pages.contains_key(&doorbell) {
            return Ok(None);
        }
        // Pages are only ever dropped with the HWPT: the used ones are the
        // first `len` of the window.
        let iova = (hwpt.msi_pages.len() as u64)
            .checked_mul(PAGE_SIZE)
            .and_then(|offset| window.0.checked_add(offset))
            .filter(|&iova| {
                iova.checked_add(PAGE_SIZE - 1)
                    .is_some_and(|l| l <= window.1)
            })
            .ok_or(Error::NoIovaSpace)?;
        let (domain, ioas_id) = (hwpt.domain, hwpt.ioas);
        // Write-only: a device only ever writes its doorbell.
        let prot = Prot {
            read: false,
            write: true,
            mmio: true,
        };
        backend.map(
            domain,
            iova,
            doorbell,
            PAGE_SIZE,
            prot,
            false,
            &mut v.budget,
        )?;
        v.hwpt_mut(h)?.msi_pages.insert(doorbell, iova);
        v.ioas_mut(ioas_id)?
            .reserved
            .insert(ReserveOwner::MsiPages(h), alloc::vec![window]);
        Ok(Some(iova))
    }

    /// Undoes [`Self::install_msi_doorbell`]'s page at `iova` in HWPT `h`.
    fn remove_msi_page(&mut self, vm: VmId, h: u32, iova: u64) {
        let Iommufd { backend, vms, .. } = self;
        let Some(v) = vms.get_mut(&vm) else { return };
        let Ok(hwpt) = v.hwpt_mut(h) else { return };
        hwpt.msi_pages.retain(|_, &mut i| i != iova);
        let (domain, ioas_id, empty) = (hwpt.domain, hwpt.ioas, hwpt.msi_pages.is_empty());
        backend.unmap(domain, iova, PAGE_SIZE, &mut v.budget);
        if empty && let Ok(ioas) = v.ioas_mut(ioas_id) {
            ioas.reserved.remove(&ReserveOwner::MsiPages(h));
        }
    }

    /// `DEVICE_LIST`.
    pub fn device_list(&self, vm: VmId) -> Result<Vec<ListedDevice>, Error> {
        self.vm(vm)?;
        let mut out: Vec<ListedDevice> = Vec::new();
        for a in self.assignments.values().filter(|a| a.vm == vm) {
            let caps = self.backend.caps(a.info.device)?;
            out.push(ListedDevice {
                guest_bdf: a.info.guest_bdf,
                group: a.info.group,
                dev_id: a.bound.unwrap_or(0),
                max_pasid_log2: effective_pasid_log2(&caps, &a.info),
                capabilities: capability_bits(&caps, &a.info),
            });
        }
        out.sort_by_key(|d| d.guest_bdf);
        Ok(out)
    }

    /// `DEVICE_BIND`. `group_capacity` is the room the guest gave for the
    /// group's BDFs.
    pub fn device_bind(
        &mut self,
        vm: VmId,
        guest_bdf: u32,
        group_capacity: u32,
    ) -> Result<BindResult, Error> {
        let v = self.vm(vm)?;
        let assignment = self
            .assignments
            .values()
            .find(|a| a.vm == vm && a.info.guest_bdf == guest_bdf)
            .ok_or(Error::NoSuchDevice)?;
        if assignment.bound.is_some() {
            return Err(Error::Busy("device already bound"));
        }
        let device = assignment.info.device;
        let group = assignment.info.group;
        let members: Vec<&super::Assignment> = self
            .assignments
            .values()
            .filter(|a| a.info.group == group)
            .collect();
        if members.iter().any(|a| a.vm != vm) || self.host_devices.values().any(|&g| g == group) {
            return Err(Error::NotPermitted(
                "another device of the group is not assigned to this VM",
            ));
        }
        let mut group_bdfs: Vec<u32> = members.iter().map(|a| a.info.guest_bdf).collect();
        group_bdfs.sort_unstable();
        let member_devices: Vec<DeviceId> = members.iter().map(|a| a.info.device).collect();
        if group_bdfs.len() as u64 > u64::from(group_capacity) {
            return Err(Error::BufferTooSmall {
                needed: group_bdfs.len() as u32,
            });
        }
        let caps = self.backend.caps(device)?;
        if !caps.interrupt_remapping {
            if !v.config.allow_unsafe_interrupts {
                log::warn!(
                    "VM {}: refusing to bind device {:#x}: its IOMMU cannot remap interrupts, so its MSIs are not isolated (configure the VM with allow_unsafe_interrupts to override)",
                    vm.0,
                    guest_bdf
                );
                return Err(Error::NotPermitted("interrupt remapping unavailable"));
            }
            log::warn!(
                "VM {}: binding device {:#x} (host device {}) without interrupt remapping: its MSIs are NOT isolated (allow_unsafe_interrupts)",
                vm.0,
                guest_bdf,
                device.0
            );
        }
        v.check_object_quota()?;
        let first_bind = !v.groups.contains_key(&group);
        if first_bind {
            for &m in &member_devices {
                self.backend.attach(m, None, AttachTarget::Blocking)?;
            }
        }
        let v = self.vm_mut(vm)?;
        let dev_id = v.insert(Object::Device(BoundDevice {
            device,
            group,
            caps,
            rid: None,
            pasids: Default::default(),
        }));
        v.groups
            .entry(group)
            .or_insert_with(GroupState::default)
            .bound
            .insert(dev_id);
        if let Some(a) = self.assignments.get_mut(&device) {
            a.bound = Some(dev_id);
        }
        Ok(BindResult {
            dev_id,
            group,
            group_bdfs,
        })
    }

    /// `DEVICE_UNBIND`: detaches everything, blocks the device, resets it
    /// when it supports FLR.
    pub fn device_unbind(&mut self, vm: VmId, dev_id: u32) -> Result<(), Error> {
        let dev = self.vm(vm)?.device(dev_id)?;
        let pasids: Vec<u32> = dev.pasids.keys().copied().collect();
        let (device, group, attached) = (dev.device, dev.group, dev.rid.is_some());
        for p in pasids {
            self.device_detach(vm, dev_id, Some(p))?;
        }
        if attached {
            self.device_detach(vm, dev_id, None)?;
        }
        let flr = self.assignment(device).map(|a| a.flr).unwrap_or(false);
        if flr {
            match self.backend.reset_device(device) {
                Ok(()) => log::info!("VM {}: device {} reset on unbind", vm.0, device.0),
                Err(e) => log::warn!(
                    "VM {}: function-level reset of device {} failed on unbind: {:?}",
                    vm.0,
                    device.0,
                    e
                ),
            }
        }
        let v = self.vm_mut(vm)?;
        v.objects.remove(&dev_id);
        if let Some(g) = v.groups.get_mut(&group) {
            g.bound.remove(&dev_id);
            if g.bound.is_empty() {
                v.groups.remove(&group);
            }
        }
        if let Some(a) = self.assignments.get_mut(&device) {
            a.bound = None;
        }
        Ok(())
    }

    /// `GET_HW_INFO`.
    pub fn hw_info(&self, vm: VmId, dev_id: u32) -> Result<HwInfo, Error> {
        let dev = self.vm(vm)?.device(dev_id)?;
        let info = self.assignment(dev.device)?;
        Ok(HwInfo {
            max_pasid_log2: effective_pasid_log2(&dev.caps, info),
            capabilities: capability_bits(&dev.caps, info),
        })
    }

    fn resolve_target(v: &Vm, pt_id: u32) -> Result<Target, Error> {
        match v.objects.get(&pt_id) {
            Some(Object::Ioas(_)) => Ok(Target::Ioas(pt_id)),
            Some(Object::Hwpt(_)) => Ok(Target::Hwpt(pt_id)),
            Some(_) => Err(Error::Invalid("pt_id is neither an IOAS nor a HWPT")),
            None => Err(Error::NoSuchObject(pt_id)),
        }
    }

    /// The HWPT a device with `caps` would use for `target`: the explicit
    /// one, or a compatible automatic HWPT of the IOAS, or `None` if a new
    /// automatic HWPT must be made. `others` are further devices (caps, has
    /// PASIDs) that must be able to share it.
    fn pick_hwpt(
        v: &Vm,
        target: Target,
        devs: &[(IommuCaps, bool)],
        want_pasid: bool,
    ) -> Result<Option<u32>, Error> {
        match target {
            Target::Hwpt(h) => {
                for (caps, has_pasids) in devs {
                    check_compatible(v, caps, *has_pasids, h)?;
                }
                if want_pasid && !v.hwpt(h)?.config.pasid_compatible {
                    return Err(Error::Invalid("HWPT was not allocated with the PASID flag"));
                }
                Ok(Some(h))
            }
            Target::Ioas(i) => {
                let ioas = v.ioas(i)?;
                let first = devs.first().map(|d| d.0.snoop_control);
                for h in ioas.hwpts.keys() {
                    let Ok(hwpt) = v.hwpt(*h) else { continue };
                    if !hwpt.auto || Some(hwpt.config.enforce_coherency) != first {
                        continue;
                    }
                    if want_pasid && !hwpt.config.pasid_compatible {
                        continue;
                    }
                    if devs
                        .iter()
                        .all(|(c, p)| check_compatible(v, c, *p, *h).is_ok())
                    {
                        return Ok(Some(*h));
                    }
                }
                Ok(None)
            }
        }
    }

    /// Resolves `target` to a HWPT for `dev_id`, creating an automatic one if
    /// needed. Returns (HWPT, whether it was created now).
    fn hwpt_for(
        &mut self,
        vm: VmId,
        dev_id: u32,
        target: Target,
        devs: &[(IommuCaps, bool)],
        want_pasid: bool,
    ) -> Result<(u32, bool), Error> {
        let v = self.vm(vm)?;
        if let Some(h) = Self::pick_hwpt(v, target, devs, want_pasid)? {
            return Ok((h, false));
        }
        let Target::Ioas(ioas) = target else {
            return Err(Error::Invalid("no HWPT"));
        };
        let dev = v.device(dev_id)?;
        let info = self.assignment(dev.device)?;
        let config = DomainConfig {
            enforce_coherency: dev.caps.snoop_control,
            pasid_compatible: effective_pasid_log2(&dev.caps, info) > 0,
        };
        if want_pasid && !config.pasid_compatible {
            return Err(Error::Invalid("device or IOMMU without PASID support"));
        }
        let (device, caps) = (dev.device, dev.caps);
        let h = self.create_hwpt(vm, ioas, device, caps, config, true, None)?;
        // The new HWPT must suit every device that will share it.
        let v = self.vm(vm)?;
        if let Err(e) = devs
            .iter()
            .try_for_each(|(c, p)| check_compatible(v, c, *p, h))
        {
            self.drop_auto_if_unused(vm, h);
            return Err(e);
        }
        Ok((h, true))
    }

    fn drop_auto_if_unused(&mut self, vm: VmId, h: u32) {
        let Iommufd { backend, vms, .. } = self;
        if let Some(v) = vms.get_mut(&vm)
            && let Ok(hwpt) = v.hwpt(h)
            && hwpt.auto
            && hwpt.users == 0
        {
            destroy_hwpt(backend, v, h);
        }
    }

    /// `DEVICE_ATTACH` (RID with `pasid == None`): returns the HWPT.
    pub fn device_attach(
        &mut self,
        vm: VmId,
        dev_id: u32,
        pasid: Option<u32>,
        pt_id: u32,
    ) -> Result<u32, Error> {
        let v = self.vm(vm)?;
        let dev = v.device(dev_id)?;
        let (device, caps, group) = (dev.device, dev.caps, dev.group);
        let has_pasids = !dev.pasids.is_empty();
        let mut target = Self::resolve_target(v, pt_id)?;
        if let Some(p) = pasid {
            self.check_pasid(v, dev_id, p)?;
            if dev.pasids.contains_key(&p) {
                return Err(Error::Busy("PASID already attached"));
            }
            if let Some(r) = dev.rid
                && !v.hwpt(r)?.config.pasid_compatible
            {
                return Err(Error::Invalid(
                    "the device's RID HWPT is not PASID-compatible",
                ));
            }
        } else {
            if dev.rid.is_some() {
                return Err(Error::Busy("device already attached"));
            }
            // A group shares one HWPT.
            if let Some(gh) = v.groups.get(&group).and_then(|g| g.hwpt) {
                let same = match target {
                    Target::Hwpt(h) => h == gh,
                    Target::Ioas(i) => v.hwpt(gh)?.ioas == i,
                };
                if !same {
                    return Err(Error::Invalid(
                        "another device of the group is attached to a different HWPT",
                    ));
                }
                target = Target::Hwpt(gh);
            }
        }
        let (h, created) =
            self.hwpt_for(vm, dev_id, target, &[(caps, has_pasids)], pasid.is_some())?;
        let ranges = self.reserved_for(device);
        let result = (|| {
            let v = self.vm(vm)?;
            let ioas_id = v.hwpt(h)?.ioas;
            v.ioas(ioas_id)?.check_reservable(&ranges)?;
            let domain = v.hwpt(h)?.domain;
            // MSIs carry no PASID: only the RID needs the doorbell.
            let msi_page = match pasid {
                None => self.install_msi_doorbell(vm, h, device)?,
                Some(_) => None,
            };
            if let Err(e) = self
                .backend
                .attach(device, pasid, AttachTarget::Domain(domain))
            {
                if let Some(iova) = msi_page {
                    self.remove_msi_page(vm, h, iova);
                }
                return Err(e.into());
            }
            Ok::<u32, Error>(ioas_id)
        })();
        let ioas_id = match result {
            Ok(i) => i,
            Err(e) => {
                if created {
                    self.drop_auto_if_unused(vm, h);
                }
                return Err(e);
            }
        };
        let v = self.vm_mut(vm)?;
        v.ioas_mut(ioas_id)?
            .reserved
            .insert(ReserveOwner::Device { dev_id, pasid }, ranges);
        v.hwpt_mut(h)?.users += 1;
        let dev = v.device_mut(dev_id)?;
        match pasid {
            Some(p) => {
                dev.pasids.insert(p, h);
            }
            None => {
                dev.rid = Some(h);
                let g = v.groups.entry(group).or_default();
                g.hwpt = Some(h);
                g.attached.insert(dev_id);
            }
        }
        Ok(h)
    }

    fn check_pasid(&self, v: &Vm, dev_id: u32, pasid: u32) -> Result<(), Error> {
        let dev = v.device(dev_id)?;
        let info = self.assignment(dev.device)?;
        let width = effective_pasid_log2(&dev.caps, info);
        if width == 0 {
            return Err(Error::Invalid(
                "PASID attach needs scalable mode and a PASID-capable device",
            ));
        }
        if width < 32 && u64::from(pasid) >= 1u64 << width {
            return Err(Error::Invalid("PASID beyond the supported width"));
        }
        Ok(())
    }

    /// `DEVICE_DETACH`.
    pub fn device_detach(
        &mut self,
        vm: VmId,
        dev_id: u32,
        pasid: Option<u32>,
    ) -> Result<(), Error> {
        let v = self.vm(vm)?;
        let dev = v.device(dev_id)?;
        let h = match pasid {
            Some(p) => *dev
                .pasids
                .get(&p)
                .ok_or(Error::Invalid("PASID not attached"))?,
            None => dev.rid.ok_or(Error::Invalid("device not attached"))?,
        };
        let (device, group) = (dev.device, dev.group);
        self.backend.attach(device, pasid, AttachTarget::Blocking)?;
        let Iommufd { backend, vms, .. } = self;
        let v = vms.get_mut(&vm).ok_or(Error::Invalid("no such VM"))?;
        let ioas_id = v.hwpt(h)?.ioas;
        v.ioas_mut(ioas_id)?
            .reserved
            .remove(&ReserveOwner::Device { dev_id, pasid });
        let hwpt = v.hwpt_mut(h)?;
        hwpt.users -= 1;
        let drop_hwpt = hwpt.auto && hwpt.users == 0;
        let dev = v.device_mut(dev_id)?;
        match pasid {
            Some(p) => {
                dev.pasids.remove(&p);
                v.vpasids
                    .retain(|_, &mut (d, hp)| !(d == dev_id && hp == p));
            }
            None => {
                dev.rid = None;
                if let Some(g) = v.groups.get_mut(&group) {
                    g.attached.remove(&dev_id);
                    if g.attached.is_empty() {
                        g.hwpt = None;
                    }
                }
            }
        }
        if drop_hwpt {
            destroy_hwpt(backend, v, h);
        }
        Ok(())
    }

    /// `DEVICE_REPLACE`: moves the RID of every attached device of the group
    /// (or one PASID) to `pt_id`, atomically.
    pub fn device_replace(
        &mut self,
        vm: VmId,
        dev_id: u32,
        pasid: Option<u32>,
        pt_id: u32,
    ) -> Result<u32, Error> {
        let v = self.vm(vm)?;
        let dev = v.device(dev_id)?;
        let old = match pasid {
            Some(p) => *dev
                .pasids
                .get(&p)
                .ok_or(Error::Invalid("PASID not attached"))?,
            None => dev.rid.ok_or(Error::Invalid("device not attached"))?,
        };
        // The devices that move: the whole attached group for a RID replace.
        let movers: Vec<u32> = match pasid {
            Some(_) => alloc::vec![dev_id],
            None => v
                .groups
                .get(&dev.group)
                .map(|g| g.attached.iter().copied().collect())
                .unwrap_or_default(),
        };
        let mut devs = Vec::new();
        for &m in &movers {
            let d = v.device(m)?;
            devs.push((d.caps, pasid.is_none() && !d.pasids.is_empty()));
        }
        let target = Self::resolve_target(v, pt_id)?;
        let (new, created) = self.hwpt_for(vm, dev_id, target, &devs, pasid.is_some())?;
        if new == old {
            return Ok(new);
        }
        let v = self.vm(vm)?;
        let old_ioas = v.hwpt(old)?.ioas;
        let new_ioas = v.hwpt(new)?.ioas;
        let new_domain = v.hwpt(new)?.domain;
        let old_domain = v.hwpt(old)?.domain;
        let mut plan = Vec::new();
        for &m in &movers {
            let device = v.device(m)?.device;
            plan.push((m, device, self.reserved_for(device)));
        }
        if new_ioas != old_ioas {
            let ioas = v.ioas(new_ioas)?;
            for (_, _, ranges) in &plan {
                if let Err(e) = ioas.check_reservable(ranges) {
                    if created {
                        self.drop_auto_if_unused(vm, new);
                    }
                    return Err(e);
                }
            }
        }
        let mut msi_pages = Vec::new();
        for (n, (_, device, _)) in plan.iter().enumerate() {
            let attached = match pasid {
                None => self
                    .install_msi_doorbell(vm, new, *device)
                    .map(|page| msi_pages.extend(page)),
                Some(_) => Ok(()),
            }
            .and_then(|()| {
                self.backend
                    .attach(*device, pasid, AttachTarget::Domain(new_domain))
                    .map_err(Error::from)
            });
            if let Err(e) = attached {
                for (_, back, _) in &plan[..n] {
                    if let Err(e2) =
                        self.backend
                            .attach(*back, pasid, AttachTarget::Domain(old_domain))
                    {
                        log::error!(
                            "VM {}: device {} could not return to its HWPT after a failed replace ({:?}); blocking it",
                            vm.0,
                            back.0,
                            e2
                        );
                        let _ = self.backend.attach(*back, pasid, AttachTarget::Blocking);
                    }
                }
                for &iova in &msi_pages {
                    self.remove_msi_page(vm, new, iova);
                }
                if created {
                    self.drop_auto_if_unused(vm, new);
                }
                return Err(e);
            }
        }
        let Iommufd { backend, vms, .. } = self;
        let v = vms.get_mut(&vm).ok_or(Error::Invalid("no such VM"))?;
        let moved = plan.len() as u32;
        for (m, _, ranges) in plan {
            let owner = ReserveOwner::Device { dev_id: m, pasid };
            v.ioas_mut(old_ioas)?.reserved.remove(&owner);
            v.ioas_mut(new_ioas)?.reserved.insert(owner, ranges);
            let d = v.device_mut(m)?;
            match pasid {
                Some(p) => {
                    d.pasids.insert(p, new);
                }
                None => d.rid = Some(new),
            }
        }
        if pasid.is_none() {
            let group = v.device(dev_id)?.group;
            if let Some(g) = v.groups.get_mut(&group) {
                g.hwpt = Some(new);
            }
        }
        v.hwpt_mut(new)?.users += moved;
        let oh = v.hwpt_mut(old)?;
        oh.users -= moved;
        if oh.auto && oh.users == 0 {
            destroy_hwpt(backend, v, old);
        }
        Ok(new)
    }

    /// `VPASID_SET`.
    pub fn vpasid_set(
        &mut self,
        vm: VmId,
        dev_id: u32,
        vpasid: u32,
        pasid: u32,
    ) -> Result<(), Error> {
        let v = self.vm_mut(vm)?;
        let dev = v.device(dev_id)?;
        if !dev.pasids.contains_key(&pasid) {
            return Err(Error::Invalid(
                "the host PASID is not attached on this device by this VM",
            ));
        }
        if v.vpasids.contains_key(&vpasid) {
            return Err(Error::Exists("vPASID already linked"));
        }
        v.vpasids.insert(vpasid, (dev_id, pasid));
        Ok(())
    }

    /// `VPASID_CLEAR`.
    pub fn vpasid_clear(&mut self, vm: VmId, vpasid: u32) -> Result<(), Error> {
        let v = self.vm_mut(vm)?;
        v.vpasids
            .remove(&vpasid)
            .map(|_| ())
            .ok_or(Error::NotMapped)
    }

    /// `WBINVD_POLICY`: flush only if a no-snoop-capable device is attached
    /// to a HWPT that does not enforce coherency.
    pub fn wbinvd_policy(&self, vm: VmId) -> Result<u32, Error> {
        let v = self.vm(vm)?;
        for obj in v.objects.values() {
            let Object::Device(d) = obj else { continue };
            let no_snoop = self
                .assignment(d.device)
                .map(|a| a.no_snoop)
                .unwrap_or(true);
            if !no_snoop {
                continue;
            }
            for h in d.rid.iter().chain(d.pasids.values()) {
                if !v.hwpt(*h)?.config.enforce_coherency {
                    return Ok(wbinvd::FLUSH);
                }
            }
        }
        Ok(wbinvd::NOOP)
    }

    /// Moves the backend's DMA faults into the fault queues of the HWPTs
    /// they happened in. Faults of HWPTs without a queue are logged only.
    pub fn process_faults(&mut self) {
        let mut faults = Vec::new();
        self.backend.drain_faults(&mut |f| faults.push(f));
        for f in faults {
            let Some(a) = self.assignments.get(&f.device) else {
                log::warn!(
                    "DMA fault from unassigned device {}: {:#x}",
                    f.device.0,
                    f.iova
                );
                continue;
            };
            let (vm, bound) = (a.vm, a.bound);
            let Some(v) = self.vms.get_mut(&vm) else {
                continue;
            };
            let Some(dev_id) = bound else { continue };
            let Ok(dev) = v.device(dev_id) else { continue };
            let hwpt = match f.pasid {
                Some(p) => dev.pasids.get(&p).copied(),
                None => dev.rid,
            };
            let Some(queue_id) = hwpt.and_then(|h| v.hwpt(h).ok()).and_then(|h| h.fault) else {
                log::info!(
                    "VM {}: DMA fault of device {} at {:#x} ({:?}), no fault queue",
                    vm.0,
                    dev_id,
                    f.iova,
                    f.reason
                );
                continue;
            };
            let Ok(q) = v.fault_mut(queue_id) else {
                continue;
            };
            if q.records.len() >= FAULT_QUEUE_CAPACITY {
                q.overflow += 1;
                continue;
            }
            let mut flags = 0;
            if f.pasid.is_some() {
                flags |= fault_flags::PASID_VALID;
            }
            if f.write {
                flags |= fault_flags::WRITE;
            }
            q.records.push_back(sluice_abi::FaultRecord {
                dev_id,
                pasid: f.pasid.unwrap_or(0),
                flags,
                reason: match f.reason {
                    FaultReason::NotPresent => fault_reason::NOT_PRESENT,
                    FaultReason::Permission => fault_reason::PERMISSION,
                    FaultReason::Blocked => fault_reason::BLOCKED,
                },
                iova: f.iova,
            });
        }
    }

    /// `FAULT_READ`: takes up to `max` records and the overflow count (which
    /// restarts from zero).
    pub fn fault_read(
        &mut self,
        vm: VmId,
        fault_id: u32,
        max: u32,
    ) -> Result<(Vec<sluice_abi::FaultRecord>, u64), Error> {
        let q = self.vm_mut(vm)?.fault_mut(fault_id)?;
        let n = q.records.len().min(max as usize);
        let records: Vec<_> = q.records.drain(..n).collect();
        let overflow = core::mem::take(&mut q.overflow);
        Ok((records, overflow))
    }

    /// Puts records taken by [`Iommufd::fault_read`] back at the head of the
    /// queue (the guest's buffer could not be written).
    pub fn fault_unread(
        &mut self,
        vm: VmId,
        fault_id: u32,
        records: Vec<sluice_abi::FaultRecord>,
        overflow: u64,
    ) {
        if let Ok(v) = self.vm_mut(vm)
            && let Ok(q) = v.fault_mut(fault_id)
        {
            for r in records.into_iter().rev() {
                q.records.push_front(r);
            }
            q.overflow += overflow;
        }
    }

    /// Everything about one VM's objects, for tests and diagnostics.
    pub fn snapshot(&self, vm: VmId) -> VmSnapshot {
        let mut s = VmSnapshot::default();
        let Some(v) = self.vms.get(&vm) else { return s };
        for (&id, obj) in &v.objects {
            match obj {
                Object::Ioas(i) => s.ioases.push(IoasSnapshot {
                    id,
                    areas: i
                        .areas
                        .values()
                        .map(|a| AreaSnapshot {
                            iova: a.iova,
                            length: a.length,
                            prot: a.prot,
                            chunks: a.chunks.clone(),
                        })
                        .collect(),
                    allowed: i.allowed.clone(),
                    reserved: i.reserved_spans(),
                    hwpts: i.hwpts.keys().copied().collect(),
                    large_pages: i.large_pages,
                }),
                Object::Hwpt(h) => s.hwpts.push(HwptSnapshot {
                    id,
                    ioas: h.ioas,
                    auto: h.auto,
                    users: h.users,
                    enforce_coherency: h.config.enforce_coherency,
                    pasid_compatible: h.config.pasid_compatible,
                    domain: h.domain,
                    msi_pages: h.msi_pages.iter().map(|(&d, &i)| (i, d)).collect(),
                }),
                Object::Device(d) => s.devices.push(DeviceSnapshot {
                    id,
                    rid: d.rid,
                    pasids: d.pasids.iter().map(|(&p, &h)| (p, h)).collect(),
                }),
                Object::Fault(f) => s.faults.push(FaultSnapshot {
                    id,
                    queued: f.records.len(),
                    overflow: f.overflow,
                    users: f.users,
                }),
            }
        }
        s.groups = v
            .groups
            .iter()
            .map(|(&group, st)| GroupSnapshot {
                group,
                hwpt: st.hwpt,
                attached: st.attached.iter().copied().collect(),
                bound: st.bound.iter().copied().collect(),
            })
            .collect();
        s.page_table_pages = v.budget.used_pages;
        s.vpasids = v.vpasids.iter().map(|(&vp, &(d, p))| (vp, d, p)).collect();
        s
    }
}
