//! Errors of the pool and the status codes they map to at the C ABI.

use std::io;

/// Status codes returned by every C entry point (`ep_status` in `expert_pool.h`).
///
/// Zero is success, positive values are non-error outcomes the engine acts on,
/// negative values are errors whose message is in `ep_last_error()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum Status {
    /// Success.
    Ok = 0,
    /// The request's distinct experts exceed the layer's slots; nothing was changed
    /// and the engine should use the original tensors for this request.
    DoesNotFit = 1,
    /// A prefetch could not be started (no slot free of in-use experts, or the
    /// in-flight limit was reached); it was counted as dropped. Not an error.
    Dropped = 2,
    /// An argument was invalid (NULL pointer, out-of-range id, bad descriptor).
    InvalidArgument = -1,
    /// Reading the model file failed (I/O error, short file).
    Io = -2,
    /// The model file was truncated, modified or replaced since it was registered.
    FileChanged = -3,
    /// Memory could not be allocated.
    NoMemory = -4,
    /// The call is not valid in the pool's current state (unknown or duplicate layer).
    State = -5,
    /// A pool function was called from inside a pool callback.
    Reentrant = -6,
    /// An internal error (a caught panic); the pool refuses further work.
    Internal = -7,
}

/// Everything that can go wrong inside the pool. The doc comment of each variant is
/// the meaning; the `Display` text is the message handed to C callers.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// A caller-supplied argument is invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The request needs more distinct experts than the layer has slots.
    #[error(
        "layer {layer}: request needs {needed} distinct experts but the layer has {slots} slots"
    )]
    DoesNotFit {
        /// Layer index.
        layer: i32,
        /// Distinct experts the request needs.
        needed: usize,
        /// Slots of the layer.
        slots: usize,
    },
    /// An I/O error while reading the model file.
    #[error("reading {path} at offset {offset} ({len} bytes): {source}")]
    Io {
        /// File path (or `fd N`).
        path: String,
        /// Absolute file offset of the read.
        offset: u64,
        /// Bytes wanted.
        len: u64,
        /// The OS error.
        source: io::Error,
    },
    /// The file ended before the expert's bytes did.
    #[error("{path}: file ends before offset {end} (truncated?); expert read at {offset} failed")]
    ShortFile {
        /// File path (or `fd N`).
        path: String,
        /// Start of the wanted bytes.
        offset: u64,
        /// End of the wanted bytes.
        end: u64,
    },
    /// The file changed under the pool.
    #[error("{path}: {what} since it was registered; refusing to serve its data")]
    FileChanged {
        /// File path (or `fd N`).
        path: String,
        /// What changed.
        what: String,
    },
    /// Opening or inspecting a file failed.
    #[error("{path}: {source}")]
    Open {
        /// File path.
        path: String,
        /// The OS error.
        source: io::Error,
    },
    /// An allocation failed.
    #[error("out of memory allocating {0} bytes")]
    NoMemory(usize),
    /// The call does not fit the pool's state.
    #[error("{0}")]
    State(String),
    /// A pool function was called from one of the pool's callbacks.
    #[error("pool function called from inside a pool callback (re-entrant call refused)")]
    Reentrant,
    /// A panic was caught; the pool is unusable.
    #[error("internal error: {0}")]
    Internal(String),
}

impl PoolError {
    /// The C status code for this error.
    pub fn status(&self) -> Status {
        match self {
            PoolError::InvalidArgument(_) => Status::InvalidArgument,
            PoolError::DoesNotFit { .. } => Status::DoesNotFit,
            PoolError::Io { .. } | PoolError::ShortFile { .. } | PoolError::Open { .. } => {
                Status::Io
            }
            PoolError::FileChanged { .. } => Status::FileChanged,
            PoolError::NoMemory(_) => Status::NoMemory,
            PoolError::State(_) => Status::State,
            PoolError::Reentrant => Status::Reentrant,
            PoolError::Internal(_) => Status::Internal,
        }
    }

    /// Shorthand for [`PoolError::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        PoolError::InvalidArgument(msg.into())
    }
}

/// Result type of the pool.
pub type Result<T> = std::result::Result<T, PoolError>;
