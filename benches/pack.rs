//! Pack / unpack throughput against memcpy, single thread, 16 M codes.
//!
//! `cargo bench --bench pack`. Each width gets one criterion group holding
//! `pack`, `unpack` and `memcpy`; throughput is counted in bytes of uint16
//! codes (2 bytes per code, what unpack writes and a caller of pack reads),
//! and memcpy copies that same number of bytes, so the ratios are direct.
//! Set `GSRQ_BENCH_CODES` to change the code count.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gsrq::pack::{pack_into, packed_len, unpack_into};

const WIDTHS: [u32; 6] = [1, 4, 8, 10, 12, 16];

fn n_codes() -> usize {
    std::env::var("GSRQ_BENCH_CODES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16 << 20)
}

fn bench(c: &mut Criterion) {
    let n = n_codes();
    let src_bytes = vec![0x5Au8; 2 * n];
    let mut dst_bytes = vec![0u8; 2 * n];
    for &bits in &WIDTHS {
        let mask = (1u32 << bits) - 1;
        let codes: Vec<u16> = (0..n as u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 7 & mask) as u16)
            .collect();
        let mut packed = vec![0u8; packed_len(n, bits).unwrap()];
        let mut out = vec![0u16; n];
        pack_into(&codes, bits, &mut packed).unwrap();
        unpack_into(&packed, bits, &mut out).unwrap();
        assert!(out == codes, "{bits}-bit round trip failed");

        let mut g = c.benchmark_group(format!("{bits}-bit"));
        g.throughput(Throughput::Bytes(2 * n as u64));
        g.sample_size(10);
        g.warm_up_time(Duration::from_millis(500));
        g.measurement_time(Duration::from_secs(2));
        g.bench_function("pack", |b| {
            b.iter(|| pack_into(black_box(&codes), bits, black_box(&mut packed)).unwrap())
        });
        g.bench_function("unpack", |b| {
            b.iter(|| unpack_into(black_box(&packed), bits, black_box(&mut out)).unwrap())
        });
        g.bench_function("memcpy", |b| {
            b.iter(|| black_box(&mut dst_bytes).copy_from_slice(black_box(&src_bytes)))
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
