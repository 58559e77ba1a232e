//! The tests peerdma runs inside the QEMU guest on the real Linux 7.2 kernel (`peerdma
//! guest-test`), against the harness's topology: an ivshmem device (the provider: BAR2 is 1 MiB
//! of memory shared with the host) and an edu device (a DMA engine) under one PCIe switch,
//! behind an Intel IOMMU.
//!
//! Each test prints `TEST name ... ok` or `TEST name ... FAILED: why`. Where only the host can
//! judge (bytes in the ivshmem backing file), a test prints `HOSTCHECK name offset hex want`
//! and the harness checks it after the guest powers off.

use std::os::fd::RawFd;

use peerdma_pci::{Bdf, Errno, regs};
use peerdma_uapi::backend::{MAP_FIXED_IOVA, MAP_READABLE, MAP_WRITEABLE};
use peerdma_uapi::feature::{
    self, DmaBufRequest, O_CLOEXEC, O_RDWR, VFIO_DEVICE_FEATURE_DMA_BUF, VFIO_DEVICE_FEATURE_GET,
    VFIO_DEVICE_FEATURE_PROBE, VFIO_DEVICE_FEATURE_SET,
};
use peerdma_uapi::{DevHandle, OpenPath, UapiBackend};

use crate::vfio::LinuxBackend;

/// The provider: QEMU's ivshmem-plain (BAR2 = the shared memory).
pub const IVSHMEM: Bdf = Bdf::from_devfn(0, 3, 0);
/// The DMA engine: QEMU's edu.
pub const EDU: Bdf = Bdf::from_devfn(0, 4, 0);
const BAR2_SIZE: u64 = 1 << 20;
const IOVA: u64 = 0x100_0000;
/// Where a page of RAM is mapped for edu to read patterns from.
const RAM_IOVA: u64 = crate::vfio::EDU_RAM_IOVA;

type Outcome = Result<(), String>;

struct Runner {
    passed: usize,
    failed: usize,
    prefix: String,
}

impl Runner {
    fn run(&mut self, name: &str, f: impl FnOnce() -> Outcome) {
        match f() {
            Ok(()) => {
                self.passed += 1;
                println!("TEST {}{name} ... ok", self.prefix);
            }
            Err(e) => {
                self.failed += 1;
                println!("TEST {}{name} ... FAILED: {e}", self.prefix);
            }
        }
    }
}

fn expect_errno<T: std::fmt::Debug>(r: Result<T, Errno>, want: Errno) -> Outcome {
    match r {
        Err(e) if e == want => Ok(()),
        other => Err(format!("expected {want:?}, got {other:?}")),
    }
}

fn export(be: &mut LinuxBackend, dev: DevHandle, req: &DmaBufRequest) -> Result<i32, Errno> {
    let mut b = req.to_bytes();
    be.device_feature(dev, &mut b)
}

fn bar2(ranges: Vec<(u64, u64)>) -> DmaBufRequest {
    DmaBufRequest::new(2, ranges)
}

fn open(be: &mut LinuxBackend, bdf: Bdf, path: OpenPath) -> Result<DevHandle, String> {
    be.open_device(bdf, path)
        .map_err(|e| format!("opening {bdf} by {path:?}: {e}"))
}

