//! Memory for read buffers: one anonymous mapping, advised for transparent huge pages,
//! carved into page-aligned buffers first fit, lowest address first.
//!
//! Why a mapping of its own: the cost of an O_DIRECT read on a virtualised disk
//! (virtio-blk) grows with the number of physically separate pieces of its destination
//! buffer, because every piece is one descriptor that the host serves on its own. A
//! buffer of fresh 4 KiB pages is hundreds of pieces; inside a 2 MiB huge page it is
//! one. On the project's VM the device time of an 864 KiB read fell from ~0.9 to ~0.45 ms
//! with huge-page buffers (bench/RESULTS.md, fill throughput).
//!
//! Invariants:
//! - Buffers handed out never overlap, lie inside the mapping, start at a multiple of
//!   [`PAGE`] and have a length that is a multiple of it.
//! - `free` holds the gaps between buffers, keyed by offset, never adjacent to each other
//!   (neighbours are merged), so a fully freed arena is one gap.
//! - Lowest-address-first keeps the touched part of the mapping, which is what stays
//!   resident, close to the peak of what is in use at once.

use std::collections::BTreeMap;
use std::ptr::NonNull;

/// Granularity of buffers (the O_DIRECT alignment).
pub const PAGE: usize = 4096;

/// Size and alignment of a transparent huge page on x86-64 and arm64 (4 KiB base pages).
const HUGE: usize = 2 << 20;

/// A buffer carved out of an [`Arena`]. It does not free itself: give it back with
/// [`Arena::free`] (dropping it only leaks its range until the arena is dropped).
#[derive(Debug)]
pub struct ArenaBuf {
    ptr: NonNull<u8>,
    off: usize,
    len: usize,
}

// SAFETY: an ArenaBuf is the only handle to its byte range of the arena's mapping (the
// arena never hands a range out twice), like a Box<[u8]>.
unsafe impl Send for ArenaBuf {}

impl ArenaBuf {
    /// Length in bytes (a multiple of [`PAGE`]).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty (never: the arena hands out at least one page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The start of the buffer.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

/// A private anonymous mapping and the gaps in it.
pub struct Arena {
    base: NonNull<u8>,
    len: usize,
    /// Gaps: offset -> length.
    free: BTreeMap<usize, usize>,
    free_bytes: usize,
}

// SAFETY: the arena owns its mapping; the raw pointer is not shared with anything that
// is not handed out as an ArenaBuf.
unsafe impl Send for Arena {}

impl Arena {
    /// Maps `len` bytes (rounded up to [`HUGE`]) at a huge-page boundary and advises
    /// the kernel to back them with huge pages. Nothing is touched yet, so nothing is
    /// resident. None when the mapping fails (the caller then uses the heap).
    pub fn new(len: usize) -> Option<Arena> {
        let len = len.max(1).div_ceil(HUGE) * HUGE;
        let span = len + HUGE;
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        let start = p as usize;
        let aligned = start.div_ceil(HUGE) * HUGE;
        let head = aligned - start;
        let tail = span - head - len;
        // SAFETY: both ranges lie inside the mapping just made and are not used; only
        // [aligned, aligned + len) stays mapped.
        unsafe {
            if head > 0 {
                libc::munmap(p, head);
            }
            if tail > 0 {
                libc::munmap((aligned + len) as *mut libc::c_void, tail);
            }
            // Advice only: without transparent huge pages the arena still works, with
            // small pages.
            libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        }
        Some(Arena {
            base: NonNull::new(aligned as *mut u8)?,
            len,
            free: BTreeMap::from([(0, len)]),
            free_bytes: len,
        })
    }

    /// Size of the mapping in bytes.
    pub fn capacity(&self) -> usize {
        self.len
    }

    /// Bytes not handed out.
    pub fn free_bytes(&self) -> usize {
        self.free_bytes
    }

    /// A buffer of at least `len` bytes (rounded up to [`PAGE`]) from the lowest gap
    /// that holds it; None when no gap does.
    pub fn alloc(&mut self, len: usize) -> Option<ArenaBuf> {
        let len = len.max(1).div_ceil(PAGE) * PAGE;
        let (&off, &gap) = self.free.iter().find(|&(_, &gap)| gap >= len)?;
        self.free.remove(&off);
        if gap > len {
            self.free.insert(off + len, gap - len);
        }
        self.free_bytes -= len;
        // SAFETY: off + len <= self.len, so the pointer stays inside the mapping.
        let ptr = unsafe { self.base.add(off) };
        Some(ArenaBuf { ptr, off, len })
    }

