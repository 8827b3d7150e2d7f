//! Backbone sessions: hidden states out of a BERT-family ONNX model
//! ([`BackboneSession`]) or any f32 model ([`F32Session`]).

use std::path::{Path, PathBuf};

use ndarray::{Array3, ArrayD, ArrayView2, ArrayView3, ArrayViewD};
use ort::session::builder::SessionBuilder;
use ort::session::Session;
use ort::value::{DynValue, TensorRef};

use crate::backbone::{hidden_state_index, hidden_state_name};
use crate::{Error, Result};

use super::config::{Device, SessionConfig};
use super::cuda::with_cuda_hint;
use super::library::Runtime;

fn ort_err(context: &str) -> impl FnOnce(ort::Error) -> Error + '_ {
    move |e| Error::Runtime(format!("{context}: {e}"))
}

/// A backbone graph in an ONNX Runtime session.
pub struct BackboneSession {
    session: Session,
    /// Indices `i` of the `hidden_states.i` outputs the model has, sorted.
    layers: Vec<usize>,
    uses_token_types: bool,
    device: String,
    model: PathBuf,
}

impl std::fmt::Debug for BackboneSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackboneSession")
            .field("model", &self.model)
            .field("device", &self.device)
            .field("layers", &self.layers)
            .finish()
    }
}

/// Outcome of device selection, for the one line `auto` prints.
#[derive(Debug, Clone)]
pub struct DeviceChoice {
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Why `auto` fell back to CPU, if it did.
    pub fallback_reason: Option<String>,
}

/// Build a session for `cfg` on the device it asks for (`cfg.device`):
/// its optimisation level and threads, the CUDA execution provider for
/// `cuda:N` (full f32, strict SkipLayerNorm) and for `auto` when the loaded
/// ONNX Runtime has one (falling back to the CPU, with the reason, when it
/// does not start); `commit` loads the model (`model` names it in
/// messages). The one place both session kinds choose their device.
fn build_on_device(
    rt: &Runtime,
    model: &Path,
    cfg: &SessionConfig,
    commit: &dyn Fn(&mut SessionBuilder) -> ort::Result<Session>,
) -> Result<(Session, DeviceChoice)> {
    let try_build = |cuda: Option<i32>| -> Result<Session> {
        let mut b = Session::builder(&rt.env)
            .map_err(ort_err("session builder"))?
            .with_optimization_level(cfg.opt_level.to_ort())
            .map_err(|e| Error::Runtime(format!("optimisation level: {e}")))?;
        if let Some(t) = cfg.threads {
            b = b
                .with_intra_threads(t)
                .map_err(|e| Error::Runtime(format!("threads: {e}")))?;
        }
        if let Some(id) = cuda {
            b = b
                // Full f32 matrix products (no TF32) and strict
                // SkipLayerNorm: a GPU cache then equals a CPU one up to
                // the storage rounding (`sherl-cache compare`).
                .with_execution_providers([ort::ep::CUDA::default()
                    .with_device_id(id)
                    .with_tf32(false)
                    .with_skip_layer_norm_strict_mode(true)
                    .build()
                    .error_on_failure()])
                .map_err(|e| {
                    Error::Runtime(format!(
                        "CUDA execution provider failed to start on GPU {id}: {e}"
                    ))
                })?;
        }
        commit(&mut b)
            .map_err(|e| Error::Runtime(format!("{}: cannot load the model: {e}", model.display())))
    };
    let no_cuda_build = || {
        format!(
            "the ONNX Runtime library {} has no CUDA execution provider (CPU-only build); \
             for --device cuda fetch the CUDA build with `pipelines/fetch-assets.sh ort-gpu` \
             (PyPI onnxruntime-gpu 1.31.1, found by --device cuda/auto in the asset folder) \
             or pass --ort-lib with a CUDA build of ONNX Runtime 1.24 or later, or use \
             --device cpu",
            rt.library.display()
        )
    };
    Ok(match cfg.device {
        Device::Cpu => (
            try_build(None)?,
            DeviceChoice {
                device: "cpu".into(),
                fallback_reason: None,
            },
        ),
        Device::Cuda(id) => {
            if !rt.has_cuda() {
                return Err(Error::Runtime(no_cuda_build()));
            }
            let s = try_build(Some(id)).map_err(|e| with_cuda_hint(e, &rt.library, id))?;
            (
                s,
                DeviceChoice {
                    device: format!("cuda:{id}"),
                    fallback_reason: None,
                },
            )
        }
        Device::Auto => {
            if rt.has_cuda() {
                match try_build(Some(0)) {
                    Ok(s) => (
                        s,
                        DeviceChoice {
                            device: "cuda:0".into(),
                            fallback_reason: None,
                        },
                    ),
                    Err(e) => (
                        try_build(None)?,
                        DeviceChoice {
                            device: "cpu".into(),
                            fallback_reason: Some(
                                with_cuda_hint(e, &rt.library, 0)
                                    .to_string()
                                    .trim_start_matches("ONNX Runtime: ")
                                    .to_string(),
                            ),
                        },
                    ),
                }
            } else {
                (
                    try_build(None)?,
                    DeviceChoice {
                        device: "cpu".into(),
                        fallback_reason: Some(format!(
                            "{} is a CPU-only build of ONNX Runtime; `pipelines/fetch-assets.sh ort-gpu` fetches the CUDA one",
                            rt.library.display()
                        )),
                    },
                )
            }
        }
    })
}

