//! Bit packing of `b`-bit codes (`1 <= b <= 16`) into a dense little-endian
//! bitstream — the layout of docs/format.md, shared with the CUDA kernels and
//! the pure-torch reference (`gsrq.reference.pack_codes_torch`).
//!
//! Code `i` occupies stream bits `[i*b, (i+1)*b)`, least significant bit
//! first; stream bit `j` is bit `j % 8` of byte `j / 8`. A stream of `n` codes
//! is exactly `ceil(n*b/8)` bytes and its trailing pad bits are zero.
//!
//! Eight codes always fill exactly `b` bytes, so the kernels work on groups of
//! eight codes with the width as a const generic (one monomorphised routine per
//! width, every shift a constant), plus plain byte/halfword loops for `b = 8`
//! and `b = 16`. Row-wise functions pack many rows of `n` codes, each row
//! padded to whole bytes (one packed row per cached token), in parallel with
//! rayon when the input is large.

use rayon::prelude::*;

use crate::error::{GsrqError, Result};

/// Largest supported code width.
pub const MAX_BITS: u32 = 16;

/// Codes per block when validating, and per parallel task. A multiple of 8,
/// so every block starts on a byte boundary of the stream.
const BLOCK: usize = 1 << 14;

/// Work (codes) above which the parallel entry points split across threads.
const PAR_MIN_CODES: usize = 1 << 18;

/// An integer type that can be packed. Signed values are sign-extended, so a
/// negative code becomes a huge unsigned value and fails every range check.
pub trait Code: Copy + Send + Sync + 'static {
    /// The value as 64 raw bits (negative values sign-extended).
    fn raw(self) -> u64;
    /// The value as a (lossless) signed number, for error messages.
    fn value(self) -> i128;
}

macro_rules! impl_code {
    (unsigned: $($t:ty),*; signed: $($s:ty),*) => {
        $(impl Code for $t {
            #[inline(always)]
            fn raw(self) -> u64 { self as u64 }
            fn value(self) -> i128 { self as i128 }
        })*
        $(impl Code for $s {
            #[inline(always)]
            fn raw(self) -> u64 { self as i64 as u64 }
            fn value(self) -> i128 { self as i128 }
        })*
    };
}
impl_code!(unsigned: u8, u16, u32, u64, usize; signed: i8, i16, i32, i64, isize);

/// Checks that `bits` is a supported width (1..=16).
pub fn check_bits(bits: u32) -> Result<()> {
    if (1..=MAX_BITS).contains(&bits) {
        Ok(())
    } else {
        Err(GsrqError::InvalidBits { bits })
    }
}

/// Bytes of a packed stream of `count` codes of `bits` bits: `ceil(count*bits/8)`.
pub fn packed_len(count: usize, bits: u32) -> Result<usize> {
    check_bits(bits)?;
    count
        .checked_mul(bits as usize)
        .map(|b| b.div_ceil(8))
        .ok_or_else(|| {
            GsrqError::InvalidValue(format!(
                "{count} codes of {bits} bits overflow the address space"
            ))
        })
}

// ---------------------------------------------------------------- validation

/// First code of `codes` that does not fit in `bits` bits, as an error whose
/// index is `base + position`.
#[cold]
fn out_of_range<T: Code>(codes: &[T], bits: u32, base: usize) -> GsrqError {
    let (i, c) = codes
        .iter()
        .enumerate()
        .find(|(_, c)| c.raw() >> bits != 0)
        .expect("out_of_range called on a valid block");
    GsrqError::CodeOutOfRange {
        index: base + i,
        value: c.value(),
        bits,
    }
}

/// `Ok` if every code fits in `bits` bits (vectorised OR-reduction).
#[inline]
fn validate<T: Code>(codes: &[T], bits: u32, base: usize) -> Result<()> {
    let any = codes.iter().fold(0u64, |a, c| a | c.raw());
    if any >> bits != 0 {
        Err(out_of_range(codes, bits, base))
    } else {
        Ok(())
    }
}

