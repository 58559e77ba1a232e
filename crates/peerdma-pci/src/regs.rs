//! Configuration-space register offsets and bits (PCI Local Bus, PCI-to-PCI Bridge, PCI Express
//! and SR-IOV specifications), under the names Linux uses in `pci_regs.h`.

#![allow(missing_docs)] // each constant is its own spec name

pub const CFG_SIZE: usize = 4096;
pub const STD_SIZE: usize = 256;

// Common header.
pub const VENDOR_ID: u16 = 0x00;
pub const DEVICE_ID: u16 = 0x02;
pub const COMMAND: u16 = 0x04;
pub const STATUS: u16 = 0x06;
pub const REVISION_ID: u16 = 0x08;
pub const CLASS_PROG: u16 = 0x09;
pub const CLASS_DEVICE: u16 = 0x0a;
pub const CACHE_LINE_SIZE: u16 = 0x0c;
pub const LATENCY_TIMER: u16 = 0x0d;
pub const HEADER_TYPE: u16 = 0x0e;
pub const BASE_ADDRESS_0: u16 = 0x10;
pub const CAPABILITY_LIST: u16 = 0x34;
pub const INTERRUPT_LINE: u16 = 0x3c;
pub const INTERRUPT_PIN: u16 = 0x3d;

pub const COMMAND_IO: u16 = 0x1;
pub const COMMAND_MEMORY: u16 = 0x2;
pub const COMMAND_MASTER: u16 = 0x4;
pub const COMMAND_PARITY: u16 = 0x40;
pub const COMMAND_SERR: u16 = 0x100;
pub const COMMAND_INTX_DISABLE: u16 = 0x400;

pub const STATUS_CAP_LIST: u16 = 0x10;
pub const STATUS_SIG_TARGET_ABORT: u16 = 0x0800;
pub const STATUS_REC_TARGET_ABORT: u16 = 0x1000;
pub const STATUS_REC_MASTER_ABORT: u16 = 0x2000;
pub const STATUS_SIG_SYSTEM_ERROR: u16 = 0x4000;
pub const STATUS_DETECTED_PARITY: u16 = 0x8000;
/// Status bits that are write-one-to-clear.
pub const STATUS_W1C: u16 = STATUS_SIG_TARGET_ABORT
    | STATUS_REC_TARGET_ABORT
    | STATUS_REC_MASTER_ABORT
    | STATUS_SIG_SYSTEM_ERROR
    | STATUS_DETECTED_PARITY;

pub const HEADER_TYPE_NORMAL: u8 = 0;
pub const HEADER_TYPE_BRIDGE: u8 = 1;
pub const HEADER_TYPE_MFD: u8 = 0x80;

pub const BAR_SPACE_IO: u32 = 0x1;
pub const BAR_MEM_TYPE_64: u32 = 0x4;
pub const BAR_MEM_PREFETCH: u32 = 0x8;
pub const BAR_MEM_FLAGS_MASK: u32 = 0xf;
pub const BAR_IO_FLAGS_MASK: u32 = 0x3;

// Type 1 (bridge) header.
pub const PRIMARY_BUS: u16 = 0x18;
pub const SECONDARY_BUS: u16 = 0x19;
pub const SUBORDINATE_BUS: u16 = 0x1a;
pub const IO_BASE: u16 = 0x1c;
pub const IO_LIMIT: u16 = 0x1d;
pub const SEC_STATUS: u16 = 0x1e;
pub const MEMORY_BASE: u16 = 0x20;
pub const MEMORY_LIMIT: u16 = 0x22;
pub const PREF_MEMORY_BASE: u16 = 0x24;
pub const PREF_MEMORY_LIMIT: u16 = 0x26;
pub const PREF_BASE_UPPER32: u16 = 0x28;
pub const PREF_LIMIT_UPPER32: u16 = 0x2c;
pub const IO_BASE_UPPER16: u16 = 0x30;
pub const IO_LIMIT_UPPER16: u16 = 0x32;
pub const BRIDGE_CONTROL: u16 = 0x3e;
pub const BRIDGE_CTL_BUS_RESET: u16 = 0x40;
pub const PREF_RANGE_TYPE_64: u16 = 0x1;
pub const IO_RANGE_TYPE_16: u8 = 0x0;

