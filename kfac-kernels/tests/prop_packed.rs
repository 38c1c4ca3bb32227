//! Properties of `kernels::packed`: the packed lower-triangle layout and
//! its helpers against an explicit column-by-column enumeration, and the
//! bf16 / f16 conversions against hand-written decoders and ulp bounds.

#[macro_use]
mod common;

use common::*;
use kfac_kernels::packed::{
    accumulate_packed, add_packed_to_lower, bf16, bf16_to_f32, f16, f16_to_f32, f32_to_bf16,
    f32_to_f16, pack_lower, packed_index, packed_len, unpack_lower,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

fn fail(e: kfac_kernels::Error) -> TestCaseError {
    TestCaseError::fail(format!("kernel returned an error: {e}"))
}

const SENTINEL: f64 = -77.625;

/// The positions `(i, j)`, `i >= j`, of an `n x n` lower triangle in packed
/// order: column by column, top to bottom.
fn packed_order(n: usize) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    for j in 0..n {
        for i in j..n {
            v.push((i, j));
        }
    }
    v
}

// ---------------------------------------------------------------------------
// packed_len / packed_index
// ---------------------------------------------------------------------------

fn any_dim() -> impl Strategy<Value = usize> {
    prop_oneof![
        0usize..=100,
        any::<usize>(),
        // Around the overflow boundary n (n + 1) / 2 = usize::MAX.
        {
            let root = ((usize::MAX as f64) * 2.0).sqrt() as usize;
            (root - 1000)..=(root + 1000)
        },
    ]
}

proptest! {
    #![proptest_config(common::config())]

    /// `packed_len(n) = n (n + 1) / 2` exactly (computed in u128), `None`
    /// exactly when that overflows `usize`.
    #[test]
    fn packed_len_is_triangular_number_or_none_on_overflow(n in any_dim()) {
        let exact = (n as u128) * (n as u128 + 1) / 2;
        let want = if exact <= usize::MAX as u128 { Some(exact as usize) } else { None };
        prop_assert_eq!(packed_len(n), want);
    }

    /// `packed_index(n, i, j)` is the position of `(i, j)` when the lower
    /// triangle is enumerated column by column.
    #[test]
    fn packed_index_enumerates_lower_triangle_by_columns(n in 0usize..=200) {
        let order = packed_order(n);
        prop_assert_eq!(packed_len(n), Some(order.len()));
        for (k, &(i, j)) in order.iter().enumerate() {
            prop_assert_eq!(packed_index(n, i, j), k, "({}, {}) of {}", i, j, n);
        }
    }
}

// ---------------------------------------------------------------------------
// pack_lower / unpack_lower / add_packed_to_lower / accumulate_packed
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct PackCase {
    n: usize,
    src_layout: Layout,
    dst_layout: Layout,
    mirror: bool,
    scale: f64,
    seed: u64,
}

fn pack_case() -> impl Strategy<Value = PackCase> {
    (
        0usize..=30,
        layout(),
        layout(),
        any::<bool>(),
        prop_oneof![Just(1.0), Just(0.0), -3.0..3.0f64],
        any::<u64>(),
    )
        .prop_map(
            |(n, src_layout, dst_layout, mirror, scale, seed)| PackCase {
                n,
                src_layout,
                dst_layout,
                mirror,
                scale,
                seed,
            },
        )
}

/// `pack_lower` writes the lower triangle in column order (bitwise), and
/// `unpack_lower` puts it back: the lower triangle bitwise equal to the
/// source, the upper one untouched (`mirror = false`) or the bitwise
/// transpose of the lower one (`mirror = true`), the padding untouched.
fn check_pack_roundtrip<T: Flt>(case: &PackCase) -> Result<(), TestCaseError> {
    let n = case.n;
    let mut rg = Gen::new(case.seed);
    let src = rg.matrix(n, n);
    let src_s = Stored::<T>::from_m(&src, case.src_layout, T::from_f64(f64::NAN));
    let order = packed_order(n);
    let mut packed = vec![T::from_f64(SENTINEL); order.len()];
    pack_lower(src_s.view(), &mut packed).map_err(fail)?;
    for (k, &(i, j)) in order.iter().enumerate() {
        prop_assert_eq!(packed[k].bits(), src_s.get(i, j).bits(), "packed[{}]", k);
    }

    let fill = rg.matrix(n, n);
    let mut dst = Stored::<T>::from_m(&fill, case.dst_layout, T::from_f64(SENTINEL));
    let before = dst.clone();
    unpack_lower(&packed, dst.view_mut(), case.mirror).map_err(fail)?;
    for &(i, j) in &order {
        prop_assert_eq!(
            dst.get(i, j).bits(),
            src_s.get(i, j).bits(),
            "lower ({}, {})",
            i,
            j
        );
        if case.mirror && i != j {
            prop_assert_eq!(
                dst.get(j, i).bits(),
                src_s.get(i, j).bits(),
                "mirrored ({}, {})",
                j,
                i
            );
        }
    }
    let mirror = case.mirror;
    check_untouched("unpack_lower", &before, &dst, |i, j| i < j && !mirror)
}

