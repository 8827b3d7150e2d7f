//! Whether the fused CPU ops may run their AVX2 builds.
//!
//! The crate is compiled for baseline x86-64 (SSE2), so that a binary runs
//! on any x86-64 CPU; the element-wise loops of the fused ops (LayerNorm,
//! softmax, GELU, dropout, the optimiser) then use 4-wide vectors. Their
//! hot functions are compiled a second time with AVX2 and FMA enabled
//! (`#[target_feature]`) and chosen at run time when the CPU has both.
//! The two builds compute the same values: Rust never contracts `a * b + c`
//! into a fused multiply-add on its own, and every reduction adds its
//! partial sums in the order the code states, so only the vector width
//! changes.

use std::sync::OnceLock;

/// The CPU has AVX2 and FMA (detected once per process). `SHERL_NO_AVX2`
/// set in the environment forces the baseline build (for comparisons).
pub fn avx2_fma() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::env::var_os("SHERL_NO_AVX2").is_none()
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}
