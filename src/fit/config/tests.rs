use super::*;
use crate::fit::method::{AdapterSettings, LoraSettings, SherlSettings};
use crate::fit::nn::adapter::{AdapterActivation, Placement};
use crate::fit::nn::lora::LoraTarget;

fn lora(settings: LoraSettings) -> FitConfig {
    FitConfig {
        method: MethodConfig::Lora(settings),
        ..FitConfig::default()
    }
}

#[test]
fn run_id_depends_on_config_and_cache() {
    let a = FitConfig::default();
    let mut b = a.clone();
    b.seed = 1;
    assert_ne!(a.run_id("x"), b.run_id("x"));
    assert_ne!(a.run_id("x"), a.run_id("y"));
    assert_eq!(a.run_id("x"), a.clone().run_id("x"));
    assert!(a.run_id("x").starts_with("sherl-"));
}

#[test]
fn schedule_warms_up_then_decays() {
    let c = FitConfig {
        warmup: 0.1,
        ..Default::default()
    };
    assert!((c.schedule(0, 100) - 0.1).abs() < 1e-12);
    assert!((c.schedule(9, 100) - 1.0).abs() < 1e-12);
    assert!((c.schedule(10, 100) - 1.0).abs() < 1e-12);
    assert!(c.schedule(99, 100) < 0.02);
    assert!(c.schedule(55, 100) < c.schedule(20, 100));
}

/// The flat JSON every config held before each method's settings were its
/// own, for a default run of `method` (what the run ids were hashed over).
fn old_json(method: &str) -> Value {
    serde_json::json!({
        "method": method, "late_layers": 1, "late_trainable": false, "reduction": 4,
        "side_dim": null, "early_layers": null, "probe_layer": null, "pool": "mean",
        "epochs": 5, "lr": 0.001, "lr_pretrained": 5e-5, "weight_decay": 0.01,
        "warmup": 0.06, "batch_size": 32, "max_tokens_per_batch": 8192, "grad_clip": 1.0,
        "seed": 0, "dropout": 0.1f32, "shuffle_chunks": 8, "train_examples": null
    })
}

fn old_id(method: &str, config: Value) -> String {
    let canon = serde_json::json!({ "config": config, "cache": "x" });
    let hex = crate::hash::hex(&Sha256::digest(canon.to_string().as_bytes()));
    format!("{method}-{}", crate::hash::abbrev(&hex))
}

/// Every method's default run, and runs with settings of their own, keep
/// the ids they had when every config held every method's keys.
#[test]
fn run_ids_are_those_of_the_flat_configs() {
    for &m in Method::all() {
        let c = FitConfig {
            method: m.defaults(),
            ..FitConfig::default()
        };
        let mut old = old_json(m.name());
        if m == Method::Lora {
            old["lora_dropout"] = serde_json::json!(0.0);
        }
        assert_eq!(c.run_id("x"), old_id(m.name(), old), "{m:?}");
    }
    let c: FitConfig = serde_json::from_value(serde_json::json!({
        "method": "lora", "lora_rank": 4, "lora_targets": "q,v,o", "seed": 3
    }))
    .unwrap();
    let mut old = old_json("lora");
    old["lora_rank"] = serde_json::json!(4);
    old["lora_targets"] = serde_json::json!(["q", "v", "o"]);
    old["lora_dropout"] = serde_json::json!(0.0);
    old["seed"] = serde_json::json!(3);
    assert_eq!(c.run_id("x"), old_id("lora", old));
    let c: FitConfig = serde_json::from_value(serde_json::json!({
        "method": "sherl", "late_trainable": true, "side_dim": 32, "early_layers": [0, 5],
        "dropout": 0.0
    }))
    .unwrap();
    let mut old = old_json("sherl");
    old["late_trainable"] = true.into();
    old["side_dim"] = 32.into();
    old["early_layers"] = serde_json::json!([0, 5]);
    old["dropout"] = serde_json::json!(0.0f32);
    assert_eq!(c.run_id("x"), old_id("sherl", old));
}

