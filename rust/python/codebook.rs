//! Glue for `crate::codebook`: the codebook file from and to Python.

use std::path::PathBuf;

use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{IntoPyArray, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use super::to_py;
use crate::codebook::{self, CodebookFile, Dtype, TensorView};
use crate::error::GsrqError;

fn parse_dtype(dtype: &str) -> PyResult<Dtype> {
    Dtype::from_name(dtype).ok_or_else(|| {
        to_py(GsrqError::InvalidValue(format!(
            "dtype must be \"float16\", \"bfloat16\" or \"float32\", got {dtype:?}"
        )))
    })
}

/// (name, shape, borrowed float32 array) of one tensor.
type Borrowed<'py> = (String, Vec<usize>, PyReadonlyArrayDyn<'py, f32>);

/// Borrowed float32 arrays of a `dict[str, ndarray]`, kept alive while views exist.
fn borrow_tensors<'py>(tensors: &Bound<'py, PyDict>) -> PyResult<Vec<Borrowed<'py>>> {
    let mut out = Vec::with_capacity(tensors.len());
    for (k, v) in tensors.iter() {
        let name: String = k.extract().map_err(|_| {
            to_py(GsrqError::Shape(format!(
                "tensor names must be str, got {k}"
            )))
        })?;
        let arr: PyReadonlyArrayDyn<'py, f32> = v.extract().map_err(|_| {
            to_py(GsrqError::Shape(format!(
                "tensor {name} must be a float32 numpy array"
            )))
        })?;
        if !arr.is_c_contiguous() {
            return Err(to_py(GsrqError::Shape(format!(
                "tensor {name} must be C-contiguous"
            ))));
        }
        let shape = arr.shape().to_vec();
        out.push((name, shape, arr));
    }
    Ok(out)
}

fn views<'a>(owned: &'a [Borrowed<'_>]) -> Vec<TensorView<'a>> {
    owned
        .iter()
        .map(|(name, shape, arr)| TensorView {
            name,
            shape,
            data: arr.as_slice().expect("checked C-contiguous"),
        })
        .collect()
}

fn to_python<'py>(py: Python<'py>, file: CodebookFile) -> PyResult<Bound<'py, PyTuple>> {
    let dict = PyDict::new(py);
    for (name, t) in file.tensors {
        let arr = ArrayD::from_shape_vec(IxDyn(&t.shape), t.data)
            .map_err(|e| to_py(GsrqError::Shape(format!("internal shape error: {e}"))))?;
        dict.set_item(name, arr.into_pyarray(py))?;
    }
    PyTuple::new(
        py,
        [
            file.meta_json.into_pyobject(py)?.into_any(),
            dict.into_any(),
            file.dtype.name().into_pyobject(py)?.into_any(),
        ],
    )
}

/// write_codebook_file(path, meta_json, tensors, dtype): validate and write atomically.
#[pyfunction]
#[pyo3(signature = (path, meta_json, tensors, dtype))]
fn write_codebook_file(
    py: Python<'_>,
    path: PathBuf,
    meta_json: &str,
    tensors: &Bound<'_, PyDict>,
    dtype: &str,
) -> PyResult<()> {
    let dtype = parse_dtype(dtype)?;
    let owned = borrow_tensors(tensors)?;
    let views = views(&owned);
    py.detach(|| codebook::write_file(&path, meta_json, &views, dtype))
        .map_err(to_py)
}

/// validate_codebook(meta_json, tensors, dtype): the checks of write_codebook_file, nothing written.
#[pyfunction]
#[pyo3(signature = (meta_json, tensors, dtype))]
fn validate_codebook(
    py: Python<'_>,
    meta_json: &str,
    tensors: &Bound<'_, PyDict>,
    dtype: &str,
) -> PyResult<()> {
    let dtype = parse_dtype(dtype)?;
    let owned = borrow_tensors(tensors)?;
    let views = views(&owned);
    py.detach(|| codebook::validate(meta_json, &views, dtype))
        .map_err(to_py)
}

/// read_codebook_file(path) -> (meta_json, {name: float32 array}, dtype).
#[pyfunction]
#[pyo3(signature = (path))]
fn read_codebook_file<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyTuple>> {
    let file = py.detach(|| codebook::read_file(&path)).map_err(to_py)?;
    to_python(py, file)
}

/// parse_codebook_bytes(data) -> (meta_json, {name: float32 array}, dtype).
#[pyfunction]
#[pyo3(signature = (data))]
fn parse_codebook_bytes<'py>(py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyTuple>> {
    let file = py.detach(|| codebook::parse_bytes(data)).map_err(to_py)?;
    to_python(py, file)
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("CODEBOOK_FORMAT_VERSION", codebook::FORMAT_VERSION)?;
    m.add_function(wrap_pyfunction!(write_codebook_file, m)?)?;
    m.add_function(wrap_pyfunction!(validate_codebook, m)?)?;
    m.add_function(wrap_pyfunction!(read_codebook_file, m)?)?;
    m.add_function(wrap_pyfunction!(parse_codebook_bytes, m)?)?;
    Ok(())
}
