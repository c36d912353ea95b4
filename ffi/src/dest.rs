//! Where filled expert bytes go: the pool never assumes a slot's layout, it hands each
//! projection's bytes to a [`SlotSink`]. Three sinks exist: memory the pool owns
//! ([`OwnedSlots`]), memory the engine owns ([`RawSlots`]), and a callback
//! ([`FnSink`], e.g. a GPU upload or a repacking copy).

use std::ptr::NonNull;

use crate::arena::{Arena, ArenaBuf, PAGE};
use crate::error::Result;
use crate::io::{AlignedBuf, Region};

/// Receives the bytes of one projection of one expert for one slot. Called with the
/// pool locked, on the thread of the pool call that reaped the read.
pub trait SlotSink: Send {
    /// Stores `data` at byte `offset` of projection `proj` of slot `slot` of layer
    /// `layer`. Unless [`SlotSink::partial`] is true, it is called once per fill and
    /// projection with `offset == 0` and all the bytes.
    fn write(&mut self, layer: i32, proj: usize, slot: u32, offset: usize, data: &[u8]);
    /// Whether [`SlotSink::write`] accepts pieces (memory sinks: the pool then copies
    /// each chunk as soon as it is read).
    fn partial(&self) -> bool {
        false
    }
    /// Base pointer and slot stride of projection `proj`, for memory sinks.
    fn base(&self, _proj: usize) -> Option<(*mut u8, usize)> {
        None
    }
    /// A copy of `len` bytes of projection `proj` of slot `slot`, for memory sinks
    /// (used by tests to compare against the file).
    fn read(&self, _proj: usize, _slot: u32, _len: usize) -> Option<Vec<u8>> {
        None
    }
    /// Where the pool may read projection `proj` of an expert straight into slot `slot`:
    /// the slot's page-aligned region, its length, and where in it the expert starts (its
    /// offset within a page of the file). None for sinks that take the bytes otherwise.
    /// The pool consults it only for the slot memory it allocated itself
    /// ([`OwnedSlots::new_direct`]), never for a sink handed to it.
    fn direct_region(&self, _proj: usize, _slot: u32) -> Option<Region> {
        None
    }
}

/// Slot memory allocated and owned by the pool: per projection one block of
/// `n_slots * stride` bytes, slot `s`'s expert at `s * stride + head`; valid until the
/// pool is dropped. Laid out for direct reads ([`OwnedSlots::new_direct`]), every slot's
/// stride is whole pages and the expert sits at its offset within a page of the file,
/// so the pool can read the file straight into the slot (see `direct_region`).
pub struct OwnedSlots {
    projs: Vec<OwnedProj>,
}

struct OwnedProj {
    mem: SlotMemory,
    stride: usize,
    head: usize,
    direct: bool,
}

/// The memory of one projection's slots.
enum SlotMemory {
    Heap(AlignedBuf),
    /// A mapping of its own backed by huge pages: a direct read's destination in few
    /// physical pieces (see `arena`).
    Huge {
        /// Owns the mapping (unmapped when dropped).
        _mapping: Arena,
        buf: ArenaBuf,
    },
}

impl SlotMemory {
    fn raw(&self) -> *mut u8 {
        match self {
            SlotMemory::Heap(b) => b.as_raw(),
            SlotMemory::Huge { buf, .. } => buf.as_ptr(),
        }
    }

    fn len(&self) -> usize {
        match self {
            SlotMemory::Heap(b) => b.capacity(),
            SlotMemory::Huge { buf, .. } => buf.len(),
        }
    }
}

/// Alignment of each slot in [`OwnedSlots`] (cache line; ggml needs 32).
pub const SLOT_ALIGN: usize = 64;

impl OwnedSlots {
    /// Allocates slots for projections of `bytes[p]` bytes each.
    pub fn new(n_slots: u32, bytes: &[usize]) -> Result<Self> {
        let mut projs = Vec::with_capacity(bytes.len());
        for &b in bytes {
            let stride = crate::io::round_up(b.max(1), SLOT_ALIGN);
            let total = stride
                .checked_mul(n_slots as usize)
                .ok_or(crate::error::PoolError::NoMemory(usize::MAX))?;
            projs.push(OwnedProj {
                mem: SlotMemory::Heap(AlignedBuf::new(total)?),
                stride,
                head: 0,
                direct: false,
            });
        }
        Ok(OwnedSlots { projs })
    }

    /// Allocates slots the file can be read into directly: projection `p` holds experts
    /// of `layout[p].0` bytes that start `layout[p].1` bytes into a page of the file (a
    /// multiple of [`SLOT_ALIGN`], below the page size). Each slot spans whole pages (up
    /// to one page more than the expert); each projection's memory is a mapping of its
    /// own, rounded up to 2 MiB and advised for huge pages (so up to 2 MiB more may
    /// become resident per projection), or the heap where no mapping is given.
    pub fn new_direct(n_slots: u32, layout: &[(usize, usize)]) -> Result<Self> {
        let mut projs = Vec::with_capacity(layout.len());
        for &(b, head) in layout {
            if head % SLOT_ALIGN != 0 || head >= PAGE {
                return Err(crate::error::PoolError::invalid(format!(
                    "an expert {head} bytes into a page cannot start a slot"
                )));
            }
            let stride = crate::io::round_up(head + b.max(1), PAGE);
            let total = stride
                .checked_mul(n_slots as usize)
                .ok_or(crate::error::PoolError::NoMemory(usize::MAX))?;
            let mem = match Arena::new(total).and_then(|mut a| a.alloc(total).map(|b| (a, b))) {
                Some((a, b)) => SlotMemory::Huge {
                    _mapping: a,
                    buf: b,
                },
                None => SlotMemory::Heap(AlignedBuf::new(total)?),
            };
            projs.push(OwnedProj {
                mem,
                stride,
                head,
                direct: true,
            });
        }
        Ok(OwnedSlots { projs })
    }
}

