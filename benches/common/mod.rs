//! Shared by the benches (`benches/*.rs`, and `ffi/capi/benches/c_step.rs`
//! through a `#[path]` include): deterministic input data.

/// `n` values in [-0.5, 0.5) from a 64-bit LCG seeded with `seed` (the same
/// stream in every bench, so figures are comparable across them).
pub fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}
