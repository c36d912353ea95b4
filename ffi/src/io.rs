//! Reads of expert slices from model files: io_uring with O_DIRECT where the file
//! system allows it (aligned superset reads into aligned buffers), io_uring with
//! buffered reads, or plain `pread` when io_uring is unavailable.
//!
//! Invariants:
//! - A read's destination buffer is owned by its [`ReadOp`] in the engine's table from
//!   submission until its completion has been reaped; dropping the engine first waits
//!   for every submitted read.
//! - Short reads are resubmitted for the rest, `EINTR`/`EAGAIN` are retried, an end of
//!   file before the wanted bytes is an error ([`PoolError::ShortFile`]).
//! - A read completes once the wanted bytes are in (an aligned read may end short at
//!   the end of the file without harm).
//! - Read buffers come from the engine's [`Arena`] (huge pages, given back on release)
//!   or, when it has no room, from the heap (freed on release).

use std::alloc::{self, Layout};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use io_uring::{IoUring, opcode, types};

use crate::arena::{Arena, ArenaBuf};
use crate::error::{PoolError, Result};

/// Alignment of O_DIRECT offsets, lengths and buffers. 4096 satisfies every common
/// logical block size.
pub const DIRECT_ALIGN: usize = 4096;

/// Which I/O path the caller asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoMode {
    /// io_uring with O_DIRECT where possible, else io_uring buffered, else pread.
    Auto,
    /// io_uring; per file O_DIRECT where possible.
    Uring,
    /// io_uring, never O_DIRECT.
    UringBuffered,
    /// pread only (no io_uring), never O_DIRECT.
    Pread,
    /// pread, O_DIRECT where possible (for tests and comparisons).
    PreadDirect,
}

impl IoMode {
    /// The C ABI code (`EP_IO_*`).
    pub fn from_code(code: u32) -> Option<IoMode> {
        match code {
            0 => Some(IoMode::Auto),
            1 => Some(IoMode::Uring),
            2 => Some(IoMode::UringBuffered),
            3 => Some(IoMode::Pread),
            4 => Some(IoMode::PreadDirect),
            _ => None,
        }
    }

    fn wants_direct(self) -> bool {
        matches!(self, IoMode::Auto | IoMode::Uring | IoMode::PreadDirect)
    }

    fn wants_uring(self) -> bool {
        matches!(self, IoMode::Auto | IoMode::Uring | IoMode::UringBuffered)
    }
}

/// A buffer aligned to [`DIRECT_ALIGN`], zero-initialised.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    cap: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `cap` bytes (rounded up to the alignment).
    pub fn new(cap: usize) -> Result<Self> {
        let cap = round_up(cap.max(1), DIRECT_ALIGN);
        let layout =
            Layout::from_size_align(cap, DIRECT_ALIGN).map_err(|_| PoolError::NoMemory(cap))?;
        // SAFETY: layout has a non-zero size.
        let p = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(p).ok_or(PoolError::NoMemory(cap))?;
        Ok(AlignedBuf { ptr, cap })
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// The whole buffer.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap initialised (zeroed, then written) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.cap) }
    }

    /// The whole buffer, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) }
    }

    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The start of the allocation, for writers that touch only part of it.
    pub fn as_raw(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout.
        unsafe {
            alloc::dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.cap, DIRECT_ALIGN),
            )
        }
    }
}

/// A read's destination: a range of the engine's [`Arena`], or heap memory when the
/// arena has no room, or memory the caller owns ([`IoEngine::start_read_into`]).
enum ReadBuf {
    Arena(ArenaBuf),
    Heap(AlignedBuf),
    /// `len` bytes at `ptr`, which the caller keeps valid and untouched until the read's
    /// `Done` event (and nothing else reads into).
    External {
        ptr: NonNull<u8>,
        len: usize,
    },
}

// SAFETY: the arena and heap variants own their memory (both Send); the external one
// points at memory the caller lends for the read under `start_read_into`'s contract,
// which does not depend on the thread that completes the read.
unsafe impl Send for ReadBuf {}

impl ReadBuf {
    fn capacity(&self) -> usize {
        match self {
            ReadBuf::Arena(b) => b.len(),
            ReadBuf::Heap(b) => b.capacity(),
            ReadBuf::External { len, .. } => *len,
        }
    }

    /// Bytes of the engine's own memory it holds (not the caller's).
    fn held(&self) -> usize {
        match self {
            ReadBuf::External { .. } => 0,
            b => b.capacity(),
        }
    }

