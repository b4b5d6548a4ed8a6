//! Weighted k-means (Lloyd), the baseline codebook learner (KM).
//!
//! * Objective: the weighted sum of squared errors `Σ_i w_i ‖x_i − c_{a(i)}‖²`.
//! * Initialisation: `"kmeans++"` (weighted D² sampling: the first centroid is
//!   drawn with probability ∝ `w_i`, each next one ∝ `w_i · D(x_i)²`) or
//!   `"random"` (k distinct samples of positive weight, uniformly). Only
//!   samples of positive weight are ever drawn, so `k` may not exceed their
//!   number.
//! * Iteration: assign every sample to its nearest centroid (ties to the
//!   lowest index), then move each centroid to the weighted mean of its
//!   members; the sums are accumulated in f64.
//! * Empty clusters: after an update, each cluster with zero member weight is
//!   re-seeded at a sample far from its centroid — the samples with the
//!   largest `w_i · ‖x_i − c_{a(i)}‖²` (ties to the lowest sample index), one
//!   distinct sample per empty cluster, most distant first to the lowest
//!   empty cluster index. This never increases the objective.
//! * Determinism: samples are processed in fixed blocks of
//!   [`BLOCK`](crate::linalg::BLOCK) rows; every sum is formed per block and
//!   the blocks are added in block order, and all random draws come from one
//!   seeded [`SplitMix64`]. The result is bitwise identical for any thread
//!   count.
//! * Output labels are the nearest returned centroid of each sample (one last
//!   assignment after the final update), and the objective history holds the
//!   objective of every assignment: `iters + 1` values, non-increasing.

use rayon::prelude::*;

use crate::error::{GsrqError, Result};
use crate::linalg::{row_norms_sq, sqdist_rows, Panels, BLOCK};
use crate::rng::SplitMix64;

/// How the first centroids are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    KMeansPlusPlus,
    Random,
}

impl std::str::FromStr for Init {
    type Err = GsrqError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "kmeans++" => Ok(Init::KMeansPlusPlus),
            "random" => Ok(Init::Random),
            other => Err(GsrqError::InvalidValue(format!(
                "init must be \"kmeans++\" or \"random\", got {other:?}"
            ))),
        }
    }
}

/// What a learner returns.
#[derive(Clone, Debug)]
pub struct Clustering {
    /// `[k, d]` row-major codewords.
    pub centroids: Vec<f32>,
    /// `[n]` index of the nearest codeword of each sample.
    pub labels: Vec<u32>,
    /// Weighted SSE of each assignment step (the last one against the
    /// returned codewords).
    pub history: Vec<f64>,
}

/// Borrowed, validated training data.
pub(crate) struct Data<'a> {
    pub x: &'a [f32],
    pub n: usize,
    pub d: usize,
    pub w: Option<&'a [f32]>,
}

impl<'a> Data<'a> {
    #[inline]
    pub fn weight(&self, i: usize) -> f32 {
        match self.w {
            Some(w) => w[i],
            None => 1.0,
        }
    }
    pub fn row(&self, i: usize) -> &'a [f32] {
        &self.x[i * self.d..(i + 1) * self.d]
    }
}

