//! `sherl._sherl`: the native module under the `sherl` Python package
//! (python/sherl/__init__.py wraps it). A cache is opened and read by
//! sherl's own reader ([`sherl::cache::Cache`]: manifest checksum, every
//! shard checked against it, every frame's checksums), examples are read as
//! `sherl-cache export` reads them ([`Cache::read_chunk`]), and batches come
//! from sherl-fit's batcher ([`Batches`]), so the seeded order is the one
//! `sherl-fit` trains in. Arrays cross as little-endian bytes that the
//! Python side views with `numpy.frombuffer` (no copy there; a `bytearray`, so the arrays are
//! writable); a sherl error
//! becomes `sherl.SherlError` with the CLI's message.
//!
//! [`command`] runs `sherl-extract run`, `sherl-fit run`, `predict` and
//! `export` in this process: the keyword arguments become the command line
//! ([`sherl::cli::command_line`]), parsed by the command's own clap parser
//! (a usage error is a `SherlError` with clap's message), then the same
//! library function the binary calls ([`sherl::cli::fit`],
//! [`sherl::cli::extract`]) runs without the GIL.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyIndexError, PyKeyError, PyRuntimeError};
use pyo3::prelude::*;
use pyo3::types::PyByteArray;
use sherl::cache::{Cache, DecodedChunk, Dtype};
use sherl::cli::FlagValue;
use sherl::fit::batcher::{split_chunks, BatchPlan, Batches};

/// The system allocator, counting the training steps' own memory as
/// `sherl-fit` does (`sherl::fit::alloc_track`: `train_memory` in
/// summary.json); it serves this module's Rust code only.
#[global_allocator]
static GLOBAL: sherl::fit::alloc_track::Tracking<std::alloc::System> =
    sherl::fit::alloc_track::Tracking(std::alloc::System);

create_exception!(
    _sherl,
    SherlError,
    PyException,
    "An error of the sherl library (the message is the CLI's)."
);

/// A sherl error as the CLI prints it (`error_chain`), raised as
/// [`SherlError`].
fn raise(e: impl Into<anyhow::Error>) -> PyErr {
    SherlError::new_err(sherl::cli::error_chain(&e.into()))
}

/// `values` as little-endian bytes in a new Python `bytearray` (so the
/// NumPy arrays viewing it are writable, as PyTorch wants them): 16-bit
/// floats when `half`, else 32-bit.
fn float_bytes<'py>(
    py: Python<'py>,
    values: &[f32],
    half: bool,
) -> PyResult<Bound<'py, PyByteArray>> {
    let width = if half { 2 } else { 4 };
    PyByteArray::new_with(py, values.len() * width, |buf| {
        if half {
            for (out, &x) in buf.chunks_exact_mut(2).zip(values) {
                out.copy_from_slice(&half::f16::from_f32(x).to_le_bytes());
            }
        } else {
            for (out, &x) in buf.chunks_exact_mut(4).zip(values) {
                out.copy_from_slice(&x.to_le_bytes());
            }
        }
        Ok(())
    })
}

/// `values` as little-endian i64 bytes.
fn i64_bytes<'py>(
    py: Python<'py>,
    values: impl ExactSizeIterator<Item = i64>,
) -> PyResult<Bound<'py, PyByteArray>> {
    PyByteArray::new_with(py, values.len() * 8, |buf| {
        for (out, x) in buf.chunks_exact_mut(8).zip(values) {
            out.copy_from_slice(&x.to_le_bytes());
        }
        Ok(())
    })
}

/// An open, validated cache.
#[pyclass(frozen, module = "sherl._sherl", name = "Cache")]
struct PyCache {
    cache: Arc<Cache>,
    /// The chunk decoded last, with the layer positions it holds: reading a
    /// split example by example decodes each chunk once.
    last: Mutex<Option<(Vec<usize>, Arc<DecodedChunk>)>>,
}

