/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/* Generated from the sluice-abi crate: do not edit. */
#ifndef SLUICE_HYPERCALL_H
#define SLUICE_HYPERCALL_H

#include <stddef.h>
#include <stdint.h>

/* x86_64: VMCALL/VMMCALL, RAX = command, RBX = argument GPA, result in RAX.
 * aarch64: HVC #0, X0 = SLUICE_AARCH64_FUNCTION_BASE | command, X1 = argument GPA,
 * result in X0. Result: >= 0 success, -errno failure. */
#define SLUICE_AARCH64_FUNCTION_BASE 0xc6000000ULL

#define SLUICE_CMD_DESTROY 0x80ULL
#define SLUICE_CMD_IOAS_ALLOC 0x81ULL
#define SLUICE_CMD_IOAS_ALLOW_IOVAS 0x82ULL
#define SLUICE_CMD_IOAS_COPY 0x83ULL
#define SLUICE_CMD_IOAS_IOVA_RANGES 0x84ULL
#define SLUICE_CMD_IOAS_MAP 0x85ULL
#define SLUICE_CMD_IOAS_UNMAP 0x86ULL
#define SLUICE_CMD_OPTION 0x87ULL
#define SLUICE_CMD_HWPT_ALLOC 0x89ULL
#define SLUICE_CMD_GET_HW_INFO 0x8aULL
#define SLUICE_CMD_FAULT_QUEUE_ALLOC 0x8eULL
#define SLUICE_CMD_DEVICE_LIST 0x100ULL
#define SLUICE_CMD_DEVICE_BIND 0x101ULL
#define SLUICE_CMD_DEVICE_UNBIND 0x102ULL
#define SLUICE_CMD_DEVICE_ATTACH 0x103ULL
#define SLUICE_CMD_DEVICE_REPLACE 0x104ULL
#define SLUICE_CMD_DEVICE_DETACH 0x105ULL
#define SLUICE_CMD_FAULT_READ 0x106ULL
#define SLUICE_CMD_WBINVD_POLICY 0x107ULL
#define SLUICE_CMD_VPASID_SET 0x108ULL
#define SLUICE_CMD_VPASID_CLEAR 0x109ULL

#define SLUICE_MAP_FIXED_IOVA 0x1ULL
#define SLUICE_MAP_WRITEABLE 0x2ULL
#define SLUICE_MAP_READABLE 0x4ULL
#define SLUICE_HWPT_ALLOC_NEST_PARENT 0x1ULL
#define SLUICE_HWPT_ALLOC_DIRTY_TRACKING 0x2ULL
#define SLUICE_HWPT_ALLOC_FAULT_ID_VALID 0x4ULL
#define SLUICE_HWPT_ALLOC_PASID 0x8ULL
#define SLUICE_ATTACH_PASID 0x1ULL
#define SLUICE_CAP_ENFORCE_SNOOP 0x100000000ULL
#define SLUICE_CAP_INTERRUPT_REMAPPING 0x200000000ULL
#define SLUICE_CAP_NO_SNOOP_DMA 0x400000000ULL
#define SLUICE_CAP_SCALABLE_MODE 0x800000000ULL
#define SLUICE_CAP_FLR 0x1000000000ULL
#define SLUICE_OPTION_RLIMIT_MODE 0x0ULL
#define SLUICE_OPTION_HUGE_PAGES 0x1ULL
#define SLUICE_OPTION_OP_SET 0x0ULL
#define SLUICE_OPTION_OP_GET 0x1ULL
#define SLUICE_FAULT_PASID_VALID 0x1ULL
#define SLUICE_FAULT_WRITE 0x2ULL
#define SLUICE_FAULT_NOT_PRESENT 0x1ULL
#define SLUICE_FAULT_PERMISSION 0x2ULL
#define SLUICE_FAULT_BLOCKED 0x3ULL
#define SLUICE_WBINVD_NOOP 0x0ULL
#define SLUICE_WBINVD_FLUSH 0x1ULL

struct sluice_destroy {
	uint32_t size;
	uint32_t id;
};
_Static_assert(offsetof(struct sluice_destroy, size) == 0, "ABI offset");
_Static_assert(offsetof(struct sluice_destroy, id) == 4, "ABI offset");
_Static_assert(sizeof(struct sluice_destroy) == 8, "ABI size");