    fn as_mut_ptr(&mut self) -> *mut u8 {
        match self {
            ReadBuf::Arena(b) => b.as_ptr(),
            ReadBuf::Heap(b) => b.as_mut_ptr(),
            ReadBuf::External { ptr, .. } => ptr.as_ptr(),
        }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            // SAFETY: the range belongs to this buffer alone while it is out of the
            // arena, lies inside the arena's mapping (alive as long as the engine that
            // owns both), and is initialised (the mapping starts zeroed).
            ReadBuf::Arena(b) => unsafe { std::slice::from_raw_parts(b.as_ptr(), b.len()) },
            ReadBuf::Heap(b) => b.as_slice(),
            // SAFETY: by the contract of `start_read_into`, the caller's range is valid,
            // initialised and written by nothing but this read while the op lives.
            ReadBuf::External { ptr, len } => unsafe {
                std::slice::from_raw_parts(ptr.as_ptr(), *len)
            },
        }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            // SAFETY: as in as_slice, and &mut self gives exclusive access.
            ReadBuf::Arena(b) => unsafe { std::slice::from_raw_parts_mut(b.as_ptr(), b.len()) },
            ReadBuf::Heap(b) => b.as_mut_slice(),
            // SAFETY: as in as_slice, and &mut self gives exclusive access.
            ReadBuf::External { ptr, len } => unsafe {
                std::slice::from_raw_parts_mut(ptr.as_ptr(), *len)
            },
        }
    }
}

/// Memory a read may go straight into ([`IoEngine::start_read_into`]): `len` bytes at
/// `ptr` (page-aligned), the wanted bytes to land at `ptr + head`.
#[derive(Debug, Clone, Copy)]
pub struct Region {
    pub ptr: NonNull<u8>,
    pub len: usize,
    pub head: usize,
}

/// Rounds `x` up to a multiple of `a` (a power of two).
pub fn round_up(x: usize, a: usize) -> usize {
    (x + a - 1) & !(a - 1)
}

/// Identity and size of a file at registration, to notice changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
}

impl FileId {
    fn of(meta: &std::fs::Metadata) -> Self {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
        }
    }
}

/// An open model file.
#[derive(Debug)]
pub struct ModelFile {
    /// Path, or `fd N` for a file registered by descriptor.
    pub name: String,
    path: Option<PathBuf>,
    file: File,
    direct: Option<File>,
    /// Why O_DIRECT is not used, if it was wanted.
    pub direct_refused: Option<String>,
    id: FileId,
}

impl ModelFile {
    /// Opens `path` read-only; tries O_DIRECT too when `mode` wants it.
    pub fn open(path: &Path, mode: IoMode) -> Result<Self> {
        let name = path.display().to_string();
        let file = File::open(path).map_err(|source| PoolError::Open {
            path: name.clone(),
            source,
        })?;
        Self::finish_open(name, Some(path.to_path_buf()), file, path, mode)
    }

    /// Registers an open descriptor: the pool `dup`s it (the caller keeps `fd`), and
    /// reopens it through `/proc/self/fd` for O_DIRECT when `mode` wants it.
    pub fn from_fd(fd: RawFd, mode: IoMode) -> Result<Self> {
        let name = format!("fd {fd}");
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) only reads the descriptor number; an invalid
        // one gives EBADF.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(PoolError::Open {
                path: name,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: dup is a fresh descriptor that we own from here on.
        let file = unsafe { File::from_raw_fd(dup) };
        let proc_path = PathBuf::from(format!("/proc/self/fd/{dup}"));
        Self::finish_open(name, None, file, &proc_path, mode)
    }

    fn finish_open(
        name: String,
        path: Option<PathBuf>,
        file: File,
        open_path: &Path,
        mode: IoMode,
    ) -> Result<Self> {
        let meta = file.metadata().map_err(|source| PoolError::Open {
            path: name.clone(),
            source,
        })?;
        if !meta.is_file() {
            return Err(PoolError::Open {
                path: name,
                source: io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
            });
        }
        let (direct, direct_refused) = if mode.wants_direct() {
            match open_direct(open_path, &meta) {
                Ok(f) => (Some(f), None),
                Err(why) => (None, Some(why)),
            }
        } else {
            (None, None)
        };
        Ok(ModelFile {
            name,
            path,
            file,
            direct,
            direct_refused,
            id: FileId::of(&meta),
        })
    }

    /// Whether reads of this file use O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Size of the file at registration.
    pub fn size(&self) -> u64 {
        self.id.size
    }

    /// Fails if the file was truncated, modified or replaced since registration.
    pub fn check_unchanged(&self) -> Result<()> {
        let meta = self.file.metadata().map_err(|source| PoolError::Io {
            path: self.name.clone(),
            offset: 0,
            len: 0,
            source,
        })?;
        let now = FileId::of(&meta);
        let changed = |what: String| PoolError::FileChanged {
            path: self.name.clone(),
            what,
        };
        if now.size < self.id.size {
            return Err(changed(format!(
                "was truncated from {} to {} bytes",
                self.id.size, now.size
            )));
        }
        if now != self.id {
            return Err(changed("was modified (size or mtime changed)".into()));
        }
        if let Some(path) = &self.path {
            match std::fs::metadata(path) {
                Ok(m) if m.dev() == self.id.dev && m.ino() == self.id.ino => {}
                Ok(_) => return Err(changed("was replaced by another file".into())),
                Err(e) => return Err(changed(format!("can no longer be opened ({e})"))),
            }
        }
        Ok(())
    }
}