/// Check `x` (`[n, d]`), the weights and `k`; the messages name the argument.
pub fn validate(x: &[f32], n: usize, d: usize, weights: Option<&[f32]>, k: usize) -> Result<()> {
    if d == 0 {
        return Err(GsrqError::Shape("x must have at least one column (D = 0)".into()));
    }
    if n == 0 {
        return Err(GsrqError::Shape("x must have at least one row (N = 0)".into()));
    }
    if x.len() != n * d {
        return Err(GsrqError::Shape(format!("x has {} values, expected N*D = {}", x.len(), n * d)));
    }
    check_finite(x, d, "x")?;
    if k == 0 {
        return Err(GsrqError::InvalidValue("k must be >= 1".into()));
    }
    if k > n {
        return Err(GsrqError::InvalidValue(format!("k = {k} exceeds the number of samples N = {n}")));
    }
    let positive = match weights {
        None => n,
        Some(w) => {
            if w.len() != n {
                return Err(GsrqError::Shape(format!(
                    "weights has {} entries but x has {n} rows",
                    w.len()
                )));
            }
            let mut positive = 0usize;
            for (i, &v) in w.iter().enumerate() {
                if !v.is_finite() {
                    return Err(GsrqError::InvalidValue(format!("weights[{i}] is not finite ({v})")));
                }
                if v < 0.0 {
                    return Err(GsrqError::InvalidValue(format!("weights[{i}] is negative ({v})")));
                }
                if v > 0.0 {
                    positive += 1;
                }
            }
            if positive == 0 {
                return Err(GsrqError::InvalidValue("weights are all zero".into()));
            }
            positive
        }
    };
    if k > positive {
        return Err(GsrqError::InvalidValue(format!(
            "k = {k} exceeds the number of samples with positive weight ({positive})"
        )));
    }
    Ok(())
}

/// Error on the first NaN/inf of a `[rows, d]` array named `what`.
pub fn check_finite(x: &[f32], d: usize, what: &str) -> Result<()> {
    // Branch-free per chunk (vectorises); locate the culprit only on failure.
    let ok = x.par_chunks(1 << 16).all(|c| c.iter().fold(true, |a, v| a & v.is_finite()));
    if ok {
        return Ok(());
    }
    if let Some(pos) = x.iter().position(|v| !v.is_finite()) {
        return Err(GsrqError::InvalidValue(format!(
            "{what} contains a non-finite value ({}) at row {}, column {}",
            x[pos],
            pos / d.max(1),
            pos % d.max(1)
        )));
    }
    Ok(())
}

/// Per-iteration result of one blocked assignment pass.
pub(crate) struct Pass {
    /// `[k, d]` weighted member sums (f64).
    pub sums: Vec<f64>,
    /// `[k]` member weight.
    pub wsum: Vec<f64>,
    /// Weighted SSE.
    pub obj: f64,
}

/// Blocks processed in parallel before their partial sums are folded in.
const CHUNK_BLOCKS: usize = 32;

/// Per-block partial sums, kept between passes so that the hot loop does not
/// allocate (memory: `CHUNK_BLOCKS · k · d` f64, independent of N).
#[derive(Default)]
pub(crate) struct Workspace {
    bufs: Vec<Pass>,
}

impl Workspace {
    pub fn new() -> Self {
        Workspace::default()
    }

    fn ensure(&mut self, count: usize, k: usize, d: usize, sums: bool) {
        let (ls, lw) = if sums { (k * d, k) } else { (0, 0) };
        while self.bufs.len() < count {
            self.bufs.push(Pass { sums: Vec::new(), wsum: Vec::new(), obj: 0.0 });
        }
        for p in &mut self.bufs[..count] {
            p.sums.resize(ls, 0.0);
            p.wsum.resize(lw, 0.0);
        }
    }
}