struct sluice_ioas_alloc {
	uint32_t size;
	uint32_t flags;
	uint32_t out_ioas_id;
};
_Static_assert(offsetof(struct sluice_ioas_alloc, size) == 0, "ABI offset");
_Static_assert(offsetof(struct sluice_ioas_alloc, flags) == 4, "ABI offset");
_Static_assert(offsetof(struct sluice_ioas_alloc, out_ioas_id) == 8, "ABI offset");
_Static_assert(sizeof(struct sluice_ioas_alloc) == 12, "ABI size");

struct sluice_iova_range {
	uint64_t start;
	uint64_t last;
};
_Static_assert(offsetof(struct sluice_iova_range, start) == 0, "ABI offset");
_Static_assert(offsetof(struct sluice_iova_range, last) == 8, "ABI offset");
_Static_assert(sizeof(struct sluice_iova_range) == 16, "ABI size");

struct sluice_ioas_iova_ranges {
	uint32_t size;
	uint32_t ioas_id;
	uint32_t num_iovas;
	uint32_t reserved;
	uint64_t allowed_iovas;
	uint64_t out_iova_alignment;
};
_Static_assert(offsetof(struct sluice_ioas_iova_ranges, size) == 0, "ABI offset");
_Static_assert(offsetof(struct sluice_ioas_iova_ranges, ioas_id) == 4, "ABI offset");
_Static_assert(offsetof(struct sluice_ioas_iova_ranges, num_iovas) == 8, "ABI offset");
_Static_assert(offsetof(struct sluice_ioas_iova_ranges, reserved) == 12, "ABI offset");
_Static_assert(offsetof(struct sluice_ioas_iova_ranges, allowed_iovas) == 16, "ABI offset");
_Static_assert(offsetof(struct sluice_ioas_iova_ranges, out_iova_alignment) == 24, "ABI offset");
_Static_assert(sizeof(struct sluice_ioas_iova_ranges) == 32, "ABI size");

struct sluice_ioas_allow_iovas {
	uint32_t size;
	uint32_t ioas_id;
	uint32_t num_iovas;
	uint32_t reserved;
	uint64_t allowed_iovas;
};
_Static_assert(offsetof(struct sluice_ioas_allow_iovas, size) == 0, "ABI offset");
_Static_assert(offsetof(struct sluice_ioas_allow_iovas, ioas_id) == 4, "ABI offset");
_Static_assert(offsetof(struct sluice_ioas_allow_iovas, num_iovas) == 8, "ABI offset");
_Static_assert(offsetof(struct sluice_ioas_allow_iovas, reserved) == 12, "ABI offset");
_Static_assert(offsetof(struct sluice_ioas_allow_iovas, allowed_iovas) == 16, "ABI offset");
_Static_assert(sizeof(struct sluice_ioas_allow_iovas) == 24, "ABI size");

struct sluice_ioas_map {
	uint32_t size;
	uint32_t flags;
	uint32_t ioas_id;
	uint32_t reserved;
	uint64_t addr;
	uint64_t length;
	uint64_t iova;
};
_Static_assert(offsetof(struct sluice_ioas_map, size) == 0, "ABI offset");
_Static_assert(offsetof(struct sluice_ioas_map, flags) == 4, "ABI offset");
_Static_assert(offsetof(struct sluice_ioas_map, ioas_id) == 8, "ABI offset");
_Static_assert(offsetof(struct sluice_ioas_map, reserved) == 12, "ABI offset");
_Static_assert(offsetof(struct sluice_ioas_map, addr) == 16, "ABI offset");
_Static_assert(offsetof(struct sluice_ioas_map, length) == 24, "ABI offset");
_Static_assert(offsetof(struct sluice_ioas_map, iova) == 32, "ABI offset");
_Static_assert(sizeof(struct sluice_ioas_map) == 40, "ABI size");

struct sluice_ioas_copy {
	uint32_t size;
	uint32_t flags;
	uint32_t dst_ioas_id;
	uint32_t src_ioas_id;
	uint64_t length;
	uint64_t dst_iova;
	uint64_t src_iova;
};
_Static_assert(offsetof(struct sluice_ioas_copy, size) == 0, "ABI offset");
_Static_assert(offsetof(struct sluice_ioas_copy, flags) == 4, "ABI offset");
_Static_assert(offsetof(struct sluice_ioas_copy, dst_ioas_id) == 8, "ABI offset");
_Static_assert(offsetof(struct sluice_ioas_copy, src_ioas_id) == 12, "ABI offset");
_Static_assert(offsetof(struct sluice_ioas_copy, length) == 16, "ABI offset");
_Static_assert(offsetof(struct sluice_ioas_copy, dst_iova) == 24, "ABI offset");
_Static_assert(offsetof(struct sluice_ioas_copy, src_iova) == 32, "ABI offset");
_Static_assert(sizeof(struct sluice_ioas_copy) == 40, "ABI size");

