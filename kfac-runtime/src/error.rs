//! Errors of the runtime: every fallible call returns one, and leaves the
//! preconditioner's state exactly as it was before the call.

use core::fmt;

/// Result alias of the runtime.
pub type Result<T> = core::result::Result<T, Error>;

/// What went wrong, with enough detail to fix the call.
///
/// ```
/// use kfac_runtime::Error;
/// let e = Error::UnknownLayer { id: 7, registered: 2 };
/// assert!(e.to_string().contains("7"));
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// A kernel refused its arguments (shapes, NaN/Inf, not PD, ...).
    Kernel {
        /// Layer the kernel ran for, if any.
        layer: Option<String>,
        /// The kernel's error.
        source: kfac_kernels::Error,
    },
    /// A configuration value is out of range.
    InvalidConfig {
        /// The field.
        field: &'static str,
        /// Why, in words.
        reason: String,
    },
    /// A layer id that was never registered.
    UnknownLayer {
        /// The id passed.
        id: usize,
        /// Number of registered layers.
        registered: usize,
    },
    /// A layer name registered twice.
    DuplicateLayer {
        /// The name.
        name: String,
    },
    /// A layer description is inconsistent (zero sizes, bad geometry).
    InvalidLayer {
        /// The layer's name.
        name: String,
        /// Why, in words.
        reason: String,
    },
    /// An observation or gradient does not fit the layer.
    Mismatch {
        /// The layer's name.
        layer: String,
        /// What does not fit, in words, with sizes.
        reason: String,
    },
    /// `step` was called while a preconditioned layer had no observation for
    /// a factor update that is due.
    MissingObservation {
        /// The layer's name.
        layer: String,
    },
    /// `step` was called without a gradient for a preconditioned layer.
    MissingGradient {
        /// The layer's name.
        layer: String,
    },
    /// Layers cannot be registered after the first step.
    LayersFrozen,
    /// A checkpoint was refused.
    Checkpoint {
        /// Why, in words (truncated, checksum, version, ...).
        reason: String,
    },
    /// A collective failed (dead or stuck peer, timeout, ...).
    Comm(crate::comm::CommError),
    /// Ranks disagree (configuration or layer list digest), or another rank
    /// failed its part of a step.
    Distributed {
        /// What differs or failed, naming the rank.
        reason: String,
    },
    /// The thread pool could not be built.
    ThreadPool {
        /// rayon's message.
        reason: String,
    },
    /// An input, or a value computed from it (a factor, a preconditioned
    /// gradient), holds NaN or Inf.
    NonFinite {
        /// The layer's name.
        layer: String,
        /// What is not finite, in words, with the position.
        what: String,
    },
    /// An input is finite but so large that a value computed from it (a
    /// factor statistic) would overflow f32; nothing was changed.
    Overflow {
        /// The layer's name.
        layer: String,
        /// What would overflow, with the bound and the limit.
        what: String,
    },
    /// The factor update or the inversion of a step failed (a factor that
    /// is not finite, an inversion that failed, on this rank or, as
    /// [`Error::RankFailed`], on another): the statistics observed since the
    /// last step were discarded, and the previous factors and
    /// decompositions stay in use, so the next step with good observations
    /// can succeed. The gradients are unchanged. Not used for running out
    /// of memory, which keeps the statistics.
    StatisticsDiscarded {
        /// The failure.
        cause: Box<Error>,
    },
    /// Memory for the state, a decomposition, a step buffer (exchange
    /// buffers of a distributed step included) or kernel scratch could not
    /// be allocated; nothing was changed (a step keeps its statistics: it
    /// can be retried as it was).
    OutOfMemory {
        /// What was being allocated (with the layer's name where there is
        /// one).
        what: String,
        /// Bytes requested.
        bytes: usize,
    },
    /// The allocation would exceed the preconditioner's memory budget
    /// ([`Config::memory_budget`](crate::Config::memory_budget)); nothing
    /// was changed.
    MemoryBudget {
        /// What needs the memory (with the layer's name).
        what: String,
        /// Bytes it needs.
        needed: usize,
        /// Bytes already charged to the budget.
        in_use: usize,
        /// The budget.
        budget: usize,
    },
    /// Another rank failed its part of a distributed step after
    /// communication had begun; every rank returns this (the failing rank
    /// returns its own error) and the group is aborted.
    RankFailed {
        /// The first rank (lowest number) that failed.
        rank: usize,
        /// The kind of that rank's error.
        kind: ErrorKind,
        /// That rank's error message.
        cause: String,
    },
}