/// One example: id, split id, label id, token ids, segment ids, real
/// tokens, and per asked layer its `[tokens, hidden]` values.
type ExampleParts<'py> = (
    String,
    u32,
    Option<u32>,
    Bound<'py, PyByteArray>,
    Bound<'py, PyByteArray>,
    usize,
    Vec<Bound<'py, PyByteArray>>,
);

impl PyCache {
    fn positions(&self, layers: Option<Vec<usize>>) -> PyResult<Vec<usize>> {
        let stored = &self.cache.manifest().settings.layers;
        let Some(layers) = layers else {
            return Ok((0..stored.len()).collect());
        };
        layers
            .iter()
            .map(|&l| {
                self.cache.layer_position(l).ok_or_else(|| {
                    PyKeyError::new_err(format!(
                        "the cache does not store hidden_states.{l} (it stores {stored:?})"
                    ))
                })
            })
            .collect()
    }

    fn chunk(&self, id: usize, positions: &[usize]) -> Result<Arc<DecodedChunk>, sherl::Error> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((p, c)) = last.as_ref() {
            if c.id == id && p == positions {
                return Ok(Arc::clone(c));
            }
        }
        let c = Arc::new(self.cache.read_chunk(id, positions)?);
        *last = Some((positions.to_vec(), Arc::clone(&c)));
        Ok(c)
    }
}

#[pymethods]
impl PyCache {
    /// Open the cache at `path` (every check `sherl-fit` makes).
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let cache = py.detach(|| Cache::open(&path)).map_err(raise)?;
        Ok(PyCache {
            cache: Arc::new(cache),
            last: Mutex::new(None),
        })
    }

    /// The manifest as JSON text.
    fn manifest_json(&self) -> PyResult<String> {
        serde_json::to_string(self.cache.manifest())
            .map_err(|e| PyRuntimeError::new_err(e.to_string()))
    }

    /// Examples in the cache.
    fn __len__(&self) -> usize {
        self.cache.manifest().examples as usize
    }

    /// NumPy dtype name of the values [`PyCache::example`] gives:
    /// `float16` for an f16 cache, `float32` otherwise (as `sherl-cache
    /// export`).
    fn value_dtype(&self) -> &'static str {
        if self.cache.manifest().settings.dtype == Dtype::F16 {
            "float16"
        } else {
            "float32"
        }
    }

    /// Cache position of the first example of split `split` (an index into
    /// `split_names`) and its number of examples.
    fn split_range(&self, split: usize) -> PyResult<(u64, u64)> {
        let m = self.cache.manifest();
        let name = m
            .split_names
            .get(split)
            .ok_or_else(|| PyIndexError::new_err(format!("no split {split}")))?;
        let start = m.split_names[..split]
            .iter()
            .map(|n| m.splits.get(n).copied().unwrap_or(0))
            .sum();
        Ok((start, m.splits.get(name).copied().unwrap_or(0)))
    }

    /// Example at cache `position` with the stored layers `layers` (all
    /// when `None`).
    #[pyo3(signature = (position, layers=None))]
    fn example<'py>(
        &self,
        py: Python<'py>,
        position: u64,
        layers: Option<Vec<usize>>,
    ) -> PyResult<ExampleParts<'py>> {
        let positions = self.positions(layers)?;
        let m = self.cache.manifest();
        if position >= m.examples {
            return Err(PyIndexError::new_err(format!(
                "example {position} of a cache of {} examples",
                m.examples
            )));
        }
        let chunks = self.cache.chunks();
        let idx = chunks.partition_point(|c| c.first_example + u64::from(c.examples) <= position);
        let first = chunks[idx].first_example;
        let chunk = py.detach(|| self.chunk(idx, &positions)).map_err(raise)?;
        let k = (position - first) as usize;
        let offsets = chunk.offsets();
        let hidden = m.backbone.hidden;
        let half = m.settings.dtype == Dtype::F16;
        let rows = offsets[k] * hidden..offsets[k + 1] * hidden;
        let e = &chunk.meta[k];
        let values = chunk
            .layers
            .iter()
            .map(|l| float_bytes(py, &l[rows.clone()], half))
            .collect::<PyResult<_>>()?;
        Ok((
            e.id.clone(),
            e.split,
            e.label,
            i64_bytes(py, e.ids.iter().map(|&t| i64::from(t)))?,
            i64_bytes(py, e.type_ids.iter().map(|&t| i64::from(t)))?,
            e.len(),
            values,
        ))
    }

    /// Chunk ids of split `split` (cache order).
    fn split_chunks(&self, split: u32) -> Vec<usize> {
        split_chunks(&self.cache, split)
    }

    /// Decode and check every frame of every shard (`sherl-cache verify`);
    /// the number of frames.
    fn verify(&self, py: Python<'_>) -> PyResult<usize> {
        py.detach(|| self.cache.verify(|_, _| {})).map_err(raise)
    }

    /// Batches of split `split` as `sherl-fit` makes them: with `seed`
    /// and `epoch`, in the seeded order of that training epoch; without,
    /// in cache order.
    #[pyo3(signature = (split, positions, batch_size, max_tokens, shuffle, shuffle_chunks, train_examples, threads))]
    #[allow(clippy::too_many_arguments)]
    fn batches(
        &self,
        split: u32,
        positions: Vec<usize>,
        batch_size: usize,
        max_tokens: usize,
        shuffle: Option<(u64, u64)>,
        shuffle_chunks: usize,
        train_examples: Option<(u64, usize)>,
        threads: usize,
    ) -> PyResult<PyBatches> {
        let plan = BatchPlan {
            split,
            positions,
            batch_size,
            max_tokens,
            shuffle,
            buffer_chunks: shuffle_chunks,
            threads,
            subset: train_examples,
        };
        let b = Batches::new(&self.cache, plan, &candle_core::Device::Cpu).map_err(raise)?;
        Ok(PyBatches {
            batches: Mutex::new(b),
        })
    }
}