/// Assign every sample to its nearest codeword of `panels`, writing
/// `labels` and `dist` (squared distance, clamped ≥ 0) and, when `sums` is
/// set, the weighted member sums. Each block of [`BLOCK`] rows is summed on
/// its own and the block results are added in block order (in parallel over
/// the sum's elements), so the result does not depend on the thread count.
pub(crate) fn assign_pass(
    ws: &mut Workspace,
    data: &Data<'_>,
    xnorm: &[f32],
    panels: &Panels,
    labels: &mut [u32],
    dist: &mut [f32],
    sums: bool,
) -> Pass {
    let (n, d, k) = (data.n, data.d, panels.k);
    let mut total = Pass {
        sums: if sums { vec![0.0; k * d] } else { Vec::new() },
        wsum: if sums { vec![0.0; k] } else { Vec::new() },
        obj: 0.0,
    };
    let nblocks = n.div_ceil(BLOCK);
    ws.ensure(CHUNK_BLOCKS.min(nblocks), k, d, sums);
    let mut cb = 0;
    while cb < nblocks {
        let ce = (cb + CHUNK_BLOCKS).min(nblocks);
        let (r0, r1) = (cb * BLOCK, (ce * BLOCK).min(n));
        let parts = &mut ws.bufs[..ce - cb];
        labels[r0..r1]
            .par_chunks_mut(BLOCK)
            .zip(dist[r0..r1].par_chunks_mut(BLOCK))
            .zip(parts.par_iter_mut())
            .enumerate()
            .for_each(|(j, ((lab, dst), p))| {
                let s = r0 + j * BLOCK;
                let rows = lab.len();
                panels.nearest(&data.x[s * d..(s + rows) * d], lab, dst);
                p.sums.fill(0.0);
                p.wsum.fill(0.0);
                p.obj = 0.0;
                for i in 0..rows {
                    let g = s + i;
                    let di = (xnorm[g] + dst[i]).max(0.0);
                    dst[i] = di;
                    let w = data.weight(g) as f64;
                    p.obj += w * di as f64;
                    if sums {
                        let l = lab[i] as usize;
                        p.wsum[l] += w;
                        let acc = &mut p.sums[l * d..(l + 1) * d];
                        for (a, &v) in acc.iter_mut().zip(data.row(g)) {
                            *a += w * v as f64;
                        }
                    }
                }
            });
        let parts = &ws.bufs[..ce - cb];
        for p in parts {
            total.obj += p.obj;
        }
        if sums {
            const RED: usize = 4096;
            total.sums.par_chunks_mut(RED).enumerate().for_each(|(ci, ch)| {
                let (o, len) = (ci * RED, ch.len());
                for p in parts {
                    for (a, b) in ch.iter_mut().zip(&p.sums[o..o + len]) {
                        *a += b;
                    }
                }
            });
            for p in parts {
                for (a, b) in total.wsum.iter_mut().zip(&p.wsum) {
                    *a += b;
                }
            }
        }
        cb = ce;
    }
    total
}