/// The class of an [`Error`], for callers that map errors to codes (the C
/// ABI's status) or decide how to react: a stable, exhaustive-by-design
/// summary that never depends on message text.
///
/// ```
/// use kfac_runtime::{Error, ErrorKind};
/// assert_eq!(Error::LayersFrozen.kind(), ErrorKind::State);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A value out of range: configuration, layer description, kernel
    /// parameter, duplicate name.
    InvalidArgument,
    /// Sizes, strides or geometry that do not fit the layer.
    Shape,
    /// NaN or Inf in an input or in a result computed from it.
    NonFinite,
    /// A layer id that was never registered.
    UnknownLayer,
    /// Calls out of order: a missing observation or gradient, registration
    /// after the first step.
    State,
    /// A numerical failure: a factor that is not positive definite after
    /// damping, an eigensolver that did not converge.
    Numerical,
    /// A collective failed (dead or stuck peer, timeout), or ranks disagree.
    Comm,
    /// Another rank failed its part of a step (see [`Error::RankFailed`]).
    PeerFailed,
    /// A checkpoint was refused.
    Checkpoint,
    /// A resource other than memory could not be had (the thread pool).
    Resource,
    /// Memory could not be allocated, or the memory budget would be
    /// exceeded.
    OutOfMemory,
}

impl ErrorKind {
    /// A stable lower-case name (`"non_finite"`, ...), for logs and the wire.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::Shape => "shape",
            ErrorKind::NonFinite => "non_finite",
            ErrorKind::UnknownLayer => "unknown_layer",
            ErrorKind::State => "state",
            ErrorKind::Numerical => "numerical",
            ErrorKind::Comm => "comm",
            ErrorKind::PeerFailed => "peer_failed",
            ErrorKind::Checkpoint => "checkpoint",
            ErrorKind::Resource => "resource",
            ErrorKind::OutOfMemory => "out_of_memory",
        }
    }

    /// The code used on the wire between ranks (stable across versions).
    pub(crate) fn code(self) -> u8 {
        self as u8 + 1
    }

    /// Inverse of [`code`](Self::code); an unknown code reads as `Comm`.
    pub(crate) fn from_code(c: u8) -> ErrorKind {
        const ALL: [ErrorKind; 11] = [
            ErrorKind::InvalidArgument,
            ErrorKind::Shape,
            ErrorKind::NonFinite,
            ErrorKind::UnknownLayer,
            ErrorKind::State,
            ErrorKind::Numerical,
            ErrorKind::Comm,
            ErrorKind::PeerFailed,
            ErrorKind::Checkpoint,
            ErrorKind::Resource,
            ErrorKind::OutOfMemory,
        ];
        ALL.get((c as usize).wrapping_sub(1))
            .copied()
            .unwrap_or(ErrorKind::Comm)
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Error {
    /// The class of this error (see [`ErrorKind`]).
    pub fn kind(&self) -> ErrorKind {
        use kfac_kernels::Error as K;
        match self {
            Error::Kernel { source, .. } => match source {
                K::NonFinite { .. } => ErrorKind::NonFinite,
                K::NotPositiveDefinite { .. } | K::EigenNoConvergence { .. } => {
                    ErrorKind::Numerical
                }
                K::DimensionMismatch { .. }
                | K::LengthMismatch { .. }
                | K::InvalidGeometry { .. } => ErrorKind::Shape,
                _ => ErrorKind::InvalidArgument,
            },
            Error::InvalidConfig { .. }
            | Error::DuplicateLayer { .. }
            | Error::InvalidLayer { .. } => ErrorKind::InvalidArgument,
            Error::UnknownLayer { .. } => ErrorKind::UnknownLayer,
            Error::Mismatch { .. } => ErrorKind::Shape,
            Error::MissingObservation { .. }
            | Error::MissingGradient { .. }
            | Error::LayersFrozen => ErrorKind::State,
            Error::Checkpoint { .. } => ErrorKind::Checkpoint,
            Error::Comm(_) | Error::Distributed { .. } => ErrorKind::Comm,
            Error::ThreadPool { .. } => ErrorKind::Resource,
            Error::OutOfMemory { .. } | Error::MemoryBudget { .. } => ErrorKind::OutOfMemory,
            Error::NonFinite { .. } | Error::Overflow { .. } => ErrorKind::NonFinite,
            Error::RankFailed { .. } => ErrorKind::PeerFailed,
            Error::StatisticsDiscarded { cause } => cause.kind(),
        }
    }

    pub(crate) fn non_finite(layer: &str, what: String) -> Error {
        Error::NonFinite {
            layer: layer.to_string(),
            what,
        }
    }

    pub(crate) fn kernel(layer: &str) -> impl FnOnce(kfac_kernels::Error) -> Error + '_ {
        move |source| Error::Kernel {
            layer: Some(layer.to_string()),
            source,
        }
    }
    pub(crate) fn mismatch(layer: &str, reason: String) -> Error {
        Error::Mismatch {
            layer: layer.to_string(),
            reason,
        }
    }
    pub(crate) fn checkpoint(reason: impl Into<String>) -> Error {
        Error::Checkpoint {
            reason: reason.into(),
        }
    }
}