/// One padded batch: ids, labels, `[B, S]` token ids, segment ids and mask
/// (i64 bytes), `B`, `S`, and per layer the `[B, S, hidden]` f32 values.
type BatchParts<'py> = (
    Vec<String>,
    Bound<'py, PyByteArray>,
    Bound<'py, PyByteArray>,
    Bound<'py, PyByteArray>,
    Bound<'py, PyByteArray>,
    usize,
    usize,
    Vec<Bound<'py, PyByteArray>>,
);

/// Iterator over the batches of one split.
#[pyclass(module = "sherl._sherl", name = "Batches")]
struct PyBatches {
    batches: Mutex<Batches>,
}

fn tensor_i64(t: &candle_core::Tensor) -> Result<Vec<i64>, candle_core::Error> {
    t.flatten_all()?
        .to_dtype(candle_core::DType::I64)?
        .to_vec1::<i64>()
}

#[pymethods]
impl PyBatches {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<BatchParts<'py>>> {
        let next = py.detach(|| {
            let mut b = self.batches.lock().unwrap_or_else(|p| p.into_inner());
            b.next().transpose()
        });
        let Some(b) = next.map_err(raise)? else {
            return Ok(None);
        };
        let parts = (|| -> Result<_, candle_core::Error> {
            let (rows, seq) = b.mask.dims2()?;
            let layers = b
                .layers
                .iter()
                .map(|t| t.flatten_all()?.to_vec1::<f32>())
                .collect::<Result<Vec<_>, _>>()?;
            Ok((
                rows,
                seq,
                layers,
                tensor_i64(&b.labels)?,
                tensor_i64(&b.token_ids)?,
                tensor_i64(&b.type_ids)?,
                tensor_i64(&b.mask)?,
            ))
        })();
        let (rows, seq, layers, labels, tok, typ, mask) =
            parts.map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        Ok(Some((
            b.ids,
            i64_bytes(py, labels.into_iter())?,
            i64_bytes(py, tok.into_iter())?,
            i64_bytes(py, typ.into_iter())?,
            i64_bytes(py, mask.into_iter())?,
            rows,
            seq,
            layers
                .iter()
                .map(|l| float_bytes(py, l, false))
                .collect::<PyResult<_>>()?,
        )))
    }
}