// ------------------------------------------------------------- the kernels

/// Packs validated codes; `out.len() == ceil(codes.len()*B/8)`.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // constant-index loops, fully unrolled
fn pack_const<const B: usize, T: Code>(codes: &[T], out: &mut [u8]) {
    debug_assert_eq!(out.len(), (codes.len() * B).div_ceil(8));
    let groups = codes.len() / 8;
    let (cmain, ctail) = codes.split_at(groups * 8);
    let (omain, otail) = out.split_at_mut(groups * B);
    if B == 8 {
        for (o, c) in omain.iter_mut().zip(cmain) {
            *o = c.raw() as u8;
        }
    } else if B == 16 {
        for (o, c) in omain.chunks_exact_mut(2).zip(cmain) {
            o.copy_from_slice(&(c.raw() as u16).to_le_bytes());
        }
    } else if B <= 8 {
        for (c, o) in cmain.chunks_exact(8).zip(omain.chunks_exact_mut(B)) {
            let mut acc = 0u64;
            for k in 0..8 {
                acc |= c[k].raw() << (k * B);
            }
            o.copy_from_slice(&acc.to_le_bytes()[..B]);
        }
    } else {
        for (c, o) in cmain.chunks_exact(8).zip(omain.chunks_exact_mut(B)) {
            // two halves of four codes: 4*B <= 64 bits each
            let mut lo = 0u64;
            let mut hi = 0u64;
            for k in 0..4 {
                lo |= c[k].raw() << (k * B);
                hi |= c[k + 4].raw() << (k * B);
            }
            let acc = (lo as u128) | ((hi as u128) << (4 * B));
            o.copy_from_slice(&acc.to_le_bytes()[..B]);
        }
    }
    if !ctail.is_empty() {
        let mut acc = 0u128;
        for (k, c) in ctail.iter().enumerate() {
            acc |= (c.raw() as u128) << (k * B);
        }
        let n = otail.len();
        otail.copy_from_slice(&acc.to_le_bytes()[..n]);
    }
}

/// Unpacks `out.len()` codes from `packed` (at least `ceil(out.len()*B/8)` bytes).
#[inline(always)]
#[allow(clippy::needless_range_loop)] // constant-index loops, fully unrolled
fn unpack_const<const B: usize>(packed: &[u8], out: &mut [u16]) {
    let groups = out.len() / 8;
    let len = (out.len() * B).div_ceil(8);
    let (omain, otail) = out.split_at_mut(groups * 8);
    let pmain = &packed[..groups * B];
    let ptail = &packed[groups * B..len];
    let mask = ((1u32 << B) - 1) as u64;
    if B == 8 {
        for (o, p) in omain.iter_mut().zip(pmain) {
            *o = *p as u16;
        }
    } else if B == 16 {
        for (o, p) in omain.iter_mut().zip(pmain.chunks_exact(2)) {
            *o = u16::from_le_bytes([p[0], p[1]]);
        }
    } else if B <= 8 {
        for (o, p) in omain.chunks_exact_mut(8).zip(pmain.chunks_exact(B)) {
            let mut buf = [0u8; 8];
            buf[..B].copy_from_slice(p);
            let w = u64::from_le_bytes(buf);
            for k in 0..8 {
                o[k] = ((w >> (k * B)) & mask) as u16;
            }
        }
    } else {
        // Groups whose 16-byte window lies inside `packed`: two unaligned u64
        // loads, codes 0..4 from byte 0 and codes 4..8 from byte B/2 (bit
        // offset 4 when B is odd; 4*B + 4 <= 64 for B <= 15).
        let fast = if packed.len() >= 16 {
            ((packed.len() - 16) / B + 1).min(groups)
        } else {
            0
        };
        let (ofast, oslow) = omain.split_at_mut(fast * 8);
        for (g, o) in ofast.chunks_exact_mut(8).enumerate() {
            let p = &packed[g * B..g * B + 16];
            let lo = u64::from_le_bytes(p[..8].try_into().unwrap());
            let hi = u64::from_le_bytes(p[B / 2..B / 2 + 8].try_into().unwrap()) >> ((4 * B) % 8);
            for k in 0..4 {
                o[k] = ((lo >> (k * B)) & mask) as u16;
                o[k + 4] = ((hi >> (k * B)) & mask) as u16;
            }
        }
        for (o, p) in oslow
            .chunks_exact_mut(8)
            .zip(pmain[fast * B..].chunks_exact(B))
        {
            let mut buf = [0u8; 16];
            buf[..B].copy_from_slice(p);
            let w = u128::from_le_bytes(buf);
            let lo = w as u64;
            let hi = (w >> (4 * B)) as u64;
            for k in 0..4 {
                o[k] = ((lo >> (k * B)) & mask) as u16;
                o[k + 4] = ((hi >> (k * B)) & mask) as u16;
            }
        }
    }
    if !otail.is_empty() {
        let mut buf = [0u8; 16];
        buf[..ptail.len()].copy_from_slice(ptail);
        let w = u128::from_le_bytes(buf);
        for (k, o) in otail.iter_mut().enumerate() {
            *o = ((w >> (k * B)) as u64 & mask) as u16;
        }
    }
}