impl BackboneSession {
    /// Open `model` with `cfg`. Checks the model's inputs and outputs follow
    /// sherl's naming (see [`crate::extract::onnx`]).
    pub fn open(rt: &Runtime, model: &Path, cfg: &SessionConfig) -> Result<(Self, DeviceChoice)> {
        if !model.is_file() {
            return Err(Error::io(
                model,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "ONNX model not found (create it with `sherl-extract export-onnx --backbone DIR`)",
                ),
            ));
        }
        let (session, choice) = build_on_device(rt, model, cfg, &|b| b.commit_from_file(model))?;
        let input_names: Vec<String> = session
            .inputs()
            .iter()
            .map(|i| i.name().to_string())
            .collect();
        for required in ["input_ids", "attention_mask"] {
            if !input_names.iter().any(|n| n == required) {
                return Err(Error::Onnx {
                    path: model.to_path_buf(),
                    message: format!(
                        "the model has no '{required}' input (inputs: {}); sherl feeds input_ids, attention_mask and optionally token_type_ids",
                        input_names.join(", ")
                    ),
                });
            }
        }
        if let Some(other) = input_names.iter().find(|n| {
            !matches!(
                n.as_str(),
                "input_ids" | "attention_mask" | "token_type_ids"
            )
        }) {
            return Err(Error::Onnx {
                path: model.to_path_buf(),
                message: format!("the model needs an input '{other}' sherl cannot provide"),
            });
        }
        let uses_token_types = input_names.iter().any(|n| n == "token_type_ids");
        let mut layers: Vec<usize> = session
            .outputs()
            .iter()
            .filter_map(|o| hidden_state_index(o.name()))
            .collect();
        layers.sort_unstable();
        let device = choice.device.clone();
        Ok((
            BackboneSession {
                session,
                layers,
                uses_token_types,
                device,
                model: model.to_path_buf(),
            },
            choice,
        ))
    }

    /// The `hidden_states.i` indices the model outputs.
    pub fn layers(&self) -> &[usize] {
        &self.layers
    }

    /// The device the session runs on.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Fail, naming exactly what is missing, unless every index in `needed`
    /// has a `hidden_states.i` output.
    pub fn check_layers(&self, needed: &[usize]) -> Result<()> {
        let missing: Vec<String> = needed
            .iter()
            .filter(|i| self.layers.binary_search(i).is_err())
            .map(|&i| hidden_state_name(i))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let have: Vec<String> = self
            .session
            .outputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        Err(Error::Onnx {
            path: self.model.clone(),
            message: format!(
                "missing output(s) {} (the model's outputs: {}). Export with `sherl-extract export-onnx`, \
                 or expose intermediate tensors with `sherl-extract inspect-onnx` and `expose-layers`",
                missing.join(", "),
                have.join(", ")
            ),
        })
    }

    /// Run one padded batch (`[batch, seq]` each) and return the requested
    /// hidden states, each `[batch, seq, hidden]`, in the order of `layers`.
    pub fn run(
        &mut self,
        ids: ArrayView2<'_, i64>,
        mask: ArrayView2<'_, i64>,
        types: ArrayView2<'_, i64>,
        layers: &[usize],
    ) -> Result<Vec<Array3<f32>>> {
        Ok(self
            .run_hidden(ids, mask, types, layers)?
            .into_iter()
            .map(HiddenStates::into_array)
            .collect())
    }

    /// [`BackboneSession::run`] leaving each hidden state where ONNX Runtime
    /// wrote it (extraction reads them once, into its chunks: no copy of
    /// every output in between).
    pub fn run_hidden(
        &mut self,
        ids: ArrayView2<'_, i64>,
        mask: ArrayView2<'_, i64>,
        types: ArrayView2<'_, i64>,
        layers: &[usize],
    ) -> Result<Vec<HiddenStates>> {
        self.check_layers(layers)?;
        let t_ids = TensorRef::from_array_view(ids).map_err(ort_err("input_ids"))?;
        let t_mask = TensorRef::from_array_view(mask).map_err(ort_err("attention_mask"))?;
        let t_types = TensorRef::from_array_view(types).map_err(ort_err("token_type_ids"))?;
        let mut outputs = if self.uses_token_types {
            self.session.run(ort::inputs![
                "input_ids" => t_ids,
                "attention_mask" => t_mask,
                "token_type_ids" => t_types,
            ])
        } else {
            self.session.run(ort::inputs![
                "input_ids" => t_ids,
                "attention_mask" => t_mask,
            ])
        }
        .map_err(ort_err("run"))?;
        let names: Vec<String> = layers.iter().map(|&i| hidden_state_name(i)).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let result = take_hidden(&mut outputs, &refs, None)?;
        for (h, name) in result.iter().zip(&names) {
            let (b, s, _) = h.dims();
            if b != ids.nrows() || s != ids.ncols() {
                return Err(Error::Runtime(format!(
                    "{name} has shape {:?}, expected [{}, {}, hidden]",
                    h.dims(),
                    ids.nrows(),
                    ids.ncols()
                )));
            }
        }
        Ok(result)
    }
}

