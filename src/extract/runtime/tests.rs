//! Unit tests of `src/extract/runtime/` (kept apart so the module stays readable).

use super::library::{newest_library_in, FETCHED_LIBRARIES};
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

/// The checksums the fetched libraries are checked against are those
/// `pipelines/fetch-assets.sh` fetches them with.
#[test]
fn fetched_library_checksums_match_the_fetch_script() {
    let script = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/fetch-assets.sh"),
    )
    .unwrap();
    for (rel, sha, arg) in FETCHED_LIBRARIES {
        let name = rel.rsplit('/').next().unwrap();
        let dir = rel.rsplit_once('/').unwrap().0;
        assert!(script.contains(sha), "{rel}: {sha} not in fetch-assets.sh");
        assert!(script.contains(name) && script.contains(&format!("$ASSETS/{dir}\"")));
        assert!(
            script.contains(&format!("{arg})")) || script.contains(&format!("|{arg}|")),
            "fetch-assets.sh has no `{arg}` target"
        );
    }
}

/// A truncated ELF file is told from a complete one by its headers alone;
/// a file of another format is left to the loader.
#[test]
fn truncated_elf_files_are_told_from_complete_ones() {
    let t = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    assert_eq!(super::elf::truncation(&exe).unwrap(), None);
    let bytes = std::fs::read(&exe).unwrap();
    for len in [10, 64, 1000, bytes.len() / 2, bytes.len() - 1] {
        let p = t.path().join(format!("cut{len}"));
        std::fs::write(&p, &bytes[..len]).unwrap();
        let why = super::elf::truncation(&p).unwrap();
        assert!(why.is_some(), "{len} bytes passed");
    }
    let p = t.path().join("text");
    std::fs::write(&p, b"not a library").unwrap();
    assert_eq!(super::elf::truncation(&p).unwrap(), None);
    assert!(super::elf::truncation(t.path()).is_err());
}