/// The LoRA and adapter settings are left out of the JSON while unset;
/// `lora_targets` reads a list or one comma-separated string (a sweep
/// grid's axis value), sorted and without repeats in the spec; a bad name
/// is refused, naming it.
#[test]
fn peft_settings_keep_run_ids_and_parse_targets() {
    let json = serde_json::to_value(lora(LoraSettings::default())).unwrap();
    for k in ["lora_rank", "lora_alpha", "lora_dropout", "lora_targets"] {
        assert!(json.get(k).is_none(), "{k}");
    }
    let json = serde_json::to_value(FitConfig {
        method: MethodConfig::Adapter(AdapterSettings::default()),
        ..FitConfig::default()
    })
    .unwrap();
    for k in ["adapter_placement", "adapter_activation"] {
        assert!(json.get(k).is_none(), "{k}");
    }
    let spec = LoraSettings::default().spec();
    assert_eq!((spec.rank, spec.alpha, spec.dropout), (8, 16.0, 0.0));
    // a default LoRA run's id is not the one the 0.1 default gave
    let default_lora = lora(LoraSettings::default());
    let old = serde_json::json!({ "config": default_lora.legacy_json(), "cache": "x" });
    let old_hex = crate::hash::hex(&Sha256::digest(old.to_string().as_bytes()));
    let old = crate::hash::abbrev(&old_hex);
    assert_ne!(default_lora.run_id("x"), format!("lora-{old}"));
    assert_eq!(
        default_lora.run_id("x"),
        lora(LoraSettings {
            lora_dropout: Some(0.0),
            ..Default::default()
        })
        .run_id("x")
    );
    assert_eq!(spec.targets, vec![LoraTarget::Q, LoraTarget::V]);
    let a: FitConfig =
        serde_json::from_str(r#"{"method": "lora", "lora_targets": "v,q,ffn-in,q"}"#).unwrap();
    let b: FitConfig =
        serde_json::from_str(r#"{"method": "lora", "lora_targets": ["ffn-in", "v", "q"]}"#)
            .unwrap();
    let targets = |c: &FitConfig| match &c.method {
        MethodConfig::Lora(l) => l.spec(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        targets(&a).targets,
        vec![LoraTarget::Q, LoraTarget::V, LoraTarget::FfnIn]
    );
    assert_eq!(targets(&a), targets(&b));
    let e = serde_json::from_str::<FitConfig>(r#"{"method": "lora", "lora_targets": "q,query"}"#)
        .unwrap_err();
    assert!(e.to_string().contains("\"query\""), "{e}");
    // set, they are recorded and change the id
    let c = lora(LoraSettings {
        lora_rank: Some(4),
        ..Default::default()
    });
    assert_ne!(c.run_id("x"), default_lora.run_id("x"));
    let back: FitConfig = serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
    assert_eq!(back, c);
    let MethodConfig::Adapter(a) = Method::Adapter.defaults() else {
        unreachable!()
    };
    assert_eq!(
        a.adapter_placement.unwrap_or(Placement::Houlsby),
        Placement::Houlsby
    );
    assert_eq!(
        a.adapter_activation.unwrap_or(AdapterActivation::Gelu),
        AdapterActivation::Gelu
    );
}

#[test]
fn unknown_fields_are_rejected() {
    let e = serde_json::from_str::<FitConfig>(r#"{"lr": 0.1, "learning_rate": 2}"#).unwrap_err();
    assert!(e.to_string().contains("learning_rate"));
    let c: FitConfig = serde_json::from_str(r#"{"lr": 0.1, "method": "linear-probe"}"#).unwrap();
    assert_eq!(c.kind(), Method::LinearProbe);
    assert_eq!(c.epochs, 5);
}

/// A setting of another method is refused, naming the setting and the
/// method(s) it belongs to; from flags, named as flags. The keys every old
/// config held are read at their old defaults from a file, and dropped,
/// whatever their value, from a stored run's config.
#[test]
fn misplaced_settings_are_refused() {
    let e = serde_json::from_str::<FitConfig>(r#"{"method": "sherl", "lora_rank": 4}"#)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("\"lora_rank\" applies to method lora only, not sherl"),
        "{e}"
    );
    let e = serde_json::from_str::<FitConfig>(r#"{"method": "linear-probe", "reduction": 8}"#)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(
            "\"reduction\" applies to method sherl, unipt, adapter or lst only, not linear-probe"
        ),
        "{e}"
    );
    let flags = given_flags(&serde_json::json!({"lora_rank": 4, "method": "adapter"})).unwrap();
    let e = FitConfig::resolve(None, &flags).unwrap_err().to_string();
    assert!(
        e.contains("--lora-rank applies to --method lora only, not adapter"),
        "{e}"
    );
    // an old run's settings: every method's keys, at their defaults
    let old = old_json("lora");
    let c: FitConfig = serde_json::from_value(old.clone()).unwrap();
    assert_eq!(c, lora(LoraSettings::default()));
    let mut odd = old;
    odd["late_layers"] = 2.into();
    assert!(serde_json::from_value::<FitConfig>(odd.clone()).is_err());
    assert_eq!(
        FitConfig::from_stored(odd).unwrap(),
        lora(LoraSettings::default())
    );
    // a retrieval tower takes the settings its method shares
    let c: FitConfig =
        serde_json::from_value(serde_json::json!({"reduction": 8, "late_layers": 2})).unwrap();
    let MethodConfig::Unipt(w) = c.for_method(Method::Unipt).method else {
        unreachable!()
    };
    assert_eq!(w.reduction, 8);
    assert_eq!(
        c.for_method(Method::Sherl).method,
        MethodConfig::Sherl(SherlSettings {
            reduction: 8,
            late_layers: 2,
            ..Default::default()
        })
    );
}