both_types!(
    pack_then_unpack_roundtrips_lower_triangle,
    pack_case(),
    check_pack_roundtrip
);

/// `add_packed_to_lower(src, dst, s)`: `dst[i, j] += s * src[k(i, j)]` on
/// the lower triangle (one product and one sum, or one FMA: within
/// `2 eps (|dst| + |s src|)`), the upper triangle and padding untouched.
fn check_add_packed<T: Flt>(case: &PackCase) -> Result<(), TestCaseError> {
    let n = case.n;
    let mut rg = Gen::new(case.seed);
    let order = packed_order(n);
    let packed: Vec<T> = (0..order.len())
        .map(|_| T::from_f64(rg.uniform(-1.0, 1.0)))
        .collect();
    let d0 = rg.matrix(n, n).round::<T>();
    let s = T::round(case.scale);
    let mut dst = Stored::<T>::from_m(&d0, case.dst_layout, T::from_f64(SENTINEL));
    let before = dst.clone();
    add_packed_to_lower(&packed, dst.view_mut(), T::from_f64(s)).map_err(fail)?;
    let mut want = d0.clone();
    let mut tol = M::zeros(n, n);
    for (k, &(i, j)) in order.iter().enumerate() {
        let x = packed[k].to_f64();
        want[(i, j)] = dot2([(d0[(i, j)], 1.0), (s, x)].into_iter());
        tol[(i, j)] = 2.0 * T::eps() * (d0[(i, j)].abs() + (s * x).abs());
    }
    check_entrywise("add_packed_to_lower", &dst.to_m(), &want, &tol, lower)?;
    check_untouched("add_packed_to_lower", &before, &dst, strict_upper)
}

both_types!(
    add_packed_to_lower_adds_scaled_triangle,
    pack_case(),
    check_add_packed
);

/// `accumulate_packed(dst, src, s)`: `dst[k] += s * src[k]` within
/// `2 eps (|dst| + |s src|)` per element.
fn check_accumulate<T: Flt>(case: &PackCase) -> Result<(), TestCaseError> {
    // Any length, not only triangular numbers (and long enough for the SIMD
    // body and tail).
    let len = case.n * 7 + (case.seed % 5) as usize;
    let mut rg = Gen::new(case.seed);
    let src: Vec<T> = (0..len)
        .map(|_| T::from_f64(rg.uniform(-1.0, 1.0)))
        .collect();
    let d0: Vec<T> = (0..len)
        .map(|_| T::from_f64(rg.uniform(-1.0, 1.0)))
        .collect();
    let s = T::round(case.scale);
    let mut dst = d0.clone();
    accumulate_packed(&mut dst, &src, T::from_f64(s)).map_err(fail)?;
    for k in 0..len {
        let (d, x) = (d0[k].to_f64(), src[k].to_f64());
        let want = dot2([(d, 1.0), (s, x)].into_iter());
        let tol = 2.0 * T::eps() * (d.abs() + (s * x).abs());
        check_le(
            &format!("accumulate_packed[{k}]"),
            (dst[k].to_f64() - want).abs(),
            tol,
        )?;
    }
    Ok(())
}

both_types!(
    accumulate_packed_is_scaled_axpy,
    pack_case(),
    check_accumulate
);

// ---------------------------------------------------------------------------
// bf16 / f16
// ---------------------------------------------------------------------------

/// `2^k` exactly (normal f64 range).
fn pow2(k: i32) -> f64 {
    assert!((-1022..=1023).contains(&k));
    f64::from_bits(((k + 1023) as u64) << 52)
}

/// A binary16-style format: `p` significant bits (hidden bit included),
/// minimum normal exponent `emin`, exponent field of `ebits` bits.
#[derive(Clone, Copy)]
struct Format {
    name: &'static str,
    p: i32,
    emin: i32,
    ebits: u32,
}

const BF16: Format = Format {
    name: "bf16",
    p: 8,
    emin: -126,
    ebits: 8,
};
const F16: Format = Format {
    name: "f16",
    p: 11,
    emin: -14,
    ebits: 5,
};

