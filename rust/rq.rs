//! Residual quantization (RQ): `M` stages of `Kc` codewords of length `D`.
//!
//! Stage m is learned (GSKM or KM) on the residuals left by stages `< m`,
//! with the seed [`derive_seed`]`(seed, m)`. Encoding is greedy — the nearest
//! codeword (l2) of the current residual, ties to the lowest index — or a beam
//! search that keeps the `beam` best partial reconstructions by their full
//! residual error `‖x − x̂‖²` (ties to the earlier candidate, then the lower
//! code) and returns the best one at the end. Decoding sums the chosen
//! codewords in stage order. Codes are `u16`, so `Kc ≤ 65536`.

use rayon::prelude::*;

use crate::error::{GsrqError, Result};
use crate::gskm::{gskm, GskmOptions};
use crate::kmeans::{check_finite, kmeans, Init};
use crate::linalg::{Panels, BLOCK};
use crate::rng::derive_seed;

/// Which learner trains each stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Gskm,
    KMeans,
}

impl std::str::FromStr for Method {
    type Err = GsrqError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "gskm" => Ok(Method::Gskm),
            "km" => Ok(Method::KMeans),
            other => Err(GsrqError::InvalidValue(format!("method must be \"gskm\" or \"km\", got {other:?}"))),
        }
    }
}

/// Training options of [`rq_fit`].
#[derive(Clone, Debug)]
pub struct RqOptions {
    pub method: Method,
    pub seed: u64,
    /// Lloyd iterations (KM) or alternating iterations (GSKM).
    pub iters: usize,
    /// Spherical initialisation iterations (GSKM only).
    pub init_iters: usize,
    pub weights_in_init_only: bool,
    /// Seeding of KM stages and of GSKM's spherical k-means.
    pub init: Init,
}

impl Default for RqOptions {
    fn default() -> Self {
        RqOptions {
            method: Method::Gskm,
            seed: 0,
            iters: 10,
            init_iters: 20,
            weights_in_init_only: false,
            init: Init::KMeansPlusPlus,
        }
    }
}

/// Learn `stages` codebooks of `kc` codewords on `x` (`[n, d]`).
/// Returns `[stages, kc, d]` row-major.
pub fn rq_fit(
    x: &[f32],
    n: usize,
    d: usize,
    weights: Option<&[f32]>,
    kc: usize,
    stages: usize,
    opts: &RqOptions,
) -> Result<Vec<f32>> {
    if stages == 0 {
        return Err(GsrqError::InvalidValue("stages must be >= 1".into()));
    }
    if kc > 65536 {
        return Err(GsrqError::InvalidValue(format!("codebook_size = {kc} exceeds 65536 (codes are 16-bit)")));
    }
    crate::kmeans::validate(x, n, d, weights, kc)?;
    let mut r = x.to_vec();
    let mut out = Vec::with_capacity(stages * kc * d);
    for m in 0..stages {
        let seed = derive_seed(opts.seed, m as u64);
        let (cb, labels) = match opts.method {
            Method::KMeans => {
                let res = kmeans(&r, n, d, kc, weights, opts.iters, opts.init, seed, None)?;
                (res.centroids, res.labels)
            }
            Method::Gskm => {
                let go = GskmOptions {
                    init_iters: opts.init_iters,
                    iters: opts.iters,
                    seed,
                    weights_in_init_only: opts.weights_in_init_only,
                    init: opts.init,
                };
                let res = gskm(&r, n, d, kc, weights, &go, None)?;
                (res.codebook, res.labels)
            }
        };
        // The learners' labels are the nearest codeword of each residual: the
        // greedy encoding of this stage.
        if m + 1 < stages {
            r.par_chunks_mut(d).zip(labels.par_iter()).for_each(|(row, &l)| {
                for (v, &c) in row.iter_mut().zip(&cb[l as usize * d..(l as usize + 1) * d]) {
                    *v -= c;
                }
            });
        }
        out.extend_from_slice(&cb);
    }
    Ok(out)
}

