//! The inner loop of every learner and encoder: for a block of samples, the
//! nearest codeword in l2, `argmin_k ‖c_k‖² − 2⟨x, c_k⟩`.
//!
//! Distances are never materialised: a register-tiled kernel computes the dot
//! products of `R` samples against `LANES` codewords at a time (a GEMM micro
//! kernel with the argmin fused into its epilogue), so memory stays linear in
//! the number of samples and there is no N×K matrix.  Codewords are stored
//! in panels `[K/LANES][D][LANES]` pre-multiplied by −2, and each accumulator
//! starts at `‖c_k‖²`, so one fused multiply-add per element yields the
//! distance up to the constant `‖x‖²`.
//!
//! The same Rust source is compiled three times — AVX-512, AVX2+FMA and
//! portable — and chosen at run time. Results do not depend on the thread
//! count: each sample's answer is computed by one thread from its own row.
//! Ties go to the lowest codeword index.

// The tiles index fixed-size register arrays by row and lane on purpose.
#![allow(clippy::needless_range_loop)]

/// Codewords per panel (lanes of the kernel).
pub const LANES: usize = 32;

/// Rows per work block. Fixed (never derived from the thread count) so that
/// every blocked reduction is summed in the same order on any machine.
pub const BLOCK: usize = 1024;

/// Codewords laid out for the kernel.
#[derive(Clone, Debug)]
pub struct Panels {
    pub k: usize,
    pub d: usize,
    groups: usize,
    /// `[groups][d][LANES]`, holding `−2·c`; padding codewords are zero.
    data: Vec<f32>,
    /// `[groups·LANES]` squared norms (or the caller's bias); padding is +inf.
    bias: Vec<f32>,
}

impl Panels {
    /// Panels for codewords `c` (`[k, d]` row-major). The bias of codeword k
    /// is `‖c_k‖²` (computed in f64), or `bias[k]` when given.
    pub fn new(c: &[f32], k: usize, d: usize, bias: Option<&[f32]>) -> Self {
        assert_eq!(c.len(), k * d);
        let groups = k.div_ceil(LANES);
        let mut data = vec![0f32; groups * d * LANES];
        let mut b = vec![f32::INFINITY; groups * LANES];
        for kk in 0..k {
            let (g, l) = (kk / LANES, kk % LANES);
            let row = &c[kk * d..(kk + 1) * d];
            for (dd, &v) in row.iter().enumerate() {
                data[(g * d + dd) * LANES + l] = -2.0 * v;
            }
            b[kk] = match bias {
                Some(bb) => bb[kk],
                None => row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() as f32,
            };
        }
        Panels { k, d, groups, data, bias: b }
    }

