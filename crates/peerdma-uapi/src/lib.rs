//! # peerdma-uapi — the userspace boundary
//!
//! | module | what |
//! |---|---|
//! | [`feature`] | the exact bytes of `VFIO_DEVICE_FEATURE` and its DMA_BUF payload (`vfio-bindings` layouts) |
//! | [`backend`] | [`backend::UapiBackend`]: open, feature ioctl, config access, reset, dma-buf fds, iommufd — implemented by the emulated stack and by real Linux |

pub mod backend;
pub mod feature;

pub use backend::{DevHandle, DmabufInfo, IoasId, OpenPath, UapiBackend};
pub use feature::DmaBufRequest;
