//! gsrq: Gain-Shape Residual Quantization of LLM key/value caches.
//!
//! Pure algorithm modules (no PyO3): bit packing ([`pack`]), the codebook file
//! format ([`codebook`]), weighted k-means ([`kmeans`]), Gain-Shape K-means
//! ([`gskm`]) and residual quantization ([`rq`]). The Python glue lives in
//! `python/` behind the `python` feature.

pub mod codebook;
pub mod error;
pub mod gskm;
pub mod kmeans;
pub mod linalg;
pub mod pack;
pub mod rng;
pub mod rq;

#[cfg(feature = "python")]
mod python;

pub use error::{GsrqError, Result};