impl SlotSink for OwnedSlots {
    fn write(&mut self, _layer: i32, proj: usize, slot: u32, offset: usize, data: &[u8]) {
        let p = &self.projs[proj];
        let start = slot as usize * p.stride + p.head + offset;
        assert!(
            p.head + offset + data.len() <= p.stride
                && (slot as usize + 1) * p.stride <= p.mem.len()
        );
        // SAFETY: the range start..start+data.len() lies inside this slot of the
        // allocation (checked above), data does not overlap it (it is a read buffer), and
        // only this slot's bytes are written, so readers of other slots are not disturbed.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), p.mem.raw().add(start), data.len());
        }
    }
    fn partial(&self) -> bool {
        true
    }
    fn base(&self, proj: usize) -> Option<(*mut u8, usize)> {
        self.projs.get(proj).map(|p| {
            // SAFETY: head < stride <= the allocation's length (n_slots >= 1).
            (unsafe { p.mem.raw().add(p.head) }, p.stride)
        })
    }
    fn read(&self, proj: usize, slot: u32, len: usize) -> Option<Vec<u8>> {
        let p = self.projs.get(proj)?;
        let start = slot as usize * p.stride + p.head;
        if p.head + len > p.stride || (slot as usize + 1) * p.stride > p.mem.len() {
            return None;
        }
        // SAFETY: in bounds (checked above); the bytes are initialised (zeroed at
        // allocation, then written by `write` or by reads into the slot).
        Some(unsafe { std::slice::from_raw_parts(p.mem.raw().add(start), len) }.to_vec())
    }
    fn direct_region(&self, proj: usize, slot: u32) -> Option<Region> {
        let p = self.projs.get(proj).filter(|p| p.direct)?;
        if (slot as usize + 1) * p.stride > p.mem.len() {
            return None;
        }
        // SAFETY: slot s's region lies inside the allocation (checked above).
        let ptr = unsafe { p.mem.raw().add(slot as usize * p.stride) };
        NonNull::new(ptr).map(|ptr| Region {
            ptr,
            len: p.stride,
            head: p.head,
        })
    }
}

/// Slot memory owned by the engine: projection `p`, slot `s` at `base[p] + s * stride[p]`.
pub struct RawSlots {
    projs: Vec<(NonNull<u8>, usize, usize)>,
}

// SAFETY: RawSlots only writes through its pointers under the contract of `new`, which
// makes the memory usable from whichever thread calls the pool.
unsafe impl Send for RawSlots {}

impl RawSlots {
    /// Wraps engine memory: `projs[p] = (base, slot_stride, expert_bytes)`.
    ///
    /// # Safety
    /// For every projection and every slot `s < n_slots`, the range
    /// `base + s * slot_stride .. + expert_bytes` must be valid for writes for as long as
    /// the pool exists, must not overlap another slot's range or the pool's read
    /// buffers, and the engine must not access a slot while the pool may fill it (that
    /// is: only slots returned by the latest request of the layer may be read).
    pub unsafe fn new(projs: Vec<(NonNull<u8>, usize, usize)>) -> Self {
        RawSlots { projs }
    }
}

impl SlotSink for RawSlots {
    fn write(&mut self, _layer: i32, proj: usize, slot: u32, offset: usize, data: &[u8]) {
        let (base, stride, bytes) = self.projs[proj];
        let len = data.len().min(bytes.saturating_sub(offset));
        // SAFETY: by the contract of `RawSlots::new`, base + slot * stride is valid for
        // `bytes >= offset + len` writes and is not accessed concurrently while being filled.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                base.as_ptr().add(slot as usize * stride + offset),
                len,
            );
        }
    }
    fn partial(&self) -> bool {
        true
    }
    fn base(&self, proj: usize) -> Option<(*mut u8, usize)> {
        self.projs.get(proj).map(|&(b, s, _)| (b.as_ptr(), s))
    }
    fn read(&self, proj: usize, slot: u32, len: usize) -> Option<Vec<u8>> {
        let &(base, stride, bytes) = self.projs.get(proj)?;
        if len > bytes {
            return None;
        }
        // SAFETY: by the contract of `RawSlots::new` the range is valid memory, and it is
        // only read here under the pool lock, when no fill writes it.
        Some(
            unsafe { std::slice::from_raw_parts(base.as_ptr().add(slot as usize * stride), len) }
                .to_vec(),
        )
    }
}

/// A sink that calls a closure: `f(layer, proj, slot, bytes)`.
pub struct FnSink<F>(pub F);

impl<F: FnMut(i32, usize, u32, &[u8]) + Send> SlotSink for FnSink<F> {
    fn write(&mut self, layer: i32, proj: usize, slot: u32, _offset: usize, data: &[u8]) {
        (self.0)(layer, proj, slot, data)
    }
}