/// Opens `path` with O_DIRECT and proves that an aligned read works (some file systems
/// accept the flag and fail the reads). Returns why not on failure.
fn open_direct(path: &Path, meta: &std::fs::Metadata) -> std::result::Result<File, String> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| format!("O_DIRECT open refused: {e}"))?;
    if meta.size() > 0 {
        let mut buf = AlignedBuf::new(DIRECT_ALIGN).map_err(|e| e.to_string())?;
        f.read_at(buf.as_mut_slice(), 0)
            .map_err(|e| format!("O_DIRECT read refused: {e}"))?;
    }
    Ok(f)
}

/// Identifies a read in the engine's table.
pub type OpId = usize;

/// io_uring reads are split into chunks of at most this many bytes, submitted
/// together: a large expert then keeps several requests in flight, and each chunk can
/// be copied into its slot while the others are still being read.
pub const CHUNK: usize = 256 * 1024;

/// One chunk of a read: `buf[start..end]`, of which `buf[start..need_end]` is needed.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    start: usize,
    end: usize,
    need_end: usize,
    /// Bytes in so far, from `start`.
    done: usize,
    /// Still reading through the O_DIRECT descriptor.
    direct: bool,
    complete: bool,
}

/// One read of a wanted byte range, through an aligned superset when O_DIRECT.
struct ReadOp {
    direct_fd: RawFd,
    /// Buffered descriptor of the same file (also used for a remainder O_DIRECT
    /// cannot read at an unaligned position).
    buffered_fd: RawFd,
    name: String,
    buf: ReadBuf,
    /// File offset of buf[0].
    base: u64,
    /// The wanted bytes are buf[want_start..want_start + want_len].
    want_start: usize,
    want_len: usize,
    /// Bytes to ask for in total (aligned length for O_DIRECT).
    total: usize,
    chunks: Vec<Chunk>,
    chunks_left: usize,
    /// SQEs of this op queued or in the kernel.
    in_kernel: usize,
    error: Option<PoolError>,
    /// The `Done` event was emitted.
    finished: bool,
    /// Caller's tag (fill id and projection).
    tag: u64,
}

impl ReadOp {
    fn need(&self) -> usize {
        self.want_start + self.want_len
    }

    /// The wanted-coordinates range covered by chunk `c`.
    fn chunk_range(&self, c: usize) -> std::ops::Range<usize> {
        let ch = self.chunks[c];
        let lo = ch.start.max(self.want_start) - self.want_start;
        let hi = ch.need_end.max(self.want_start) - self.want_start;
        lo..hi.max(lo)
    }
}

/// What the engine reports about a read.
#[derive(Debug)]
pub enum Event {
    /// Bytes `range` of the wanted data of read `op` (tag `tag`) are in.
    Part {
        /// The read.
        op: OpId,
        /// Its tag.
        tag: u64,
        /// Range within the wanted bytes.
        range: std::ops::Range<usize>,
    },
    /// Read `op` ended (all parts in, or failed); release it after use.
    Done {
        /// The read.
        op: OpId,
        /// Its tag.
        tag: u64,
        /// Success or the error.
        result: Result<()>,
    },
}

/// A fault injected into the next read completion (tests of the completion handling).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The completion reports this errno.
    Errno(i32),
    /// The completion reports at most this many bytes (a short read).
    Short(usize),
}

/// Which I/O path is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActiveIo {
    /// io_uring.
    Uring,
    /// pread in the calling thread.
    Pread,
}

