//! Quantized blocks made directly from random bits, with f16 scales chosen so that the
//! dequantized weights are zero-mean with a requested standard deviation. Also the f16
//! conversion and reference dequantizers the tests check the encodings with.

use super::rng::Rng;

/// Elements per Q8_0 block.
pub const Q8_0_BLOCK: usize = 32;
/// Bytes per Q8_0 block: f16 scale + 32 int8.
pub const Q8_0_BYTES: usize = 34;
/// Elements per Q4_K super-block.
pub const Q4_K_BLOCK: usize = 256;
/// Bytes per Q4_K super-block: f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 nibble bytes.
pub const Q4_K_BYTES: usize = 144;

/// Elements per Q6_K super-block.
pub const Q6_K_BLOCK: usize = 256;
/// Bytes per Q6_K super-block: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8
/// scales, f16 d.
pub const Q6_K_BYTES: usize = 210;

/// Elements per Q2_K super-block.
pub const Q2_K_BLOCK: usize = 256;
/// Bytes per Q2_K super-block: 16 bytes of 4-bit scales and mins, 64 bytes of 2-bit
/// quants, f16 d, f16 dmin.
pub const Q2_K_BYTES: usize = 84;
/// Each Q2_K sub-block takes one of these (scale, min) pairs at random, with dmin = d, so a
/// weight is d (s q - 1.5 s) for a uniform 2-bit q: zero mean whatever the pair, and the
/// sub-blocks of a block differ (a repack that mixed up their scales would show). The
/// variance is d^2 1.25 E[s^2] = 55 d^2 (E[s^2] = (4 + 16 + 36 + 64 + 100) / 5 = 44).
const Q2K_SCALE_MIN: [(u8, u8); 5] = [(2, 3), (4, 6), (6, 9), (8, 12), (10, 15)];
const Q2K_STD_PER_D: f64 = 7.416_198_487_095_663;

/// Elements per MXFP4 block.
pub const MXFP4_BLOCK: usize = 32;
/// Bytes per MXFP4 block: an E8M0 scale byte and 16 bytes of 4-bit E2M1 codes.
pub const MXFP4_BYTES: usize = 17;
/// ggml's `kvalues_mxfp4`: the E2M1 values doubled, by 4-bit code.
pub const MXFP4_VALUES: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];
/// Variance of an MXFP4 code value drawn uniformly from the 16 codes (mean 0):
/// 2 (0 + 1 + 4 + 9 + 16 + 36 + 64 + 144) / 16.
const MXFP4_VAR: f64 = 34.25;

/// Standard deviation of a Q8_0 quant drawn uniformly from -127..=127 with 0 taking
/// the place of -128 (so the mean is exactly 0): sqrt(sum k^2 / 256).
const Q8_STD: f64 = 73.467_254_950_258_6;
/// Every Q4_K sub-block uses scale 8 and min 60 with dmin = d, so a weight is
/// d * (8q - 60) = 8d (q - 7.5) for a uniform nibble q: zero mean, std 8d * sqrt(255/12).
const Q4K_SCALE: u8 = 8;
const Q4K_MIN: u8 = 60;
const Q4K_STD_PER_D: f64 = 36.878_177_829_171_55;
/// Every Q6_K sub-block uses scale 16, and the 6-bit quant q is a uniform byte's low six
/// bits with 0 replaced by 32 (so 32 is twice as likely as the others), so a weight is
/// 16d (q - 32) in -31..=31, symmetric: zero mean, std 16d * sqrt(20832 / 64).
const Q6K_SCALE: i8 = 16;
const Q6K_STD_PER_D: f64 = 288.665_896_842_699_45;

/// f32 -> IEEE half bits, round to nearest even (overflow to infinity, NaN kept NaN).
pub fn f32_to_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let man = bits & 0x007f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x0200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = man | 0x0080_0000;
        let shift = (14 - e) as u32;
        let h = m >> shift;
        let rem = m & ((1 << shift) - 1);
        let half = 1 << (shift - 1);
        let h = if rem > half || (rem == half && h & 1 == 1) {
            h + 1
        } else {
            h
        };
        return sign | h as u16;
    }
    let h = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    let h = if rem > 0x1000 || (rem == 0x1000 && h & 1 == 1) {
        h + 1
    } else {
        h
    };
    sign | h as u16
}