    /// Gives a buffer back, merging it with the gaps next to it.
    ///
    /// Panics if the buffer is not from this arena (a bug in the caller).
    pub fn free(&mut self, buf: ArenaBuf) {
        assert!(
            buf.ptr.as_ptr() as usize == self.base.as_ptr() as usize + buf.off
                && buf.off + buf.len <= self.len,
            "buffer freed into the wrong arena"
        );
        let (mut off, mut len) = (buf.off, buf.len);
        if let Some((&prev, &prev_len)) = self.free.range(..off).next_back() {
            debug_assert!(prev + prev_len <= off, "double free");
            if prev + prev_len == off {
                self.free.remove(&prev);
                off = prev;
                len += prev_len;
            }
        }
        if let Some(&next_len) = self.free.get(&(off + len)) {
            self.free.remove(&(off + len));
            len += next_len;
        }
        self.free.insert(off, len);
        self.free_bytes += buf.len;
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: the mapping was made in `new` with exactly this start and length.
        // Buffers still out point into it but are never dereferenced after the arena
        // is gone (their owner drops them with it, see io::IoEngine).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn mapping_is_huge_page_aligned_and_zeroed() {
        let mut a = Arena::new(3 << 20).expect("mmap");
        assert_eq!(a.capacity(), 4 << 20);
        let b = a.alloc(10).expect("alloc");
        assert_eq!(b.as_ptr() as usize % HUGE, 0);
        assert_eq!(b.len(), PAGE);
        // SAFETY: b is PAGE bytes of the arena's mapping, owned by b.
        let bytes = unsafe { std::slice::from_raw_parts(b.as_ptr(), b.len()) };
        assert!(bytes.iter().all(|&x| x == 0));
        a.free(b);
        assert_eq!(a.free_bytes(), a.capacity());
    }

    #[test]
    fn lowest_gap_first_and_merging() {
        let mut a = Arena::new(HUGE).expect("mmap");
        let x = a.alloc(PAGE).unwrap();
        let y = a.alloc(2 * PAGE).unwrap();
        let z = a.alloc(PAGE).unwrap();
        assert_eq!((x.off, y.off, z.off), (0, PAGE, 3 * PAGE));
        a.free(y);
        // A one-page request takes the lowest gap (y's), not the tail.
        let w = a.alloc(PAGE).unwrap();
        assert_eq!(w.off, PAGE);
        a.free(x);
        a.free(w);
        a.free(z);
        assert_eq!(a.free.len(), 1, "gaps were not merged: {:?}", a.free);
        assert!(a.alloc(HUGE).is_some());
        assert!(a.alloc(PAGE).is_none(), "the arena is full");
    }

    proptest! {
        /// Random allocations and frees: buffers never overlap, stay inside the mapping,
        /// the byte count adds up, and freeing everything leaves one gap.
        #[test]
        fn never_overlaps(ops in proptest::collection::vec((any::<bool>(), 1usize..300_000), 1..200)) {
            let mut a = Arena::new(4 << 20).expect("mmap");
            let mut live: Vec<ArenaBuf> = Vec::new();
            for (alloc, n) in ops {
                if alloc || live.is_empty() {
                    if let Some(b) = a.alloc(n) {
                        prop_assert!(b.len() >= n && b.len() % PAGE == 0 && b.off % PAGE == 0);
                        prop_assert!(b.off + b.len() <= a.capacity());
                        for o in &live {
                            prop_assert!(b.off + b.len() <= o.off || o.off + o.len() <= b.off);
                        }
                        live.push(b);
                    } else {
                        // Only when no gap is large enough.
                        prop_assert!(a.free.values().all(|&g| g < n));
                    }
                } else {
                    let b = live.swap_remove(n % live.len());
                    a.free(b);
                }
                let used: usize = live.iter().map(|b| b.len()).sum();
                prop_assert_eq!(a.free_bytes() + used, a.capacity());
            }
            for b in live.drain(..) {
                a.free(b);
            }
            prop_assert_eq!(a.free.len(), 1);
            prop_assert_eq!(a.free_bytes(), a.capacity());
        }
    }
}