macro_rules! dispatch_bits {
    ($bits:expr, $f:ident, $($ty:ty),* ; $($arg:expr),*) => {
        match $bits {
            1 => $f::<1, $($ty),*>($($arg),*),
            2 => $f::<2, $($ty),*>($($arg),*),
            3 => $f::<3, $($ty),*>($($arg),*),
            4 => $f::<4, $($ty),*>($($arg),*),
            5 => $f::<5, $($ty),*>($($arg),*),
            6 => $f::<6, $($ty),*>($($arg),*),
            7 => $f::<7, $($ty),*>($($arg),*),
            8 => $f::<8, $($ty),*>($($arg),*),
            9 => $f::<9, $($ty),*>($($arg),*),
            10 => $f::<10, $($ty),*>($($arg),*),
            11 => $f::<11, $($ty),*>($($arg),*),
            12 => $f::<12, $($ty),*>($($arg),*),
            13 => $f::<13, $($ty),*>($($arg),*),
            14 => $f::<14, $($ty),*>($($arg),*),
            15 => $f::<15, $($ty),*>($($arg),*),
            16 => $f::<16, $($ty),*>($($arg),*),
            _ => unreachable!("bits checked before dispatch"),
        }
    };
}

/// Validates and packs one stream, block by block; `out` is exactly sized.
/// `base` offsets the index reported for an out-of-range code.
fn pack_stream_const<const B: usize, T: Code>(
    codes: &[T],
    out: &mut [u8],
    base: usize,
) -> Result<()> {
    let block_bytes = BLOCK * B / 8;
    for (i, (c, o)) in codes
        .chunks(BLOCK)
        .zip(out.chunks_mut(block_bytes))
        .enumerate()
    {
        validate(c, B as u32, base + i * BLOCK)?;
        pack_const::<B, T>(c, o);
    }
    Ok(())
}

fn pack_stream<T: Code>(codes: &[T], bits: u32, out: &mut [u8], base: usize) -> Result<()> {
    dispatch_bits!(bits, pack_stream_const, T; codes, out, base)
}

fn unpack_stream(packed: &[u8], bits: u32, out: &mut [u16]) {
    dispatch_bits!(bits, unpack_const, ; packed, out)
}

// ----------------------------------------------------------- public: streams