/// IEEE half bits -> f32 (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0f32 } else { 1.0 };
    let exp = i32::from((h >> 10) & 0x1f);
    let man = f32::from(h & 0x3ff);
    match exp {
        0 => sign * man * 2f32.powi(-24),
        0x1f if man == 0.0 => sign * f32::INFINITY,
        0x1f => f32::NAN,
        _ => sign * (1.0 + man / 1024.0) * 2f32.powi(exp - 15),
    }
}

/// Appends one row of `n` Q8_0 weights (n a multiple of 32) with standard deviation `std`.
pub fn q8_0_row(rng: &mut Rng, n: usize, std: f64, out: &mut Vec<u8>) {
    let d = f32_to_f16((std / Q8_STD) as f32).to_le_bytes();
    let mut qs = [0u8; Q8_0_BLOCK];
    for _ in 0..n / Q8_0_BLOCK {
        rng.fill_bytes(&mut qs);
        for q in &mut qs {
            if *q == 0x80 {
                *q = 0; // -128 would skew the mean; 0 takes its place
            }
        }
        out.extend_from_slice(&d);
        out.extend_from_slice(&qs);
    }
}

/// ggml's `GGML_E8M0_TO_FP32_HALF`: half of 2^(e - 127).
pub fn e8m0_half(e: u8) -> f32 {
    let bits = if e < 2 {
        0x0020_0000u32 << e
    } else {
        u32::from(e - 1) << 23
    };
    f32::from_bits(bits)
}

/// Appends one row of `n` MXFP4 weights (n a multiple of 32) with standard deviation
/// `std`. Codes are uniform (zero mean); a block's scale is a power of two, so each block
/// takes the exponent just below or just above the requested std, at random with the
/// odds that make the mean variance the requested one.
pub fn mxfp4_row(rng: &mut Rng, n: usize, std: f64, out: &mut Vec<u8>) {
    // a weight is code * 2^(e - 128), so a block's variance is MXFP4_VAR * 4^(e - 128)
    let target = std * std / MXFP4_VAR;
    let e_real = if target > 0.0 {
        target.log(4.0) + 128.0
    } else {
        2.0
    };
    let e_lo = e_real.floor().clamp(2.0, 253.0);
    let v_lo = 4f64.powf(e_lo - 128.0);
    let p_lo = ((4.0 * v_lo - target) / (3.0 * v_lo)).clamp(0.0, 1.0);
    let e_lo = e_lo as u8;
    let mut qs = [0u8; MXFP4_BLOCK / 2];
    for _ in 0..n / MXFP4_BLOCK {
        let e = if rng.next_f64() < p_lo {
            e_lo
        } else {
            e_lo + 1
        };
        rng.fill_bytes(&mut qs);
        out.push(e);
        out.extend_from_slice(&qs);
    }
}

/// Dequantizes MXFP4 blocks the way ggml's `dequantize_row_mxfp4` does: byte j of a
/// block's codes holds weight j (low nibble) and weight j + 16 (reference, for tests).
pub fn dequant_mxfp4(bytes: &[u8]) -> Vec<f32> {
    let mut out = Vec::new();
    for b in bytes.chunks_exact(MXFP4_BYTES) {
        let d = e8m0_half(b[0]);
        let qs = &b[1..];
        let mut y = [0f32; MXFP4_BLOCK];
        for (j, &q) in qs.iter().enumerate() {
            y[j] = d * f32::from(MXFP4_VALUES[usize::from(q & 0xf)]);
            y[j + MXFP4_BLOCK / 2] = d * f32::from(MXFP4_VALUES[usize::from(q >> 4)]);
        }
        out.extend_from_slice(&y);
    }
    out
}

/// Dequantizes a tensor's bytes of type `ty` with the reference dequantizers (for
/// tests): F32 and every type the generator writes; None for other types.
pub fn dequant(ty: crate::gguf::GgmlType, bytes: &[u8]) -> Option<Vec<f32>> {
    use crate::gguf::GgmlType as T;
    Some(match ty {
        T::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        T::Q8_0 => dequant_q8_0(bytes),
        T::Q4_K => dequant_q4_k(bytes),
        T::Q6_K => dequant_q6_k(bytes),
        T::Q2_K => dequant_q2_k(bytes),
        T::MXFP4 => dequant_mxfp4(bytes),
        _ => return None,
    })
}

