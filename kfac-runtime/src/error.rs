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
}

impl Error {
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
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Kernel { source, .. } => Some(source),
            Error::Comm(e) => Some(e),
            _ => None,
        }
    }
}