struct sluice_ioas_unmap {
	uint32_t size;
	uint32_t ioas_id;
	uint64_t iova;
	uint64_t length;
};
_Static_assert(offsetof(struct sluice_ioas_unmap, size) == 0, "ABI offset");
_Static_assert(offsetof(struct sluice_ioas_unmap, ioas_id) == 4, "ABI offset");
_Static_assert(offsetof(struct sluice_ioas_unmap, iova) == 8, "ABI offset");
_Static_assert(offsetof(struct sluice_ioas_unmap, length) == 16, "ABI offset");
_Static_assert(sizeof(struct sluice_ioas_unmap) == 24, "ABI size");

struct sluice_option {
	uint32_t size;
	uint32_t option_id;
	uint16_t op;
	uint16_t reserved;
	uint32_t object_id;
	uint64_t val64;
};
_Static_assert(offsetof(struct sluice_option, size) == 0, "ABI offset");
_Static_assert(offsetof(struct sluice_option, option_id) == 4, "ABI offset");
_Static_assert(offsetof(struct sluice_option, op) == 8, "ABI offset");
_Static_assert(offsetof(struct sluice_option, reserved) == 10, "ABI offset");
_Static_assert(offsetof(struct sluice_option, object_id) == 12, "ABI offset");
_Static_assert(offsetof(struct sluice_option, val64) == 16, "ABI offset");
_Static_assert(sizeof(struct sluice_option) == 24, "ABI size");

struct sluice_hwpt_alloc {
	uint32_t size;
	uint32_t flags;
	uint32_t dev_id;
	uint32_t pt_id;
	uint32_t out_hwpt_id;
	uint32_t reserved;
	uint32_t data_type;
	uint32_t data_len;
	uint64_t data_uptr;
	uint32_t fault_id;
	uint32_t reserved2;
};
_Static_assert(offsetof(struct sluice_hwpt_alloc, size) == 0, "ABI offset");
_Static_assert(offsetof(struct sluice_hwpt_alloc, flags) == 4, "ABI offset");
_Static_assert(offsetof(struct sluice_hwpt_alloc, dev_id) == 8, "ABI offset");
_Static_assert(offsetof(struct sluice_hwpt_alloc, pt_id) == 12, "ABI offset");
_Static_assert(offsetof(struct sluice_hwpt_alloc, out_hwpt_id) == 16, "ABI offset");
_Static_assert(offsetof(struct sluice_hwpt_alloc, reserved) == 20, "ABI offset");
_Static_assert(offsetof(struct sluice_hwpt_alloc, data_type) == 24, "ABI offset");
_Static_assert(offsetof(struct sluice_hwpt_alloc, data_len) == 28, "ABI offset");
_Static_assert(offsetof(struct sluice_hwpt_alloc, data_uptr) == 32, "ABI offset");
_Static_assert(offsetof(struct sluice_hwpt_alloc, fault_id) == 40, "ABI offset");
_Static_assert(offsetof(struct sluice_hwpt_alloc, reserved2) == 44, "ABI offset");
_Static_assert(sizeof(struct sluice_hwpt_alloc) == 48, "ABI size");

struct sluice_hw_info {
	uint32_t size;
	uint32_t flags;
	uint32_t dev_id;
	uint32_t data_len;
	uint64_t data_uptr;
	uint32_t out_data_type;
	uint8_t out_max_pasid_log2;
	uint8_t reserved0;
	uint16_t reserved1;
	uint64_t out_capabilities;
};
_Static_assert(offsetof(struct sluice_hw_info, size) == 0, "ABI offset");
_Static_assert(offsetof(struct sluice_hw_info, flags) == 4, "ABI offset");
_Static_assert(offsetof(struct sluice_hw_info, dev_id) == 8, "ABI offset");
_Static_assert(offsetof(struct sluice_hw_info, data_len) == 12, "ABI offset");
_Static_assert(offsetof(struct sluice_hw_info, data_uptr) == 16, "ABI offset");
_Static_assert(offsetof(struct sluice_hw_info, out_data_type) == 24, "ABI offset");
_Static_assert(offsetof(struct sluice_hw_info, out_max_pasid_log2) == 28, "ABI offset");
_Static_assert(offsetof(struct sluice_hw_info, reserved0) == 29, "ABI offset");
_Static_assert(offsetof(struct sluice_hw_info, reserved1) == 30, "ABI offset");
_Static_assert(offsetof(struct sluice_hw_info, out_capabilities) == 32, "ABI offset");
_Static_assert(sizeof(struct sluice_hw_info) == 40, "ABI size");

