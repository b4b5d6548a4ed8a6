//! Criterion benchmarks of the codebook engine: one k-means iteration, one GSKM
//! run and greedy RQ encoding at a couple of sizes (single-threaded pool, so
//! the numbers are comparable between machines with different core counts).
//!
//!     cargo bench --bench train

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gsrq::gskm::{gskm, GskmOptions};
use gsrq::kmeans::{kmeans, Init};
use gsrq::rng::SplitMix64;
use gsrq::rq::rq_encode;

fn gaussian(n: usize, seed: u64) -> Vec<f32> {
    let mut r = SplitMix64::new(seed);
    (0..n)
        .map(|_| {
            let (a, b) = (r.next_f64().max(1e-300), r.next_f64());
            ((-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()) as f32
        })
        .collect()
}

fn pool() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap()
}

fn bench_kmeans(c: &mut Criterion) {
    let pool = pool();
    let mut g = c.benchmark_group("kmeans_iteration");
    g.sample_size(10);
    for &(n, d, k) in &[(20_000usize, 8usize, 256usize), (20_000, 64, 256)] {
        let x = gaussian(n * d, 1);
        let c0: Vec<f32> = x[..k * d].to_vec();
        g.throughput(Throughput::Elements((n * k * d) as u64));
        g.bench_with_input(BenchmarkId::from_parameter(format!("{n}x{d}x{k}")), &x, |b, x| {
            b.iter(|| {
                pool.install(|| {
                    black_box(kmeans(x, n, d, k, None, 1, Init::Random, 0, Some(&c0)).unwrap());
                })
            })
        });
    }
    g.finish();
}

fn bench_gskm(c: &mut Criterion) {
    let pool = pool();
    let mut g = c.benchmark_group("gskm_5+5_iterations");
    g.sample_size(10);
    for &(n, d, k) in &[(20_000usize, 8usize, 256usize), (20_000, 64, 256)] {
        let x = gaussian(n * d, 2);
        let opts = GskmOptions { init_iters: 5, iters: 5, seed: 0, weights_in_init_only: false, init: Init::Random };
        g.bench_with_input(BenchmarkId::from_parameter(format!("{n}x{d}x{k}")), &x, |b, x| {
            b.iter(|| pool.install(|| black_box(gskm(x, n, d, k, None, &opts, None).unwrap())))
        });
    }
    g.finish();
}

fn bench_rq_encode(c: &mut Criterion) {
    let pool = pool();
    let mut g = c.benchmark_group("rq_encode_greedy");
    g.sample_size(10);
    for &(n, d, kc, m) in &[(50_000usize, 8usize, 256usize, 1usize), (50_000, 16, 256, 2), (20_000, 64, 256, 3)] {
        let x = gaussian(n * d, 3);
        let cb = gaussian(m * kc * d, 4);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(format!("{n}x{d}_Kc{kc}_M{m}")), &x, |b, x| {
            b.iter(|| pool.install(|| black_box(rq_encode(x, n, d, &cb, m, kc, 1).unwrap())))
        });
    }
    g.finish();
}

criterion_group!(benches, bench_kmeans, bench_gskm, bench_rq_encode);
criterion_main!(benches);