/// Packs eight 6-bit scales and mins the way `get_scale_min_k4` unpacks them.
pub fn pack_q4k_scales(sc: [u8; 8], m: [u8; 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..4 {
        q[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        q[j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6);
        q[j + 8] = (sc[j + 4] & 15) | ((m[j + 4] & 15) << 4);
    }
    q
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j`.
pub fn unpack_q4k_scale(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Appends one row of `n` Q4_K weights (n a multiple of 256) with standard deviation `std`.
pub fn q4_k_row(rng: &mut Rng, n: usize, std: f64, out: &mut Vec<u8>) {
    let d = f32_to_f16((std / Q4K_STD_PER_D) as f32).to_le_bytes();
    let scales = pack_q4k_scales([Q4K_SCALE; 8], [Q4K_MIN; 8]);
    let mut qs = [0u8; Q4_K_BLOCK / 2];
    for _ in 0..n / Q4_K_BLOCK {
        rng.fill_bytes(&mut qs);
        out.extend_from_slice(&d); // d
        out.extend_from_slice(&d); // dmin = d: the mins cancel the nibble mean
        out.extend_from_slice(&scales);
        out.extend_from_slice(&qs);
    }
}

/// Appends one row of `n` Q2_K weights (n a multiple of 256) with standard deviation `std`.
pub fn q2_k_row(rng: &mut Rng, n: usize, std: f64, out: &mut Vec<u8>) {
    let d = f32_to_f16((std / Q2K_STD_PER_D) as f32).to_le_bytes();
    let mut qs = [0u8; Q2_K_BLOCK / 4];
    let mut scales = [0u8; 16];
    for _ in 0..n / Q2_K_BLOCK {
        rng.fill_bytes(&mut scales);
        for b in &mut scales {
            let (sc, m) = Q2K_SCALE_MIN[usize::from(*b) % Q2K_SCALE_MIN.len()];
            *b = sc | (m << 4);
        }
        rng.fill_bytes(&mut qs);
        out.extend_from_slice(&scales);
        out.extend_from_slice(&qs);
        out.extend_from_slice(&d); // d
        out.extend_from_slice(&d); // dmin = d: the mins cancel the quants' mean
    }
}

/// Dequantizes Q2_K blocks the way ggml's `dequantize_row_q2_K` does (reference, for
/// tests): two halves of 128 weights, each four groups of 32 (2-bit fields of the same
/// 32 bytes, low bits first), each group two sub-blocks of 16 with their own scale byte.
pub fn dequant_q2_k(bytes: &[u8]) -> Vec<f32> {
    let mut out = Vec::new();
    for b in bytes.chunks_exact(Q2_K_BYTES) {
        let (scales, rest) = b.split_at(16);
        let (qs, dm) = rest.split_at(64);
        let d = f16_to_f32(u16::from_le_bytes([dm[0], dm[1]]));
        let min = f16_to_f32(u16::from_le_bytes([dm[2], dm[3]]));
        let mut is = 0;
        for half in 0..2 {
            let q = &qs[32 * half..32 * half + 32];
            for shift in [0, 2, 4, 6] {
                for part in 0..2 {
                    let sc = scales[is];
                    is += 1;
                    let (dl, ml) = (d * f32::from(sc & 0xf), min * f32::from(sc >> 4));
                    for &x in &q[16 * part..16 * part + 16] {
                        out.push(dl * f32::from((x >> shift) & 3) - ml);
                    }
                }
            }
        }
    }
    out
}

/// Appends one row of `n` Q6_K weights (n a multiple of 256) with standard deviation `std`.
pub fn q6_k_row(rng: &mut Rng, n: usize, std: f64, out: &mut Vec<u8>) {
    let d = f32_to_f16((std / Q6K_STD_PER_D) as f32).to_le_bytes();
    let mut q = [0u8; Q6_K_BLOCK];
    for _ in 0..n / Q6_K_BLOCK {
        rng.fill_bytes(&mut q);
        for x in &mut q {
            *x &= 63;
            if *x == 0 {
                *x = 32; // keeps the mean at exactly 0
            }
        }
        // ggml's layout: two halves of 128 weights; in each, byte l of ql holds weights
        // l and l + 64 (low nibbles), byte l + 32 weights l + 32 and l + 96, and byte l
        // of qh the high 2 bits of weights l, l + 32, l + 64, l + 96.
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        for h in 0..2 {
            let y = &q[128 * h..128 * h + 128];
            for l in 0..32 {
                let (q1, q2, q3, q4) = (y[l], y[l + 32], y[l + 64], y[l + 96]);
                ql[64 * h + l] = (q1 & 0xf) | ((q3 & 0xf) << 4);
                ql[64 * h + l + 32] = (q2 & 0xf) | ((q4 & 0xf) << 4);
                qh[32 * h + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
            }
        }
        out.extend_from_slice(&ql);
        out.extend_from_slice(&qh);
        out.extend_from_slice(&[Q6K_SCALE as u8; 16]);
        out.extend_from_slice(&d);
    }
}

/// Dequantizes Q6_K blocks the way ggml's `dequantize_row_q6_K` does (reference, for
/// tests).
pub fn dequant_q6_k(bytes: &[u8]) -> Vec<f32> {
    let mut out = Vec::new();
    for b in bytes.chunks_exact(Q6_K_BYTES) {
        let (ql, rest) = b.split_at(128);
        let (qh, rest) = rest.split_at(64);
        let (sc, d) = rest.split_at(16);
        let d = f16_to_f32(u16::from_le_bytes([d[0], d[1]]));
        for h in 0..2 {
            let (ql, qh, sc) = (&ql[64 * h..], &qh[32 * h..], &sc[8 * h..]);
            let mut y = [0f32; 128];
            for l in 0..32 {
                let is = l / 16;
                let q = |lo: u8, shift: u8| i32::from(lo | ((qh[l] >> shift) & 3) << 4) - 32;
                let s = |i: usize| d * f32::from(sc[i] as i8);
                y[l] = s(is) * q(ql[l] & 0xf, 0) as f32;
                y[l + 32] = s(is + 2) * q(ql[l + 32] & 0xf, 2) as f32;
                y[l + 64] = s(is + 4) * q(ql[l] >> 4, 4) as f32;
                y[l + 96] = s(is + 6) * q(ql[l + 32] >> 4, 6) as f32;
            }
            out.extend_from_slice(&y);
        }
    }
    out
}

/// Dequantizes Q8_0 blocks (reference, for tests).
pub fn dequant_q8_0(bytes: &[u8]) -> Vec<f32> {
    let mut out = Vec::new();
    for b in bytes.chunks_exact(Q8_0_BYTES) {
        let d = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
        out.extend(b[2..].iter().map(|&q| d * f32::from(q as i8)));
    }
    out
}

/// Dequantizes Q4_K blocks the way ggml's `dequantize_row_q4_K` does (reference, for
/// tests).
pub fn dequant_q4_k(bytes: &[u8]) -> Vec<f32> {
    let mut out = Vec::new();
    for b in bytes.chunks_exact(Q4_K_BYTES) {
        let d = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
        let dmin = f16_to_f32(u16::from_le_bytes([b[2], b[3]]));
        let mut scales = [0u8; 12];
        scales.copy_from_slice(&b[4..16]);
        let qs = &b[16..];
        // 4 groups of 64 weights: 32 low nibbles then 32 high nibbles of 32 bytes.
        for g in 0..4 {
            let (sc1, m1) = unpack_q4k_scale(2 * g, &scales);
            let (sc2, m2) = unpack_q4k_scale(2 * g + 1, &scales);
            let q = &qs[32 * g..32 * g + 32];
            for &x in q {
                out.push(d * f32::from(sc1) * f32::from(x & 0xf) - dmin * f32::from(m1));
            }
            for &x in q {
                out.push(d * f32::from(sc2) * f32::from(x >> 4) - dmin * f32::from(m2));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(x: &[f32]) -> (f64, f64) {
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = x
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        (mean, var.sqrt())
    }

    #[test]
    fn f16_round_trip() {
        for x in [
            0.0f32,
            1.0,
            -2.5,
            65504.0,
            6.103_515_6e-5,
            5.960_464_5e-8,
            0.000_847,
        ] {
            let h = f32_to_f16(x);
            let back = f16_to_f32(h);
            assert!(
                (back - x).abs() <= x.abs() * 1e-3 + 6e-8,
                "{x} -> {h:#x} -> {back}"
            );
        }
        assert_eq!(f32_to_f16(1.0), 0x3c00);
        assert_eq!(f32_to_f16(-2.0), 0xc000);
        assert_eq!(f32_to_f16(65504.0), 0x7bff);
        assert_eq!(f32_to_f16(1e6), 0x7c00);
        assert_eq!(f32_to_f16(5.960_464_5e-8), 0x0001);
        assert_eq!(f32_to_f16(1.0 + 1.0 / 2048.0), 0x3c00, "ties to even");
        assert!(f16_to_f32(f32_to_f16(f32::NAN)).is_nan());
        // Every half value survives half -> f32 -> half.
        for h in 0..=0xffffu16 {
            let x = f16_to_f32(h);
            if !x.is_nan() {
                assert_eq!(f32_to_f16(x), h, "{h:#x}");
            }
        }
    }

    #[test]
    fn scale_packing_matches_ggml_unpacking() {
        let sc = [1, 2, 63, 17, 33, 48, 0, 62];
        let m = [5, 60, 9, 31, 63, 16, 47, 2];
        let q = pack_q4k_scales(sc, m);
        for j in 0..8 {
            assert_eq!(unpack_q4k_scale(j, &q), (sc[j], m[j]), "sub-block {j}");
        }
    }

    #[test]
    fn q8_0_blocks_have_requested_std() {
        let mut rng = Rng::new(1);
        let mut buf = Vec::new();
        q8_0_row(&mut rng, 32 * 4096, 0.05, &mut buf);
        assert_eq!(buf.len(), 4096 * Q8_0_BYTES);
        let (mean, std) = stats(&dequant_q8_0(&buf));
        assert!(mean.abs() < 0.05 * 0.01, "mean {mean}");
        assert!((std / 0.05 - 1.0).abs() < 0.01, "std {std}");
    }

    #[test]
    fn q6_k_dequant_reads_every_sub_block_scale_in_order() {
        // One block, every quant q = 33 (weight d * scale), d = 1, sixteen different
        // scales (some negative): weight i is the scale of sub-block i / 16.
        let scales: [i8; 16] = [-8, -7, -6, -5, -4, -3, -2, -1, 1, 2, 3, 4, 5, 6, 7, 8];
        let mut b = vec![0u8; Q6_K_BYTES];
        // q = 33 = 0b10_0001: low nibble 1 (both nibbles of every ql byte), high bits 2
        // (every 2-bit field of every qh byte)
        b[..128].fill(0x11);
        b[128..192].fill(0b1010_1010);
        for (i, &sc) in scales.iter().enumerate() {
            b[192 + i] = sc as u8;
        }
        b[208..210].copy_from_slice(&f32_to_f16(1.0).to_le_bytes());
        let w = dequant_q6_k(&b);
        for (i, &x) in w.iter().enumerate() {
            assert_eq!(x, f32::from(scales[i / 16]), "weight {i}");
        }
    }

    #[test]
    fn q6_k_blocks_have_requested_std() {
        let mut rng = Rng::new(4);
        let mut buf = Vec::new();
        q6_k_row(&mut rng, 256 * 512, 0.02, &mut buf);
        assert_eq!(buf.len(), 512 * Q6_K_BYTES);
        let w = dequant_q6_k(&buf);
        assert_eq!(w.len(), 256 * 512);
        let (mean, std) = stats(&w);
        assert!(mean.abs() < 0.02 * 0.01, "mean {mean}");
        assert!((std / 0.02 - 1.0).abs() < 0.01, "std {std}");
        // every weight is 16 d (q - 32) with q in 1..=63
        let d = f16_to_f32(f32_to_f16((0.02 / Q6K_STD_PER_D) as f32));
        for &x in &w {
            let k = x / (16.0 * d);
            assert!(
                (k - k.round()).abs() < 1e-3 && (-31.0..=31.0).contains(&k),
                "{x}"
            );
        }
    }

    #[test]
    fn q2_k_dequant_reads_each_sub_block_with_its_own_scale() {
        // every 2-bit quant 1, d and dmin 1, sub-block i's scale i + 1 (4 bits) and min 0,
        // except the last: scale 1, min 15. Weight j is then the value of the sub-block
        // ggml puts it in (16 consecutive weights per sub-block): 1..=15, then -14.
        let mut b = [0u8; Q2_K_BYTES];
        for (i, sc) in b[..15].iter_mut().enumerate() {
            *sc = i as u8 + 1;
        }
        b[15] = 1 | (15 << 4);
        b[16..80].fill(0b0101_0101);
        b[80..82].copy_from_slice(&f32_to_f16(1.0).to_le_bytes());
        b[82..84].copy_from_slice(&f32_to_f16(1.0).to_le_bytes());
        let w = dequant_q2_k(&b);
        for (j, &x) in w.iter().enumerate() {
            let want = if j < 240 { (j / 16 + 1) as f32 } else { -14.0 };
            assert_eq!(x, want, "weight {j}");
        }
    }

    #[test]
    fn q2_k_blocks_have_requested_std() {
        let mut rng = Rng::new(8);
        let mut buf = Vec::new();
        q2_k_row(&mut rng, 256 * 4096, 0.03, &mut buf);
        assert_eq!(buf.len(), 4096 * Q2_K_BYTES);
        let (mean, std) = stats(&dequant_q2_k(&buf));
        assert!(mean.abs() < 0.03 * 0.01, "mean {mean}");
        assert!((std / 0.03 - 1.0).abs() < 0.01, "std {std}");
        // every (scale, min) pair is used, and a block's sub-blocks differ
        let mut seen = std::collections::BTreeSet::new();
        for b in buf.chunks_exact(Q2_K_BYTES) {
            seen.extend(b[..16].iter().copied());
            assert!(b[..16].iter().any(|&x| x != b[0]), "{:?}", &b[..16]);
        }
        assert_eq!(seen.len(), Q2K_SCALE_MIN.len(), "{seen:?}");
    }

    #[test]
    fn e8m0_half_matches_ggml() {
        // ggml's denormal patterns for 0 and 1, then 2^(e - 128)
        assert_eq!(e8m0_half(0), 2f32.powi(-128));
        assert_eq!(e8m0_half(1), 2f32.powi(-127));
        assert_eq!(e8m0_half(2), 2f32.powi(-126));
        assert_eq!(e8m0_half(127), 0.5);
        assert_eq!(e8m0_half(128), 1.0);
        assert_eq!(e8m0_half(254), 2f32.powi(126));
    }

    #[test]
    fn mxfp4_dequant_reads_low_then_high_nibbles() {
        // codes 1..=15 in the low nibbles, 15 - j in the high ones, scale 1
        let mut b = [0u8; MXFP4_BYTES];
        b[0] = 128;
        for j in 0..16 {
            b[1 + j] = (j as u8) | ((15 - j as u8) << 4);
        }
        let w = dequant_mxfp4(&b);
        for j in 0..16 {
            assert_eq!(w[j], f32::from(MXFP4_VALUES[j]), "weight {j}");
            assert_eq!(
                w[j + 16],
                f32::from(MXFP4_VALUES[15 - j]),
                "weight {}",
                j + 16
            );
        }
    }

    #[test]
    fn mxfp4_blocks_have_requested_std() {
        for (seed, want) in [(5, 0.02), (6, 0.0625), (7, 1.0 / 45.0)] {
            let mut rng = Rng::new(seed);
            let mut buf = Vec::new();
            mxfp4_row(&mut rng, 32 * 8192, want, &mut buf);
            assert_eq!(buf.len(), 8192 * MXFP4_BYTES);
            let w = dequant_mxfp4(&buf);
            let (mean, std) = stats(&w);
            assert!(mean.abs() < want * 0.02, "mean {mean}");
            assert!((std / want - 1.0).abs() < 0.02, "std {std} for {want}");
            // the scales are the two powers of two around the requested std
            let mut es: Vec<u8> = buf.chunks_exact(MXFP4_BYTES).map(|b| b[0]).collect();
            es.sort_unstable();
            es.dedup();
            assert!(
                es.len() <= 2 && es.windows(2).all(|p| p[1] == p[0] + 1),
                "{es:?}"
            );
        }
    }

    #[test]
    fn q4_k_blocks_have_requested_std() {
        let mut rng = Rng::new(2);
        let mut buf = Vec::new();
        q4_k_row(&mut rng, 256 * 512, 0.03, &mut buf);
        assert_eq!(buf.len(), 512 * Q4_K_BYTES);
        let (mean, std) = stats(&dequant_q4_k(&buf));
        assert!(mean.abs() < 0.03 * 0.01, "mean {mean}");
        assert!((std / 0.03 - 1.0).abs() < 0.01, "std {std}");
    }
}
