//! Gain-Shape K-means (GSKM), the codebook learner of GSRQ (DESIGN.md §1).
//!
//! A codeword is `g_k · s_k`: a unit shape `s_k` and a gain `g_k ≥ 1e-4`.
//!
//! 1. Spherical initialisation: weighted Lloyd k-means ([`crate::kmeans`],
//!    k-means++ or random seeding, empty-cluster rule and determinism) for `init_iters`
//!    iterations on the unit-normalised samples `u_i = x_i / ‖x_i‖`
//!    (a zero sample stays zero: it still counts in the weights and pulls its
//!    centroid towards the origin, but has no direction). Shapes are the
//!    normalised centroids. The members of cluster k are the samples whose
//!    nearest final spherical centroid is k; its gain is the weighted mean of
//!    their `‖x_i‖` (a cluster without member weight gets the weighted mean
//!    norm of all samples).
//! 2. `iters` alternating steps, each:
//!    * gains rounded to bfloat16 (round to nearest even), clamped ≥ 1e-4;
//!    * assignment `argmax_k 2 g_k ⟨x, s_k⟩ − g_k²` (ties to the lowest k);
//!    * new shape = normalise(Σ w_i x_i over members); a cluster without
//!      member weight, or whose member sum is exactly zero, keeps its shape;
//!    * new gain = Σ w_i ⟨x_i, s_k^old⟩ / Σ w_i over members (the projection
//!      on the shape used to assign, computed as ⟨Σ w_i x_i, s_k^old⟩ in
//!      f64), clamped ≥ 1e-4; a cluster without member weight keeps its gain.
//! 3. Codebook `c_k = g_k · s_k` with the last gains (not rounded); labels are
//!    the l2-nearest codeword of each sample.
//!
//! With `weights_in_init_only` the weights enter step 1 only and every sample
//! counts once in step 2 (the authors' reference variant).

use crate::error::Result;
use crate::kmeans::{assign_pass, lloyd, start_centroids, validate, Data, Init, Workspace};
use crate::linalg::{row_norms_sq, Panels, BLOCK};

/// Smallest gain.
pub const MIN_GAIN: f32 = 1e-4;

/// Options of [`gskm`].
#[derive(Clone, Debug)]
pub struct GskmOptions {
    pub init_iters: usize,
    pub iters: usize,
    pub seed: u64,
    pub weights_in_init_only: bool,
    /// Seeding of the spherical k-means (k-means++ by default).
    pub init: Init,
}

impl Default for GskmOptions {
    fn default() -> Self {
        GskmOptions { init_iters: 20, iters: 10, seed: 0, weights_in_init_only: false, init: Init::KMeansPlusPlus }
    }
}

/// What [`gskm`] returns.
#[derive(Clone, Debug)]
pub struct GainShape {
    /// `[k, d]` codewords `g_k · s_k`.
    pub codebook: Vec<f32>,
    /// `[k]` gains.
    pub gains: Vec<f32>,
    /// `[k, d]` unit shapes.
    pub shapes: Vec<f32>,
    /// `[n]` nearest codeword of each sample.
    pub labels: Vec<u32>,
    /// Weighted SSE of each alternating assignment, then of the final labels
    /// against the returned codebook (`iters + 1` values).
    pub history: Vec<f64>,
}

/// bfloat16 rounding (nearest even) of a gain.
#[inline]
pub fn round_bf16(g: f32) -> f32 {
    half::bf16::from_f32(g).to_f32()
}

/// Rows of `x` scaled to unit l2 norm (f64 norm); zero rows stay zero.
/// Returns the unit rows and the norms.
pub fn unit_rows(x: &[f32], d: usize) -> (Vec<f32>, Vec<f32>) {
    use rayon::prelude::*;
    let n = x.len() / d.max(1);
    let mut u = vec![0f32; x.len()];
    let mut norms = vec![0f32; n];
    u.par_chunks_mut(BLOCK * d)
        .zip(norms.par_chunks_mut(BLOCK))
        .zip(x.par_chunks(BLOCK * d))
        .for_each(|((ub, nb), xb)| {
            for ((ur, nv), row) in ub.chunks_exact_mut(d).zip(nb.iter_mut()).zip(xb.chunks_exact(d)) {
                let nn = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt();
                *nv = nn as f32;
                if nn > 0.0 {
                    for (o, &v) in ur.iter_mut().zip(row) {
                        *o = (v as f64 / nn) as f32;
                    }
                }
            }
        });
    (u, norms)
}

