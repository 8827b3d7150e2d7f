//! Stage four of `sherl-extract run`: one shard, from examples to sealed
//! file. The calling thread cuts the shard's examples into batches
//! ([`shard_batches`]), runs the backbone on each ([`padded_batch`]), strips
//! padding into chunk buffers ([`ChunkBuilder`]); full chunks go through a
//! bounded queue to compression threads, and a writer thread appends them in
//! order to the shard's temporary file ([`write_shard`]). Queues are
//! bounded, so peak memory is set by the settings (batch budget, chunk size,
//! threads), not by the dataset's size.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::mpsc;
use std::time::Instant;

use super::common::{ExtractReporter, StageTimes};
use super::error::ExtractError;
use crate::batching::{batch_ranges, real_rows, real_rows_slice, PaddedBatch};
use crate::cache::manifest::ExtractSettings;
use crate::cache::shard::{compress_chunk, CompressedChunk, SealedShard, ShardWriter};
use crate::cache::ExampleMeta;
use crate::extract::runtime::{BackboneSession, HiddenStates};
use crate::extract::tokenize::Encoded;
use crate::{Error, Result};

/// The batches one shard's examples are run in: consecutive examples under
/// the padded-token budget (batches never cross a shard boundary).
pub fn shard_batches(examples: &[ExampleMeta], s: &ExtractSettings) -> Vec<Range<usize>> {
    let lengths: Vec<usize> = examples.iter().map(ExampleMeta::len).collect();
    batch_ranges(&lengths, s.max_tokens_per_batch, s.max_batch)
}

/// The backbone inputs of `examples`, padded to the longest.
pub fn padded_batch(examples: &[ExampleMeta]) -> PaddedBatch {
    let encs: Vec<Encoded> = examples
        .iter()
        .map(|e| Encoded {
            ids: e.ids.clone(),
            type_ids: e.type_ids.iter().map(|&t| u32::from(t)).collect(),
        })
        .collect();
    let refs: Vec<&Encoded> = encs.iter().collect();
    PaddedBatch::new(&refs, None)
}

/// A full chunk: its examples and, per stored layer, their real-token rows
/// (`tokens x hidden`, examples concatenated in order).
#[derive(Debug)]
pub struct Chunk {
    /// Examples.
    pub meta: Vec<ExampleMeta>,
    /// Rows per stored layer.
    pub layers: Vec<Vec<f32>>,
}

/// Fills chunk buffers from backbone outputs, one example at a time,
/// handing out a [`Chunk`] every `chunk_size` examples.
#[derive(Debug)]
pub struct ChunkBuilder {
    chunk_size: usize,
    meta: Vec<ExampleMeta>,
    layers: Vec<Vec<f32>>,
}

impl ChunkBuilder {
    /// Chunks of `chunk_size` examples of `n_layers` stored layers.
    pub fn new(chunk_size: usize, n_layers: usize) -> Self {
        ChunkBuilder {
            chunk_size,
            meta: Vec::with_capacity(chunk_size),
            layers: vec![Vec::new(); n_layers],
        }
    }

    /// Append example `b` of the batch the outputs `outs` (one
    /// `[batch, seq, hidden]` array per stored layer) came from; returns the
    /// chunk it completes, if any.
    pub fn push(&mut self, outs: &[HiddenStates], b: usize, meta: &ExampleMeta) -> Option<Chunk> {
        for (l, h) in outs.iter().enumerate() {
            let h = h.view();
            // One copy straight into the chunk buffer; the compression
            // thread checks the values are finite.
            match real_rows_slice(h, b, meta.len()) {
                Some(rows) => self.layers[l].extend_from_slice(rows),
                None => self.layers[l].extend_from_slice(&real_rows(h, b, meta.len())),
            }
        }
        self.meta.push(meta.clone());
        (self.meta.len() == self.chunk_size).then(|| self.take())
    }

    /// The last, partial chunk, if any example is left.
    pub fn finish(mut self) -> Option<Chunk> {
        (!self.meta.is_empty()).then(|| self.take())
    }

    fn take(&mut self) -> Chunk {
        // The next chunk's buffers start at this one's size (chunks of one
        // shard hold examples of similar length: cache order sorts by
        // length), so they are not grown and copied again and again.
        let fresh = self
            .layers
            .iter()
            .map(|l| Vec::with_capacity(l.len() + l.len() / 8))
            .collect();
        Chunk {
            meta: std::mem::replace(&mut self.meta, Vec::with_capacity(self.chunk_size)),
            layers: std::mem::replace(&mut self.layers, fresh),
        }
    }
}

/// Run the backbone over `examples` (one shard's, in cache order) and write
/// them into `shard` with `threads` compression threads. The calling thread
/// runs the backbone and cuts its outputs into chunks. Returns the sealed
/// shard, the padded token slots that were run, and the stage times.
pub fn write_shard(
    session: &mut BackboneSession,
    examples: &[ExampleMeta],
    layers: &[usize],
    shard: ShardWriter,
    threads: usize,
    s: &ExtractSettings,
    reporter: &dyn ExtractReporter,
) -> Result<(SealedShard, u64, StageTimes)> {
    let mut run = |batch_examples: &[ExampleMeta]| -> Result<BatchOutput> {
        let batch = padded_batch(batch_examples);
        let (ids, mask, types) = batch.views();
        let outs = session.run_hidden(ids, mask, types, layers)?;
        Ok(BatchOutput {
            outs,
            padded_tokens: batch.padded_tokens() as u64,
            metas: None,
        })
    };
    write_shard_with(&mut run, examples, shard, threads, s, reporter)
}