// Capability IDs.
pub const CAP_ID_PM: u8 = 0x01;
pub const CAP_ID_EXP: u8 = 0x10;
pub const CAP_ID_AF: u8 = 0x13;
pub const EXT_CAP_ID_ACS: u16 = 0x000d;
pub const EXT_CAP_ID_SRIOV: u16 = 0x0010;

// Power management capability.
pub const PM_PMC: u16 = 2;
pub const PM_CTRL: u16 = 4;
pub const PM_CTRL_STATE_MASK: u16 = 0x3;
pub const PM_CTRL_NO_SOFT_RESET: u16 = 0x8;
pub const PM_CAP_D1: u16 = 0x0200;
pub const PM_CAP_D2: u16 = 0x0400;
pub const PM_SIZEOF: u8 = 8;

// PCI Express capability.
pub const EXP_FLAGS: u16 = 2;
pub const EXP_FLAGS_VERS: u16 = 0x000f;
pub const EXP_FLAGS_TYPE: u16 = 0x00f0;
pub const EXP_DEVCAP: u16 = 4;
pub const EXP_DEVCAP_FLR: u32 = 0x1000_0000;
pub const EXP_DEVCTL: u16 = 8;
pub const EXP_DEVCTL_BCR_FLR: u16 = 0x8000;
pub const EXP_DEVSTA: u16 = 10;
pub const EXP_LNKCAP: u16 = 12;
pub const EXP_LNKCTL: u16 = 16;
pub const EXP_DEVCTL2: u16 = 0x28;
pub const EXP_LNKSTA: u16 = 18;
pub const EXP_SIZEOF_V2: u8 = 0x3c;

/// PCIe device/port type values (the `EXP_FLAGS_TYPE` field, shifted down).
pub const EXP_TYPE_ENDPOINT: u8 = 0x0;
pub const EXP_TYPE_LEG_END: u8 = 0x1;
pub const EXP_TYPE_ROOT_PORT: u8 = 0x4;
pub const EXP_TYPE_UPSTREAM: u8 = 0x5;
pub const EXP_TYPE_DOWNSTREAM: u8 = 0x6;
pub const EXP_TYPE_PCI_BRIDGE: u8 = 0x7;
pub const EXP_TYPE_RC_END: u8 = 0x9;

// Advanced Features capability.
pub const AF_LENGTH: u16 = 2;
pub const AF_CAP: u16 = 3;
pub const AF_CAP_TP: u8 = 0x01;
pub const AF_CAP_FLR: u8 = 0x02;
pub const AF_CTRL: u16 = 4;
pub const AF_CTRL_FLR: u8 = 0x01;
pub const AF_STATUS: u16 = 5;
pub const AF_SIZEOF: u8 = 6;

// ACS extended capability.
pub const ACS_CAP: u16 = 0x04;
pub const ACS_CTRL: u16 = 0x06;
pub const ACS_EGRESS_CTL_V: u16 = 0x08;
pub const ACS_SV: u16 = 0x01;
pub const ACS_TB: u16 = 0x02;
pub const ACS_RR: u16 = 0x04;
pub const ACS_CR: u16 = 0x08;
pub const ACS_UF: u16 = 0x10;
pub const ACS_EC: u16 = 0x20;
pub const ACS_DT: u16 = 0x40;
pub const ACS_ALL: u16 = 0x7f;
/// Egress control vector size field of the ACS capability register (bits 15:8).
pub const ACS_EGRESS_BITS: u16 = 0xff00;

// SR-IOV extended capability.
pub const SRIOV_CAP: u16 = 0x04;
pub const SRIOV_CTRL: u16 = 0x08;
pub const SRIOV_CTRL_VFE: u16 = 0x01;
pub const SRIOV_CTRL_MSE: u16 = 0x08;
pub const SRIOV_STATUS: u16 = 0x0a;
pub const SRIOV_INITIAL_VF: u16 = 0x0c;
pub const SRIOV_TOTAL_VF: u16 = 0x0e;
pub const SRIOV_NUM_VF: u16 = 0x10;
pub const SRIOV_FUNC_LINK: u16 = 0x12;
pub const SRIOV_VF_OFFSET: u16 = 0x14;
pub const SRIOV_VF_STRIDE: u16 = 0x16;
pub const SRIOV_VF_DID: u16 = 0x1a;
pub const SRIOV_SUP_PGSIZE: u16 = 0x1c;
pub const SRIOV_SYS_PGSIZE: u16 = 0x20;
pub const SRIOV_BAR: u16 = 0x24;
pub const SRIOV_SIZEOF: u16 = 0x40;
