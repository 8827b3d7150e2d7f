//! Unit tests of `src/extract/runtime/` (kept apart so the module stays readable).

use super::library::newest_library_in;
use super::*;

#[test]
fn device_parsing() {
    assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
    assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda(0)));
    assert_eq!("cuda:3".parse::<Device>(), Ok(Device::Cuda(3)));
    assert_eq!("auto".parse::<Device>(), Ok(Device::Auto));
    assert!("gpu".parse::<Device>().unwrap_err().contains("expected"));
    assert!("cuda:-1".parse::<Device>().is_err());
}

#[test]
fn the_cuda_build_is_tried_first_only_where_a_gpu_may_be_used() {
    let gpu_first = ["onnxruntime-gpu", "onnxruntime"];
    let cpu_first = ["onnxruntime", "onnxruntime-gpu"];
    assert_eq!(asset_library_dirs(Device::Cuda(1), false), gpu_first);
    assert_eq!(asset_library_dirs(Device::Cuda(0), true), gpu_first);
    assert_eq!(asset_library_dirs(Device::Auto, true), gpu_first);
    assert_eq!(asset_library_dirs(Device::Auto, false), cpu_first);
    assert_eq!(asset_library_dirs(Device::Cpu, true), cpu_first);
}

#[test]
fn the_newest_version_folder_with_a_library_wins() {
    let t = std::env::temp_dir().join(format!("sherl-rt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&t);
    for (v, lib) in [
        ("1.9.0", Some("libonnxruntime.so.1.9.0")),
        ("1.31.1", Some("libonnxruntime.so.1.31.1")),
        ("1.40.0", None),
    ] {
        let d = t.join(v);
        std::fs::create_dir_all(&d).unwrap();
        if let Some(l) = lib {
            std::fs::write(d.join(l), b"").unwrap();
        }
    }
    // 1.31.1 > 1.9.0 numerically; the empty 1.40.0 is passed over.
    assert_eq!(
        newest_library_in(&t),
        Some(t.join("1.31.1").join("libonnxruntime.so.1.31.1"))
    );
    assert_eq!(newest_library_in(&t.join("absent")), None);
    std::fs::remove_dir_all(&t).unwrap();
}

#[test]
fn missing_cuda_libraries_are_named() {
    let t = std::env::temp_dir().join(format!("sherl-cudalibs-{}", std::process::id()));
    std::fs::create_dir_all(&t).unwrap();
    std::fs::write(t.join("libsherl-test-present.so.7"), b"").unwrap();
    let missing = missing_cuda_libraries(
        &["libsherl-test-present.so.7", "libsherl-test-absent.so.7"],
        std::slice::from_ref(&t),
    );
    assert_eq!(missing, vec!["libsherl-test-absent.so.7"]);
    std::fs::remove_dir_all(&t).unwrap();
}