struct sluice_fault_alloc {
	uint32_t size;
	uint32_t flags;
	uint32_t out_fault_id;
	uint32_t out_reserved;
};
_Static_assert(offsetof(struct sluice_fault_alloc, size) == 0, "ABI offset");
_Static_assert(offsetof(struct sluice_fault_alloc, flags) == 4, "ABI offset");
_Static_assert(offsetof(struct sluice_fault_alloc, out_fault_id) == 8, "ABI offset");
_Static_assert(offsetof(struct sluice_fault_alloc, out_reserved) == 12, "ABI offset");
_Static_assert(sizeof(struct sluice_fault_alloc) == 16, "ABI size");

struct sluice_device_list {
	uint32_t size;
	uint32_t flags;
	uint32_t num_devices;
	uint32_t reserved;
	uint64_t devices;
};
_Static_assert(offsetof(struct sluice_device_list, size) == 0, "ABI offset");
_Static_assert(offsetof(struct sluice_device_list, flags) == 4, "ABI offset");
_Static_assert(offsetof(struct sluice_device_list, num_devices) == 8, "ABI offset");
_Static_assert(offsetof(struct sluice_device_list, reserved) == 12, "ABI offset");
_Static_assert(offsetof(struct sluice_device_list, devices) == 16, "ABI offset");
_Static_assert(sizeof(struct sluice_device_list) == 24, "ABI size");

struct sluice_device_info {
	uint32_t guest_bdf;
	uint32_t group_id;
	uint32_t dev_id;
	uint8_t max_pasid_log2;
	uint8_t reserved0;
	uint16_t reserved1;
	uint64_t capabilities;
};
_Static_assert(offsetof(struct sluice_device_info, guest_bdf) == 0, "ABI offset");
_Static_assert(offsetof(struct sluice_device_info, group_id) == 4, "ABI offset");
_Static_assert(offsetof(struct sluice_device_info, dev_id) == 8, "ABI offset");
_Static_assert(offsetof(struct sluice_device_info, max_pasid_log2) == 12, "ABI offset");
_Static_assert(offsetof(struct sluice_device_info, reserved0) == 13, "ABI offset");
_Static_assert(offsetof(struct sluice_device_info, reserved1) == 14, "ABI offset");
_Static_assert(offsetof(struct sluice_device_info, capabilities) == 16, "ABI offset");
_Static_assert(sizeof(struct sluice_device_info) == 24, "ABI size");

struct sluice_device_bind {
	uint32_t size;
	uint32_t flags;
	uint32_t guest_bdf;
	uint32_t out_dev_id;
	uint32_t out_group_id;
	uint32_t num_group_devices;
	uint64_t group_devices;
};
_Static_assert(offsetof(struct sluice_device_bind, size) == 0, "ABI offset");
_Static_assert(offsetof(struct sluice_device_bind, flags) == 4, "ABI offset");
_Static_assert(offsetof(struct sluice_device_bind, guest_bdf) == 8, "ABI offset");
_Static_assert(offsetof(struct sluice_device_bind, out_dev_id) == 12, "ABI offset");
_Static_assert(offsetof(struct sluice_device_bind, out_group_id) == 16, "ABI offset");
_Static_assert(offsetof(struct sluice_device_bind, num_group_devices) == 20, "ABI offset");
_Static_assert(offsetof(struct sluice_device_bind, group_devices) == 24, "ABI offset");
_Static_assert(sizeof(struct sluice_device_bind) == 32, "ABI size");

struct sluice_device_unbind {
	uint32_t size;
	uint32_t dev_id;
};
_Static_assert(offsetof(struct sluice_device_unbind, size) == 0, "ABI offset");
_Static_assert(offsetof(struct sluice_device_unbind, dev_id) == 4, "ABI offset");
_Static_assert(sizeof(struct sluice_device_unbind) == 8, "ABI size");

struct sluice_device_attach {
	uint32_t size;
	uint32_t flags;
	uint32_t dev_id;
	uint32_t pt_id;
	uint32_t pasid;
	uint32_t out_hwpt_id;
};
_Static_assert(offsetof(struct sluice_device_attach, size) == 0, "ABI offset");
_Static_assert(offsetof(struct sluice_device_attach, flags) == 4, "ABI offset");
_Static_assert(offsetof(struct sluice_device_attach, dev_id) == 8, "ABI offset");
_Static_assert(offsetof(struct sluice_device_attach, pt_id) == 12, "ABI offset");
_Static_assert(offsetof(struct sluice_device_attach, pasid) == 16, "ABI offset");
_Static_assert(offsetof(struct sluice_device_attach, out_hwpt_id) == 20, "ABI offset");
_Static_assert(sizeof(struct sluice_device_attach) == 24, "ABI size");

