//! `sherl-extract`: phase one. Exports a BERT-family checkpoint to ONNX,
//! inspects and edits user ONNX graphs, and runs the frozen backbone over a
//! dataset.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::bail;
use clap::Parser;
use serde_json::json;

use sherl::backbone::{BackboneDir, Checkpoint};
use sherl::cli::extract_args::{Args, Command, RunArgs};
use sherl::cli::{init_output, main_wrapper, print_line, OutputArgs, RuntimeArgs};
use sherl::data::args::DatasetArgs;
use sherl::extract::onnx::inspect;
use sherl::extract::runtime;
use sherl::extract::sample::SamplePlan;

fn main() -> ExitCode {
    // Extraction frees and reallocates the backbone's outputs every batch
    // (13 x 5.9 MB for a batch of 15 ViT images): with mimalloc's purging
    // off they are reused instead of page-faulted back in (200 images:
    // 15.3-15.4 s against 16.3-18.0 s, alternating).
    sherl::cli::tune_allocator();
    main_wrapper(|| {
        let args = Args::parse();
        init_output(&args.output);
        match args.command {
            Command::ExportOnnx { backbone, out } => export_onnx(backbone, out),
            Command::InspectOnnx { file, json } => inspect_onnx(file, json),
            Command::ExposeLayers {
                file,
                tensors,
                first_index,
                only_exposed,
                out,
            } => expose_layers(file, tensors, first_index, only_exposed, out),
            Command::Run(run) => run_extract(*run, &args.output),
            Command::Pairs {
                emoji,
                out,
                split,
                split_seed,
                limit,
                openmoji,
            } => {
                let line = sherl::data::paired::prepare_emoji_tables(
                    &emoji,
                    &out,
                    &split,
                    split_seed,
                    limit,
                    openmoji.as_deref(),
                )?;
                print_line(&line.to_string())?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Sample(a) => {
                let a = *a;
                sample(
                    a.backbone,
                    a.model,
                    a.data,
                    a.max_len,
                    a.limit,
                    a.batch_size,
                    a.runtime,
                )
            }
        }
    })
}

fn export_onnx(backbone: PathBuf, out: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let dir = BackboneDir::open(&backbone)?;
    let cfg = dir.config()?;
    let ckpt = Checkpoint::open(&dir.safetensors_path())?;
    let out = out.unwrap_or_else(|| dir.onnx_path());
    let t = Instant::now();
    let s = sherl::extract::onnx::export_backbone(&cfg, &ckpt, &out)?;
    tracing::info!(
        "exported {} layers (hidden {}, checkpoint prefix '{}') to {} ({:.1} MB) in {:.1}s",
        s.layers,
        s.hidden,
        s.prefix,
        out.display(),
        s.bytes as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    print_line(
        &json!({
            "onnx": out,
            "layers": s.layers,
            "hidden": s.hidden,
            "outputs": (0..=s.layers).map(sherl::extract::onnx::hidden_state_name).collect::<Vec<_>>(),
            "checkpoint_prefix": s.prefix,
            "bytes": s.bytes,
        })
        .to_string(),
    )?;
    Ok(ExitCode::SUCCESS)
}

fn inspect_onnx(file: PathBuf, as_json: bool) -> anyhow::Result<ExitCode> {
    let model = inspect::read_model(&file)?;
    let iface = inspect::interface(&model);
    if as_json {
        print_line(&serde_json::to_string(&iface)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut text = String::new();
    use std::fmt::Write;
    writeln!(
        text,
        "{}: {} nodes, opsets {:?}",
        file.display(),
        iface.nodes,
        iface.opsets
    )?;
    writeln!(text, "inputs:")?;
    for p in &iface.inputs {
        writeln!(text, "  {:<32} {}", p.name, p.ty)?;
    }
    writeln!(text, "outputs:")?;
    for p in &iface.outputs {
        writeln!(text, "  {:<32} {}", p.name, p.ty)?;
    }
    if iface.hidden_state_outputs.is_empty() {
        writeln!(
            text,
            "no hidden_states.i outputs: sherl-extract cannot use this model as it is"
        )?;
    } else {
        writeln!(
            text,
            "hidden_states outputs: {:?}",
            iface.hidden_state_outputs
        )?;
    }
    if !iface.candidates.is_empty() {
        writeln!(
            text,
            "candidate per-layer tensors (LayerNorm outputs outside attention, in graph order):"
        )?;
        for c in &iface.candidates {
            writeln!(
                text,
                "  {:<17} <- {:<40} {}",
                sherl::backbone::hidden_state_name(c.suggested_index),
                c.tensor,
                c.producer
            )?;
        }
        let names: Vec<&str> = iface.candidates.iter().map(|c| c.tensor.as_str()).collect();
        writeln!(
            text,
            "to expose them: sherl-extract expose-layers {} --tensors {} --out OUT.onnx",
            file.display(),
            names.join(",")
        )?;
    }
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}

fn expose_layers(
    file: PathBuf,
    tensors: Vec<String>,
    first: usize,
    only_exposed: bool,
    out: PathBuf,
) -> anyhow::Result<ExitCode> {
    if out == file {
        bail!("--out must differ from the input model (the input is never modified)");
    }
    let bytes = sherl::fsutil::read_bounded(&file, sherl::backbone::MODEL_FILE_LIMIT)?;
    let mut new = sherl::extract::onnx::edit::expose_layers(&file, &bytes, &tensors, first)?;
    let names: Vec<String> = (first..first + tensors.len())
        .map(sherl::extract::onnx::hidden_state_name)
        .collect();
    let mut pruned = false;
    if only_exposed {
        match sherl::extract::onnx::edit::prune_to_outputs(&file, &new, &names)? {
            Some(p) => {
                new = p;
                pruned = true;
            }
            None => tracing::warn!(
                "{}: a needed node has a subgraph, so nothing was pruned",
                file.display()
            ),
        }
    }
    sherl::fsutil::write_atomic(&out, &new)?;
    tracing::info!("wrote {} exposing {}", out.display(), names.join(", "));
    print_line(
        &json!({ "onnx": out, "exposed": names, "tensors": tensors, "pruned": pruned }).to_string(),
    )?;
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
fn sample(
    backbone: PathBuf,
    model: Option<PathBuf>,
    data: DatasetArgs,
    max_len: usize,
    limit: usize,
    batch_size: usize,
    rt_args: RuntimeArgs,
) -> anyhow::Result<ExitCode> {
    let plan = SamplePlan {
        backbone,
        model,
        dataset: data.to_plan()?,
        max_len,
        limit,
        batch_size,
        session: rt_args.session_config(),
    };
    let rt = runtime::init_for(rt_args.ort_lib.as_deref(), rt_args.device)?;
    let r = sherl::extract::sample::sample(rt, &plan)?;
    let dataset = &r.dataset;
    let report = &dataset.report;
    tracing::info!(
        "dataset: {} rows read, {} examples, {} labels {:?}, splits {:?}, {} bad rows skipped, {} dropped by --labels",
        report.rows_read,
        dataset.examples.len(),
        dataset.label_names.len(),
        dataset.label_names,
        report.split_counts,
        report.skipped_bad_rows,
        report.dropped_unknown_label
    );
    if let Some(reason) = &r.fallback_reason {
        tracing::info!("device auto: running on CPU ({reason})");
    }
    for l in &r.layers {
        eprintln!(
            "{:<16} mean {:+.4} std {:.4}  first example [CLS][:3] = {:?}",
            sherl::backbone::hidden_state_name(l.layer),
            l.mean,
            l.std,
            l.first_cls_head
        );
    }
    let lens = &r.lengths;
    eprintln!(
        "ran {} examples ({} tokens, median length {}, max {}) on {} in {:.2}s: {:.0} tokens/s",
        r.sampled,
        r.tokens,
        lens[lens.len() / 2],
        lens[lens.len() - 1],
        r.device,
        r.seconds,
        r.tokens_per_second()
    );
    print_line(
        &json!({
            "examples_in_dataset": dataset.examples.len(),
            "rows_read": report.rows_read,
            "skipped_bad_rows": report.skipped_bad_rows,
            "dropped_unknown_label": report.dropped_unknown_label,
            "labels": dataset.label_names,
            "splits": report.split_counts,
            "sampled": r.sampled,
            "tokens": r.tokens,
            "hidden": r.hidden,
            "layers": r.layers,
            "device": r.device,
            "seconds": r.seconds,
            "tokens_per_second": r.tokens_per_second(),
        })
        .to_string(),
    )?;
    Ok(ExitCode::SUCCESS)
}

fn run_extract(a: RunArgs, output: &OutputArgs) -> anyhow::Result<ExitCode> {
    print_line(&sherl::cli::extract::run(a, output)?)?;
    Ok(ExitCode::SUCCESS)
}
