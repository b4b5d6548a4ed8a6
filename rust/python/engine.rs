//! Glue of the codebook engine (`kmeans`, `gskm`, `rq`): numpy in, numpy out,
//! the GIL released around the work, errors through `super::to_py`.

use numpy::ndarray::{Array1, Array2, Array3};
use numpy::{IntoPyArray, PyUntypedArrayMethods, PyArray1, PyArray2, PyArray3, PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArray3};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use super::to_py;
use crate::error::GsrqError;
use crate::gskm::{gskm as gskm_rs, GskmOptions};
use crate::kmeans::{kmeans as kmeans_rs, Init};
use crate::linalg::with_threads;
use crate::rq::{rq_decode as rq_decode_rs, rq_encode as rq_encode_rs, rq_fit as rq_fit_rs, Method, RqOptions};

fn contiguous<'a, T: numpy::Element, D: numpy::ndarray::Dimension>(
    a: &'a numpy::PyReadonlyArray<'_, T, D>,
    what: &str,
) -> PyResult<&'a [T]> {
    a.as_slice()
        .map_err(|_| to_py(GsrqError::Shape(format!("{what} must be a C-contiguous array"))))
}

fn weights_vec(weights: Option<&PyReadonlyArray1<'_, f32>>) -> PyResult<Option<Vec<f32>>> {
    match weights {
        None => Ok(None),
        Some(w) => Ok(Some(contiguous(w, "weights")?.to_vec())),
    }
}

fn threads_opt(threads: Option<i64>) -> PyResult<Option<usize>> {
    match threads {
        None => Ok(None),
        Some(t) if t >= 1 => Ok(Some(t as usize)),
        Some(t) => Err(to_py(GsrqError::InvalidValue(format!("threads must be >= 1 or None, got {t}")))),
    }
}

fn labels_i64(labels: Vec<u32>) -> Vec<i64> {
    labels.into_iter().map(i64::from).collect()
}

/// `init_centroids` as an owned `k * D` vector, checked to be `[k, D]`.
fn init_centroids_vec(c: Option<&PyReadonlyArray2<'_, f32>>, k: usize, d: usize) -> PyResult<Option<Vec<f32>>> {
    let Some(c) = c else { return Ok(None) };
    if c.shape() != [k, d] {
        return Err(to_py(GsrqError::Shape(format!(
            "init_centroids must have shape [{k}, {d}], got {:?}",
            c.shape()
        ))));
    }
    Ok(Some(contiguous(c, "init_centroids")?.to_vec()))
}

/// `(centroids f32[k, D], labels i64[N])`, plus the objective history when asked.
fn clustering_tuple<'py>(
    py: Python<'py>,
    k: usize,
    d: usize,
    centroids: Vec<f32>,
    labels: Vec<u32>,
    history: Vec<f64>,
    return_history: bool,
) -> PyResult<Bound<'py, PyTuple>> {
    let c = Array2::from_shape_vec((k, d), centroids).expect("k*d").into_pyarray(py);
    let l = Array1::from_vec(labels_i64(labels)).into_pyarray(py);
    if return_history {
        PyTuple::new(py, [c.into_any(), l.into_any(), PyArray1::from_vec(py, history).into_any()])
    } else {
        PyTuple::new(py, [c.into_any(), l.into_any()])
    }
}

/// Returns `(centroids f32[k, D], labels i64[N])`, plus the objective
/// history `f64[iters + 1]` when `return_history`.
#[pyfunction]
#[pyo3(signature = (x, k, weights=None, iters=20, init="kmeans++", seed=0, threads=None, init_centroids=None, return_history=false))]
#[allow(clippy::too_many_arguments)]
fn kmeans<'py>(
    py: Python<'py>,
    x: PyReadonlyArray2<'py, f32>,
    k: usize,
    weights: Option<PyReadonlyArray1<'py, f32>>,
    iters: usize,
    init: &str,
    seed: u64,
    threads: Option<i64>,
    init_centroids: Option<PyReadonlyArray2<'py, f32>>,
    return_history: bool,
) -> PyResult<Bound<'py, PyTuple>> {
    let init: Init = init.parse().map_err(to_py)?;
    let (n, d) = (x.shape()[0], x.shape()[1]);
    let xs = contiguous(&x, "x")?.to_vec();
    let w = weights_vec(weights.as_ref())?;
    let c0 = init_centroids_vec(init_centroids.as_ref(), k, d)?;
    let threads = threads_opt(threads)?;
    let res = py
        .detach(|| {
            with_threads(threads, || kmeans_rs(&xs, n, d, k, w.as_deref(), iters, init, seed, c0.as_deref()))
        })
        .and_then(|r| r)
        .map_err(to_py)?;
    clustering_tuple(py, k, d, res.centroids, res.labels, res.history, return_history)
}