/// Packs `codes` into `out[..packed_len(codes.len(), bits)]` on the calling
/// thread and returns that length.
///
/// Errors: [`GsrqError::InvalidBits`], [`GsrqError::CodeOutOfRange`] (the
/// first offending code; `out` may then hold a partial stream),
/// [`GsrqError::BufferTooShort`]. Nothing is written past the packed length.
pub fn pack_into<T: Code>(codes: &[T], bits: u32, out: &mut [u8]) -> Result<usize> {
    let len = packed_len(codes.len(), bits)?;
    if out.len() < len {
        return Err(GsrqError::BufferTooShort {
            needed: len,
            got: out.len(),
        });
    }
    pack_stream(codes, bits, &mut out[..len], 0)?;
    Ok(len)
}

/// Packs `codes` into a new stream of exactly `ceil(codes.len()*bits/8)` bytes.
pub fn pack<T: Code>(codes: &[T], bits: u32) -> Result<Vec<u8>> {
    let mut out = vec![0u8; packed_len(codes.len(), bits)?];
    pack_into(codes, bits, &mut out)?;
    Ok(out)
}

/// Unpacks `out.len()` codes from `packed` on the calling thread. Bytes of
/// `packed` past `ceil(out.len()*bits/8)` are ignored.
///
/// Errors: [`GsrqError::InvalidBits`], [`GsrqError::BufferTooShort`].
pub fn unpack_into(packed: &[u8], bits: u32, out: &mut [u16]) -> Result<()> {
    let len = packed_len(out.len(), bits)?;
    if packed.len() < len {
        return Err(GsrqError::BufferTooShort {
            needed: len,
            got: packed.len(),
        });
    }
    unpack_stream(&packed[..len], bits, out);
    Ok(())
}

/// Unpacks `count` codes of `bits` bits from the start of `packed`.
pub fn unpack(packed: &[u8], bits: u32, count: usize) -> Result<Vec<u16>> {
    let len = packed_len(count, bits)?;
    if packed.len() < len {
        return Err(GsrqError::BufferTooShort {
            needed: len,
            got: packed.len(),
        });
    }
    let mut out = vec![0u16; count];
    unpack_stream(packed, bits, &mut out);
    Ok(out)
}

/// [`pack_into`], split across rayon's threads for long inputs. The result is
/// identical; on several bad codes the lowest index is reported.
pub fn par_pack_into<T: Code>(codes: &[T], bits: u32, out: &mut [u8]) -> Result<usize> {
    let len = packed_len(codes.len(), bits)?;
    if out.len() < len {
        return Err(GsrqError::BufferTooShort {
            needed: len,
            got: out.len(),
        });
    }
    if codes.len() < PAR_MIN_CODES {
        pack_stream(codes, bits, &mut out[..len], 0)?;
        return Ok(len);
    }
    let block_bytes = BLOCK * bits as usize / 8;
    let results: Vec<Result<()>> = codes
        .par_chunks(BLOCK)
        .zip(out[..len].par_chunks_mut(block_bytes))
        .enumerate()
        .map(|(i, (c, o))| pack_stream(c, bits, o, i * BLOCK))
        .collect();
    results.into_iter().collect::<Result<()>>()?;
    Ok(len)
}

/// [`unpack_into`], split across rayon's threads for long outputs.
pub fn par_unpack_into(packed: &[u8], bits: u32, out: &mut [u16]) -> Result<()> {
    let len = packed_len(out.len(), bits)?;
    if packed.len() < len {
        return Err(GsrqError::BufferTooShort {
            needed: len,
            got: packed.len(),
        });
    }
    if out.len() < PAR_MIN_CODES {
        unpack_stream(&packed[..len], bits, out);
        return Ok(());
    }
    let block_bytes = BLOCK * bits as usize / 8;
    out.par_chunks_mut(BLOCK)
        .zip(packed[..len].par_chunks(block_bytes))
        .for_each(|(o, p)| unpack_stream(p, bits, o));
    Ok(())
}

// -------------------------------------------------------------- public: rows

