//! The importer on sysfs captured from the QEMU guest (`harness/run capture`): the topology
//! it finds must be the one the harness's QEMU command line builds.

use std::path::PathBuf;

use peerdma_linux::guest::{EDU, IVSHMEM, check_qemu_topology};
use peerdma_linux::sysfs::{RootDir, scan};
use peerdma_pci::spec::CpuVendor;
use peerdma_pci::{DmaAddr, Fabric, Target};

fn fixture() -> RootDir {
    RootDir(PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/qemu-guest"
    )))
}

#[test]
fn the_captured_guest_is_the_qemu_topology() {
    let s = scan(&fixture()).unwrap();
    check_qemu_topology(&s).unwrap();
    assert!(s.notes.is_empty(), "{:?}", s.notes);
}

#[test]
fn platform_facts_come_from_proc() {
    let s = scan(&fixture()).unwrap();
    assert_eq!(s.spec.host_bridges.len(), 1);
    assert!(
        !s.spec.host_bridges[0].mmio.is_empty(),
        "windows from /proc/iomem"
    );
    assert!(
        s.spec.platform.ram.iter().map(|r| r.size).sum::<u64>() > 512 << 20,
        "1 GiB guest"
    );
    assert_ne!(s.spec.platform.cpu.vendor, CpuVendor::Other);
}

#[test]
fn the_scanned_fabric_routes_edu_into_ivshmem() {
    let s = scan(&fixture()).unwrap();
    let f = Fabric::build(&s.spec).unwrap();
    let bar = f.bar(IVSHMEM, 2).unwrap();
    let t = f
        .dma_write(EDU, DmaAddr(bar.bus.get() + 0x100), b"edu")
        .unwrap();
    assert_eq!(
        t.segments[0].target,
        Target::Bar {
            bdf: IVSHMEM,
            bar: 2,
            offset: 0x100
        }
    );
    assert!(!t.via_root_complex());
}

#[test]
fn unprivileged_views_say_acs_is_unknown() {
    // Cut every config file to the 64 bytes an unprivileged reader sees.
    let dir = std::env::temp_dir().join(format!("peerdma-unpriv-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(&fixture().0)
        .arg(&dir)
        .status()
        .unwrap();
    assert!(status.success());
    for e in walk(&dir) {
        if e.file_name().is_some_and(|n| n == "config") {
            let b = std::fs::read(&e).unwrap();
            std::fs::write(&e, &b[..64]).unwrap();
        }
        if e.file_name().is_some_and(|n| n == "iomem") {
            std::fs::write(&e, "00000000-00000000 : PCI Bus 0000:00\n").unwrap();
        }
    }
    let s = scan(&RootDir(dir.clone())).unwrap();
    assert!(s.devices.values().all(|d| !d.acs_known));
    assert!(
        s.notes.iter().any(|n| n.contains("unknown")),
        "{:?}",
        s.notes
    );
    assert!(
        s.notes.iter().any(|n| n.contains("windows made")),
        "{:?}",
        s.notes
    );
    // The tree is still right without PCIe port types: inferred from the shape.
    let f = Fabric::build(&s.spec).unwrap();
    assert_eq!(
        f.function("0000:02:01.0".parse().unwrap()).unwrap().kind(),
        peerdma_pci::DeviceKind::SwitchDownstream
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn walk(d: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap().flatten() {
        let p = e.path();
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            out.extend(walk(&p));
        } else if ft.is_file() {
            out.push(p);
        }
    }
    out
}
