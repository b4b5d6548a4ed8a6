//! The one error type of the crate. Every variant maps onto one Python
//! exception class of the `gsrq.GsrqError` tree (see `python/mod.rs`).

use std::fmt;

/// Every failure the crate reports.
#[derive(Debug)]
pub enum GsrqError {
    /// A bit width outside 1..=16. Python: `InvalidValueError`.
    InvalidBits { bits: u32 },
    /// A code that needs more than `bits` bits. Python: `InvalidValueError`.
    CodeOutOfRange { index: usize, value: i128, bits: u32 },
    /// A packed buffer shorter than the codes it must hold. Python: `ShapeError`.
    BufferTooShort { needed: usize, got: usize },
    /// Wrong shapes, sizes or dtypes; the message names the argument. Python: `ShapeError`.
    Shape(String),
    /// A value that is not allowed: NaN/inf, negative weights, k > n, an
    /// unknown option. Python: `InvalidValueError`.
    InvalidValue(String),
    /// A codebook file that is truncated, corrupt, of another version or
    /// inconsistent with its own metadata. Python: `CodebookFormatError`.
    CodebookFormat(String),
    /// An operating-system I/O failure. Python: `OSError`.
    Io(std::io::Error),
}

pub type Result<T> = std::result::Result<T, GsrqError>;

impl fmt::Display for GsrqError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GsrqError::InvalidBits { bits } => {
                write!(f, "bits must be in 1..=16, got {bits}")
            }
            GsrqError::CodeOutOfRange { index, value, bits } => write!(
                f,
                "code {value} at index {index} does not fit in {bits} bits (allowed 0..={})",
                (1u64 << bits) - 1
            ),
            GsrqError::BufferTooShort { needed, got } => write!(
                f,
                "packed buffer too short: need {needed} bytes, got {got}"
            ),
            GsrqError::Shape(m) => write!(f, "{m}"),
            GsrqError::InvalidValue(m) => write!(f, "{m}"),
            GsrqError::CodebookFormat(m) => write!(f, "invalid codebook file: {m}"),
            GsrqError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for GsrqError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            GsrqError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<std::io::Error> for GsrqError {
    fn from(e: std::io::Error) -> Self {
        GsrqError::Io(e)
    }
}
