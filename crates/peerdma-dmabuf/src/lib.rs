//! # peerdma-dmabuf — dma-buf on the emulated machine
//!
//! | module | kernel | what |
//! |---|---|---|
//! | [`buf`] | drivers/dma-buf/dma-buf.c | export, files and fds, attach/detach, pin, map under the lock, invalidation |
//! | [`resv`] | drivers/dma-buf/dma-resv.c, dma-fence.c | the reservation lock as a guard, fences |
//! | [`sgt`] | drivers/dma-buf/dma-buf-mapping.c | physical ranges of a BAR → DMA-only scatter table, by p2pdma map type |
//!
//! Everything that the kernel runs "with the reservation lock held" takes a
//! [`ResvGuard`] argument and checks it is the right buffer's.

pub mod buf;
pub mod resv;
pub mod sgt;

pub use buf::{
    Attachment, DmaBuf, DmaBufOps, ExportInfo, File, ImporterOps, Invalidate, Process, export,
};
pub use resv::{Fence, Resv, ResvGuard, Usage};
pub use sgt::{DmaEnv, PhysVec, SgDma, SgKind, SgTable, free_sgt, phys_vec_to_sgt};

/// Mapping needs the reservation lock: without a guard the call does not compile.
///
/// ```compile_fail
/// fn map_unlocked(b: &peerdma_dmabuf::DmaBuf, a: &peerdma_dmabuf::Attachment) {
///     let _ = b.map_attachment(a, peerdma_dma::Direction::ToDevice);
/// }
/// ```
///
/// With the guard it does:
///
/// ```
/// fn map_locked(b: &peerdma_dmabuf::DmaBuf, a: &peerdma_dmabuf::Attachment) {
///     let g = b.lock();
///     if let Ok(t) = b.map_attachment(a, peerdma_dma::Direction::ToDevice, &g) {
///         b.unmap_attachment(a, t, peerdma_dma::Direction::ToDevice, &g);
///     }
/// }
/// ```
pub mod locking {}

/// The README's examples (this crate sees every crate they use), compiled and run as doc tests
/// so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