/// Gain-Shape K-means of `x` (`[n, d]`). `init_centroids` (`[k, d]`), when
/// given, replaces the k-means++ seeding of the spherical initialisation
/// (the centroids are used as they are, on the unit-vector data).
pub fn gskm(
    x: &[f32],
    n: usize,
    d: usize,
    k: usize,
    weights: Option<&[f32]>,
    opts: &GskmOptions,
    init_centroids: Option<&[f32]>,
) -> Result<GainShape> {
    validate(x, n, d, weights, k)?;
    // 1. Spherical initialisation.
    let (u, norms) = unit_rows(x, d);
    let udata = Data { x: &u, n, d, w: weights };
    let mut c = start_centroids(&udata, k, opts.init, opts.seed, init_centroids)?;
    let (init_labels, _) = lloyd(&udata, &mut c, k, opts.init_iters);
    drop(u);
    let mut shapes = vec![0f32; k * d];
    for kk in 0..k {
        let row = &c[kk * d..(kk + 1) * d];
        let nn = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt();
        if nn > 0.0 {
            for (s, &v) in shapes[kk * d..(kk + 1) * d].iter_mut().zip(row) {
                *s = (v as f64 / nn) as f32;
            }
        }
    }
    let data = Data { x, n, d, w: weights };
    let mut gsum = vec![0f64; k];
    let mut wsum = vec![0f64; k];
    let (mut all_g, mut all_w) = (0f64, 0f64);
    for i in 0..n {
        let w = data.weight(i) as f64;
        let l = init_labels[i] as usize;
        gsum[l] += w * norms[i] as f64;
        wsum[l] += w;
        all_g += w * norms[i] as f64;
        all_w += w;
    }
    let mean_norm = all_g / all_w;
    let mut gains: Vec<f32> = (0..k)
        .map(|kk| if wsum[kk] > 0.0 { (gsum[kk] / wsum[kk]) as f32 } else { mean_norm as f32 })
        .collect();
    drop(init_labels);

    // 2. Alternating gain/shape steps.
    let alt = Data { x, n, d, w: if opts.weights_in_init_only { None } else { weights } };
    let xnorm = row_norms_sq(x, d);
    let mut labels = vec![0u32; n];
    let mut dist = vec![0f32; n];
    let mut history = Vec::with_capacity(opts.iters + 1);
    let mut cw = vec![0f32; k * d];
    let mut bias = vec![0f32; k];
    let mut ws = Workspace::new();
    for _ in 0..opts.iters {
        for kk in 0..k {
            let g = round_bf16(gains[kk]).max(MIN_GAIN);
            bias[kk] = g * g;
            for (o, &s) in cw[kk * d..(kk + 1) * d].iter_mut().zip(&shapes[kk * d..(kk + 1) * d]) {
                *o = g * s;
            }
        }
        let panels = Panels::new(&cw, k, d, Some(&bias));
        let pass = assign_pass(&mut ws, &alt, &xnorm, &panels, &mut labels, &mut dist, true);
        history.push(pass.obj);
        for kk in 0..k {
            if pass.wsum[kk] <= 0.0 {
                continue;
            }
            let sum = &pass.sums[kk * d..(kk + 1) * d];
            let old = &mut shapes[kk * d..(kk + 1) * d];
            let proj: f64 = sum.iter().zip(old.iter()).map(|(&a, &b)| a * b as f64).sum();
            gains[kk] = ((proj / pass.wsum[kk]) as f32).max(MIN_GAIN);
            let nn = sum.iter().map(|v| v * v).sum::<f64>().sqrt();
            if nn > 0.0 {
                for (s, &v) in old.iter_mut().zip(sum) {
                    *s = (v / nn) as f32;
                }
            }
        }
    }

    // 3. Codebook and final labels.
    for kk in 0..k {
        for (o, &s) in cw[kk * d..(kk + 1) * d].iter_mut().zip(&shapes[kk * d..(kk + 1) * d]) {
            *o = gains[kk] * s;
        }
    }
    let panels = Panels::new(&cw, k, d, None);
    let pass = assign_pass(&mut ws, &alt, &xnorm, &panels, &mut labels, &mut dist, false);
    history.push(pass.obj);
    Ok(GainShape { codebook: cw, gains, shapes, labels, history })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn gauss(r: &mut SplitMix64) -> f32 {
        // Box–Muller.
        let (a, b) = (r.next_f64().max(1e-300), r.next_f64());
        ((-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()) as f32
    }

    #[test]
    fn bf16_rounding_is_nearest_even() {
        assert_eq!(round_bf16(1.0), 1.0);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
    }

    #[test]
    fn unit_rows_keep_zero() {
        let (u, n) = unit_rows(&[3.0, 4.0, 0.0, 0.0], 2);
        assert_eq!(u, vec![0.6, 0.8, 0.0, 0.0]);
        assert_eq!(n, vec![5.0, 0.0]);
    }

    #[test]
    fn codewords_are_gain_times_unit_shape() {
        // Directions spread on the sphere at radius ~3: k-means centroids shrink,
        // GSKM gains stay near the members' norm.
        let (n, d, k) = (4000, 16, 8);
        let mut r = SplitMix64::new(11);
        let x: Vec<f32> = (0..n * d).map(|_| gauss(&mut r)).collect();
        let res = gskm(&x, n, d, k, None, &GskmOptions::default(), None).unwrap();
        for kk in 0..k {
            let s = &res.shapes[kk * d..(kk + 1) * d];
            let nn: f32 = s.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((nn - 1.0).abs() < 1e-5);
            assert!(res.gains[kk] >= MIN_GAIN);
        }
        // Codewords are g·s.
        for (i, &c) in res.codebook.iter().enumerate() {
            assert!((c - res.gains[i / d] * res.shapes[i]).abs() < 1e-6);
        }
        // A sensible quantizer: close to k-means' distortion.
        let km = crate::kmeans::kmeans(&x, n, d, k, None, 30, Init::KMeansPlusPlus, 0, None).unwrap();
        let (g, m) = (*res.history.last().unwrap(), *km.history.last().unwrap());
        assert!(g < 1.1 * m, "gskm {g} vs km {m}");
    }

    #[test]
    fn deterministic_across_thread_counts() {
        let (n, d, k) = (3000, 8, 16);
        let mut r = SplitMix64::new(4);
        let x: Vec<f32> = (0..n * d).map(|_| gauss(&mut r)).collect();
        let w: Vec<f32> = (0..n).map(|i| 0.5 + (i % 3) as f32).collect();
        let run = |t| {
            crate::linalg::with_threads(Some(t), || gskm(&x, n, d, k, Some(&w), &GskmOptions::default(), None).unwrap())
                .unwrap()
        };
        let (a, b) = (run(1), run(2));
        assert_eq!(a.labels, b.labels);
        assert_eq!(a.codebook, b.codebook);
    }
}