/// The outputs `names` of a run, each taken out of `out` where ONNX Runtime
/// wrote it and checked by [`HiddenStates::from_value`] (`tokens` as
/// there); a name asked for twice gets a copy of the first.
fn take_hidden(
    out: &mut ort::session::SessionOutputs<'_>,
    names: &[&str],
    tokens: Option<usize>,
) -> Result<Vec<HiddenStates>> {
    let mut result: Vec<HiddenStates> = Vec::with_capacity(names.len());
    for (k, &name) in names.iter().enumerate() {
        let h = match out.remove(name) {
            Some(value) => HiddenStates::from_value(name, value, tokens)?,
            None => match names[..k].iter().position(|&n| n == name) {
                Some(p) => HiddenStates::Owned(result[p].view().to_owned()),
                None => {
                    return Err(Error::Runtime(format!(
                        "output {name} missing from the run"
                    )))
                }
            },
        };
        result.push(h);
    }
    Ok(result)
}

/// One `[batch, seq, hidden]` float32 hidden state of a batch: the tensor
/// ONNX Runtime returned, read in place, or an array computed here (pooled
/// image patches, a test's input).
#[derive(Debug)]
pub enum HiddenStates {
    /// ONNX Runtime's output value and its checked dimensions.
    Runtime {
        /// The output (f32, `dims` elements; checked when it was wrapped).
        value: DynValue,
        /// `[batch, seq, hidden]`.
        dims: (usize, usize, usize),
    },
    /// An owned array.
    Owned(Array3<f32>),
}

impl HiddenStates {
    /// Wrap output `name`, checking it is a 3-D float32 tensor (and, when
    /// `tokens` is given, that it has that many tokens per example).
    pub fn from_value(name: &str, value: DynValue, tokens: Option<usize>) -> Result<Self> {
        let (shape, data) = value
            .try_extract_tensor::<f32>()
            .map_err(|e| Error::Runtime(format!("{name}: expected a float32 tensor: {e}")))?;
        let dims: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
        let &[b, s, d] = dims.as_slice() else {
            return Err(Error::Runtime(format!(
                "{name} has shape {dims:?}, expected [batch, tokens, hidden]"
            )));
        };
        if b * s * d != data.len() || tokens.is_some_and(|t| t != s) {
            return Err(Error::Runtime(format!(
                "{name} has shape {dims:?}, expected [batch, {}, hidden]",
                tokens.map_or("tokens".to_string(), |t| t.to_string())
            )));
        }
        Ok(HiddenStates::Runtime {
            value,
            dims: (b, s, d),
        })
    }

    /// `[batch, seq, hidden]`.
    pub fn dims(&self) -> (usize, usize, usize) {
        match self {
            HiddenStates::Runtime { dims, .. } => *dims,
            HiddenStates::Owned(a) => a.dim(),
        }
    }

    /// The values, without copying them.
    pub fn view(&self) -> ArrayView3<'_, f32> {
        match self {
            HiddenStates::Runtime { value, dims } => {
                // Both checked in `from_value`: a float32 tensor of
                // exactly `dims` elements.
                let (_, data) = value
                    .try_extract_tensor::<f32>()
                    .expect("a float32 tensor, checked when it was wrapped");
                ArrayView3::from_shape(*dims, data).expect("dims checked when it was wrapped")
            }
            HiddenStates::Owned(a) => a.view(),
        }
    }

    /// An owned array (a copy of a runtime output).
    pub fn into_array(self) -> Array3<f32> {
        match self {
            HiddenStates::Owned(a) => a,
            h => h.view().to_owned(),
        }
    }
}

/// A model whose inputs and chosen outputs are float32 tensors of any shape:
/// an image backbone's `[batch, 3, H, W]` input, or a test fixture, on the
/// device `cfg` asks for (as [`BackboneSession`]). Outputs are asked for by
/// name.
pub struct F32Session {
    session: Session,
    model: PathBuf,
    device: DeviceChoice,
}

