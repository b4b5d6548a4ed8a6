//! PyO3 glue: converts numpy buffers and errors, nothing else. Each algorithm
//! module has one glue file here that registers its functions.

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;

use crate::error::GsrqError;

mod codebook;
mod engine;
mod pack;

/// Raise `gsrq.errors.<class_name>(msg)`. The exception tree is defined in
/// Python (so that classes can also derive from `ValueError`); should that
/// module be unavailable, fall back to a plain `ValueError`.
fn gsrq_exception(class_name: &str, msg: String) -> PyErr {
    Python::attach(|py| {
        match py
            .import("gsrq.errors")
            .and_then(|m| m.getattr(class_name))
        {
            Ok(cls) => match cls.call1((msg.clone(),)) {
                Ok(inst) => PyErr::from_value(inst),
                Err(e) => e,
            },
            Err(_) => PyValueError::new_err(msg),
        }
    })
}

/// Exhaustive mapping of the Rust error enum onto the Python exception tree.
pub(crate) fn to_py(err: GsrqError) -> PyErr {
    let msg = err.to_string();
    match err {
        GsrqError::InvalidBits { .. }
        | GsrqError::CodeOutOfRange { .. }
        | GsrqError::InvalidValue(_) => gsrq_exception("InvalidValueError", msg),
        GsrqError::BufferTooShort { .. } | GsrqError::Shape(_) => gsrq_exception("ShapeError", msg),
        GsrqError::CodebookFormat(_) => gsrq_exception("CodebookFormatError", msg),
        GsrqError::Io(e) => PyOSError::new_err(e.to_string()),
    }
}

#[pymodule]
#[pyo3(name = "_gsrq")]
fn gsrq_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    pack::register(m)?;
    codebook::register(m)?;
    engine::register(m)?;
    Ok(())
}
