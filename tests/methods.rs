//! The method table: each method's settings are its own (a setting of
//! another method is refused from flags, settings files and grids alike),
//! a run stores them with the spec its model was built from, and predict
//! builds the model from that stored spec (or, for a run written before
//! specs were stored, from its flat settings).

use serde_json::Value;

use crate::common;
use crate::fit::{fit, fit_fixture, predict_data, summary};

fn refused(o: &std::process::Output, needle: &str) {
    let err = common::stderr(o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

#[test]
fn misplaced_settings_are_refused_from_flags_files_and_grids() {
    let f = fit_fixture(20, 41, &[]);
    let r = &f.root;
    fn with<'a>(args: &[&'a str]) -> Vec<&'a str> {
        [args, &["--epochs", "1", "--out", "refused"][..]].concat()
    }
    refused(
        &fit(r, &with(&["--method", "linear-probe", "--late-trainable"])),
        "--late-trainable applies to --method sherl only, not linear-probe",
    );
    refused(
        &fit(r, &with(&["--method", "full-ft", "--reduction", "8"])),
        "--reduction applies to --method sherl, unipt, adapter or lst only, not full-ft",
    );
    refused(
        &fit(r, &with(&["--method", "unipt", "--probe-layer", "1"])),
        "--probe-layer applies to --method linear-probe only, not unipt",
    );
    // a settings file: named as a key, with the file
    std::fs::write(r.join("lst.json"), r#"{"method": "lst", "lora_rank": 4}"#).unwrap();
    refused(
        &fit(r, &with(&["--config", "lst.json"])),
        "\"lora_rank\" applies to method lora only, not lst",
    );
    // a flag choosing another method than the file's, whose settings stay
    std::fs::write(r.join("lora.json"), r#"{"method": "lora", "lora_rank": 4}"#).unwrap();
    refused(
        &fit(r, &with(&["--config", "lora.json", "--method", "adapter"])),
        "\"lora_rank\" applies to method lora only, not adapter",
    );
    assert!(!r.join("refused").exists());
    // a grid: refused before any run starts
    std::fs::write(
        r.join("grid.json"),
        r#"{"method": ["sherl", "unipt"], "late_trainable": true, "epochs": 1}"#,
    )
    .unwrap();
    let o = common::run(
        "sherl-fit",
        &[
            "sweep",
            "--cache",
            "cache",
            "--backbone",
            "backbone",
            "--grid",
            "grid.json",
            "--out",
            "refused",
        ],
        r,
        &[],
    );
    refused(
        &o,
        "\"late_trainable\" applies to method sherl only, not unipt",
    );
    assert!(!r.join("refused").join("summary.json").exists());
}

/// The run's `config.json` stores the method's own settings (flat, beside
/// the shared ones) and the resolved spec; both read back unchanged, and
/// predict builds its model from the spec: a spec edited to another width
/// no longer fits the weights, and a run without a spec (as written
/// before) with every method's keys predicts the same labels.
#[test]
fn stored_method_settings_round_trip_and_predict_uses_them() {
    let f = fit_fixture(40, 42, &["--layers", "all"]);
    let r = &f.root;
    let s = summary(&fit(
        r,
        &[
            "--side-dim",
            "12",
            "--early-layers",
            "0,1,2",
            "--epochs",
            "1",
        ],
    ));
    let run_dir = s["run_dir"].as_str().unwrap().to_string();
    let config_path = r.join(&run_dir).join("config.json");
    let text = std::fs::read_to_string(&config_path).unwrap();
    let stored: Value = serde_json::from_str(&text).unwrap();
    let c = &stored["config"];
    assert_eq!(c["method"], "sherl");
    assert_eq!(c["side_dim"], 12);
    assert_eq!(c["early_layers"], serde_json::json!([0, 1, 2]));
    for other in ["probe_layer", "lora_rank", "lst_init"] {
        assert!(c.get(other).is_none(), "{other} in {c}");
    }
    let spec = &stored["spec"];
    assert_eq!(spec["method"], "sherl");
    assert_eq!(spec["side_dim"], 12);
    assert_eq!(spec["early_layers"], serde_json::json!([0, 1, 2]));
    assert_eq!(spec["late_layers"], 1);
    // read back and written again: the same JSON
    let rc = sherl::fit::run_dir::RunConfig::read(&r.join(&run_dir)).unwrap();
    assert_eq!(serde_json::to_value(&rc).unwrap(), stored);
    let id = rc.config.run_id(&rc.cache.settings_hash);
    assert_eq!(id, rc.run_id, "the run id is the settings' own");

    let labels = |o: std::process::Output| -> Vec<Value> {
        assert!(o.status.success(), "{}", common::stderr(&o));
        std::fs::read_to_string(r.join("pred.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["label"].clone())
            .collect()
    };
    let want = labels(predict_data(r, &run_dir));
    assert!(!want.is_empty());

    // the stored spec is what predict builds
    let mut wrong = stored.clone();
    wrong["spec"]["side_dim"] = 24.into();
    std::fs::write(&config_path, serde_json::to_string(&wrong).unwrap()).unwrap();
    let o = predict_data(r, &run_dir);
    assert_eq!(o.status.code(), Some(2), "{}", common::stderr(&o));

    // a run written before specs were stored: no spec, every method's keys
    // (and, being that old, no checksum of config.json in summary.json)
    let summary_path = r.join(&run_dir).join("summary.json");
    let mut summary: Value =
        serde_json::from_slice(&std::fs::read(&summary_path).unwrap()).unwrap();
    summary.as_object_mut().unwrap().remove("config_sha256");
    std::fs::write(&summary_path, serde_json::to_vec(&summary).unwrap()).unwrap();
    let mut old = stored.clone();
    old.as_object_mut().unwrap().remove("spec");
    let o = old["config"].as_object_mut().unwrap();
    o.insert("probe_layer".into(), Value::Null);
    std::fs::write(&config_path, serde_json::to_string(&old).unwrap()).unwrap();
    assert_eq!(labels(predict_data(r, &run_dir)), want);
    let rc = sherl::fit::run_dir::RunConfig::read(&r.join(&run_dir)).unwrap();
    assert_eq!(rc.config.run_id(&rc.cache.settings_hash), rc.run_id);
}