/// Packs `rows` rows of `row_len` codes each (`codes` row-major, length
/// `rows*row_len`) into `out`, row `r` at bytes
/// `[r*row_bytes, (r+1)*row_bytes)` with `row_bytes = ceil(row_len*bits/8)`:
/// every row starts on a byte boundary and its pad bits are zero. Large inputs
/// run in parallel. A bad code is reported with its flat index `r*row_len + i`
/// (the lowest one if there are several). Returns `row_bytes`.
pub fn pack_rows_into<T: Code>(
    codes: &[T],
    rows: usize,
    row_len: usize,
    bits: u32,
    out: &mut [u8],
) -> Result<usize> {
    let row_bytes = packed_len(row_len, bits)?;
    let total = rows
        .checked_mul(row_len)
        .ok_or_else(|| GsrqError::Shape(format!("{rows} rows of {row_len} codes overflow")))?;
    if codes.len() != total {
        return Err(GsrqError::Shape(format!(
            "codes hold {} values, expected {rows} rows x {row_len} = {total}",
            codes.len()
        )));
    }
    let needed = rows
        .checked_mul(row_bytes)
        .ok_or_else(|| GsrqError::Shape(format!("{rows} rows of {row_bytes} bytes overflow")))?;
    if out.len() < needed {
        return Err(GsrqError::BufferTooShort {
            needed,
            got: out.len(),
        });
    }
    if rows == 0 || row_len == 0 {
        return Ok(row_bytes);
    }
    if rows == 1 {
        par_pack_into(codes, bits, &mut out[..row_bytes])?;
        return Ok(row_bytes);
    }
    let out = &mut out[..needed];
    let serial = |codes: &[T], out: &mut [u8], first_row: usize| -> Result<()> {
        for (r, (c, o)) in codes
            .chunks_exact(row_len)
            .zip(out.chunks_exact_mut(row_bytes))
            .enumerate()
        {
            pack_stream(c, bits, o, (first_row + r) * row_len)?;
        }
        Ok(())
    };
    if total < PAR_MIN_CODES {
        return serial(codes, out, 0).map(|_| row_bytes);
    }
    let rows_per_task = BLOCK.div_ceil(row_len).max(1);
    let results: Vec<Result<()>> = codes
        .par_chunks(rows_per_task * row_len)
        .zip(out.par_chunks_mut(rows_per_task * row_bytes))
        .enumerate()
        .map(|(t, (c, o))| serial(c, o, t * rows_per_task))
        .collect();
    results.into_iter().collect::<Result<()>>()?;
    Ok(row_bytes)
}

/// Packs rows into a new buffer of `rows * ceil(row_len*bits/8)` bytes.
pub fn pack_rows<T: Code>(codes: &[T], rows: usize, row_len: usize, bits: u32) -> Result<Vec<u8>> {
    let row_bytes = packed_len(row_len, bits)?;
    let n = rows
        .checked_mul(row_bytes)
        .ok_or_else(|| GsrqError::Shape(format!("{rows} rows of {row_bytes} bytes overflow")))?;
    let mut out = vec![0u8; n];
    pack_rows_into(codes, rows, row_len, bits, &mut out)?;
    Ok(out)
}