fn check_codebooks(codebooks: &[f32], stages: usize, kc: usize, d: usize) -> Result<()> {
    if stages == 0 || kc == 0 || d == 0 {
        return Err(GsrqError::Shape(format!(
            "codebooks must have shape [stages, Kc, D] with all sizes >= 1, got [{stages}, {kc}, {d}]"
        )));
    }
    if kc > 65536 {
        return Err(GsrqError::InvalidValue(format!("Kc = {kc} exceeds 65536 (codes are 16-bit)")));
    }
    if codebooks.len() != stages * kc * d {
        return Err(GsrqError::Shape("codebooks length does not match [stages, Kc, D]".into()));
    }
    check_finite(codebooks, d, "codebooks")
}

/// Encode `x` (`[n, d]`) with `codebooks` (`[stages, kc, d]`). Returns
/// `[n, stages]` codes. `beam == 1` is the greedy encoder.
pub fn rq_encode(
    x: &[f32],
    n: usize,
    d: usize,
    codebooks: &[f32],
    stages: usize,
    kc: usize,
    beam: usize,
) -> Result<Vec<u16>> {
    check_codebooks(codebooks, stages, kc, d)?;
    if x.len() != n * d {
        return Err(GsrqError::Shape(format!("x has {} values, expected N*D = {}", x.len(), n * d)));
    }
    check_finite(x, d, "x")?;
    if beam == 0 {
        return Err(GsrqError::InvalidValue("beam must be >= 1".into()));
    }
    let mut codes = vec![0u16; n * stages];
    if n == 0 {
        return Ok(codes);
    }
    if beam == 1 {
        let panels: Vec<Panels> = (0..stages)
            .map(|m| Panels::new(&codebooks[m * kc * d..(m + 1) * kc * d], kc, d, None))
            .collect();
        codes
            .par_chunks_mut(BLOCK * stages)
            .zip(x.par_chunks(BLOCK * d))
            .for_each(|(cblk, xblk)| {
                let rows = xblk.len() / d;
                let mut r = xblk.to_vec();
                let mut labels = vec![0u32; rows];
                let mut dist = vec![0f32; rows];
                for (m, p) in panels.iter().enumerate() {
                    p.nearest(&r, &mut labels, &mut dist);
                    let cb = &codebooks[m * kc * d..(m + 1) * kc * d];
                    for i in 0..rows {
                        let l = labels[i] as usize;
                        cblk[i * stages + m] = l as u16;
                        if m + 1 < stages {
                            for (v, &c) in r[i * d..(i + 1) * d].iter_mut().zip(&cb[l * d..(l + 1) * d]) {
                                *v -= c;
                            }
                        }
                    }
                }
            });
    } else {
        codes
            .par_chunks_mut(stages)
            .zip(x.par_chunks(d))
            .for_each(|(out, row)| beam_one(row, codebooks, stages, kc, d, beam, out));
    }
    Ok(codes)
}

/// Beam search for one vector.
fn beam_one(x: &[f32], codebooks: &[f32], stages: usize, kc: usize, d: usize, beam: usize, out: &mut [u16]) {
    // Candidates: (error, residual, codes so far).
    let mut cands: Vec<(f32, Vec<f32>, Vec<u16>)> = vec![(0.0, x.to_vec(), Vec::with_capacity(stages))];
    let mut scored: Vec<(f32, usize, usize)> = Vec::with_capacity(beam * kc);
    for m in 0..stages {
        let cb = &codebooks[m * kc * d..(m + 1) * kc * d];
        scored.clear();
        for (b, (_, r, _)) in cands.iter().enumerate() {
            for kk in 0..kc {
                let c = &cb[kk * d..(kk + 1) * d];
                let mut e = 0f32;
                for (&a, &q) in r.iter().zip(c) {
                    let t = a - q;
                    e += t * t;
                }
                scored.push((e, b, kk));
            }
        }
        let cmp = |a: &(f32, usize, usize), b: &(f32, usize, usize)| {
            a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2))
        };
        let keep = beam.min(scored.len());
        if keep < scored.len() {
            scored.select_nth_unstable_by(keep, cmp);
            scored.truncate(keep);
        }
        scored.sort_by(cmp);
        cands = scored
            .iter()
            .map(|&(e, b, kk)| {
                let (_, r, codes) = &cands[b];
                let c = &cb[kk * d..(kk + 1) * d];
                let nr: Vec<f32> = r.iter().zip(c).map(|(&a, &q)| a - q).collect();
                let mut nc = codes.clone();
                nc.push(kk as u16);
                (e, nr, nc)
            })
            .collect();
    }
    out.copy_from_slice(&cands[0].2);
}