impl Format {
    fn mbits(&self) -> u32 {
        15 - self.ebits
    }
    /// The value of a 16-bit pattern, decoded by hand.
    fn decode(&self, b: u16) -> f64 {
        let sign = if b >> 15 == 1 { -1.0 } else { 1.0 };
        let emax_field = (1u16 << self.ebits) - 1;
        let e = (b >> self.mbits()) & emax_field;
        let m = (b & ((1u16 << self.mbits()) - 1)) as f64;
        let bias = -(self.emin - 1); // 127 or 15
        if e == emax_field {
            if m == 0.0 {
                sign * f64::INFINITY
            } else {
                f64::NAN
            }
        } else if e == 0 {
            // subnormal: m * 2^(emin - (p - 1))
            sign * m * pow2(self.emin - (self.p - 1))
        } else {
            sign * (pow2(self.p - 1) + m) * pow2(e as i32 - bias - (self.p - 1))
        }
    }
    /// The spacing of the format's values in the binade of `x` (finite,
    /// nonzero): `2^(max(e, emin) - (p - 1))`, `e = floor(log2 |x|)`
    /// (read exactly from the f64 exponent field).
    fn ulp(&self, x: f64) -> f64 {
        let e = ((x.abs().to_bits() >> 52) & 0x7ff) as i32 - 1023;
        pow2(e.max(self.emin) - (self.p - 1))
    }
    /// Largest finite value.
    fn max(&self) -> f64 {
        let emax = -self.emin + 1;
        (2.0 - pow2(1 - self.p)) * pow2(emax)
    }
}

/// Round-to-nearest-even conversion of one value `x` to `y` (decoded):
/// NaN stays NaN; the sign is kept (zeros included); `|x| >= max + ulp/2`
/// becomes an infinity (the tie at `max + ulp/2` goes to the even
/// infinity); otherwise `|y - x| <= ulp(x) / 2` and on an exact tie the
/// last significand bit of `y` is 0.
fn check_conversion(fmt: Format, x: f32, bits: u16) -> Result<(), TestCaseError> {
    let y = fmt.decode(bits);
    let xf = x as f64;
    if x.is_nan() {
        prop_assert!(
            y.is_nan(),
            "{}: NaN became {:e} ({:#06x})",
            fmt.name,
            y,
            bits
        );
        return Ok(());
    }
    prop_assert!(!y.is_nan(), "{}: {:e} became NaN", fmt.name, xf);
    prop_assert_eq!(
        y.is_sign_negative(),
        x.is_sign_negative(),
        "{}: sign of {:e} lost ({:#06x})",
        fmt.name,
        xf,
        bits
    );
    let max = fmt.max();
    let threshold = max + fmt.ulp(max) / 2.0;
    if xf.abs() >= threshold {
        prop_assert!(
            y.is_infinite(),
            "{}: {:e} >= {:e} must overflow to infinity, got {:e}",
            fmt.name,
            xf,
            threshold,
            y
        );
        return Ok(());
    }
    prop_assert!(y.is_finite(), "{}: {:e} became {:e}", fmt.name, xf, y);
    if xf == 0.0 {
        prop_assert_eq!(y, 0.0);
        return Ok(());
    }
    let half = fmt.ulp(xf) / 2.0;
    let err = (y - xf).abs();
    prop_assert!(
        err <= half,
        "{}: {:e} -> {:e}: error {:e} > half ulp {:e}",
        fmt.name,
        xf,
        y,
        err,
        half
    );
    if err == half {
        prop_assert_eq!(
            bits & 1,
            0,
            "{}: tie {:e} rounded to odd {:e} ({:#06x})",
            fmt.name,
            xf,
            y,
            bits
        );
    }
    Ok(())
}