/// What the backbone returned for one batch (the runner of
/// [`write_shard_with`]).
#[derive(Debug)]
pub struct BatchOutput {
    /// One `[batch, seq, hidden]` array per stored layer.
    pub outs: Vec<HiddenStates>,
    /// Token slots run, padding included.
    pub padded_tokens: u64,
    /// The batch's examples as they are to be recorded, when running them
    /// completed their metadata (an image's digest); `None`: as given.
    pub metas: Option<Vec<ExampleMeta>>,
}

/// [`write_shard`] with the backbone behind `run_batch` (called once per
/// batch of consecutive examples under the token budget): text runs the
/// padded token batch through [`BackboneSession`], images decode,
/// preprocess and run the image model ([`super::image`]).
pub fn write_shard_with(
    run_batch: &mut dyn FnMut(&[ExampleMeta]) -> Result<BatchOutput>,
    examples: &[ExampleMeta],
    mut shard: ShardWriter,
    threads: usize,
    s: &ExtractSettings,
    reporter: &dyn ExtractReporter,
) -> Result<(SealedShard, u64, StageTimes)> {
    let spec = *shard.spec();
    let path = shard.path().to_path_buf();
    let hidden = spec.hidden as usize;
    let threads = threads.max(1);
    // Room for a chunk per compression thread and as many waiting, so a
    // burst of short examples does not stall the chunker.
    let (job_tx, job_rx) = mpsc::sync_channel::<(usize, Chunk)>(2 * threads);
    let job_rx = std::sync::Mutex::new(job_rx);
    let (done_tx, done_rx) = mpsc::sync_channel::<(usize, Result<CompressedChunk>)>(threads);
    let mut padded = 0u64;
    let mut times = StageTimes::default();
    let stopped = || ExtractError::CompressionStopped {
        shard: path.clone(),
    };

    let result: Result<()> = std::thread::scope(|scope| {
        for _ in 0..threads {
            let (rx, tx, path) = (&job_rx, done_tx.clone(), &path);
            scope.spawn(move || loop {
                let job = {
                    let guard = match rx.lock() {
                        Ok(g) => g,
                        Err(_) => break,
                    };
                    guard.recv()
                };
                let Ok((seq, chunk)) = job else { break };
                let r = compress_chunk(&spec, &chunk.meta, &chunk.layers).map_err(|source| {
                    Error::Cache {
                        path: path.clone(),
                        source,
                    }
                });
                if tx.send((seq, r)).is_err() {
                    break;
                }
            });
        }
        drop(done_tx);
        let shard_ref = &mut shard;
        let writer_thread = scope.spawn(move || -> Result<()> {
            let mut pending = BTreeMap::new();
            let mut next = 0usize;
            let mut first_err = None;
            for (seq, r) in done_rx {
                pending.insert(seq, r);
                while let Some(r) = pending.remove(&next) {
                    next += 1;
                    match r {
                        Ok(c) if first_err.is_none() => {
                            if let Err(e) = shard_ref.push(c) {
                                first_err = Some(e);
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            first_err.get_or_insert(e);
                        }
                    }
                }
            }
            match first_err {
                Some(e) => Err(e),
                None => Ok(()),
            }
        });

        // Producer: batches of consecutive examples under the token budget,
        // cut into chunks here. (A separate chunker thread was measured: on
        // two cores it only slowed ONNX Runtime's threads down as much as
        // it saved.)
        let mut produce = || -> Result<()> {
            let mut chunks = ChunkBuilder::new(s.chunk_size as usize, spec.n_layers as usize);
            let mut seq = 0usize;
            let mut wait = 0f64;
            let mut send = |chunk: Chunk, wait: &mut f64| -> Result<()> {
                let t = Instant::now();
                job_tx.send((seq, chunk)).map_err(|_| stopped())?;
                *wait += t.elapsed().as_secs_f64();
                seq += 1;
                Ok(())
            };
            for range in shard_batches(examples, s) {
                let batch_examples = &examples[range];
                let t = Instant::now();
                let BatchOutput {
                    outs,
                    padded_tokens,
                    metas,
                } = run_batch(batch_examples)?;
                times.backbone += t.elapsed().as_secs_f64();
                let batch_examples = metas.as_deref().unwrap_or(batch_examples);
                let real_tokens: u64 = batch_examples.iter().map(|e| e.len() as u64).sum();
                if let Some(o) = outs.first() {
                    if o.dims().2 != hidden {
                        return Err(Error::Runtime(format!(
                            "the model returned hidden size {}, expected {hidden}",
                            o.dims().2
                        )));
                    }
                }
                padded += padded_tokens;
                let t = Instant::now();
                for (b, meta) in batch_examples.iter().enumerate() {
                    if let Some(chunk) = chunks.push(&outs, b, meta) {
                        send(chunk, &mut wait)?;
                    }
                }
                times.chunking += t.elapsed().as_secs_f64();
                reporter.advance(batch_examples.len() as u64, real_tokens);
            }
            if let Some(chunk) = chunks.finish() {
                send(chunk, &mut wait)?;
            }
            times.queue_wait = wait;
            times.chunking -= wait;
            Ok(())
        };
        let produced = produce();
        drop(job_tx);
        let t = Instant::now();
        let written = writer_thread
            .join()
            .map_err(|_| ExtractError::WriterPanicked {
                shard: path.clone(),
            })?;
        times.drain = t.elapsed().as_secs_f64();
        produced.and(written)
    });
    result?;
    let t = Instant::now();
    let sealed = shard.seal()?;
    times.drain += t.elapsed().as_secs_f64();
    Ok((sealed, padded, times))
}