/// Unpacks `count` codes from each of `rows` rows of `stride` bytes (row `r`
/// at `packed[r*stride..]`, `stride >= ceil(count*bits/8)`; extra bytes of a
/// row are ignored) into `out` (`rows*count` codes, row-major).
pub fn unpack_rows_into(
    packed: &[u8],
    rows: usize,
    stride: usize,
    bits: u32,
    count: usize,
    out: &mut [u16],
) -> Result<()> {
    let row_bytes = packed_len(count, bits)?;
    if stride < row_bytes {
        return Err(GsrqError::BufferTooShort {
            needed: row_bytes,
            got: stride,
        });
    }
    let in_len = rows
        .checked_mul(stride)
        .ok_or_else(|| GsrqError::Shape(format!("{rows} rows of {stride} bytes overflow")))?;
    if packed.len() < in_len {
        return Err(GsrqError::BufferTooShort {
            needed: in_len,
            got: packed.len(),
        });
    }
    let total = rows
        .checked_mul(count)
        .ok_or_else(|| GsrqError::Shape(format!("{rows} rows of {count} codes overflow")))?;
    if out.len() != total {
        return Err(GsrqError::Shape(format!(
            "output holds {} codes, expected {rows} rows x {count} = {total}",
            out.len()
        )));
    }
    if rows == 0 || count == 0 {
        return Ok(());
    }
    if rows == 1 {
        return par_unpack_into(&packed[..row_bytes], bits, out);
    }
    let packed = &packed[..in_len];
    let serial = |p: &[u8], o: &mut [u16]| {
        for (pr, or) in p.chunks_exact(stride).zip(o.chunks_exact_mut(count)) {
            unpack_stream(&pr[..row_bytes], bits, or);
        }
    };
    if total < PAR_MIN_CODES {
        serial(packed, out);
        return Ok(());
    }
    let rows_per_task = BLOCK.div_ceil(count).max(1);
    out.par_chunks_mut(rows_per_task * count)
        .zip(packed.par_chunks(rows_per_task * stride))
        .for_each(|(o, p)| serial(p, o));
    Ok(())
}

/// Unpacks rows into a new `rows*count` vector (see [`unpack_rows_into`]).
pub fn unpack_rows(
    packed: &[u8],
    rows: usize,
    stride: usize,
    bits: u32,
    count: usize,
) -> Result<Vec<u16>> {
    let total = rows
        .checked_mul(count)
        .ok_or_else(|| GsrqError::Shape(format!("{rows} rows of {count} codes overflow")))?;
    packed_len(count, bits)?;
    let mut out = vec![0u16; total];
    unpack_rows_into(packed, rows, stride, bits, count, &mut out)?;
    Ok(out)
}