struct sluice_device_detach {
	uint32_t size;
	uint32_t flags;
	uint32_t dev_id;
	uint32_t pasid;
};
_Static_assert(offsetof(struct sluice_device_detach, size) == 0, "ABI offset");
_Static_assert(offsetof(struct sluice_device_detach, flags) == 4, "ABI offset");
_Static_assert(offsetof(struct sluice_device_detach, dev_id) == 8, "ABI offset");
_Static_assert(offsetof(struct sluice_device_detach, pasid) == 12, "ABI offset");
_Static_assert(sizeof(struct sluice_device_detach) == 16, "ABI size");

struct sluice_fault_read {
	uint32_t size;
	uint32_t fault_id;
	uint32_t num_records;
	uint32_t reserved;
	uint64_t records;
	uint64_t out_overflow;
};
_Static_assert(offsetof(struct sluice_fault_read, size) == 0, "ABI offset");
_Static_assert(offsetof(struct sluice_fault_read, fault_id) == 4, "ABI offset");
_Static_assert(offsetof(struct sluice_fault_read, num_records) == 8, "ABI offset");
_Static_assert(offsetof(struct sluice_fault_read, reserved) == 12, "ABI offset");
_Static_assert(offsetof(struct sluice_fault_read, records) == 16, "ABI offset");
_Static_assert(offsetof(struct sluice_fault_read, out_overflow) == 24, "ABI offset");
_Static_assert(sizeof(struct sluice_fault_read) == 32, "ABI size");

struct sluice_fault_record {
	uint32_t dev_id;
	uint32_t pasid;
	uint32_t flags;
	uint32_t reason;
	uint64_t iova;
};
_Static_assert(offsetof(struct sluice_fault_record, dev_id) == 0, "ABI offset");
_Static_assert(offsetof(struct sluice_fault_record, pasid) == 4, "ABI offset");
_Static_assert(offsetof(struct sluice_fault_record, flags) == 8, "ABI offset");
_Static_assert(offsetof(struct sluice_fault_record, reason) == 12, "ABI offset");
_Static_assert(offsetof(struct sluice_fault_record, iova) == 16, "ABI offset");
_Static_assert(sizeof(struct sluice_fault_record) == 24, "ABI size");

struct sluice_wbinvd_policy {
	uint32_t size;
	uint32_t flags;
	uint32_t out_policy;
	uint32_t reserved;
};
_Static_assert(offsetof(struct sluice_wbinvd_policy, size) == 0, "ABI offset");
_Static_assert(offsetof(struct sluice_wbinvd_policy, flags) == 4, "ABI offset");
_Static_assert(offsetof(struct sluice_wbinvd_policy, out_policy) == 8, "ABI offset");
_Static_assert(offsetof(struct sluice_wbinvd_policy, reserved) == 12, "ABI offset");
_Static_assert(sizeof(struct sluice_wbinvd_policy) == 16, "ABI size");

struct sluice_vpasid_set {
	uint32_t size;
	uint32_t flags;
	uint32_t dev_id;
	uint32_t vpasid;
	uint32_t pasid;
	uint32_t reserved;
};
_Static_assert(offsetof(struct sluice_vpasid_set, size) == 0, "ABI offset");
_Static_assert(offsetof(struct sluice_vpasid_set, flags) == 4, "ABI offset");
_Static_assert(offsetof(struct sluice_vpasid_set, dev_id) == 8, "ABI offset");
_Static_assert(offsetof(struct sluice_vpasid_set, vpasid) == 12, "ABI offset");
_Static_assert(offsetof(struct sluice_vpasid_set, pasid) == 16, "ABI offset");
_Static_assert(offsetof(struct sluice_vpasid_set, reserved) == 20, "ABI offset");
_Static_assert(sizeof(struct sluice_vpasid_set) == 24, "ABI size");

struct sluice_vpasid_clear {
	uint32_t size;
	uint32_t vpasid;
};
_Static_assert(offsetof(struct sluice_vpasid_clear, size) == 0, "ABI offset");
_Static_assert(offsetof(struct sluice_vpasid_clear, vpasid) == 4, "ABI offset");
_Static_assert(sizeof(struct sluice_vpasid_clear) == 8, "ABI size");

#endif /* SLUICE_HYPERCALL_H */