/// Indices of the `e` samples with the largest `w_i · dist_i` (ties to the
/// lowest index), largest first.
pub(crate) fn farthest(data: &Data<'_>, dist: &[f32], e: usize) -> Vec<usize> {
    let mut scored: Vec<(f64, usize)> =
        (0..data.n).map(|i| (data.weight(i) as f64 * dist[i] as f64, i)).collect();
    let cmp = |a: &(f64, usize), b: &(f64, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    let e = e.min(scored.len());
    if e < scored.len() {
        scored.select_nth_unstable_by(e, cmp);
        scored.truncate(e);
    }
    scored.sort_by(cmp);
    scored.into_iter().map(|(_, i)| i).collect()
}

/// Lloyd iterations from the centroids `c` (`[k, d]`, updated in place).
/// Returns the labels of the final assignment and the objective history.
pub(crate) fn lloyd(data: &Data<'_>, c: &mut [f32], k: usize, iters: usize) -> (Vec<u32>, Vec<f64>) {
    let (n, d) = (data.n, data.d);
    let xnorm = row_norms_sq(data.x, d);
    let mut labels = vec![0u32; n];
    let mut dist = vec![0f32; n];
    let mut history = Vec::with_capacity(iters + 1);
    let mut ws = Workspace::new();
    for _ in 0..iters {
        let panels = Panels::new(c, k, d, None);
        let pass = assign_pass(&mut ws, data, &xnorm, &panels, &mut labels, &mut dist, true);
        history.push(pass.obj);
        let mut empty = Vec::new();
        for kk in 0..k {
            let ws = pass.wsum[kk];
            if ws > 0.0 {
                for (dst, &s) in c[kk * d..(kk + 1) * d].iter_mut().zip(&pass.sums[kk * d..(kk + 1) * d]) {
                    *dst = (s / ws) as f32;
                }
            } else {
                empty.push(kk);
            }
        }
        if !empty.is_empty() {
            let far = farthest(data, &dist, empty.len());
            for (&kk, &i) in empty.iter().zip(&far) {
                c[kk * d..(kk + 1) * d].copy_from_slice(data.row(i));
            }
        }
    }
    let panels = Panels::new(c, k, d, None);
    let pass = assign_pass(&mut ws, data, &xnorm, &panels, &mut labels, &mut dist, false);
    history.push(pass.obj);
    (labels, history)
}

/// `[k, d]` initial centroids drawn with `init` and `seed`.
pub(crate) fn initial_centroids(data: &Data<'_>, k: usize, init: Init, seed: u64) -> Vec<f32> {
    let d = data.d;
    let mut rng = SplitMix64::new(seed);
    let mut c = Vec::with_capacity(k * d);
    match init {
        Init::Random => {
            let mut pool: Vec<usize> = (0..data.n).filter(|&i| data.weight(i) > 0.0).collect();
            for j in 0..k {
                let r = j + rng.below((pool.len() - j) as u64) as usize;
                pool.swap(j, r);
                c.extend_from_slice(data.row(pool[j]));
            }
        }
        Init::KMeansPlusPlus => {
            let n = data.n;
            // First centroid: probability ∝ w.
            let wsum: f64 = block_sums(n, |i| data.weight(i) as f64).iter().sum();
            let first = pick(n, &mut rng, wsum, |i| data.weight(i) as f64)
                .unwrap_or(0);
            c.extend_from_slice(data.row(first));
            let mut dmin = vec![0f32; n];
            let mut bsum = vec![0f64; n.div_ceil(BLOCK)];
            let xnorm = if d < SHORT_ROWS { row_norms_sq(data.x, d) } else { Vec::new() };
            update_dmin(data, &xnorm, &c[0..d], &mut dmin, &mut bsum, true);
            for j in 1..k {
                let total: f64 = bsum.iter().sum();
                let score = |i: usize| data.weight(i) as f64 * dmin[i] as f64;
                let chosen = if total > 0.0 {
                    pick_blocked(n, &bsum, &mut rng, total, score)
                } else {
                    None
                };
                let i = match chosen {
                    Some(i) => i,
                    None => {
                        // Every positive-weight sample coincides with a centroid:
                        // draw uniformly among them.
                        let pos: Vec<usize> = (0..n).filter(|&i| data.weight(i) > 0.0).collect();
                        pos[rng.below(pos.len() as u64) as usize]
                    }
                };
                c.extend_from_slice(data.row(i));
                update_dmin(data, &xnorm, &c[j * d..(j + 1) * d], &mut dmin, &mut bsum, false);
            }
        }
    }
    c
}

fn block_sums(n: usize, f: impl Fn(usize) -> f64 + Sync) -> Vec<f64> {
    (0..n.div_ceil(BLOCK))
        .into_par_iter()
        .map(|b| (b * BLOCK..((b + 1) * BLOCK).min(n)).map(&f).sum())
        .collect()
}

/// `dmin_i ← min(dmin_i, ‖x_i − c‖²)` (or `=` when `first`), with the block
/// sums of `w_i · dmin_i` refreshed. `xnorm` holds the squared row norms
/// when `d < SHORT_ROWS`.
fn update_dmin(data: &Data<'_>, xnorm: &[f32], c: &[f32], dmin: &mut [f32], bsum: &mut [f64], first: bool) {
    let d = data.d;
    // Short rows: the SIMD kernel's expanded form ‖x‖² + ‖c‖² − 2⟨x, c⟩ (clamped
    // at 0) is an order of magnitude faster than the direct difference; from
    // D = 16 on, the direct ‖x − c‖² vectorises along the row.
    let panels = if d < SHORT_ROWS { Some(Panels::new(c, 1, d, None)) } else { None };
    dmin.par_chunks_mut(BLOCK)
        .zip(bsum.par_iter_mut())
        .enumerate()
        .for_each_init(
            || (vec![0f32; BLOCK], vec![0u32; BLOCK]),
            |(tmp, lab), (b, (dm, bs))| {
                let s = b * BLOCK;
                let rows = dm.len();
                let e = &mut tmp[..rows];
                let xs = &data.x[s * d..(s + rows) * d];
                match &panels {
                    Some(p) => {
                        p.nearest(xs, &mut lab[..rows], e);
                        for (v, &xn) in e.iter_mut().zip(&xnorm[s..s + rows]) {
                            *v = (*v + xn).max(0.0);
                        }
                    }
                    None => sqdist_rows(xs, c, e),
                }
                let mut acc = 0f64;
                for (i, (v, &ei)) in dm.iter_mut().zip(e.iter()).enumerate() {
                    if first || ei < *v {
                        *v = ei;
                    }
                    acc += data.weight(s + i) as f64 * *v as f64;
                }
                *bs = acc;
            },
        );
}

/// Below this many columns k-means++ uses the SIMD kernel's expanded distance.
const SHORT_ROWS: usize = 16;

/// Draw an index with probability ∝ `score(i)` (sequential scan).
fn pick(n: usize, rng: &mut SplitMix64, total: f64, score: impl Fn(usize) -> f64) -> Option<usize> {
    let u = rng.next_f64() * total;
    let mut acc = 0f64;
    let mut last = None;
    for i in 0..n {
        let s = score(i);
        if s > 0.0 {
            acc += s;
            last = Some(i);
            if acc > u {
                return Some(i);
            }
        }
    }
    last
}

/// Draw an index in `0..n` with probability ∝ `score(i)`, locating the
/// block first from the block sums `bsum`.
fn pick_blocked(
    n: usize,
    bsum: &[f64],
    rng: &mut SplitMix64,
    total: f64,
    score: impl Fn(usize) -> f64,
) -> Option<usize> {
    let u = rng.next_f64() * total;
    let mut acc = 0f64;
    let mut last_block = None;
    for (b, &s) in bsum.iter().enumerate() {
        if s > 0.0 {
            last_block = Some(b);
            if acc + s > u {
                return scan_block(n, b, u - acc, &score);
            }
            acc += s;
        }
    }
    // Rounding left u at the very end: the last sample of positive score.
    last_block.and_then(|b| scan_block(n, b, f64::INFINITY, &score))
}

fn scan_block(n: usize, b: usize, u: f64, score: &impl Fn(usize) -> f64) -> Option<usize> {
    let mut acc = 0f64;
    let mut last = None;
    for i in b * BLOCK..((b + 1) * BLOCK).min(n) {
        let s = score(i);
        if s > 0.0 {
            acc += s;
            last = Some(i);
            if acc > u {
                return Some(i);
            }
        }
    }
    last
}

/// Weighted k-means. `x` is `[n, d]` row-major; `weights` `[n]` or `None`
/// (all ones). `init_centroids` (`[k, d]`) replaces the random
/// initialisation when given.
#[allow(clippy::too_many_arguments)]
pub fn kmeans(
    x: &[f32],
    n: usize,
    d: usize,
    k: usize,
    weights: Option<&[f32]>,
    iters: usize,
    init: Init,
    seed: u64,
    init_centroids: Option<&[f32]>,
) -> Result<Clustering> {
    validate(x, n, d, weights, k)?;
    let data = Data { x, n, d, w: weights };
    let mut c = start_centroids(&data, k, init, seed, init_centroids)?;
    let (labels, history) = lloyd(&data, &mut c, k, iters);
    Ok(Clustering { centroids: c, labels, history })
}


/// The centroids Lloyd starts from: `init_centroids` (`k * D` finite values)
/// when given, else seeded with `init`.
pub(crate) fn start_centroids(
    data: &Data<'_>,
    k: usize,
    init: Init,
    seed: u64,
    init_centroids: Option<&[f32]>,
) -> Result<Vec<f32>> {
    match init_centroids {
        Some(c0) => {
            if c0.len() != k * data.d {
                return Err(GsrqError::Shape(format!(
                    "init_centroids has {} values, expected k*D = {}",
                    c0.len(),
                    k * data.d
                )));
            }
            check_finite(c0, data.d, "init_centroids")?;
            Ok(c0.to_vec())
        }
        None => Ok(initial_centroids(data, k, init, seed)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blobs(n: usize, d: usize, centers: usize, seed: u64) -> Vec<f32> {
        let mut r = SplitMix64::new(seed);
        let cs: Vec<f32> = (0..centers * d).map(|_| (r.next_f64() as f32 - 0.5) * 20.0).collect();
        (0..n)
            .flat_map(|i| {
                let c = i % centers;
                (0..d).map(|j| cs[c * d + j] + (r.next_f64() as f32 - 0.5) * 0.1).collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn recovers_separated_blobs() {
        let (n, d, k) = (600, 5, 6);
        let x = blobs(n, d, k, 1);
        let res = kmeans(&x, n, d, k, None, 10, Init::KMeansPlusPlus, 0, None).unwrap();
        // Perfect clustering: objective is just the within-blob noise.
        let last = *res.history.last().unwrap();
        assert!(last / (n as f64) < 0.01, "{last}");
        for w in res.history.windows(2) {
            assert!(w[1] <= w[0] * (1.0 + 1e-6));
        }
        // Samples i and i+k come from the same blob.
        for i in 0..n - k {
            assert_eq!(res.labels[i], res.labels[i + k]);
        }
    }

    #[test]
    fn deterministic_across_thread_counts() {
        let (n, d, k) = (5000, 7, 40);
        let x = blobs(n, d, 50, 2);
        let w: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = |t| {
            crate::linalg::with_threads(Some(t), || {
                kmeans(&x, n, d, k, Some(&w), 5, Init::KMeansPlusPlus, 9, None).unwrap()
            })
            .unwrap()
        };
        let (a, b) = (run(1), run(2));
        assert_eq!(a.labels, b.labels);
        assert_eq!(
            a.centroids.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            b.centroids.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(a.history, b.history);
    }

    #[test]
    fn empty_clusters_are_reseeded() {
        // Three identical far-away initial centroids: two clusters start empty.
        let (n, d, k) = (300, 2, 3);
        let x = blobs(n, d, 3, 5);
        let c0 = vec![100.0f32; k * d];
        let res = kmeans(&x, n, d, k, None, 10, Init::Random, 0, Some(&c0)).unwrap();
        let mut counts = [0usize; 3];
        for &l in &res.labels {
            counts[l as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 0), "{counts:?}");
        for w in res.history.windows(2) {
            assert!(w[1] <= w[0] * (1.0 + 1e-6));
        }
        // Two of the three blobs have their own centroid: far better than one mean.
        assert!(res.history[res.history.len() - 1] < 0.5 * res.history[0]);
    }

    #[test]
    fn rejects_bad_input() {
        let x = vec![0f32; 10];
        assert!(matches!(kmeans(&x, 5, 2, 6, None, 1, Init::Random, 0, None), Err(GsrqError::InvalidValue(_))));
        assert!(matches!(kmeans(&x, 5, 0, 1, None, 1, Init::Random, 0, None), Err(GsrqError::Shape(_))));
        let w = vec![1f32; 4];
        assert!(matches!(kmeans(&x, 5, 2, 2, Some(&w), 1, Init::Random, 0, None), Err(GsrqError::Shape(_))));
        let w = vec![0f32; 5];
        assert!(matches!(kmeans(&x, 5, 2, 2, Some(&w), 1, Init::Random, 0, None), Err(GsrqError::InvalidValue(_))));
        let mut xn = x.clone();
        xn[3] = f32::NAN;
        assert!(matches!(kmeans(&xn, 5, 2, 2, None, 1, Init::Random, 0, None), Err(GsrqError::InvalidValue(_))));
    }
}