/// Returns `(codebook f32[k, D], labels i64[N])`, plus the objective history
/// `f64[iters + 1]` when `return_history`.
#[pyfunction]
#[pyo3(signature = (x, k, weights=None, init_iters=20, iters=10, seed=0, threads=None, weights_in_init_only=false, init_centroids=None, return_history=false, init="kmeans++"))]
#[allow(clippy::too_many_arguments)]
fn gskm<'py>(
    py: Python<'py>,
    x: PyReadonlyArray2<'py, f32>,
    k: usize,
    weights: Option<PyReadonlyArray1<'py, f32>>,
    init_iters: usize,
    iters: usize,
    seed: u64,
    threads: Option<i64>,
    weights_in_init_only: bool,
    init_centroids: Option<PyReadonlyArray2<'py, f32>>,
    return_history: bool,
    init: &str,
) -> PyResult<Bound<'py, PyTuple>> {
    let init: Init = init.parse().map_err(to_py)?;
    let (n, d) = (x.shape()[0], x.shape()[1]);
    let xs = contiguous(&x, "x")?.to_vec();
    let w = weights_vec(weights.as_ref())?;
    let c0 = init_centroids_vec(init_centroids.as_ref(), k, d)?;
    let threads = threads_opt(threads)?;
    let opts = GskmOptions { init_iters, iters, seed, weights_in_init_only, init };
    let res = py
        .detach(|| with_threads(threads, || gskm_rs(&xs, n, d, k, w.as_deref(), &opts, c0.as_deref())))
        .and_then(|r| r)
        .map_err(to_py)?;
    clustering_tuple(py, k, d, res.codebook, res.labels, res.history, return_history)
}

/// Returns the codebooks `f32[stages, codebook_size, D]`.
#[pyfunction]
#[pyo3(signature = (x, weights, codebook_size, stages, method="gskm", seed=0, iters=10, init_iters=20, weights_in_init_only=false, threads=None, init="kmeans++"))]
#[allow(clippy::too_many_arguments)]
fn rq_fit<'py>(
    py: Python<'py>,
    x: PyReadonlyArray2<'py, f32>,
    weights: Option<PyReadonlyArray1<'py, f32>>,
    codebook_size: usize,
    stages: usize,
    method: &str,
    seed: u64,
    iters: usize,
    init_iters: usize,
    weights_in_init_only: bool,
    threads: Option<i64>,
    init: &str,
) -> PyResult<Bound<'py, PyArray3<f32>>> {
    let method: Method = method.parse().map_err(to_py)?;
    let init: Init = init.parse().map_err(to_py)?;
    let (n, d) = (x.shape()[0], x.shape()[1]);
    let xs = contiguous(&x, "x")?.to_vec();
    let w = weights_vec(weights.as_ref())?;
    let threads = threads_opt(threads)?;
    let opts = RqOptions { method, seed, iters, init_iters, weights_in_init_only, init };
    let cbs = py
        .detach(|| with_threads(threads, || rq_fit_rs(&xs, n, d, w.as_deref(), codebook_size, stages, &opts)))
        .and_then(|r| r)
        .map_err(to_py)?;
    Ok(Array3::from_shape_vec((stages, codebook_size, d), cbs).expect("M*Kc*D").into_pyarray(py))
}

/// Returns the codes `u16[N, stages]`.
#[pyfunction]
#[pyo3(signature = (x, codebooks, beam=1, threads=None))]
fn rq_encode<'py>(
    py: Python<'py>,
    x: PyReadonlyArray2<'py, f32>,
    codebooks: PyReadonlyArray3<'py, f32>,
    beam: usize,
    threads: Option<i64>,
) -> PyResult<Bound<'py, PyArray2<u16>>> {
    let (n, d) = (x.shape()[0], x.shape()[1]);
    let cs = codebooks.shape();
    let (m, kc, cd) = (cs[0], cs[1], cs[2]);
    if cd != d {
        return Err(to_py(GsrqError::Shape(format!(
            "x has D = {d} columns but the codebooks have D = {cd}"
        ))));
    }
    let xs = contiguous(&x, "x")?.to_vec();
    let cb = contiguous(&codebooks, "codebooks")?.to_vec();
    let threads = threads_opt(threads)?;
    let codes = py
        .detach(|| with_threads(threads, || rq_encode_rs(&xs, n, d, &cb, m, kc, beam)))
        .and_then(|r| r)
        .map_err(to_py)?;
    Ok(Array2::from_shape_vec((n, m), codes).expect("N*M").into_pyarray(py))
}

/// Returns the reconstruction `f32[N, D]`.
#[pyfunction]
#[pyo3(signature = (codes, codebooks, threads=None))]
fn rq_decode<'py>(
    py: Python<'py>,
    codes: PyReadonlyArray2<'py, u16>,
    codebooks: PyReadonlyArray3<'py, f32>,
    threads: Option<i64>,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let (n, cm) = (codes.shape()[0], codes.shape()[1]);
    let cs = codebooks.shape();
    let (m, kc, d) = (cs[0], cs[1], cs[2]);
    if cm != m {
        return Err(to_py(GsrqError::Shape(format!(
            "codes have {cm} stages but the codebooks have {m}"
        ))));
    }
    let c = contiguous(&codes, "codes")?.to_vec();
    let cb = contiguous(&codebooks, "codebooks")?.to_vec();
    let threads = threads_opt(threads)?;
    let out = py
        .detach(|| with_threads(threads, || rq_decode_rs(&c, n, &cb, m, kc, d)))
        .and_then(|r| r)
        .map_err(to_py)?;
    Ok(Array2::from_shape_vec((n, d), out).expect("N*D").into_pyarray(py))
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(kmeans, m)?)?;
    m.add_function(wrap_pyfunction!(gskm, m)?)?;
    m.add_function(wrap_pyfunction!(rq_fit, m)?)?;
    m.add_function(wrap_pyfunction!(rq_encode, m)?)?;
    m.add_function(wrap_pyfunction!(rq_decode, m)?)?;
    Ok(())
}