/// One keyword argument of `sherl.extract`, `sherl.fit`, `sherl.predict`
/// or `sherl.export` as the Python side passes it: the flag's name, and
/// either a bool (a switch) or the values as text.
type Flag = (String, Option<bool>, Vec<String>);

fn flag_values(flags: Vec<Flag>) -> Vec<(String, FlagValue)> {
    flags
        .into_iter()
        .map(|(name, switch, values)| {
            let value = match switch {
                Some(on) => FlagValue::Switch(on),
                None => FlagValue::Values(values),
            };
            (name, value)
        })
        .collect()
}

/// A usage error (clap's message, as the binary prints it after
/// `error: `), raised as [`SherlError`].
fn usage(e: &sherl::cli::ClapError) -> PyErr {
    SherlError::new_err(sherl::cli::usage_error(e))
}

/// `RAYON_NUM_THREADS` as it was before a `run` set it, put back when
/// dropped: the threads `sherl-fit run` chooses hold for that call only.
struct RestoreThreads(Option<std::ffi::OsString>);

impl Drop for RestoreThreads {
    fn drop(&mut self) {
        match self.0.take() {
            Some(v) => std::env::set_var("RAYON_NUM_THREADS", v),
            None => std::env::remove_var("RAYON_NUM_THREADS"),
        }
    }
}

/// Run `PROGRAM SUB` with `flags`, as the binary would (the same flag
/// parsing, defaults, checks and library code), without the GIL; returns
/// the JSON line the binary prints. `sherl-extract run`, `sherl-fit run`,
/// `sherl-fit predict` and `sherl-fit export` are offered.
#[pyfunction]
fn command(py: Python<'_>, program: &str, sub: &str, flags: Vec<Flag>) -> PyResult<String> {
    let flags = flag_values(flags);
    match program {
        "sherl-extract" => {
            use sherl::cli::extract_args::{command, try_parse_from, Command};
            let argv = sherl::cli::command_line(&command(), sub, &flags);
            let args = try_parse_from(argv).map_err(|e| usage(&e))?;
            sherl::cli::set_output(&args.output);
            match args.command {
                Command::Run(a) => py
                    .detach(|| sherl::cli::extract::run(*a, &args.output))
                    .map_err(raise),
                _ => Err(SherlError::new_err(format!(
                    "sherl-extract {sub} is not offered in Python; run the command"
                ))),
            }
        }
        "sherl-fit" => {
            use sherl::cli::fit_args::Command;
            let argv = sherl::cli::command_line(&sherl::cli::fit_args::command(), sub, &flags);
            let args = sherl::cli::fit_args::try_parse_from(argv).map_err(|e| usage(&e))?;
            sherl::cli::set_output(&args.output);
            let blas = args.blas_source;
            let output = args.output;
            match args.command {
                Command::Run(a) => py
                    .detach(|| {
                        let _restore = RestoreThreads(std::env::var_os("RAYON_NUM_THREADS"));
                        sherl::cli::fit::set_run_threads(&a);
                        sherl::cli::fit::run(*a, &output, blas)
                    })
                    .map_err(raise),
                Command::Predict(a) => py
                    .detach(|| sherl::cli::fit::predict(*a, blas))
                    .map_err(raise),
                Command::Export {
                    run,
                    backbone,
                    image_backbone,
                    text_backbone,
                    out,
                } => py
                    .detach(|| {
                        sherl::cli::fit::export(run, backbone, image_backbone, text_backbone, out)
                    })
                    .map_err(raise),
                _ => Err(SherlError::new_err(format!(
                    "sherl-fit {sub} is not offered in Python; run the command"
                ))),
            }
        }
        _ => Err(SherlError::new_err(format!("no program {program}"))),
    }
}

/// The native module.
#[pymodule]
fn _sherl(m: &Bound<'_, PyModule>) -> PyResult<()> {
    GLOBAL.installed();
    m.add("SherlError", m.py().get_type::<SherlError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<PyCache>()?;
    m.add_class::<PyBatches>()?;
    m.add_function(wrap_pyfunction!(command, m)?)?;
    Ok(())
}