    /// For each row of `x` (`[rows, d]`), the index of the codeword minimising
    /// `bias_k − 2⟨x, c_k⟩` (lowest index on ties) and that minimum.
    pub fn nearest(&self, x: &[f32], labels: &mut [u32], dist: &mut [f32]) {
        let rows = labels.len();
        assert_eq!(x.len(), rows * self.d);
        assert_eq!(dist.len(), rows);
        if rows == 0 {
            return;
        }
        if self.d == 0 {
            // Degenerate: only the bias decides.
            let (mut bi, mut bv) = (0u32, f32::INFINITY);
            for kk in 0..self.k {
                if self.bias[kk] < bv {
                    bv = self.bias[kk];
                    bi = kk as u32;
                }
            }
            labels.fill(bi);
            dist.fill(bv);
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU supports the features the function is compiled for.
                unsafe { nearest_avx512(self, x, labels, dist) };
                return;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: as above.
                unsafe { nearest_avx2(self, x, labels, dist) };
                return;
            }
        }
        nearest_generic::<2, false>(self, x, labels, dist);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn nearest_avx512(p: &Panels, x: &[f32], labels: &mut [u32], dist: &mut [f32]) {
    let rows = labels.len();
    let d = p.d;
    let mut r0 = 0;
    while r0 + 6 <= rows {
        x86::tile512::<6>(p, x.as_ptr().add(r0 * d), labels.as_mut_ptr().add(r0), dist.as_mut_ptr().add(r0));
        r0 += 6;
    }
    while r0 < rows {
        x86::tile512::<1>(p, x.as_ptr().add(r0 * d), labels.as_mut_ptr().add(r0), dist.as_mut_ptr().add(r0));
        r0 += 1;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn nearest_avx2(p: &Panels, x: &[f32], labels: &mut [u32], dist: &mut [f32]) {
    let rows = labels.len();
    let d = p.d;
    let mut r0 = 0;
    while r0 + 3 <= rows {
        x86::tile256::<3>(p, x.as_ptr().add(r0 * d), labels.as_mut_ptr().add(r0), dist.as_mut_ptr().add(r0));
        r0 += 3;
    }
    while r0 < rows {
        x86::tile256::<1>(p, x.as_ptr().add(r0 * d), labels.as_mut_ptr().add(r0), dist.as_mut_ptr().add(r0));
        r0 += 1;
    }
}

/// Explicit SIMD tiles. Both compute, per lane, exactly the same sequence of
/// fused multiply-adds (bias, then d = 0..D in order), so AVX-512 and AVX2
/// give bitwise identical answers.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Panels, LANES};
    use std::arch::x86_64::*;

    /// Horizontal argmin of per-lane minima (lowest index on ties).
    #[inline(always)]
    fn reduce(bv: &[f32; LANES], bi: &[u32; LANES]) -> (u32, f32) {
        let (mut v, mut i) = (bv[0], bi[0]);
        for l in 1..LANES {
            if bv[l] < v || (bv[l] == v && bi[l] < i) {
                v = bv[l];
                i = bi[l];
            }
        }
        (i, v)
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn tile512<const R: usize>(p: &Panels, x: *const f32, labels: *mut u32, dist: *mut f32) {
        let d = p.d;
        let mut bv = [[f32::INFINITY; LANES]; R];
        let mut bi = [[0u32; LANES]; R];
        let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let mut idx0 = iota;
        let mut idx1 = _mm512_add_epi32(iota, _mm512_set1_epi32(16));
        let step = _mm512_set1_epi32(LANES as i32);
        let mut pp = p.data.as_ptr();
        let mut bp = p.bias.as_ptr();
        for _ in 0..p.groups {
            let b0 = _mm512_loadu_ps(bp);
            let b1 = _mm512_loadu_ps(bp.add(16));
            let mut a0 = [b0; R];
            let mut a1 = [b1; R];
            for dd in 0..d {
                let c0 = _mm512_loadu_ps(pp.add(dd * LANES));
                let c1 = _mm512_loadu_ps(pp.add(dd * LANES + 16));
                for r in 0..R {
                    let xv = _mm512_set1_ps(*x.add(r * d + dd));
                    a0[r] = _mm512_fmadd_ps(xv, c0, a0[r]);
                    a1[r] = _mm512_fmadd_ps(xv, c1, a1[r]);
                }
            }
            for r in 0..R {
                let v0 = _mm512_loadu_ps(bv[r].as_ptr());
                let v1 = _mm512_loadu_ps(bv[r].as_ptr().add(16));
                let m0 = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(a0[r], v0);
                let m1 = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(a1[r], v1);
                _mm512_storeu_ps(bv[r].as_mut_ptr(), _mm512_mask_mov_ps(v0, m0, a0[r]));
                _mm512_storeu_ps(bv[r].as_mut_ptr().add(16), _mm512_mask_mov_ps(v1, m1, a1[r]));
                let i0 = _mm512_loadu_si512(bi[r].as_ptr() as *const _);
                let i1 = _mm512_loadu_si512(bi[r].as_ptr().add(16) as *const _);
                _mm512_storeu_si512(bi[r].as_mut_ptr() as *mut _, _mm512_mask_mov_epi32(i0, m0, idx0));
                _mm512_storeu_si512(bi[r].as_mut_ptr().add(16) as *mut _, _mm512_mask_mov_epi32(i1, m1, idx1));
            }
            idx0 = _mm512_add_epi32(idx0, step);
            idx1 = _mm512_add_epi32(idx1, step);
            pp = pp.add(d * LANES);
            bp = bp.add(LANES);
        }
        for r in 0..R {
            let v0 = _mm512_loadu_ps(bv[r].as_ptr());
            let v1 = _mm512_loadu_ps(bv[r].as_ptr().add(16));
            let i0 = _mm512_loadu_si512(bi[r].as_ptr() as *const _);
            let i1 = _mm512_loadu_si512(bi[r].as_ptr().add(16) as *const _);
            let v = _mm512_reduce_min_ps(_mm512_min_ps(v0, v1));
            let vv = _mm512_set1_ps(v);
            let m0 = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(v0, vv);
            let m1 = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(v1, vv);
            let big = _mm512_set1_epi32(-1);
            let j = _mm512_min_epu32(_mm512_mask_mov_epi32(big, m0, i0), _mm512_mask_mov_epi32(big, m1, i1));
            let i = _mm512_reduce_min_epu32(j);
            if m0 == 0 && m1 == 0 {
                // Only when every distance is +inf/NaN: fall back to the scalar rule.
                let (i, v) = reduce(&bv[r], &bi[r]);
                *labels.add(r) = i;
                *dist.add(r) = v;
            } else {
                *labels.add(r) = i;
                *dist.add(r) = v;
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile256<const R: usize>(p: &Panels, x: *const f32, labels: *mut u32, dist: *mut f32) {
        let d = p.d;
        let mut bv = [[f32::INFINITY; LANES]; R];
        let mut bi = [[0u32; LANES]; R];
        let iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let mut idx = [
            iota,
            _mm256_add_epi32(iota, _mm256_set1_epi32(8)),
            _mm256_add_epi32(iota, _mm256_set1_epi32(16)),
            _mm256_add_epi32(iota, _mm256_set1_epi32(24)),
        ];
        let step = _mm256_set1_epi32(LANES as i32);
        let mut pp = p.data.as_ptr();
        let mut bp = p.bias.as_ptr();
        for _ in 0..p.groups {
            let mut a = [[_mm256_setzero_ps(); 4]; R];
            for r in 0..R {
                for q in 0..4 {
                    a[r][q] = _mm256_loadu_ps(bp.add(8 * q));
                }
            }
            for dd in 0..d {
                let c = pp.add(dd * LANES);
                for r in 0..R {
                    let xv = _mm256_set1_ps(*x.add(r * d + dd));
                    for q in 0..4 {
                        a[r][q] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(c.add(8 * q)), a[r][q]);
                    }
                }
            }
            for r in 0..R {
                for q in 0..4 {
                    let v = _mm256_loadu_ps(bv[r].as_ptr().add(8 * q));
                    let m = _mm256_cmp_ps::<_CMP_LT_OQ>(a[r][q], v);
                    _mm256_storeu_ps(bv[r].as_mut_ptr().add(8 * q), _mm256_blendv_ps(v, a[r][q], m));
                    let i = _mm256_loadu_si256(bi[r].as_ptr().add(8 * q) as *const _);
                    let ni = _mm256_castps_si256(_mm256_blendv_ps(
                        _mm256_castsi256_ps(i),
                        _mm256_castsi256_ps(idx[q]),
                        m,
                    ));
                    _mm256_storeu_si256(bi[r].as_mut_ptr().add(8 * q) as *mut _, ni);
                }
            }
            for q in 0..4 {
                idx[q] = _mm256_add_epi32(idx[q], step);
            }
            pp = pp.add(d * LANES);
            bp = bp.add(LANES);
        }
        for r in 0..R {
            let (i, v) = reduce(&bv[r], &bi[r]);
            *labels.add(r) = i;
            *dist.add(r) = v;
        }
    }
}

/// Portable path (also the reference of the SIMD tiles in tests).
fn nearest_generic<const R: usize, const FMA: bool>(
    p: &Panels,
    x: &[f32],
    labels: &mut [u32],
    dist: &mut [f32],
) {
    let rows = labels.len();
    let d = p.d;
    let full = rows / R * R;
    let mut r0 = 0;
    while r0 < full {
        tile::<R, FMA>(p, &x[r0 * d..(r0 + R) * d], &mut labels[r0..r0 + R], &mut dist[r0..r0 + R]);
        r0 += R;
    }
    while r0 < rows {
        tile::<1, FMA>(p, &x[r0 * d..(r0 + 1) * d], &mut labels[r0..r0 + 1], &mut dist[r0..r0 + 1]);
        r0 += 1;
    }
}

/// `R` rows of `x` against every panel; writes their argmin and minimum.
#[inline(always)]
fn tile<const R: usize, const FMA: bool>(p: &Panels, x: &[f32], labels: &mut [u32], dist: &mut [f32]) {
    let d = p.d;
    debug_assert_eq!(x.len(), R * d);
    let mut bv = [[f32::INFINITY; LANES]; R];
    let mut bi = [[0u32; LANES]; R];
    let xp = x.as_ptr();
    for g in 0..p.groups {
        let panel = &p.data[g * d * LANES..(g + 1) * d * LANES];
        let bias: &[f32; LANES] = p.bias[g * LANES..(g + 1) * LANES].try_into().unwrap();
        let mut acc = [[0f32; LANES]; R];
        for a in acc.iter_mut() {
            *a = *bias;
        }
        let pp = panel.as_ptr();
        for dd in 0..d {
            // SAFETY: dd < d, the panel has d·LANES entries, x has R·d.
            let cp: &[f32; LANES] = unsafe { &*(pp.add(dd * LANES) as *const [f32; LANES]) };
            for r in 0..R {
                let xv = unsafe { *xp.add(r * d + dd) };
                for l in 0..LANES {
                    acc[r][l] = if FMA {
                        xv.mul_add(cp[l], acc[r][l])
                    } else {
                        acc[r][l] + xv * cp[l]
                    };
                }
            }
        }
        let base = (g * LANES) as u32;
        for r in 0..R {
            for l in 0..LANES {
                let v = acc[r][l];
                let m = v < bv[r][l];
                bv[r][l] = if m { v } else { bv[r][l] };
                bi[r][l] = if m { base + l as u32 } else { bi[r][l] };
            }
        }
    }
    for r in 0..R {
        let (mut v, mut i) = (bv[r][0], bi[r][0]);
        for l in 1..LANES {
            let (vl, il) = (bv[r][l], bi[r][l]);
            if vl < v || (vl == v && il < i) {
                v = vl;
                i = il;
            }
        }
        labels[r] = i;
        dist[r] = v;
    }
}

/// `out[i] = ‖x_i − c‖²` for the rows of `x` (`[rows, d]`), in f32 with
/// 16 interleaved partial sums (vectorised; the order is fixed, so the result
/// does not depend on the thread count).
pub fn sqdist_rows(x: &[f32], c: &[f32], out: &mut [f32]) {
    let d = c.len();
    assert_eq!(x.len(), out.len() * d);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports the feature the function is compiled for.
            unsafe { sqdist_rows_avx512(x, c, out) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            unsafe { sqdist_rows_avx2(x, c, out) };
            return;
        }
    }
    sqdist_rows_generic(x, c, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn sqdist_rows_avx512(x: &[f32], c: &[f32], out: &mut [f32]) {
    sqdist_rows_generic(x, c, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sqdist_rows_avx2(x: &[f32], c: &[f32], out: &mut [f32]) {
    sqdist_rows_generic(x, c, out)
}

#[inline(always)]
fn sqdist_rows_generic(x: &[f32], c: &[f32], out: &mut [f32]) {
    const W: usize = 16;
    let d = c.len();
    if d < W {
        // Short rows: vectorise across rows instead of along them.
        for (o, row) in out.iter_mut().zip(x.chunks_exact(d)) {
            let mut e = [0f32; W];
            for j in 0..d {
                let t = row[j] - c[j];
                e[j] = t * t;
            }
            *o = hsum(&e);
        }
        return;
    }
    let full = d / W * W;
    for (o, row) in out.iter_mut().zip(x.chunks_exact(d)) {
        let mut acc = [0f32; W];
        for (xs, cs) in row[..full].chunks_exact(W).zip(c[..full].chunks_exact(W)) {
            for l in 0..W {
                let t = xs[l] - cs[l];
                acc[l] += t * t;
            }
        }
        for j in full..d {
            let t = row[j] - c[j];
            acc[j - full] += t * t;
        }
        *o = hsum(&acc);
    }
}

#[inline(always)]
fn hsum(a: &[f32; 16]) -> f32 {
    let mut b = [0f32; 8];
    for l in 0..8 {
        b[l] = a[l] + a[l + 8];
    }
    let mut q = [0f32; 4];
    for l in 0..4 {
        q[l] = b[l] + b[l + 4];
    }
    (q[0] + q[2]) + (q[1] + q[3])
}

/// Squared l2 norm of each row, accumulated in f64, returned as f32.
pub fn row_norms_sq(x: &[f32], d: usize) -> Vec<f32> {
    use rayon::prelude::*;
    if d == 0 {
        return Vec::new();
    }
    let mut out = vec![0f32; x.len() / d];
    out.par_chunks_mut(BLOCK).zip(x.par_chunks(BLOCK * d)).for_each(|(o, xs)| {
        for (v, r) in o.iter_mut().zip(xs.chunks_exact(d)) {
            *v = r.iter().map(|&a| (a as f64) * (a as f64)).sum::<f64>() as f32;
        }
    });
    out
}

/// Run `f` on the global rayon pool (`threads == None`) or on a local pool
/// with exactly `threads` workers.
pub fn with_threads<T: Send>(threads: Option<usize>, f: impl FnOnce() -> T + Send) -> crate::Result<T> {
    match threads {
        None => Ok(f()),
        Some(0) => Err(crate::GsrqError::InvalidValue("threads must be >= 1 (or None for the global pool)".into())),
        Some(n) => {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .map_err(|e| crate::GsrqError::InvalidValue(format!("cannot build a pool of {n} threads: {e}")))?;
            Ok(pool.install(f))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn brute(x: &[f32], c: &[f32], d: usize) -> (Vec<u32>, Vec<f64>) {
        let k = c.len() / d;
        let mut labels = vec![];
        let mut best = vec![];
        for row in x.chunks_exact(d) {
            let mut bd = f64::INFINITY;
            let mut bi = 0;
            for kk in 0..k {
                let dd: f64 = row
                    .iter()
                    .zip(&c[kk * d..(kk + 1) * d])
                    .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
                    .sum();
                if dd < bd {
                    bd = dd;
                    bi = kk as u32;
                }
            }
            labels.push(bi);
            best.push(bd);
        }
        (labels, best)
    }

    #[test]
    fn nearest_matches_brute_force() {
        let mut rng = SplitMix64::new(3);
        for &(n, d, k) in &[(37usize, 3usize, 5usize), (100, 8, 70), (13, 33, 64), (50, 1, 33)] {
            let x: Vec<f32> = (0..n * d).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect();
            let c: Vec<f32> = (0..k * d).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect();
            let p = Panels::new(&c, k, d, None);
            let mut labels = vec![0u32; n];
            let mut dist = vec![0f32; n];
            p.nearest(&x, &mut labels, &mut dist);
            let (bl, bd) = brute(&x, &c, d);
            let xn = row_norms_sq(&x, d);
            for i in 0..n {
                let got = (xn[i] + dist[i]) as f64;
                assert!((got - bd[i]).abs() < 1e-4 * (1.0 + bd[i]), "dist {i}: {got} vs {}", bd[i]);
                if labels[i] != bl[i] {
                    // Only acceptable on a numerical near-tie.
                    let row = &x[i * d..(i + 1) * d];
                    let dl: f64 = row
                        .iter()
                        .zip(&c[labels[i] as usize * d..])
                        .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
                        .sum();
                    assert!((dl - bd[i]).abs() < 1e-5, "label {i}");
                }
            }
        }
    }

    #[test]
    fn simd_paths_agree_bitwise() {
        let mut rng = SplitMix64::new(9);
        for &(n, d, k) in &[(50usize, 8usize, 100usize), (31, 17, 40), (7, 128, 33)] {
            let x: Vec<f32> = (0..n * d).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect();
            let c: Vec<f32> = (0..k * d).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect();
            let p = Panels::new(&c, k, d, None);
            let run = |f: &dyn Fn(&mut [u32], &mut [f32])| {
                let mut l = vec![0u32; n];
                let mut dd = vec![0f32; n];
                f(&mut l, &mut dd);
                (l, dd)
            };
            // Portable FMA path: the same operation sequence as the SIMD tiles.
            let reference = run(&|l, dd| nearest_generic::<2, true>(&p, &x, l, dd));
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    let got = run(&|l, dd| unsafe { nearest_avx2(&p, &x, l, dd) });
                    assert_eq!(got, reference);
                }
                if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma") {
                    let got = run(&|l, dd| unsafe { nearest_avx512(&p, &x, l, dd) });
                    assert_eq!(got, reference);
                }
            }
            let plain = run(&|l, dd| nearest_generic::<2, false>(&p, &x, l, dd));
            for i in 0..n {
                assert!((plain.1[i] - reference.1[i]).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn sqdist_rows_matches_f64() {
        let mut rng = SplitMix64::new(5);
        for &d in &[1usize, 7, 16, 37, 128] {
            let n = 9;
            let x: Vec<f32> = (0..n * d).map(|_| rng.next_f64() as f32 - 0.5).collect();
            let c: Vec<f32> = (0..d).map(|_| rng.next_f64() as f32 - 0.5).collect();
            let mut out = vec![0f32; n];
            sqdist_rows(&x, &c, &mut out);
            for i in 0..n {
                let e: f64 = (0..d).map(|j| (x[i * d + j] as f64 - c[j] as f64).powi(2)).sum();
                assert!((out[i] as f64 - e).abs() < 1e-5 * (1.0 + e), "d={d}");
            }
        }
    }

    #[test]
    fn ties_go_to_lowest_index() {
        // Codewords 1, 3 and 40 are identical and nearest.
        let d = 4;
        let k = 45;
        let mut c = vec![10f32; k * d];
        for &kk in &[40usize, 3, 1] {
            c[kk * d..(kk + 1) * d].copy_from_slice(&[1.0, 2.0, 3.0, 4.0]);
        }
        let p = Panels::new(&c, k, d, None);
        let x = [1.0f32, 2.0, 3.0, 4.1].repeat(7);
        let mut labels = vec![0u32; 7];
        let mut dist = vec![0f32; 7];
        p.nearest(&x, &mut labels, &mut dist);
        assert!(labels.iter().all(|&l| l == 1));
    }
}
