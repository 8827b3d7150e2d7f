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
    let lib = sherl::runtime::locate_library(None)
        .expect("asset library (run pipelines/fetch-assets.sh)");
    assert!(lib.to_string_lossy().contains("libonnxruntime.so"));
    let explicit = sherl::runtime::locate_library(Some(lib.parent().unwrap())).unwrap();
    assert_eq!(explicit, lib);
    let err = sherl::runtime::locate_library(Some(std::path::Path::new("/nonexistent/x.so")))
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
    let mut cuda = args.clone();
    cuda.extend(["--device".into(), "cuda".into()]);
    let cuda: Vec<&str> = cuda.iter().map(String::as_str).collect();
    let out = common::run("sherl-extract", &cuda, tmp.path(), &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = common::stderr(&out);
    assert!(err.contains("no CUDA execution provider"), "{err}");
    let mut auto = args.clone();
    auto.extend(["--device".into(), "auto".into()]);
    let auto: Vec<&str> = auto.iter().map(String::as_str).collect();
    let out = common::run("sherl-extract", &auto, tmp.path(), &[]);
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