/// Reconstruct `[n, d]` from `codes` (`[n, stages]`).
pub fn rq_decode(codes: &[u16], n: usize, codebooks: &[f32], stages: usize, kc: usize, d: usize) -> Result<Vec<f32>> {
    check_codebooks(codebooks, stages, kc, d)?;
    if codes.len() != n * stages {
        return Err(GsrqError::Shape(format!(
            "codes has {} values, expected N*stages = {}",
            codes.len(),
            n * stages
        )));
    }
    if let Some(pos) = codes.iter().position(|&c| c as usize >= kc) {
        return Err(GsrqError::InvalidValue(format!(
            "code {} at row {}, stage {} is out of range for Kc = {kc}",
            codes[pos],
            pos / stages,
            pos % stages
        )));
    }
    let mut out = vec![0f32; n * d];
    out.par_chunks_mut(d).zip(codes.par_chunks(stages)).for_each(|(o, cs)| {
        for (m, &c) in cs.iter().enumerate() {
            let cw = &codebooks[(m * kc + c as usize) * d..(m * kc + c as usize + 1) * d];
            for (v, &q) in o.iter_mut().zip(cw) {
                *v += q;
            }
        }
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn exact_on_representable_data() {
        // Data = one codeword of stage 1 + one of stage 2 (well separated scales).
        let (d, kc, n) = (4, 4, 400);
        let mut r = SplitMix64::new(1);
        let c1: Vec<f32> = (0..kc * d).map(|_| (r.next_f64() as f32 - 0.5) * 100.0).collect();
        let c2: Vec<f32> = (0..kc * d).map(|_| (r.next_f64() as f32 - 0.5) * 1.0).collect();
        let mut x = vec![0f32; n * d];
        for i in 0..n {
            let (a, b) = (i % kc, (i / kc) % kc);
            for j in 0..d {
                x[i * d + j] = c1[a * d + j] + c2[b * d + j];
            }
        }
        for method in [Method::KMeans, Method::Gskm] {
            let opts = RqOptions { method, iters: 20, ..Default::default() };
            let cbs = rq_fit(&x, n, d, None, kc, 2, &opts).unwrap();
            let codes = rq_encode(&x, n, d, &cbs, 2, kc, 1).unwrap();
            let xh = rq_decode(&codes, n, &cbs, 2, kc, d).unwrap();
            let err: f32 = x.iter().zip(&xh).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(err < 1e-3, "{method:?}: max error {err}");
        }
    }

    #[test]
    fn beam_is_never_worse_than_greedy() {
        let (d, kc, n, m) = (6, 8, 200, 3);
        let mut r = SplitMix64::new(2);
        let x: Vec<f32> = (0..n * d).map(|_| r.next_f64() as f32 - 0.5).collect();
        let cbs: Vec<f32> = (0..m * kc * d).map(|_| r.next_f64() as f32 - 0.5).collect();
        let err = |codes: &[u16]| {
            let xh = rq_decode(codes, n, &cbs, m, kc, d).unwrap();
            x.iter().zip(&xh).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>()
        };
        let g = rq_encode(&x, n, d, &cbs, m, kc, 1).unwrap();
        let b1 = rq_encode(&x, n, d, &cbs, m, kc, 1).unwrap();
        let b4 = rq_encode(&x, n, d, &cbs, m, kc, 4).unwrap();
        assert_eq!(g, b1);
        assert!(err(&b4) <= err(&g) + 1e-9);
        assert!(err(&b4) < err(&g));
    }

    #[test]
    fn decode_rejects_out_of_range_codes() {
        let cbs = vec![0f32; 2 * 3 * 2];
        assert!(matches!(rq_decode(&[0, 3], 1, &cbs, 2, 3, 2), Err(GsrqError::InvalidValue(_))));
    }
}