impl std::fmt::Debug for F32Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("F32Session")
            .field("model", &self.model)
            .field("device", &self.device.device)
            .finish()
    }
}

impl F32Session {
    /// Open `model` with `cfg`'s device, threads and optimisation level.
    pub fn open(rt: &Runtime, model: &Path, cfg: &SessionConfig) -> Result<Self> {
        Self::build(rt, model, cfg, |b| b.commit_from_file(model))
    }

    /// Like [`F32Session::open`], from the model's bytes (`model` names it
    /// in messages): an image backbone whose per-layer tensors were exposed
    /// in memory ([`crate::extract::onnx::edit::expose_layers`]).
    pub fn from_bytes(
        rt: &Runtime,
        model: &Path,
        bytes: &[u8],
        cfg: &SessionConfig,
    ) -> Result<Self> {
        Self::build(rt, model, cfg, |b| b.commit_from_memory(bytes))
    }

    /// The one builder behind [`F32Session::open`] and
    /// [`F32Session::from_bytes`]: [`build_on_device`] with `commit` loading
    /// the model (`model` names it in messages).
    fn build(
        rt: &Runtime,
        model: &Path,
        cfg: &SessionConfig,
        commit: impl Fn(&mut SessionBuilder) -> ort::Result<Session>,
    ) -> Result<Self> {
        let (session, device) = build_on_device(rt, model, cfg, &commit)?;
        Ok(F32Session {
            session,
            model: model.to_owned(),
            device,
        })
    }

    /// The device the session runs on (and why `auto` fell back, if it did).
    pub fn device(&self) -> &DeviceChoice {
        &self.device
    }

    /// Run with the named `inputs`; returns the named `outputs`, each a
    /// `[batch, tokens, hidden]` tensor with `tokens` tokens, in order, where
    /// ONNX Runtime wrote them (no copy).
    pub fn run_hidden(
        &mut self,
        inputs: &[(&str, ArrayViewD<'_, f32>)],
        outputs: &[&str],
        tokens: usize,
    ) -> Result<Vec<HiddenStates>> {
        let values = Self::inputs(inputs)?;
        let mut out = self.session.run(values).map_err(ort_err("run"))?;
        take_hidden(&mut out, outputs, Some(tokens))
    }

    fn inputs<'v>(
        inputs: &'v [(&str, ArrayViewD<'_, f32>)],
    ) -> Result<Vec<(String, TensorRef<'v, f32>)>> {
        let mut values = Vec::with_capacity(inputs.len());
        for (name, view) in inputs {
            let t = TensorRef::from_array_view(view.view())
                .map_err(|e| Error::Runtime(format!("input {name}: {e}")))?;
            values.push((name.to_string(), t));
        }
        Ok(values)
    }

    /// Run with the named `inputs`; returns the named `outputs`, in order.
    pub fn run(
        &mut self,
        inputs: &[(&str, ArrayViewD<'_, f32>)],
        outputs: &[&str],
    ) -> Result<Vec<ArrayD<f32>>> {
        let values = Self::inputs(inputs)?;
        let out = self.session.run(values).map_err(ort_err("run"))?;
        Self::outputs(&out, outputs)
    }

    /// [`F32Session::run`] for a model whose inputs are int64 (token ids
    /// and masks: a model `sherl-fit export` wrote); float32 outputs.
    pub fn run_i64(
        &mut self,
        inputs: &[(&str, ArrayViewD<'_, i64>)],
        outputs: &[&str],
    ) -> Result<Vec<ArrayD<f32>>> {
        let mut values = Vec::with_capacity(inputs.len());
        for (name, view) in inputs {
            let t = TensorRef::from_array_view(view.view())
                .map_err(|e| Error::Runtime(format!("input {name}: {e}")))?;
            values.push((name.to_string(), t));
        }
        let out = self.session.run(values).map_err(ort_err("run"))?;
        Self::outputs(&out, outputs)
    }

    fn outputs(
        out: &ort::session::SessionOutputs<'_>,
        outputs: &[&str],
    ) -> Result<Vec<ArrayD<f32>>> {
        outputs
            .iter()
            .map(|&name| {
                let value = out
                    .get(name)
                    .ok_or_else(|| Error::Runtime(format!("output {name} missing from the run")))?;
                let (shape, data) = value.try_extract_tensor::<f32>().map_err(|e| {
                    Error::Runtime(format!("{name}: expected a float32 tensor: {e}"))
                })?;
                let dims: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
                ArrayD::from_shape_vec(dims, data.to_vec())
                    .map_err(|e| Error::Runtime(format!("{name}: {e}")))
            })
            .collect()
    }
}