/// The read engine. Not thread-safe by itself; the pool serialises access.
pub struct IoEngine {
    ring: Option<IoUring>,
    ops: Vec<Option<ReadOp>>,
    free_ops: Vec<OpId>,
    /// SQEs pushed to the ring whose completion has not been reaped.
    in_kernel: usize,
    /// Of those, entries still in the submission queue.
    unsubmitted: usize,
    events: Vec<Event>,
    /// Where read buffers come from (None if it could not be mapped: then the heap).
    arena: Option<Arena>,
    /// Bytes of the buffers reads hold (started, not released).
    held_bytes: usize,
    /// Why io_uring is not used, if it was wanted.
    pub uring_refused: Option<String>,
    /// Faults to apply to the next completions, in order.
    faults: std::collections::VecDeque<Fault>,
    /// An errno the next waiting [`IoEngine::reap`] fails with (tests of the callers'
    /// handling of a failed wait while reads are in flight).
    fail_next_wait: Option<i32>,
    cqe_scratch: Vec<(u64, i32)>,
}

/// Queue depth used when the caller gives 0.
pub const DEFAULT_QUEUE_DEPTH: u32 = 256;

/// Size of the engine's [`Arena`], the memory read buffers come from and go back to:
/// what stays resident for reads is at most this. Staging reads many buffers per layer;
/// freeing them made the next layer allocate and fault them in again (pp128 under a
/// 1024 MiB cap: 15% slower, bench/RESULTS.md), while keeping every one left a few
/// hundred MiB resident after a prompt, memory the slots could have had. With the pool's
/// bound on what staging reads hold at once ([`crate::pool::STAGE_READ_BUDGET`]) the
/// arena's memory is faulted in once and reused. A read that finds no room in the arena
/// gets heap memory, freed when it is released.
pub const MAX_READ_MEMORY: usize = 128 << 20;

const CHUNK_BITS: u32 = 16;

impl IoEngine {
    /// Starts the engine: io_uring with `queue_depth` entries when `mode` wants it and
    /// the kernel allows it (the READ opcode is probed), else pread.
    pub fn new(mode: IoMode, queue_depth: u32) -> Self {
        let depth = if queue_depth == 0 {
            DEFAULT_QUEUE_DEPTH
        } else {
            queue_depth.clamp(1, 4096)
        };
        let (ring, uring_refused) = if mode.wants_uring() {
            match setup_ring(depth) {
                Ok(r) => (Some(r), None),
                Err(why) => (None, Some(why)),
            }
        } else {
            (None, None)
        };
        IoEngine {
            ring,
            ops: Vec::new(),
            free_ops: Vec::new(),
            in_kernel: 0,
            unsubmitted: 0,
            events: Vec::new(),
            arena: Arena::new(MAX_READ_MEMORY),
            held_bytes: 0,
            uring_refused,
            faults: Default::default(),
            fail_next_wait: None,
            cqe_scratch: Vec::new(),
        }
    }

    /// Makes the next completions report `faults` (in order) instead of their result.
    pub fn inject_faults(&mut self, faults: &[Fault]) {
        self.faults.extend(faults.iter().copied());
    }

    /// Makes the next waiting [`IoEngine::reap`] fail with `errno` without reaping, as a
    /// failed `io_uring_enter` would; the reads in flight stay in flight.
    pub fn fail_next_wait(&mut self, errno: i32) {
        self.fail_next_wait = Some(errno);
    }

    fn apply_fault(&mut self, res: isize) -> isize {
        match self.faults.pop_front() {
            None => res,
            Some(Fault::Errno(e)) => -(e as isize),
            Some(Fault::Short(n)) if res > 0 => res.min(n as isize),
            Some(Fault::Short(_)) => res,
        }
    }

    /// The I/O path in use.
    pub fn active(&self) -> ActiveIo {
        if self.ring.is_some() {
            ActiveIo::Uring
        } else {
            ActiveIo::Pread
        }
    }

    /// SQEs queued or submitted whose completion has not been reaped.
    pub fn pending(&self) -> usize {
        self.in_kernel
    }

    /// Bytes of read buffers held by reads that were started and not yet released.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Starts reading `len` bytes at `offset` of `file`. With io_uring the read is
    /// queued in chunks (call [`IoEngine::submit`]); with pread it is done now. Either
    /// way its progress comes back through [`IoEngine::take_events`].
    pub fn start_read(
        &mut self,
        file: &ModelFile,
        offset: u64,
        len: usize,
        tag: u64,
    ) -> Result<OpId> {
        self.start_read_to(file, offset, len, tag, None)
    }