/// f32 inputs: arbitrary bit patterns (all classes), values in and around
/// the target's range, and exact ties between two consecutive target values
/// (built from a random target pattern; exactly representable in f32).
fn f32_inputs(fmt: Format) -> impl Strategy<Value = Vec<f32>> {
    let arbitrary = any::<u32>().prop_map(f32::from_bits);
    let emin = fmt.emin;
    let emax = -fmt.emin + 1;
    let in_range =
        (any::<bool>(), (emin - 12)..=(emax + 1), 0u32..(1 << 23)).prop_map(|(neg, e, m)| {
            let v = (1.0 + m as f64 / (1u64 << 23) as f64) * pow2(e);
            (if neg { -v } else { v }) as f32
        });
    let tie = any::<u16>().prop_filter_map("finite, not the largest", move |b| {
        let lo = fmt.decode(b);
        let hi = fmt.decode(b.wrapping_add(1));
        // b + 1 is the next value away from zero while it stays finite.
        if !lo.is_finite() || !hi.is_finite() || (b & 0x7fff) == 0x7fff {
            return None;
        }
        let mid = (lo + hi) / 2.0;
        let m = mid as f32;
        if m as f64 != mid {
            return None;
        }
        Some(m)
    });
    let special = prop_oneof![
        Just(0.0f32),
        Just(-0.0f32),
        Just(f32::INFINITY),
        Just(f32::NEG_INFINITY),
        Just(f32::NAN),
        Just(f32::MIN_POSITIVE),
        Just(f32::MAX),
        Just(fmt.max() as f32),
        Just((fmt.max() + fmt.ulp(fmt.max()) / 2.0) as f32),
        Just(-(fmt.max() + fmt.ulp(fmt.max()) / 2.0) as f32),
    ];
    proptest::collection::vec(
        prop_oneof![2 => arbitrary, 3 => in_range, 3 => tie, 1 => special],
        0..64,
    )
}

proptest! {
    #![proptest_config(common::config())]

    /// `f32_to_bf16` rounds to nearest, ties to even, within half a bf16 ulp
    /// (8 significant bits), overflowing to infinities.
    #[test]
    fn f32_to_bf16_rounds_to_nearest_even(xs in f32_inputs(BF16)) {
        let mut out = vec![bf16::from_bits(0x5555); xs.len()];
        f32_to_bf16(&xs, &mut out).map_err(fail)?;
        for (&x, y) in xs.iter().zip(&out) {
            check_conversion(BF16, x, y.to_bits())?;
        }
    }

    /// `f32_to_f16` rounds to nearest, ties to even, within half an f16 ulp
    /// (11 significant bits; subnormal spacing 2^-24 below 2^-14),
    /// overflowing to infinities from 65520 on.
    #[test]
    fn f32_to_f16_rounds_to_nearest_even(xs in f32_inputs(F16)) {
        let mut out = vec![f16::from_bits(0x5555); xs.len()];
        f32_to_f16(&xs, &mut out).map_err(fail)?;
        for (&x, y) in xs.iter().zip(&out) {
            check_conversion(F16, x, y.to_bits())?;
        }
    }
}

/// Every one of the 65536 bf16 and f16 patterns widens to exactly the value
/// of the hand decoder (NaN to NaN), and a finite or infinite value
/// converts back to the same pattern.
#[test]
fn bf16_and_f16_widen_exactly_for_every_pattern() {
    let all: Vec<u16> = (0..=u16::MAX).collect();
    for (fmt, widened) in [
        (BF16, {
            let src: Vec<bf16> = all.iter().map(|&b| bf16::from_bits(b)).collect();
            let mut out = vec![0.0f32; src.len()];
            bf16_to_f32(&src, &mut out).unwrap();
            out
        }),
        (F16, {
            let src: Vec<f16> = all.iter().map(|&b| f16::from_bits(b)).collect();
            let mut out = vec![0.0f32; src.len()];
            f16_to_f32(&src, &mut out).unwrap();
            out
        }),
    ] {
        for (&b, &w) in all.iter().zip(&widened) {
            let want = fmt.decode(b);
            if want.is_nan() {
                assert!(w.is_nan(), "{}: {b:#06x} (NaN) widened to {w:e}", fmt.name);
            } else {
                assert_eq!(
                    (w as f64).to_bits(),
                    want.to_bits(),
                    "{}: {b:#06x} widened to {w:e}, want {want:e}",
                    fmt.name
                );
            }
        }
        // Round trip: narrowing an exactly representable value is exact.
        let finite: Vec<(u16, f32)> = all
            .iter()
            .zip(&widened)
            .filter(|(_, w)| !w.is_nan())
            .map(|(&b, &w)| (b, w))
            .collect();
        let xs: Vec<f32> = finite.iter().map(|&(_, w)| w).collect();
        let back: Vec<u16> = if fmt.name == "bf16" {
            let mut out = vec![bf16::ZERO; xs.len()];
            f32_to_bf16(&xs, &mut out).unwrap();
            out.iter().map(|v| v.to_bits()).collect()
        } else {
            let mut out = vec![f16::ZERO; xs.len()];
            f32_to_f16(&xs, &mut out).unwrap();
            out.iter().map(|v| v.to_bits()).collect()
        };
        for (&(b, w), &r) in finite.iter().zip(&back) {
            assert_eq!(r, b, "{}: {w:e} ({b:#06x}) narrowed to {r:#06x}", fmt.name);
        }
    }
}