// ---------------------------------------------------------------------- tests

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Bit-by-bit oracle of the documented layout.
    fn pack_naive(codes: &[u64], bits: u32) -> Vec<u8> {
        let mut out = vec![0u8; (codes.len() * bits as usize).div_ceil(8)];
        for (i, &c) in codes.iter().enumerate() {
            for t in 0..bits as usize {
                if (c >> t) & 1 == 1 {
                    let j = i * bits as usize + t;
                    out[j / 8] |= 1 << (j % 8);
                }
            }
        }
        out
    }

    fn codes_strategy() -> impl Strategy<Value = (u32, Vec<u64>)> {
        (1u32..=16).prop_flat_map(|b| {
            let max = (1u64 << b) - 1;
            (Just(b), prop::collection::vec(0..=max, 0..300))
        })
    }

    #[test]
    fn known_bytes() {
        // 3-bit codes 1,2,3,4,5 -> bits 100 010 110 001 101 (LSB first)
        // stream: 1,0,0, 0,1,0, 1,1,0, 0,0,1, 1,0,1 -> byte0 = 0b1101_0001 = 0xD1, byte1 = 0b0101_1000 = 0x58 (bit 15 pad)
        assert_eq!(pack(&[1u8, 2, 3, 4, 5], 3).unwrap(), vec![0xD1, 0x58]);
        assert_eq!(pack(&[0x1234u16], 16).unwrap(), vec![0x34, 0x12]);
        assert_eq!(pack(&[0x3FFu16, 0], 10).unwrap(), vec![0xFF, 0x03, 0x00]);
        assert_eq!(
            pack(&[1u8, 0, 1, 1, 0, 0, 0, 1, 1], 1).unwrap(),
            vec![0b1000_1101, 0b1]
        );
        assert_eq!(unpack(&[0xD1, 0x58], 3, 5).unwrap(), vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn every_width_every_small_length() {
        for b in 1..=16u32 {
            for n in 0..40usize {
                let codes: Vec<u64> = (0..n as u64)
                    .map(|i| (i * 2654435761 + 7) & ((1 << b) - 1))
                    .collect();
                let packed = pack(&codes, b).unwrap();
                assert_eq!(packed, pack_naive(&codes, b), "b={b} n={n}");
                let back = unpack(&packed, b, n).unwrap();
                assert_eq!(back.iter().map(|&x| x as u64).collect::<Vec<_>>(), codes);
            }
        }
    }

    #[test]
    fn errors() {
        assert!(matches!(
            pack(&[0u8], 0),
            Err(GsrqError::InvalidBits { bits: 0 })
        ));
        assert!(matches!(
            pack(&[0u8], 17),
            Err(GsrqError::InvalidBits { bits: 17 })
        ));
        assert!(matches!(
            unpack(&[0u8], 17, 1),
            Err(GsrqError::InvalidBits { bits: 17 })
        ));
        match pack(&[1u16, 2, 300, 7, 400], 8) {
            Err(GsrqError::CodeOutOfRange {
                index: 2,
                value: 300,
                bits: 8,
            }) => {}
            other => panic!("{other:?}"),
        }
        match pack(&[1i32, -1], 4) {
            Err(GsrqError::CodeOutOfRange {
                index: 1,
                value: -1,
                bits: 4,
            }) => {}
            other => panic!("{other:?}"),
        }
        match pack(&[u64::MAX], 16) {
            Err(GsrqError::CodeOutOfRange {
                index: 0, value, ..
            }) => assert_eq!(value, u64::MAX as i128),
            other => panic!("{other:?}"),
        }
        let msg = pack(&[0u16, 70000u32 as u16], 3).unwrap_err().to_string();
        assert!(msg.contains("index 1"), "{msg}");
        assert!(matches!(
            unpack(&[0u8; 3], 10, 3),
            Err(GsrqError::BufferTooShort { needed: 4, got: 3 })
        ));
        let mut small = [0u8; 1];
        assert!(matches!(
            pack_into(&[1u8, 2, 3], 4, &mut small),
            Err(GsrqError::BufferTooShort { needed: 2, got: 1 })
        ));
        // an error deep in a long parallel input reports the lowest index
        let mut big = vec![5u16; 3 * PAR_MIN_CODES + 3];
        big[PAR_MIN_CODES + 11] = 64;
        big[2 * PAR_MIN_CODES] = 99;
        let mut out = vec![0u8; packed_len(big.len(), 6).unwrap()];
        match par_pack_into(&big, 6, &mut out) {
            Err(GsrqError::CodeOutOfRange {
                index,
                value: 64,
                bits: 6,
            }) => assert_eq!(index, PAR_MIN_CODES + 11),
            other => panic!("{other:?}"),
        }
        match pack_rows(&big[..3 * PAR_MIN_CODES], 3 * PAR_MIN_CODES / 64, 64, 6) {
            Err(GsrqError::CodeOutOfRange {
                index,
                value: 64,
                bits: 6,
            }) => assert_eq!(index, PAR_MIN_CODES + 11),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn no_write_past_packed_len() {
        let mut out = vec![0xAAu8; 16];
        let n = pack_into(&[1u8, 2, 3], 5, &mut out).unwrap();
        assert_eq!(n, 2);
        assert!(out[2..].iter().all(|&x| x == 0xAA));
    }

    #[test]
    fn parallel_matches_serial() {
        for &b in &[1u32, 3, 8, 10, 12, 13, 16] {
            let n = PAR_MIN_CODES * 2 + 13;
            let codes: Vec<u32> = (0..n as u32)
                .map(|i| i.wrapping_mul(2654435761) >> (32 - b))
                .collect();
            let serial = pack(&codes, b).unwrap();
            let mut par = vec![0u8; serial.len()];
            par_pack_into(&codes, b, &mut par).unwrap();
            assert_eq!(serial, par);
            let mut back = vec![0u16; n];
            par_unpack_into(&par, b, &mut back).unwrap();
            assert!(back.iter().zip(&codes).all(|(&x, &y)| x as u32 == y));
        }
    }

    #[test]
    fn rows_large_parallel() {
        let (rows, len, b) = (5000usize, 61usize, 11u32);
        let codes: Vec<u16> = (0..rows * len)
            .map(|i| ((i as u64 * 40503) % 2048) as u16)
            .collect();
        let packed = pack_rows(&codes, rows, len, b).unwrap();
        let rb = packed_len(len, b).unwrap();
        for r in [0, 1, 2500, rows - 1] {
            assert_eq!(
                &packed[r * rb..(r + 1) * rb],
                pack(&codes[r * len..(r + 1) * len], b).unwrap().as_slice()
            );
        }
        assert_eq!(unpack_rows(&packed, rows, rb, b, len).unwrap(), codes);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn round_trip((b, codes) in codes_strategy()) {
            let packed = pack(&codes, b).unwrap();
            prop_assert_eq!(packed.len(), (codes.len() * b as usize).div_ceil(8));
            prop_assert_eq!(&packed, &pack_naive(&codes, b));
            let back = unpack(&packed, b, codes.len()).unwrap();
            prop_assert_eq!(back.iter().map(|&x| x as u64).collect::<Vec<_>>(), codes.clone());
            // signed input, same stream
            let signed: Vec<i32> = codes.iter().map(|&c| c as i32).collect();
            prop_assert_eq!(pack(&signed, b).unwrap(), packed);
        }

        #[test]
        fn rows_round_trip(b in 1u32..=16, rows in 0usize..12, len in 0usize..40, seed in any::<u64>()) {
            let mask = (1u64 << b) - 1;
            let codes: Vec<u16> = (0..rows * len)
                .map(|i| ((seed ^ (i as u64).wrapping_mul(0x9E3779B97F4A7C15)).rotate_left(17) & mask) as u16)
                .collect();
            let packed = pack_rows(&codes, rows, len, b).unwrap();
            let rb = (len * b as usize).div_ceil(8);
            prop_assert_eq!(packed.len(), rows * rb);
            for r in 0..rows {
                let row: Vec<u64> = codes[r * len..(r + 1) * len].iter().map(|&c| c as u64).collect();
                let expect = pack_naive(&row, b);
                prop_assert_eq!(&packed[r * rb..(r + 1) * rb], expect.as_slice());
            }
            prop_assert_eq!(unpack_rows(&packed, rows, rb, b, len).unwrap(), codes.clone());
            // a wider stride: padding bytes per row are ignored
            let stride = rb + 3;
            let mut wide = vec![0xFFu8; rows * stride];
            for r in 0..rows {
                wide[r * stride..r * stride + rb].copy_from_slice(&packed[r * rb..(r + 1) * rb]);
            }
            prop_assert_eq!(unpack_rows(&wide, rows, stride, b, len).unwrap(), codes);
        }

        #[test]
        fn out_of_range_is_found(b in 1u32..=15, n in 1usize..200, pos in any::<prop::sample::Index>(), extra in 0u32..1000) {
            let mut codes = vec![0u32; n];
            let i = pos.index(n);
            codes[i] = (1u32 << b) + extra;
            match pack(&codes, b) {
                Err(GsrqError::CodeOutOfRange { index, value, bits }) => {
                    prop_assert_eq!(index, i);
                    prop_assert_eq!(value, ((1u32 << b) + extra) as i128);
                    prop_assert_eq!(bits, b);
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }

        #[test]
        fn short_buffer_is_an_error(b in 1u32..=16, n in 1usize..200) {
            let len = (n * b as usize).div_ceil(8);
            let short = vec![0u8; len - 1];
            let is_short = matches!(unpack(&short, b, n), Err(GsrqError::BufferTooShort { .. }));
            prop_assert!(is_short);
        }
    }
}