    /// Like [`IoEngine::start_read`], but reads into the caller's memory: the region's
    /// `len` bytes at `ptr` (page-aligned) hold the wanted bytes at `head`, so with
    /// O_DIRECT the aligned superset of the read must start at `ptr`
    /// (`offset % DIRECT_ALIGN == head`) and fit in `len`; a buffered read goes straight
    /// to `ptr + head`. Fails with an invalid-argument error, starting nothing, when
    /// the read does not fit that way.
    ///
    /// # Safety
    /// `ptr .. ptr + len` of the region must be valid for writes, initialised, and neither
    /// read nor written by anything else from this call until the read's `Done` event
    /// has been taken (`take_events`) or [`IoEngine::drain`] has returned.
    pub unsafe fn start_read_into(
        &mut self,
        file: &ModelFile,
        offset: u64,
        len: usize,
        tag: u64,
        into: Region,
    ) -> Result<OpId> {
        self.start_read_to(file, offset, len, tag, Some(into))
    }

    fn start_read_to(
        &mut self,
        file: &ModelFile,
        offset: u64,
        len: usize,
        tag: u64,
        into: Option<Region>,
    ) -> Result<OpId> {
        let (direct, base, want_start, total) = match &file.direct {
            Some(_) => {
                let base = offset & !(DIRECT_ALIGN as u64 - 1);
                let want_start = (offset - base) as usize;
                let total = round_up(want_start + len, DIRECT_ALIGN);
                (true, base, want_start, total)
            }
            None => (false, offset, 0, len),
        };
        let buf = match into {
            None => self.get_buf(total)?,
            Some(Region {
                ptr: region,
                len: cap,
                head,
            }) => {
                // the wanted bytes land at region + head
                let Some(skip) = head.checked_sub(want_start) else {
                    return Err(PoolError::invalid("the read does not fit the region"));
                };
                if (direct && skip != 0) || skip + total > cap {
                    return Err(PoolError::invalid("the read does not fit the region"));
                }
                // SAFETY: skip + total <= cap, so the pointer stays inside the region.
                let ptr = unsafe { region.add(skip) };
                ReadBuf::External { ptr, len: total }
            }
        };
        let need = want_start + len;
        // (chunks let a copy start on the first bytes while the rest are read; a read
        // into the caller's memory has no copy to overlap)
        let chunk = if self.ring.is_some() && !matches!(buf, ReadBuf::External { .. }) {
            CHUNK
        } else {
            total.max(1)
        };
        let mut chunks = Vec::with_capacity(total.div_ceil(chunk));
        let mut start = 0;
        while start < need {
            let mut end = (start + chunk).min(total);
            if total - end < chunk / 4 {
                // Fold a small tail (e.g. the O_DIRECT alignment slack) into this chunk.
                end = total;
            }
            chunks.push(Chunk {
                start,
                end,
                need_end: end.min(need),
                done: 0,
                direct,
                complete: false,
            });
            start = end;
        }
        if chunks.len() >= 1 << CHUNK_BITS {
            return Err(PoolError::invalid(format!(
                "read of {len} bytes is too large"
            )));
        }
        self.held_bytes += buf.held();
        let op = ReadOp {
            direct_fd: file.direct.as_ref().map_or(-1, |d| d.as_raw_fd()),
            buffered_fd: file.file.as_raw_fd(),
            name: file.name.clone(),
            buf,
            base,
            want_start,
            want_len: len,
            total,
            chunks_left: chunks.len(),
            chunks,
            in_kernel: 0,
            error: None,
            finished: false,
            tag,
        };
        let id = match self.free_ops.pop() {
            Some(id) => {
                self.ops[id] = Some(op);
                id
            }
            None => {
                self.ops.push(Some(op));
                self.ops.len() - 1
            }
        };
        if self.ring.is_some() {
            let n = self.ops[id].as_ref().expect("just stored").chunks.len();
            for c in 0..n {
                // Chunks already queued complete later; one that fails or finds the
                // read failed (while waiting for room) ends here, and so do the rest.
                self.queue_chunk(id, c);
            }
            if n == 0 {
                self.finish_op(id);
            }
        } else {
            let res = self.pread_all(id);
            if res.is_ok() {
                let op = self.ops[id].as_ref().expect("op");
                self.events.push(Event::Part {
                    op: id,
                    tag,
                    range: 0..op.want_len,
                });
            }
            self.events.push(Event::Done {
                op: id,
                tag,
                result: res,
            });
        }
        Ok(id)
    }

    /// The wanted bytes of a read (complete once its `Done` came with `Ok`).
    pub fn data(&self, id: OpId) -> &[u8] {
        let op = self.ops[id].as_ref().expect("data of a released read");
        &op.buf.as_slice()[op.want_start..op.want_start + op.want_len]
    }

