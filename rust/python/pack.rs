//! Glue for `crate::pack`: numpy arrays in and out, errors to `gsrq.errors`.

use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{Element, IntoPyArray, PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use super::{gsrq_exception, to_py};
use crate::error::GsrqError;
use crate::pack::{self, Code};

fn check_bits(bits: i64) -> PyResult<u32> {
    if (1..=pack::MAX_BITS as i64).contains(&bits) {
        Ok(bits as u32)
    } else {
        Err(gsrq_exception(
            "InvalidValueError",
            format!("bits must be in 1..=16, got {bits}"),
        ))
    }
}

fn check_count(count: i64) -> PyResult<usize> {
    usize::try_from(count).map_err(|_| {
        gsrq_exception(
            "InvalidValueError",
            format!("count must be >= 0, got {count}"),
        )
    })
}

/// `flat` as a numpy-style multi-index of `shape` ("5" for 1-D, "(1, 2)" else).
fn unravel(flat: usize, shape: &[usize]) -> String {
    if shape.len() <= 1 {
        return flat.to_string();
    }
    let mut idx = vec![0usize; shape.len()];
    let mut rest = flat;
    for (i, &d) in shape.iter().enumerate().rev() {
        if d > 0 {
            idx[i] = rest % d;
            rest /= d;
        }
    }
    let parts: Vec<String> = idx.iter().map(|x| x.to_string()).collect();
    format!("({})", parts.join(", "))
}

fn pack_typed<'py, T: Code + Element>(
    py: Python<'py>,
    codes: PyReadonlyArrayDyn<'py, T>,
    bits: u32,
) -> PyResult<Bound<'py, PyArrayDyn<u8>>> {
    let shape = codes.shape().to_vec();
    let Some((&n, lead)) = shape.split_last() else {
        return Err(to_py(GsrqError::Shape(
            "codes must have at least one dimension, got a 0-d array".into(),
        )));
    };
    let rows: usize = lead.iter().product();
    let slice = codes
        .as_slice()
        .map_err(|_| to_py(GsrqError::Shape("codes must be C-contiguous".into())))?;
    let packed = py.detach(|| pack::pack_rows(slice, rows, n, bits));
    let packed = match packed {
        Ok(p) => p,
        Err(GsrqError::CodeOutOfRange { index, value, bits }) => {
            return Err(gsrq_exception(
                "InvalidValueError",
                format!(
                    "code {value} at index {} does not fit in {bits} bits (allowed 0..={})",
                    unravel(index, &shape),
                    (1u32 << bits) - 1
                ),
            ))
        }
        Err(e) => return Err(to_py(e)),
    };
    let mut out_shape = shape;
    *out_shape.last_mut().expect("ndim >= 1") = pack::packed_len(n, bits).map_err(to_py)?;
    let arr = ArrayD::from_shape_vec(IxDyn(&out_shape), packed)
        .map_err(|e| to_py(GsrqError::Shape(format!("internal shape error: {e}"))))?;
    Ok(arr.into_pyarray(py))
}

/// pack_codes(codes, bits) -> uint8 array; see `gsrq.pack.pack_codes`.
#[pyfunction]
#[pyo3(signature = (codes, bits))]
fn pack_codes<'py>(
    py: Python<'py>,
    codes: &Bound<'py, PyAny>,
    bits: i64,
) -> PyResult<Bound<'py, PyArrayDyn<u8>>> {
    let bits = check_bits(bits)?;
    macro_rules! try_types {
        ($($t:ty),*) => {
            $(if let Ok(a) = codes.extract::<PyReadonlyArrayDyn<'py, $t>>() {
                return pack_typed::<$t>(py, a, bits);
            })*
        };
    }
    try_types!(u8, u16, u32, u64, i8, i16, i32, i64);
    let what = codes
        .getattr("dtype")
        .map(|d| d.to_string())
        .unwrap_or_else(|_| codes.get_type().to_string());
    Err(to_py(GsrqError::Shape(format!(
        "codes must be a numpy array of a native-endian integer dtype, got {what}"
    ))))
}

/// unpack_codes(packed, bits, count) -> uint16 array; see `gsrq.pack.unpack_codes`.
#[pyfunction]
#[pyo3(signature = (packed, bits, count))]
fn unpack_codes<'py>(
    py: Python<'py>,
    packed: PyReadonlyArrayDyn<'py, u8>,
    bits: i64,
    count: i64,
) -> PyResult<Bound<'py, PyArrayDyn<u16>>> {
    let bits = check_bits(bits)?;
    let count = check_count(count)?;
    let shape = packed.shape().to_vec();
    let Some((&stride, lead)) = shape.split_last() else {
        return Err(to_py(GsrqError::Shape(
            "packed must have at least one dimension, got a 0-d array".into(),
        )));
    };
    let rows: usize = lead.iter().product();
    let slice = packed
        .as_slice()
        .map_err(|_| to_py(GsrqError::Shape("packed must be C-contiguous".into())))?;
    let codes = py
        .detach(|| pack::unpack_rows(slice, rows, stride, bits, count))
        .map_err(to_py)?;
    let mut out_shape = shape;
    *out_shape.last_mut().expect("ndim >= 1") = count;
    let arr = ArrayD::from_shape_vec(IxDyn(&out_shape), codes)
        .map_err(|e| to_py(GsrqError::Shape(format!("internal shape error: {e}"))))?;
    Ok(arr.into_pyarray(py))
}

/// packed_size(count, bits) -> int: ceil(count*bits/8).
#[pyfunction]
#[pyo3(signature = (count, bits))]
fn packed_size(count: i64, bits: i64) -> PyResult<usize> {
    let bits = check_bits(bits)?;
    let count = check_count(count)?;
    pack::packed_len(count, bits).map_err(to_py)
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(pack_codes, m)?)?;
    m.add_function(wrap_pyfunction!(unpack_codes, m)?)?;
    m.add_function(wrap_pyfunction!(packed_size, m)?)?;
    Ok(())
}
