//! candle's own f32 matmul rate on this machine, the roofline that
//! `pipelines/bench-fit.sh` compares a training step's achieved GFLOP/s
//! with. Prints one JSON line. Threads follow `RAYON_NUM_THREADS` (as
//! candle does).

// A measuring tool, not the library: clippy.toml's reader/writer rules
// (sherl::fsutil) do not apply.
#![allow(clippy::disallowed_methods)]

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

fn main() -> candle_core::Result<()> {
    let n: usize = std::env::var("BENCH_MATMUL_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let dev = Device::Cpu;
    let a = Tensor::randn(0f32, 1.0, (n, n), &dev)?.to_dtype(DType::F32)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &dev)?.to_dtype(DType::F32)?;
    // warm-up
    for _ in 0..2 {
        a.matmul(&b)?;
    }
    let mut best = f64::MAX;
    for _ in 0..7 {
        let t = Instant::now();
        let c = a.matmul(&b)?;
        c.sum_all()?.to_scalar::<f32>()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    let gflops = 2.0 * (n as f64).powi(3) / best / 1e9;
    println!(
        "{}",
        serde_json::json!({
            "matmul_n": n,
            "threads": candle_core::utils::get_num_threads(),
            "best_seconds": best,
            "gflops": gflops,
        })
    );
    Ok(())
}