    /// Releases a finished read and gives its buffer back.
    pub fn release(&mut self, id: OpId) {
        if let Some(op) = self.ops[id].as_ref() {
            // Before taking it out: a panic here leaves the buffer with the op, which
            // `Drop` leaks rather than frees while the kernel may still write into it.
            assert_eq!(
                op.in_kernel, 0,
                "release of a read the kernel may still write into"
            );
        }
        if let Some(op) = self.ops[id].take() {
            self.held_bytes -= op.buf.held();
            match op.buf {
                ReadBuf::Arena(b) => self
                    .arena
                    .as_mut()
                    .expect("arena buffers come from the arena")
                    .free(b),
                ReadBuf::Heap(b) => drop(b),
                ReadBuf::External { .. } => {} // the caller's
            }
            self.free_ops.push(id);
        }
    }

    /// Hands the queued reads to the kernel.
    pub fn submit(&mut self) -> Result<()> {
        while self.unsubmitted > 0 {
            let ring = self.ring.as_mut().expect("queued reads imply a ring");
            match ring.submit() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN)) => {
                    // Completion queue backpressure: reap, then try again.
                    self.reap(true)?;
                }
                Err(source) => return Err(engine_err(source)),
            }
            self.sync_unsubmitted();
        }
        Ok(())
    }

    fn sync_unsubmitted(&mut self) {
        if let Some(ring) = self.ring.as_mut() {
            self.unsubmitted = ring.submission().len();
        }
    }

    /// Processes completions into events. With `wait`, blocks until at least one
    /// completion arrives (if any read is pending).
    pub fn reap(&mut self, wait: bool) -> Result<()> {
        if self.ring.is_none() {
            return Ok(());
        }
        if wait && self.in_kernel > 0 {
            if let Some(errno) = self.fail_next_wait.take() {
                return Err(engine_err(std::io::Error::from_raw_os_error(errno)));
            }
            let ring = self.ring.as_mut().expect("ring");
            loop {
                match ring.submit_and_wait(1) {
                    Ok(_) => break,
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => break,
                    Err(source) => return Err(engine_err(source)),
                }
            }
            self.sync_unsubmitted();
        }
        let mut cqes = std::mem::take(&mut self.cqe_scratch);
        {
            let ring = self.ring.as_mut().expect("ring");
            for cqe in ring.completion() {
                cqes.push((cqe.user_data(), cqe.result()));
            }
        }
        // Out of the kernel now, whatever handling them does: if a handler panicked
        // half-way, `drain` must not wait for completions that were already taken.
        self.in_kernel -= cqes.len();
        for &(ud, res) in &cqes {
            let res = self.apply_fault(res as isize) as i32;
            let id = (ud >> CHUNK_BITS) as usize;
            let c = (ud & ((1 << CHUNK_BITS) - 1)) as usize;
            self.on_cqe(id, c, res);
        }
        cqes.clear();
        self.cqe_scratch = cqes;
        Ok(())
    }

    /// Whether a completion is waiting (cheap: reads the ring's tail).
    pub fn has_completions(&mut self) -> bool {
        match self.ring.as_mut() {
            Some(r) => !r.completion().is_empty(),
            None => !self.events.is_empty(),
        }
    }

    /// Takes the events so far.
    pub fn take_events(&mut self, out: &mut Vec<Event>) {
        out.append(&mut self.events);
    }

    /// Handles one reaped completion of chunk `c` of read `id` (already counted out of
    /// [`IoEngine::in_kernel`] by [`IoEngine::reap`]).
    fn on_cqe(&mut self, id: OpId, c: usize, res: i32) {
        let op = self.ops[id]
            .as_mut()
            .expect("completion of an unknown read");
        op.in_kernel -= 1;
        let ch = &mut op.chunks[c];
        if res < 0 {
            let errno = -res;
            let retry = errno == libc::EINTR || errno == libc::EAGAIN;
            let unaligned = errno == libc::EINVAL && ch.direct && ch.done % DIRECT_ALIGN != 0;
            if unaligned {
                // An O_DIRECT read stopped at an unaligned point: finish buffered.
                ch.direct = false;
            }
            if (retry || unaligned) && op.error.is_none() {
                self.queue_chunk(id, c);
                return;
            }
            let err = PoolError::Io {
                path: op.name.clone(),
                offset: op.base + (ch.start + ch.done) as u64,
                len: (ch.end - ch.start - ch.done) as u64,
                source: io::Error::from_raw_os_error(errno),
            };
            self.fail_chunk(id, c, err);
            return;
        }
        let n = res as usize;
        ch.done += n;
        if ch.start + ch.done >= ch.need_end {
            ch.complete = true;
            op.chunks_left -= 1;
            let range = op.chunk_range(c);
            let tag = op.tag;
            if op.error.is_none() {
                self.events.push(Event::Part { op: id, tag, range });
            }
            self.maybe_finish(id);
            return;
        }
        if n == 0 {
            let err = PoolError::ShortFile {
                path: op.name.clone(),
                offset: op.base + op.want_start as u64,
                end: op.base + op.need() as u64,
            };
            self.fail_chunk(id, c, err);
            return;
        }
        if ch.direct && ch.done % DIRECT_ALIGN != 0 {
            ch.direct = false;
        }
        if op.error.is_some() {
            // Another chunk failed: stop reading this one.
            self.end_chunk(id, c);
            return;
        }
        self.queue_chunk(id, c);
    }

    /// Queues (the rest of) chunk `c` of read `id`. A chunk that cannot be queued ends
    /// here: with the error when queuing failed, quietly when the read failed meanwhile
    /// (another chunk's completion, reaped while waiting for room in the rings).
    fn queue_chunk(&mut self, id: OpId, c: usize) {
        match self.push(id, c) {
            Ok(true) => {}
            Ok(false) => self.end_chunk(id, c),
            Err(e) => self.fail_chunk(id, c, e),
        }
    }

    /// Marks chunk `c` of `id` ended without its bytes (the read has failed already).
    fn end_chunk(&mut self, id: OpId, c: usize) {
        let op = self.ops[id].as_mut().expect("op");
        if !op.chunks[c].complete {
            op.chunks[c].complete = true;
            op.chunks_left -= 1;
        }
        self.maybe_finish(id);
    }

    /// Marks chunk `c` of `id` ended with `err`; the op fails once nothing is in flight.
    fn fail_chunk(&mut self, id: OpId, c: usize, err: PoolError) {
        let op = self.ops[id].as_mut().expect("op");
        if !op.chunks[c].complete {
            op.chunks[c].complete = true;
            op.chunks_left -= 1;
        }
        if op.error.is_none() {
            op.error = Some(err);
        }
        self.maybe_finish(id);
    }

    fn maybe_finish(&mut self, id: OpId) {
        let op = self.ops[id].as_ref().expect("op");
        if !op.finished && op.in_kernel == 0 && (op.chunks_left == 0 || op.error.is_some()) {
            self.finish_op(id);
        }
    }

    fn finish_op(&mut self, id: OpId) {
        let op = self.ops[id].as_mut().expect("op");
        if op.finished {
            return;
        }
        op.finished = true;
        let result = match op.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        };
        let tag = op.tag;
        self.events.push(Event::Done {
            op: id,
            tag,
            result,
        });
    }

    /// Queues the rest of chunk `c` of read `id`; submits first when the queue is
    /// full, and reaps when the kernel already has as many reads as the completion
    /// queue holds. Returns whether it queued the chunk: not when the read has failed
    /// (or ended) by then, since a failed read emits `Done` once none of its chunks is
    /// in the kernel, after which its buffer may be released: nothing of it may be
    /// queued after that.
    fn push(&mut self, id: OpId, c: usize) -> Result<bool> {
        loop {
            let ring = self.ring.as_mut().expect("push needs a ring");
            let cq_cap = ring.params().cq_entries() as usize;
            if self.in_kernel >= cq_cap {
                self.reap(true)?;
                continue;
            }
            let op = self.ops[id].as_mut().expect("push of an unknown read");
            if op.error.is_some() || op.finished {
                return Ok(false);
            }
            let ch = op.chunks[c];
            let pos = ch.start + ch.done;
            let len = (ch.end - pos) as u32;
            let fd = if ch.direct {
                op.direct_fd
            } else {
                op.buffered_fd
            };
            debug_assert!(pos < op.total && ch.end <= op.buf.capacity());
            // SAFETY: pos < total <= buf.capacity(), so the pointer is inside the buffer.
            let ptr = unsafe { op.buf.as_mut_ptr().add(pos) };
            let entry = opcode::Read::new(types::Fd(fd), ptr, len)
                .offset(op.base + pos as u64)
                .build()
                .user_data(((id as u64) << CHUNK_BITS) | c as u64);
            // SAFETY: the buffer is owned by ops[id], which is neither released nor
            // moved-from until every completion of it has been reaped (in_kernel counts
            // them; `release` asserts it, and a read has not finished, so its `Done`
            // has not been handed out, checked just above); the descriptors stay open
            // until the engine has drained (the pool drops its engine before its files).
            let pushed = unsafe { ring.submission().push(&entry) };
            match pushed {
                Ok(()) => {
                    op.in_kernel += 1;
                    self.in_kernel += 1;
                    self.unsubmitted += 1;
                    return Ok(true);
                }
                Err(_) => {
                    // Submission queue full: hand what is queued to the kernel.
                    let ring = self.ring.as_mut().expect("ring");
                    match ring.submit() {
                        Ok(_) => {}
                        Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => self.reap(true)?,
                        Err(source) => return Err(engine_err(source)),
                    }
                    self.sync_unsubmitted();
                }
            }
        }
    }

    /// Reads op `id` with pread, retrying short reads and EINTR.
    fn pread_all(&mut self, id: OpId) -> Result<()> {
        loop {
            let op = self.ops[id].as_mut().expect("pread of an unknown read");
            let done = op.chunks.first().map_or(0, |c| c.done);
            if done >= op.need() {
                return Ok(());
            }
            let direct = op.chunks[0].direct;
            let fd = if direct { op.direct_fd } else { op.buffered_fd };
            let want = op.total - done;
            let off = op.base + done as u64;
            let dst = &mut op.buf.as_mut_slice()[done..done + want];
            // SAFETY: dst is a valid writable slice of `want` bytes owned by the op.
            let r = unsafe { libc::pread(fd, dst.as_mut_ptr().cast(), want, off as i64) };
            // Failures as -errno, like io_uring completions.
            let r = if r < 0 {
                -(io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO) as isize)
            } else {
                r
            };
            let r = self.apply_fault(r);
            let op = self.ops[id].as_mut().expect("pread of an unknown read");
            let ch = &mut op.chunks[0];
            if r < 0 {
                let errno = (-r) as i32;
                match errno {
                    libc::EINTR | libc::EAGAIN => continue,
                    libc::EINVAL if ch.direct && ch.done % DIRECT_ALIGN != 0 => {
                        ch.direct = false;
                        continue;
                    }
                    _ => {
                        return Err(PoolError::Io {
                            path: op.name.clone(),
                            offset: off,
                            len: want as u64,
                            source: io::Error::from_raw_os_error(errno),
                        });
                    }
                }
            }
            if r == 0 {
                return Err(PoolError::ShortFile {
                    path: op.name.clone(),
                    offset: op.base + op.want_start as u64,
                    end: op.base + op.need() as u64,
                });
            }
            ch.done += r as usize;
            if ch.direct && ch.done % DIRECT_ALIGN != 0 {
                ch.direct = false;
            }
        }
    }

    fn get_buf(&mut self, len: usize) -> Result<ReadBuf> {
        match self.arena.as_mut().and_then(|a| a.alloc(len)) {
            Some(b) => Ok(ReadBuf::Arena(b)),
            None => Ok(ReadBuf::Heap(AlignedBuf::new(len)?)),
        }
    }

    /// Waits for every submitted read (used before dropping buffers). Returns whether
    /// none is left in the kernel (false when waiting itself failed).
    pub fn drain(&mut self) -> bool {
        while self.ring.is_some() && self.in_kernel > 0 {
            if self.unsubmitted > 0 {
                let _ = self.submit();
            }
            if self.reap(true).is_err() {
                break;
            }
        }
        self.in_kernel == 0
    }
}

impl Drop for IoEngine {
    fn drop(&mut self) {
        self.drain();
        if self.in_kernel > 0 {
            // The kernel may still write into these buffers: leak them (and the arena's
            // mapping) rather than free memory under a pending read.
            for op in self.ops.drain(..).flatten() {
                if op.in_kernel > 0 {
                    std::mem::forget(op.buf);
                }
            }
            std::mem::forget(self.arena.take());
        }
    }
}

fn engine_err(source: io::Error) -> PoolError {
    PoolError::Io {
        path: "io_uring".into(),
        offset: 0,
        len: 0,
        source,
    }
}

/// Creates a ring and probes the READ opcode.
fn setup_ring(depth: u32) -> std::result::Result<IoUring, String> {
    let ring = IoUring::new(depth).map_err(|e| format!("io_uring unavailable: {e}"))?;
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("io_uring probe failed: {e}"))?;
    if !probe.is_supported(opcode::Read::CODE) {
        return Err("io_uring lacks IORING_OP_READ (kernel older than 5.6)".into());
    }
    Ok(ring)
}
