//! ONNX Runtime loading and sessions: the library lookup order, clear errors
//! (never a panic or a hang) when it is missing, and device selection.

use crate::common;

fn minilm_sample_args(dir: &str) -> Vec<String> {
    [
        "sample",
        "--backbone",
        dir,
        "--data",
        "data.csv",
        "--limit",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn write_csv(dir: &std::path::Path) {
    std::fs::write(
        dir.join("data.csv"),
        "text,label\nfine film,pos\nawful,neg\n",
    )
    .unwrap();
}

/// No library anywhere: exit 2 with a message saying how to get it.
#[test]
fn missing_library_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    write_csv(tmp.path());
    let backbone = common::minilm_dir();
    let args = minilm_sample_args(backbone.to_str().unwrap());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let empty_assets = tmp.path().join("no-assets");
    // nothing in the asset dir, no env var
    let out = common::run(
        "sherl-extract",
        &args,
        tmp.path(),
        &[
            ("SHERL_ASSETS", empty_assets.to_str().unwrap()),
            ("ORT_DYLIB_PATH", ""),
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", common::stderr(&out));
    let err = common::stderr(&out);
    assert!(
        err.contains("ONNX Runtime library not found") && err.contains("fetch-assets.sh"),
        "{err}"
    );
    // env var pointing nowhere
    let out = common::run(
        "sherl-extract",
        &args,
        tmp.path(),
        &[
            ("SHERL_ASSETS", empty_assets.to_str().unwrap()),
            ("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so"),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        common::stderr(&out).contains("ORT_DYLIB_PATH=/nonexistent"),
        "{}",
        common::stderr(&out)
    );
    // --ort-lib wins over the env var, and a file that is not a library is an error, not a crash
    std::fs::write(tmp.path().join("fake.so"), b"not a library").unwrap();
    let mut a = args.clone();
    a.extend(["--ort-lib", "fake.so"]);
    let out = common::run(
        "sherl-extract",
        &a,
        tmp.path(),
        &[("ORT_DYLIB_PATH", "/nonexistent")],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = common::stderr(&out);
    assert!(
        err.contains("cannot load") && err.contains("fake.so"),
        "{err}"
    );
}

/// The library is found through ORT_DYLIB_PATH and through the asset dir.
#[test]
fn library_lookup_order() {
    let lib = sherl::extract::runtime::locate_library(None)
        .expect("asset library (run pipelines/fetch-assets.sh)");
    assert!(lib.to_string_lossy().contains("libonnxruntime.so"));
    let explicit = sherl::extract::runtime::locate_library(Some(lib.parent().unwrap())).unwrap();
    assert_eq!(explicit, lib);
    let err =
        sherl::extract::runtime::locate_library(Some(std::path::Path::new("/nonexistent/x.so")))
            .unwrap_err()
            .to_string();
    assert!(err.contains("--ort-lib /nonexistent/x.so"), "{err}");
}

/// `--device cuda` on a CPU-only library is an error naming the cause;
/// `auto` falls back to CPU with one line saying why.
#[test]
fn cuda_on_cpu_only_library() {
    let tmp = tempfile::tempdir().unwrap();
    write_csv(tmp.path());
    let rt = common::runtime();
    if rt.has_cuda() {
        // A GPU build of ONNX Runtime is installed: the CPU-only behaviour
        // cannot be observed with it. The asset script fetches the CPU build.
        panic!("test expects the CPU-only onnxruntime from pipelines/fetch-assets.sh");
    }
    let backbone = common::minilm_dir();
    let onnx = crate::export::minilm_onnx_path();
    let mut args = minilm_sample_args(backbone.to_str().unwrap());
    args.extend([
        "--model".into(),
        onnx.to_string_lossy().into_owned(),
        "--no-labels".into(),
    ]);
    // The CPU build named explicitly: the asset folder may also hold the
    // CUDA build (`fetch-assets.sh ort-gpu`), which `cuda` would pick.
    let cpu_lib = rt.library().to_str().unwrap().to_owned();
    let env = [("ORT_DYLIB_PATH", cpu_lib.as_str())];
    let mut cuda = args.clone();
    cuda.extend(["--device".into(), "cuda".into()]);
    let cuda: Vec<&str> = cuda.iter().map(String::as_str).collect();
    let out = common::run("sherl-extract", &cuda, tmp.path(), &env);
    assert_eq!(out.status.code(), Some(2));
    let err = common::stderr(&out);
    assert!(err.contains("no CUDA execution provider"), "{err}");
    let mut auto = args.clone();
    auto.extend(["--device".into(), "auto".into()]);
    let auto: Vec<&str> = auto.iter().map(String::as_str).collect();
    let out = common::run("sherl-extract", &auto, tmp.path(), &env);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(
        common::stderr(&out).contains("running on CPU"),
        "{}",
        common::stderr(&out)
    );
    let summary: serde_json::Value = serde_json::from_str(common::stdout(&out).trim()).unwrap();
    assert_eq!(summary["device"], "cpu");
    assert_eq!(summary["sampled"], 2);
}

/// ONNX Runtime's CUDA build (`fetch-assets.sh ort-gpu`) on a machine with
/// no GPU and no CUDA libraries, the situation of a user who fetched it
/// before moving to the GPU machine: `--device cuda` exits 2 naming the
/// libraries the loader cannot find and how to provide them; `auto` says
/// why in one line and runs on the CUDA build's CPU provider, with the same
/// features as the CPU build (1e-4).
#[test]
fn cuda_build_without_cuda_libraries() {
    assert!(
        !sherl::extract::runtime::nvidia_gpu_present(),
        "this test checks the no-GPU path; run it on a machine without an NVIDIA GPU"
    );
    let gpu_lib = common::asset("onnxruntime-gpu/1.31.1/libonnxruntime.so.1.31.1");
    let tmp = tempfile::tempdir().unwrap();
    write_csv(tmp.path());
    let backbone = common::minilm_dir();
    let onnx = crate::export::minilm_onnx_path();
    let mut args = minilm_sample_args(backbone.to_str().unwrap());
    args.extend([
        "--model".into(),
        onnx.to_string_lossy().into_owned(),
        "--no-labels".into(),
    ]);
    let run = |device: &str, lib: &str| {
        let mut a = args.clone();
        a.extend(["--device".into(), device.into()]);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        common::run(
            "sherl-extract",
            &a,
            tmp.path(),
            &[("ORT_DYLIB_PATH", lib), ("LD_LIBRARY_PATH", "")],
        )
    };
    let gpu = gpu_lib.to_str().unwrap();
    let out = run("cuda", gpu);
    assert_eq!(out.status.code(), Some(2), "{}", common::stderr(&out));
    let err = common::stderr(&out);
    assert!(
        err.contains("CUDA execution provider failed to start"),
        "{err}"
    );
    assert!(
        err.contains("Not on the loader path: libcuda.so.1"),
        "{err}"
    );
    assert!(err.contains("libcublas.so.13"), "{err}");
    assert!(err.contains("LD_LIBRARY_PATH"), "{err}");
    assert!(err.contains("cuda-env.sh"), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{err}"
    );

    let out = run("auto", gpu);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let err = common::stderr(&out);
    let line: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("running on CPU"))
        .collect();
    assert_eq!(line.len(), 1, "{err}");
    assert!(line[0].contains("libcublas.so.13"), "{err}");
    let on_gpu_build: serde_json::Value =
        serde_json::from_str(common::stdout(&out).lines().last().unwrap()).unwrap();
    assert_eq!(on_gpu_build["device"], "cpu");
    let cpu_lib = common::runtime().library().to_str().unwrap().to_owned();
    let out = run("cpu", &cpu_lib);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let on_cpu_build: serde_json::Value =
        serde_json::from_str(common::stdout(&out).lines().last().unwrap()).unwrap();
    let layers = |v: &serde_json::Value| -> Vec<f64> {
        v["layers"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|l| {
                let mut x = vec![l["mean"].as_f64().unwrap(), l["std"].as_f64().unwrap()];
                x.extend(
                    l["first_cls_head"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|f| f.as_f64().unwrap()),
                );
                x
            })
            .collect()
    };
    let (a, b) = (layers(&on_gpu_build), layers(&on_cpu_build));
    assert_eq!(a.len(), b.len());
    assert!(!a.is_empty());
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() <= 1e-4,
            "CUDA build's CPU provider {x} vs CPU build {y}"
        );
    }
}