/// The export tests, on one open path.
fn export_suite(r: &mut Runner, path: OpenPath) {
    let mut be = LinuxBackend::new();
    let dev = match open(&mut be, IVSHMEM, path) {
        Ok(d) => d,
        Err(e) => {
            r.run("open", || Err(e));
            return;
        }
    };
    r.run("open", || Ok(()));
    let hdr = |flags: u32| feature::header_bytes(8, flags);
    r.run("probe_get_is_0", || {
        let mut b =
            hdr(VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_BUF);
        match be.device_feature(dev, &mut b) {
            Ok(0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    r.run("probe_set_is_einval", || {
        let mut b =
            hdr(VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_BUF);
        expect_errno(be.device_feature(dev, &mut b), Errno::EINVAL)
    });
    r.run("whole_bar_export", || {
        let fd = export(&mut be, dev, &bar2(vec![(0, BAR2_SIZE)])).map_err(|e| e.to_string())?;
        let info = be.dmabuf_info(fd).map_err(|e| e.to_string())?;
        if info.size != BAR2_SIZE || info.count != 1 || info.exp_name != "vfio_pci_core" {
            return Err(format!("fdinfo {info:?}"));
        }
        if info.flags & (O_RDWR | O_CLOEXEC) != O_RDWR | O_CLOEXEC {
            return Err(format!("flags {:o}", info.flags));
        }
        // SAFETY: lseek on a descriptor we own; no memory is involved.
        let end = unsafe { libc::lseek(fd, 0, libc::SEEK_END) };
        if u64::try_from(end) != Ok(BAR2_SIZE) {
            return Err(format!("lseek(SEEK_END) = {end}"));
        }
        let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).map_err(|e| e.to_string())?;
        if !link.to_string_lossy().starts_with("/dmabuf:") {
            return Err(format!("readlink = {}", link.display()));
        }
        mmap_is_einval(fd)?;
        be.close_fd(fd).map_err(|e| e.to_string())
    });
    r.run("two_ranges_size_8192", || {
        let fd = export(&mut be, dev, &bar2(vec![(0, 4096), (8192, 4096)]))
            .map_err(|e| e.to_string())?;
        let size = be.dmabuf_info(fd).map_err(|e| e.to_string())?.size;
        be.close_fd(fd).ok();
        if size == 8192 {
            Ok(())
        } else {
            Err(format!("size {size}"))
        }
    });
    // Every export errno is a step of the conformance scenario `export-every-errno`
    // (scenarios/), which runs on both kernels and on the emulated machine.
    r.run("export_while_memory_disabled_gives_an_fd", || {
        let cmd = read_command(&mut be, dev)?;
        write_command(&mut be, dev, cmd & !regs::COMMAND_MEMORY)?;
        let res = export(&mut be, dev, &bar2(vec![(0, 4096)]));
        write_command(&mut be, dev, cmd)?;
        let fd = res.map_err(|e| e.to_string())?;
        be.close_fd(fd).map_err(|e| e.to_string())
    });
    r.run("reset_is_0", || {
        be.reset(dev).map_err(|e| format!("VFIO_DEVICE_RESET: {e}"))
    });
    r.run("dmabuf_outlives_device_fd", || {
        let fd = export(&mut be, dev, &bar2(vec![(0, BAR2_SIZE)])).map_err(|e| e.to_string())?;
        let before = be.dmabuf_info(fd).map_err(|e| e.to_string())?;
        be.close_device(dev).map_err(|e| e.to_string())?;
        let after = be
            .dmabuf_info(fd)
            .map_err(|e| format!("after close: {e}"))?;
        be.close_fd(fd).ok();
        if before == after {
            Ok(())
        } else {
            Err(format!("{before:?} became {after:?}"))
        }
    });
}

fn mmap_is_einval(fd: RawFd) -> Outcome {
    // SAFETY: a fresh mapping request at a kernel-chosen address; on success it is unmapped
    // right away and never touched.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        let e = std::io::Error::last_os_error().raw_os_error();
        return if e == Some(libc::EINVAL) {
            Ok(())
        } else {
            Err(format!("mmap failed with {e:?}, expected EINVAL"))
        };
    }
    // SAFETY: `p` is the 4096-byte mapping just made.
    unsafe { libc::munmap(p, 4096) };
    Err("mmap of the dma-buf succeeded".into())
}

fn read_command(be: &mut LinuxBackend, dev: DevHandle) -> Result<u16, String> {
    let mut b = [0u8; 2];
    be.config_read(dev, u64::from(regs::COMMAND), &mut b)
        .map_err(|e| format!("config read: {e}"))?;
    Ok(u16::from_le_bytes(b))
}

fn write_command(be: &mut LinuxBackend, dev: DevHandle, v: u16) -> Outcome {
    be.config_write(dev, u64::from(regs::COMMAND), &v.to_le_bytes())
        .map_err(|e| format!("config write: {e}"))
}

/// edu copies `data` to device address `dst` (through RAM mapped at `RAM_IOVA`, never
/// revoked, so only the final write can fail).
fn edu_dma(be: &mut LinuxBackend, edu: DevHandle, dst: u64, data: &[u8]) -> Outcome {
    be.edu_dma(edu, dst, data)
        .map_err(|e| format!("edu DMA: {e}"))
}

fn pattern(step: u8) -> Vec<u8> {
    (0..64u8)
        .map(|i| i.wrapping_mul(7).wrapping_add(step.wrapping_mul(29)) | 1)
        .collect()
}

fn hex(b: &[u8]) -> String {
    use std::fmt::Write;
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

fn hostcheck(name: &str, offset: u64, data: &[u8], present: bool) {
    println!(
        "HOSTCHECK {name} {offset} {} {}",
        hex(data),
        if present { "present" } else { "absent" }
    );
}

/// The P2P story: edu DMAs through an iommufd mapping of ivshmem's exported BAR2; each
/// revocation stops the next pattern from landing; the recovery the kernel requires (unmap,
/// map again) brings it back.
fn p2p_suite(r: &mut Runner) {
    let mut be = LinuxBackend::new();
    let setup = (|| -> Result<(DevHandle, DevHandle, peerdma_uapi::IoasId, i32), String> {
        let ivs = open(&mut be, IVSHMEM, OpenPath::CdevIommufd)?;
        let edu = open(&mut be, EDU, OpenPath::CdevIommufd)?;
        let ioas = be.ioas_alloc().map_err(|e| format!("IOAS alloc: {e}"))?;
        be.attach_ioas(edu, ioas)
            .map_err(|e| format!("attach edu: {e}"))?;
        be.ioas_map_anon(
            ioas,
            4096,
            RAM_IOVA,
            MAP_FIXED_IOVA | MAP_READABLE | MAP_WRITEABLE,
        )
        .map_err(|e| format!("mapping RAM: {e}"))?;
        let cmd = read_command(&mut be, edu)?;
        write_command(
            &mut be,
            edu,
            cmd | regs::COMMAND_MEMORY | regs::COMMAND_MASTER,
        )?;
        let fd = export(&mut be, ivs, &bar2(vec![(0, BAR2_SIZE)]))
            .map_err(|e| format!("export: {e}"))?;
        Ok((ivs, edu, ioas, fd))
    })();
    let (ivs, edu, ioas, fd) = match setup {
        Ok(s) => s,
        Err(e) => {
            r.run("p2p_setup", || Err(e));
            return;
        }
    };
    let rw = MAP_FIXED_IOVA | MAP_READABLE | MAP_WRITEABLE;
    let map = |be: &mut LinuxBackend| be.ioas_map_file(ioas, fd, 0, BAR2_SIZE, IOVA, rw);
    r.run("map_file_whole_buffer", || {
        map(&mut be).map(|_| ()).map_err(|e| e.to_string())
    });
    r.run("map_file_taken_iova_is_eexist", || {
        expect_errno(map(&mut be), Errno::EEXIST)
    });
    r.run("map_file_partial", || {
        be.ioas_map_file(ioas, fd, 0x20000, 4096, IOVA + 0x400_0000, rw)
            .map_err(|e| e.to_string())?;
        be.ioas_unmap(ioas, IOVA + 0x400_0000, 4096)
            .map(drop)
            .map_err(|e| e.to_string())
    });
    r.run("map_file_two_range_buffer_is_eopnotsupp", || {
        let two = export(&mut be, ivs, &bar2(vec![(0, 4096), (8192, 4096)]))
            .map_err(|e| e.to_string())?;
        let res = be.ioas_map_file(ioas, two, 0, 8192, IOVA + 0x800_0000, rw);
        be.close_fd(two).ok();
        expect_errno(res, Errno::EOPNOTSUPP)
    });
    let dma = |be: &mut LinuxBackend, step: u8| -> Result<(u64, Vec<u8>), String> {
        let off = u64::from(step) * 0x1000;
        let p = pattern(step);
        edu_dma(be, edu, IOVA + off, &p)?;
        Ok((off, p))
    };
    let landed = |be: &mut LinuxBackend, off: u64, p: &[u8]| -> Result<bool, String> {
        let mut got = vec![0u8; p.len()];
        be.bar_read(ivs, 2, off, &mut got)
            .map_err(|e| format!("reading BAR2: {e}"))?;
        Ok(got == p)
    };
    // One DMA of pattern `step`, a host check of the backing file, and the guest's own look
    // at BAR2: it must (or must not) have landed.
    let expect = |be: &mut LinuxBackend, step: u8, name: &str, want: bool| -> Outcome {
        let (off, p) = dma(be, step)?;
        hostcheck(name, off, &p, want);
        match (landed(be, off, &p)?, want) {
            (true, true) | (false, false) => Ok(()),
            (false, true) => Err(format!("{name}: the pattern is not in BAR2")),
            (true, false) => Err(format!("{name}: the pattern landed in a revoked buffer")),
        }
    };
    r.run("p2p_dma_lands", || {
        expect(&mut be, 1, "p2p_dma_lands", true)
    });
    // Memory decode off: revoked.
    r.run("decode_off_stops_dma", || {
        let cmd = read_command(&mut be, ivs)?;
        write_command(&mut be, ivs, cmd & !regs::COMMAND_MEMORY)?;
        let (off, p) = dma(&mut be, 2)?;
        hostcheck("decode_off_stops_dma", off, &p, false);
        let remap = be.ioas_map_file(ioas, fd, 0, BAR2_SIZE, IOVA + 0x200_0000, rw);
        // BAR2 can only be read back once decoding is on again.
        write_command(&mut be, ivs, cmd)?;
        if landed(&mut be, off, &p)? {
            return Err("the pattern landed while memory decode was off".into());
        }
        expect_errno(remap, Errno::ENODEV)
            .map_err(|e| format!("MAP_FILE of the revoked buffer: {e}"))
    });
    r.run("decode_on_leaves_the_mapping_dead", || {
        expect(&mut be, 3, "decode_on_leaves_the_mapping_dead", false)
    });
    let recover = |be: &mut LinuxBackend| -> Outcome {
        let n = be
            .ioas_unmap(ioas, IOVA, BAR2_SIZE)
            .map_err(|e| format!("unmap: {e}"))?;
        if n != BAR2_SIZE {
            return Err(format!("unmapped {n:#x} bytes"));
        }
        be.ioas_map_file(ioas, fd, 0, BAR2_SIZE, IOVA, rw)
            .map(|_| ())
            .map_err(|e| format!("map again: {e}"))
    };
    r.run("unmap_and_map_again_lands", || {
        recover(&mut be)?;
        expect(&mut be, 4, "unmap_and_map_again_lands", true)
    });
    r.run("reset_stops_dma_until_remap", || {
        be.reset(ivs).map_err(|e| format!("reset: {e}"))?;
        expect(&mut be, 5, "reset_stops_dma", false)?;
        recover(&mut be)?;
        expect(&mut be, 6, "reset_then_remap_lands", true)
    });
    r.run("device_close_kills_the_buffer", || {
        be.close_device(ivs).map_err(|e| e.to_string())?;
        let (off, p) = dma(&mut be, 7)?;
        hostcheck("device_close_stops_dma", off, &p, false);
        be.ioas_unmap(ioas, IOVA, BAR2_SIZE).ok();
        expect_errno(
            be.ioas_map_file(ioas, fd, 0, BAR2_SIZE, IOVA, rw),
            Errno::ENODEV,
        )
    });
}

/// Checks that a scanned machine is what the harness's QEMU command line builds: a root port
/// on `pci0000:00`, a switch (x3130 upstream, two xio3130 downstream ports) below it, ivshmem
/// (1 MiB 64-bit prefetchable BAR2) below the first downstream port and edu (1 MiB BAR0) below
/// the second, both bound to vfio-pci in IOMMU groups of their own, and P2P between them
/// switch-local (the downstream ports have no ACS capability).
pub fn check_qemu_topology(scan: &crate::sysfs::HostScan) -> Outcome {
    use peerdma_pci::{DeviceKind, Fabric};
    let f = Fabric::build(&scan.spec).map_err(|e| format!("the scan does not build: {e}"))?;
    let kind = |b: &str| {
        f.function(b.parse().expect("literal address"))
            .map(peerdma_pci::Function::kind)
            .map_err(|e| e.to_string())
    };
    let up = |b: &str| {
        f.upstream_bridge(b.parse().expect("literal address"))
            .map_err(|e| e.to_string())
    };
    let b = |s: &str| s.parse::<Bdf>().expect("literal address");
    let want = [
        ("0000:00:01.0", DeviceKind::RootPort, None),
        (
            "0000:01:00.0",
            DeviceKind::SwitchUpstream,
            Some("0000:00:01.0"),
        ),
        (
            "0000:02:00.0",
            DeviceKind::SwitchDownstream,
            Some("0000:01:00.0"),
        ),
        (
            "0000:02:01.0",
            DeviceKind::SwitchDownstream,
            Some("0000:01:00.0"),
        ),
        ("0000:03:00.0", DeviceKind::Endpoint, Some("0000:02:00.0")),
        ("0000:04:00.0", DeviceKind::Endpoint, Some("0000:02:01.0")),
    ];
    for (dev, k, parent) in want {
        if kind(dev)? != k {
            return Err(format!("{dev} is a {}, expected {k}", kind(dev)?));
        }
        if up(dev)? != parent.map(b) {
            return Err(format!(
                "{dev} sits below {:?}, expected {parent:?}",
                up(dev)?
            ));
        }
    }
    if f.host_bridge_of(IVSHMEM).map_err(|e| e.to_string())?.name() != "pci0000:00" {
        return Err("ivshmem is not under pci0000:00".into());
    }
    let ivs = f.function(IVSHMEM).map_err(|e| e.to_string())?;
    let edu = f.function(EDU).map_err(|e| e.to_string())?;
    if (ivs.vendor(), ivs.device(), edu.vendor(), edu.device()) != (0x1af4, 0x1110, 0x1234, 0x11e8)
    {
        return Err("vendor/device IDs differ from ivshmem (1af4:1110) and edu (1234:11e8)".into());
    }
    let bar2 = ivs.bar(2).ok_or("ivshmem has no BAR2")?;
    if bar2.size != BAR2_SIZE || !bar2.prefetch || bar2.kind != peerdma_pci::BarType::Mem64 {
        return Err(format!("ivshmem BAR2 is {bar2:?}"));
    }
    if edu.bar(0).map(|b| b.size) != Some(1 << 20) {
        return Err("edu BAR0 is not 1 MiB".into());
    }
    for d in [IVSHMEM, EDU] {
        let h = scan
            .devices
            .get(&d)
            .ok_or(format!("{d} missing from the scan"))?;
        if h.driver.as_deref() != Some("vfio-pci") {
            return Err(format!("{d} is bound to {:?}", h.driver));
        }
        if !h.acs_known {
            return Err(format!(
                "{d}: ACS unknown (config space not fully readable)"
            ));
        }
    }
    let (gi, ge) = (
        scan.devices[&IVSHMEM].iommu_group,
        scan.devices[&EDU].iommu_group,
    );
    if gi.is_none() || gi == ge {
        return Err(format!("IOMMU groups {gi:?} and {ge:?}"));
    }
    if f.acs_ctrl(b("0000:00:01.0"))
        .map_err(|e| e.to_string())?
        .is_none_or(|a| a & regs::ACS_RR == 0)
    {
        return Err(
            "the root port's ACS RR is not on (the kernel enables it under an IOMMU)".into(),
        );
    }
    // The kernel's analysis of the pair, run on the scanned fabric.
    let p2p = peerdma_p2pdma::P2pDma::new(std::sync::Arc::new(f));
    let (t, d) = p2p.calc_map_type_and_dist(IVSHMEM, EDU, false);
    if (t, d) != (peerdma_p2pdma::MapType::BusAddr, 4) {
        return Err(format!(
            "ivshmem → edu is {t} at distance {d}, expected bus_addr at 4"
        ));
    }
    Ok(())
}

/// Runs every test that applies to `mode` (`custom`: iommufd kernel; `debian`: Debian's
/// kernel, group/container only). Returns (passed, failed).
pub fn run(mode: &str) -> (usize, usize) {
    let mut r = Runner {
        passed: 0,
        failed: 0,
        prefix: "host:".into(),
    };
    r.run("topo_host_matches_the_qemu_command_line", || {
        let scan = crate::sysfs::scan_host().map_err(|e| e.to_string())?;
        check_qemu_topology(&scan)
    });
    r.run("cli_export_prints_fdinfo", || {
        let out = std::process::Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
            .args([
                "export",
                "--device",
                "0000:03:00.0",
                "--bar",
                "2",
                "--range",
                "0:64K",
                "--range",
                "128K:4K",
            ])
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout);
        if out.status.success()
            && text.contains("size:\t69632")
            && text.contains("exp_name:\tvfio_pci_core")
        {
            Ok(())
        } else {
            Err(format!(
                "status {:?}, stdout {text:?}, stderr {:?}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    r.run("cli_export_error_says_errno_and_meaning", || {
        let out = std::process::Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
            .args([
                "export",
                "--device",
                "0000:03:00.0",
                "--bar",
                "1",
                "--range",
                "0:4K",
            ])
            .output()
            .map_err(|e| e.to_string())?;
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.code() == Some(2)
            && err.contains("ENODEV")
            && err.contains("not a BAR this device implements")
        {
            Ok(())
        } else {
            Err(format!("status {:?}, stderr {err:?}", out.status))
        }
    });
    r.prefix = "group:".into();
    export_suite(&mut r, OpenPath::GroupContainer);
    if mode == "custom" {
        r.prefix = "cdev:".into();
        export_suite(&mut r, OpenPath::CdevIommufd);
        r.prefix = "p2p:".into();
        p2p_suite(&mut r);
        r.prefix = "cli:".into();
        r.run("import_maps_for_the_importer", || {
            let out =
                std::process::Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
                    .args([
                        "import",
                        "--provider",
                        "0000:03:00.0",
                        "--bar",
                        "2",
                        "--range",
                        "0:1M",
                        "--importer",
                        "0000:04:00.0",
                        "--iova",
                        "0x1000000",
                    ])
                    .output()
                    .map_err(|e| e.to_string())?;
            let text = String::from_utf8_lossy(&out.stdout);
            if out.status.success() && text.contains("is mapped for 0000:04:00.0 at IOVA 0x1000000")
            {
                Ok(())
            } else {
                Err(format!(
                    "status {:?}, stdout {text:?}, stderr {:?}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        });
    }
    (r.passed, r.failed)
}
