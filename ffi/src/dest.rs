//! Where filled expert bytes go: the pool never assumes a slot's layout, it hands each
//! projection's bytes to a [`SlotSink`]. Three sinks exist: memory the pool owns
//! ([`OwnedSlots`]), memory the engine owns ([`RawSlots`]), and a callback
//! ([`FnSink`], e.g. a GPU upload or a repacking copy).

use std::ptr::NonNull;

use crate::error::Result;
use crate::io::AlignedBuf;

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
}

/// Slot memory allocated and owned by the pool: per projection one aligned block of
/// `n_slots * stride` bytes, slot `s` at `s * stride`; valid until the pool is dropped.
pub struct OwnedSlots {
    projs: Vec<(AlignedBuf, usize)>,
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
            projs.push((AlignedBuf::new(total)?, stride));
        }
        Ok(OwnedSlots { projs })
    }
}

impl SlotSink for OwnedSlots {
    fn write(&mut self, _layer: i32, proj: usize, slot: u32, offset: usize, data: &[u8]) {
        let (buf, stride) = &mut self.projs[proj];
        let start = slot as usize * *stride + offset;
        assert!(offset + data.len() <= *stride && (slot as usize + 1) * *stride <= buf.capacity());
        // SAFETY: the range start..start+data.len() lies inside this slot of the
        // allocation (checked above), data does not overlap it (it is a read buffer), and
        // only this slot's bytes are written, so readers of other slots are not disturbed.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), buf.as_raw().add(start), data.len());
        }
    }
    fn partial(&self) -> bool {
        true
    }
    fn base(&self, proj: usize) -> Option<(*mut u8, usize)> {
        self.projs.get(proj).map(|(b, s)| (b.as_raw(), *s))
    }
    fn read(&self, proj: usize, slot: u32, len: usize) -> Option<Vec<u8>> {
        let (buf, stride) = self.projs.get(proj)?;
        let start = slot as usize * *stride;
        if len > *stride || start + *stride > buf.capacity() {
            return None;
        }
        // SAFETY: in bounds (checked above); the bytes are initialised (zeroed at
        // allocation, then written by `write`).
        Some(unsafe { std::slice::from_raw_parts(buf.as_raw().add(start), len) }.to_vec())
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