impl From<kfac_kernels::Error> for Error {
    fn from(source: kfac_kernels::Error) -> Self {
        Error::Kernel {
            layer: None,
            source,
        }
    }
}

impl From<crate::comm::CommError> for Error {
    fn from(e: crate::comm::CommError) -> Self {
        Error::Comm(e)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Kernel {
                layer: Some(l),
                source,
            } => write!(f, "layer '{l}': {source}"),
            Error::Kernel { layer: None, source } => write!(f, "{source}"),
            Error::InvalidConfig { field, reason } => write!(f, "config.{field}: {reason}"),
            Error::UnknownLayer { id, registered } => {
                write!(f, "unknown layer id {id} ({registered} layers registered)")
            }
            Error::DuplicateLayer { name } => write!(f, "layer '{name}' is already registered"),
            Error::InvalidLayer { name, reason } => write!(f, "layer '{name}': {reason}"),
            Error::Mismatch { layer, reason } => write!(f, "layer '{layer}': {reason}"),
            Error::MissingObservation { layer } => write!(
                f,
                "layer '{layer}': a factor update is due but nothing was observed since the last step"
            ),
            Error::MissingGradient { layer } => write!(f, "layer '{layer}': no gradient passed to step"),
            Error::LayersFrozen => write!(f, "layers cannot be registered after the first step"),
            Error::Checkpoint { reason } => write!(f, "checkpoint refused: {reason}"),
            Error::ThreadPool { reason } => write!(f, "thread pool: {reason}"),
            Error::Comm(e) => write!(f, "communication: {e}"),
            Error::Distributed { reason } => write!(f, "distributed step: {reason}"),
            Error::OutOfMemory { what, bytes } => {
                write!(f, "out of memory: {what} needs {bytes} bytes")
            }
            Error::MemoryBudget {
                what,
                needed,
                in_use,
                budget,
            } => write!(
                f,
                "memory budget exceeded: {what} needs {needed} bytes, \
                 {in_use} of the budget of {budget} bytes are in use"
            ),
            Error::NonFinite { layer, what } => write!(f, "layer '{layer}': {what} is not finite (NaN/Inf)"),
            Error::RankFailed { rank, kind, cause } => {
                write!(f, "rank {rank} failed its part of the step ({kind}): {cause}")
            }
            Error::Overflow { layer, what } => write!(f, "layer '{layer}': {what} would overflow f32"),
            Error::StatisticsDiscarded { cause } => write!(
                f,
                "{cause}; the statistics observed since the last step were discarded, \
                 the previous factors and decompositions stay in use"
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Kernel { source, .. } => Some(source),
            Error::Comm(e) => Some(e),
            Error::StatisticsDiscarded { cause } => Some(&**cause),
            _ => None,
        }
    }
}
