//! `/dev/udmabuf` on the emulated machine: a device that imports a udmabuf gets DMA
//! addresses of the memfd's RAM, so its writes land in the memfd and its reads see the
//! memfd's bytes; once it unmaps, the same address faults at the IOMMU and nothing lands.
//! The create checks and how VFIO and iommufd treat a udmabuf are held to the real kernel by
//! the `udmabuf-*` scenarios.

use peerdma_dma::Direction;
use peerdma_dmabuf::buf::seal;
use peerdma_pci::Errno;
use peerdma_uapi::UapiBackend;
use peerdma_uapi::backend::ScenarioBackend;
use peerdma_vfio::emulated::Machine;
use peerdma_vfio::pci::KernelConfig;

fn machine() -> Machine {
    peerdma_vfio::testbed::qemu_machine(KernelConfig {
        pm: false,
        thp: false,
    })
    .unwrap()
}

#[test]
fn a_device_that_imports_a_udmabuf_dmas_into_the_memfd_and_not_after_unmap() {
    let m = machine();
    let mut be = m.process();
    let dev = be.role("initiator").unwrap();
    // The importer is the device's kernel driver here (not vfio): it turns on bus mastering.
    m.fabric().config_write(dev, 4, 2, 0x0006).unwrap();
    let mfd = be.memfd_sealed(64 << 10, seal::SHRINK).unwrap();
    let ufd = be.udmabuf(mfd, 1, 16 << 10, 32 << 10).unwrap();
    let f = be.fget(ufd).unwrap();
    let buf = f.dmabuf().unwrap().clone();
    assert_eq!(buf.size(), 32 << 10);
    assert_eq!(buf.exp_name(), "udmabuf");

    let att = buf.attach(dev).unwrap();
    let sgt = {
        let g = buf.lock();
        buf.map_attachment(&att, Direction::Bidirectional, &g)
            .unwrap()
    };
    assert_eq!(sgt.size(), 32 << 10);
    // Every byte of the buffer, by the device: the first and the last 16 bytes.
    let first = sgt.dma_addr_of(0).unwrap();
    let last = sgt.dma_addr_of((32 << 10) - 16).unwrap();
    m.fabric()
        .dma_write(dev, first, b"udmabuf first 16")
        .unwrap();
    m.fabric()
        .dma_write(dev, last, b"udmabuf last 16!")
        .unwrap();
    let mut back = [0u8; 16];
    assert_eq!(be.memfd_peek(mfd, 16 << 10, &mut back), Ok(16));
    assert_eq!(
        &back, b"udmabuf first 16",
        "the buffer starts at the offset"
    );
    assert_eq!(be.memfd_peek(mfd, (48 << 10) - 16, &mut back), Ok(16));
    assert_eq!(&back, b"udmabuf last 16!");
    let mut read = [0u8; 16];
    m.fabric().dma_read(dev, first, &mut read).unwrap();
    assert_eq!(&read, b"udmabuf first 16");

    // Unmapped: the address is gone from the device's IOMMU domain.
    {
        let g = buf.lock();
        buf.unmap_attachment(&att, sgt, Direction::Bidirectional, &g);
    }
    assert!(
        m.fabric()
            .dma_write(dev, first, b"after the unmap!")
            .is_err(),
        "a DMA through an unmapped udmabuf address faults"
    );
    assert_eq!(be.memfd_peek(mfd, 16 << 10, &mut back), Ok(16));
    assert_eq!(&back, b"udmabuf first 16", "nothing landed after the unmap");
    buf.detach(&att);
    f.put();

    // The memfd's close leaves the buffer whole; its close releases it.
    be.close_fd(mfd).unwrap();
    assert_eq!(be.fd_refs(ufd), Ok(1));
    be.close_fd(ufd).unwrap();
    assert_eq!(be.fd_refs(ufd), Err(Errno::EBADF));
}

#[test]
fn a_memfd_takes_no_seal_after_f_seal_seal_and_refuses_unknown_bits() {
    let m = machine();
    let mut be = m.process();
    assert_eq!(be.memfd_sealed(4096, 0x40), Err(Errno::EINVAL));
    let mfd = be.memfd_sealed(4096, seal::SEAL).unwrap();
    let f = be.fget(mfd).unwrap();
    assert_eq!(f.seals(), Ok(seal::SEAL));
    assert_eq!(f.add_seals(seal::SHRINK), Err(Errno::EPERM));
    assert_eq!(f.seals(), Ok(seal::SEAL), "a refused seal changes nothing");
    f.put();
    // Exec brings the write seals: the memfd can back no udmabuf.
    let x = be.memfd_sealed(4096, seal::EXEC).unwrap();
    let fx = be.fget(x).unwrap();
    assert_eq!(
        fx.seals(),
        Ok(seal::EXEC | seal::SHRINK | seal::GROW | seal::WRITE | seal::FUTURE_WRITE)
    );
    fx.put();
    assert_eq!(be.udmabuf(x, 1, 0, 4096), Err(Errno::EINVAL));
    // Not sealable at all: only F_SEAL_SEAL.
    let plain = be.memfd(4096).unwrap();
    let fp = be.fget(plain).unwrap();
    assert_eq!(fp.seals(), Ok(seal::SEAL));
    fp.put();
}
